"""Spec: `prefix-based-pd-decider` approves disaggregation when the chosen decode pod's uncached prompt tokens
(prompt tokens − the cached prefix the prefix producers estimate) reach `nonCachedTokens`."""

from __future__ import annotations

import logging

import pytest

from epp.config import ConfigError, load_config
from epp.datastore.endpoint import Endpoint
from epp.datastore.pool import Pool
from epp.request import LLMRequest
from epp.scheduling import registry
from epp.scheduling.registry import PluginHandle
from epp.scheduling.types import CycleState, ProfileResult, SchedulingResult
from plugins.pd import PDDecider
from plugins.pd.prefix_pd_decider import PrefixBasedPDDecider, prompt_and_cached_tokens
from plugins.prefix import APPROX_PRODUCER_TYPE, PrefixMatchInfo
from plugins.prefix.hashing import USER_INPUT_KEY
from plugins.prefix.precise.producer import PreciseMatchInfo

TYPE = "prefix-based-pd-decider"
BLOCK_CHARS = 16 * 4  # the approximate producer's default block: 16 tokens of 4 characters


def completion(prompt: str, request_id: str = "r") -> LLMRequest:
    body = {"model": "m", "prompt": prompt}
    return LLMRequest(request_id, "completions", "m", "m", body, {}, len(prompt), prompt=prompt)


def text(n_chars: int, seed: str) -> str:
    return (seed * (n_chars // len(seed) + 1))[:n_chars]


class SmallPool:
    """A real approximate producer over a pool of two endpoints, and a decider reading it."""

    def __init__(self, producer_params: dict | None = None, **decider_params) -> None:
        registry.load_builtin_plugins()
        self.pool = Pool()
        self.a, self.b = Endpoint("a", "127.0.0.2", 8000), Endpoint("b", "127.0.0.3", 8000)
        self.pool.replace([self.a, self.b])
        self.pool.synced = True
        handle = PluginHandle(self.pool)
        self.producer = registry.create(APPROX_PRODUCER_TYPE, APPROX_PRODUCER_TYPE, producer_params, handle)
        handle.plugins[APPROX_PRODUCER_TYPE] = self.producer
        self.decider = registry.create(TYPE, TYPE, decider_params, handle)
        self.decider.bind(handle)

    def learn(self, prompt: str, endpoint: Endpoint) -> None:
        request = completion(prompt)
        self.producer.prepare(request, self.pool.endpoints)
        self.producer.pre_request(request, SchedulingResult({"decode": ProfileResult((endpoint,))}, "decode"))

    def approves(self, prompt: str, endpoint: Endpoint) -> bool:
        request = completion(prompt)
        self.producer.prepare(request, self.pool.endpoints)
        return self.decider.disaggregate(CycleState(), request, endpoint)


def test_is_a_registered_decider(make_plugin):
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is PrefixBasedPDDecider
    assert isinstance(make_plugin(TYPE, {"nonCachedTokens": 10}), PDDecider)


SHARED = text(2048, "system prompt: be brief. ")  # 32 blocks = 512 estimated tokens

# (nonCachedTokens, promptTokens, what endpoint a learned, prompt sent) -> approved
# Prompts are character blocks of 64 = 16 estimated tokens; a holds SHARED + tail 'x' after learning.
THRESHOLDS = [
    pytest.param(512, 0, None, SHARED + text(2048, "q1 "), True, id="cold-1024-tokens-reach-512"),
    pytest.param(1025, 0, None, SHARED + text(2048, "q1 "), False, id="cold-1024-tokens-below-1025"),
    pytest.param(1024, 0, None, SHARED + text(2048, "q1 "), True, id="threshold-is-inclusive"),
    pytest.param(512, 0, "a", SHARED + text(2048, "q1 "), False, id="fully-cached-on-a"),
    pytest.param(512, 0, "a", SHARED + text(2048, "q2 "), True, id="shared-prefix-cached-512-uncached"),
    pytest.param(513, 0, "a", SHARED + text(2048, "q2 "), False, id="shared-prefix-cached-512-below-513"),
    pytest.param(16, 0, "a", SHARED + text(2048, "q1 ") + "tail", False, id="partial-block-tail-is-1-token"),
    pytest.param(1, 0, "a", SHARED + text(2048, "q1 ") + "tail", True, id="partial-block-tail-reaches-1"),
    pytest.param(64, 2000, None, SHARED + text(2048, "q1 "), False, id="prompt-shorter-than-promptTokens"),
    pytest.param(64, 1024, None, SHARED + text(2048, "q1 "), True, id="prompt-reaches-promptTokens"),
    pytest.param(0, 0, None, SHARED + text(2048, "q1 "), False, id="zero-turns-it-off"),
]


@pytest.mark.parametrize("non_cached, prompt_tokens, learned, prompt, approved", THRESHOLDS)
def test_threshold_on_the_uncached_prompt_tokens_of_the_chosen_pod(non_cached, prompt_tokens, learned, prompt,
                                                                   approved):
    small = SmallPool(nonCachedTokens=non_cached, promptTokens=prompt_tokens)
    if learned:
        small.learn(SHARED + text(2048, "q1 "), getattr(small, learned))
    assert small.approves(prompt, small.a) is approved


def test_the_decision_is_about_the_pod_the_decode_profile_chose():
    small = SmallPool(nonCachedTokens=512)
    prompt = SHARED + text(2048, "q1 ")
    small.learn(prompt, small.a)
    assert small.approves(prompt, small.a) is False
    assert small.approves(prompt, small.b) is True


def test_prompts_longer_than_the_match_cap_count_their_unhashed_tail_as_uncached():
    # maxPrefixBlocksToMatch 4 (256 characters) is hashed and cached on a; the other 1,000 tokens are not
    small = SmallPool({"maxPrefixBlocksToMatch": 4}, nonCachedTokens=1000)
    prompt = text(256, "abcd") + text(4000, "efgh")
    small.learn(prompt, small.a)
    assert small.approves(prompt, small.a) is True
    assert small.approves(text(256, "abcd"), small.a) is False


def test_a_pod_without_the_producers_attribute_is_never_disaggregated():
    small = SmallPool(nonCachedTokens=1)
    stranger = Endpoint("c", "127.0.0.4", 8000)
    request = completion(SHARED)
    small.producer.prepare(request, small.pool.endpoints)
    assert small.decider.disaggregate(CycleState(), request, stranger) is False


@pytest.mark.parametrize(
    "info, user_input, expected",
    [
        pytest.param(PrefixMatchInfo(3, 10, 16), b"x" * 800, (200, 48), id="approx-prompt-from-characters"),
        pytest.param(PrefixMatchInfo(3, 10, 16), None, (160, 48), id="approx-without-user-input-uses-blocks"),
        pytest.param(PrefixMatchInfo(4, 4, 16), b"x" * 20000, (5000, 64), id="approx-beyond-the-match-cap"),
        pytest.param(PrefixMatchInfo(0, 0, 16), b"x" * 40, (10, 0), id="approx-shorter-than-a-block"),
        pytest.param(PreciseMatchInfo(2.4, 10, 16, 3), b"x" * 8000, (160, 48), id="precise-counts-real-blocks"),
        pytest.param(PreciseMatchInfo(0, 0, 16, 0), None, (0, 0), id="precise-shorter-than-a-block"),
    ],
)
def test_prompt_and_cached_tokens_reuse_what_the_producers_computed(info, user_input, expected):
    request = completion("unused")
    if user_input is not None:
        request.scratch[USER_INPUT_KEY] = user_input
    assert prompt_and_cached_tokens(info, request) == expected


@pytest.mark.parametrize("non_cached, approved", [(81, False), (80, True)])
def test_precise_cpu_tier_blocks_count_as_cached_not_by_their_weight(make_plugin, non_cached, approved):
    # 10 blocks of 16 tokens, 5 held (weighted 4.0 as some are only in the CPU tier): 80 tokens uncached
    decider = make_plugin(TYPE, {"nonCachedTokens": non_cached, "prefixMatchInfoProducerName": "precise"})
    ep = Endpoint("p", "127.0.0.9", 8000)
    ep.attributes["precise"] = PreciseMatchInfo(4.0, 10, 16, 5)
    assert decider.disaggregate(CycleState(), completion("x"), ep) is approved


def test_zero_non_cached_tokens_warns_that_it_never_approves(make_plugin, caplog):
    with caplog.at_level(logging.WARNING):
        make_plugin(TYPE)
    assert "nonCachedTokens is 0, so it never approves" in caplog.text


@pytest.mark.parametrize(
    "params, message",
    [
        ({"nonCachedTokens": -1}, "nonCachedTokens must be >= 0"),
        ({"promptTokens": -5}, "promptTokens must be >= 0"),
        ({"threshold": 10}, "unknown parameter 'threshold'; allowed: nonCachedTokens, "
                            "prefixMatchInfoProducerName, promptTokens"),
    ],
)
def test_bad_parameters_are_refused_saying_what_is_allowed(make_plugin, params, message):
    with pytest.raises(ConfigError, match=message):
        make_plugin(TYPE, params)


CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefix-based-pd-decider
  parameters: %s
"""


def test_it_auto_creates_the_approximate_producer_it_reads():
    config = load_config(CONFIG % "{nonCachedTokens: 64}", "t", PluginHandle())
    assert type(config.plugins[APPROX_PRODUCER_TYPE]).type == APPROX_PRODUCER_TYPE
    assert config.plugins[TYPE].attribute == APPROX_PRODUCER_TYPE


def test_a_named_producer_must_exist_and_produce_prefix_match_info():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG % "{nonCachedTokens: 64, prefixMatchInfoProducerName: queue-scorer}", "t", PluginHandle())
    message = str(info.value)
    assert "the plugin named 'queue-scorer' does not produce PrefixCacheMatchInfo" in message
    assert "set it to the name of a PrefixCacheMatchInfo producer" in message
