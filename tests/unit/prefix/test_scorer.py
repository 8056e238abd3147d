"""Specification of `prefix-cache-scorer`, alone and end to end with the approximate producer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datastore.endpoint import Endpoint
from epp.scheduling.interfaces import Scorer
from epp.scheduling.registry import ConfigError, PluginHandle, param_key
from epp.scheduling.scheduler import clamped_scores
from epp.scheduling.types import CycleState
from plugins.prefix import PrefixMatchInfo
from plugins.prefix.approx_producer import ApproxPrefixParams
from plugins.prefix.scorer import PrefixCacheScorer

from .helpers import chat, completion, make_pool, producer, routed_to, scorer, text

PRODUCER = "approx-prefix-cache-producer"


def _endpoint(info: object | None = None, key: str = PRODUCER) -> Endpoint:
    ep = Endpoint("pod", "127.0.0.2", 8000)
    if info is not None:
        ep.attributes[key] = info
    return ep


def _score(s, ep: Endpoint) -> float:
    return s.score(CycleState(), completion("x"), [ep])[ep]


# ---------------------------------------------------------------------------------------------------------
# Declaration and parameters


def test_it_is_a_scorer_that_requires_the_approximate_producer():
    s = scorer()
    assert isinstance(s, PrefixCacheScorer) and isinstance(s, Scorer)
    assert s.type == "prefix-cache-scorer"
    assert PrefixCacheScorer.requires == (PRODUCER,)
    assert s.consumes == frozenset({"PrefixCacheMatchInfo"})


def test_it_accepts_every_producer_parameter_so_the_loader_can_pass_them_on():
    producer_keys = {param_key(f) for f in ApproxPrefixParams.__dataclass_fields__.values()}
    assert producer_keys == {"autoTune", "blockSizeTokens", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch",
                             "lruCapacityPerServer", "blockSize"}
    params = {"autoTune": False, "blockSizeTokens": 8, "maxPrefixBlocksToMatch": 4, "maxPrefixTokensToMatch": 0,
              "lruCapacityPerServer": 10, "blockSize": 64}
    s = scorer({**params, "matchLengthWeight": 0.5, "matchLengthScaleTokens": 100,
                "prefixMatchInfoProducerName": "mine"})
    assert (s.params.block_size_tokens, s.params.match_length_weight, s.params.match_length_scale_tokens,
            s.attribute) == (8, 0.5, 100, "mine")
    # What the loader does: the producer gets the scorer's parameters restricted to its own keys.
    pool = make_pool(1)
    p = producer(pool, {k: v for k, v in params.items() if k in producer_keys})
    assert p.params.block_size_tokens == 8 and p.params.lru_capacity_per_server == 10


@pytest.mark.parametrize(
    "params, message",
    [
        ({"matchLengthWeight": 1.5}, "matchLengthWeight must be in"),
        ({"matchLengthWeight": -0.1}, "matchLengthWeight must be in"),
        ({"matchLengthScaleTokens": 0}, "matchLengthScaleTokens must be > 0"),
        ({"blockSizeTokens": 0}, "blockSizeTokens must be > 0"),
        ({"mode": "estimate"}, "unknown parameter 'mode'"),
    ],
)
def test_bad_parameters_are_refused_with_the_key_named(params, message):
    with pytest.raises(ConfigError, match=message):
        scorer(params)


@pytest.mark.parametrize("name, expected", [(None, PRODUCER), ("", PRODUCER), ("precise", "precise")])
def test_it_reads_the_attribute_of_the_configured_producer_defaulting_to_the_approximate_one(name, expected):
    s = scorer({} if name is None else {"prefixMatchInfoProducerName": name})
    assert s.attribute == expected
    assert _score(s, _endpoint(PrefixMatchInfo(1, 2, 16), key=expected)) == 0.5
    assert _score(s, _endpoint(PrefixMatchInfo(1, 2, 16), key="someone-else")) == 0.0


# ---------------------------------------------------------------------------------------------------------
# The formula


@pytest.mark.parametrize(
    "info, weight, scale, expected",
    [
        (PrefixMatchInfo(0, 10, 16), 0.0, 8192, 0.0),
        (PrefixMatchInfo(5, 10, 16), 0.0, 8192, 0.5),
        (PrefixMatchInfo(10, 10, 16), 0.0, 8192, 1.0),
        (PrefixMatchInfo(3, 0, 16), 0.0, 8192, 0.0),  # no blocks: 0, not a division by zero
        (PrefixMatchInfo(0, 0, 16), 0.5, 8192, 0.0),
        # w·min(1, matched_tokens/scale)² + (1−w)·ratio
        (PrefixMatchInfo(5, 10, 16), 1.0, 160, (80 / 160) ** 2),
        (PrefixMatchInfo(5, 10, 16), 0.5, 160, 0.5 * 0.25 + 0.5 * 0.5),
        (PrefixMatchInfo(20, 40, 16), 0.5, 160, 0.5 * 1.0 + 0.5 * 0.5),  # the length term saturates at 1
        (PrefixMatchInfo(256, 256, 16), 0.3, 8192, 0.3 * (4096 / 8192) ** 2 + 0.7),
    ],
)
def test_score_mixes_matched_length_and_matched_ratio(info, weight, scale, expected):
    s = scorer({"matchLengthWeight": weight, "matchLengthScaleTokens": scale})
    assert _score(s, _endpoint(info)) == pytest.approx(expected)


def test_an_endpoint_without_the_attribute_scores_zero():
    assert _score(scorer(), _endpoint(None)) == 0.0


def test_every_endpoint_gets_a_score():
    eps = [_endpoint(PrefixMatchInfo(i, 4, 16)) for i in range(5)]
    eps.append(_endpoint(None))
    scores = scorer().score(CycleState(), completion("x"), eps)
    assert [scores[ep] for ep in eps] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# End to end: producer + scorer over a sequence of requests


class _Router:
    """prepare -> score -> route to the best (first on ties) -> pre_request, as the Director does."""

    def __init__(self, n_endpoints: int = 4, scorer_params: dict | None = None) -> None:
        self.pool = make_pool(n_endpoints)
        self.scorer = scorer(scorer_params)
        # As the config loader: the producer gets the scorer's parameters that are its own.
        own = {param_key(f) for f in ApproxPrefixParams.__dataclass_fields__.values()}
        self.producer = producer(self.pool, {k: v for k, v in (scorer_params or {}).items() if k in own})

    def scores(self, req) -> dict[str, float]:
        self.producer.prepare(req, self.pool.endpoints)
        scores = self.scorer.score(CycleState(), req, list(self.pool.endpoints))
        return {ep.name: round(s, 3) for ep, s in scores.items()}

    def route(self, req, to: int | None = None) -> tuple[str, dict[str, float]]:
        scores = self.scores(req)
        target = self.pool.endpoints[to] if to is not None else max(
            self.pool.endpoints, key=lambda ep: scores[ep.name])
        self.producer.pre_request(req, routed_to(target))
        return target.name, scores


def test_a_repeated_prefix_scores_one_on_the_endpoint_that_served_it_and_zero_elsewhere():
    router = _Router()
    system = {"role": "system", "content": text(40)}
    first, scores = router.route(chat([system, {"role": "user", "content": "q1"}]), to=2)
    assert set(scores.values()) == {0.0}
    again = router.scores(chat([system, {"role": "user", "content": "q1"}]))
    assert again == {"pod-0": 0.0, "pod-1": 0.0, "pod-2": 1.0, "pod-3": 0.0}


def test_a_request_sharing_half_the_prefix_scores_about_one_half():
    router = _Router()
    router.route(completion(text(20)), to=1)
    half = text(10) + text(10, tag="z")
    scores = router.scores(completion(half))
    assert scores["pod-1"] == pytest.approx(0.5)
    assert {scores[n] for n in ("pod-0", "pod-2", "pod-3")} == {0.0}


def test_different_models_and_salts_never_share_the_cache():
    router = _Router()
    router.route(completion(text(8), model="llama"), to=0)
    assert router.scores(completion(text(8), model="llama"))["pod-0"] == 1.0
    assert router.scores(completion(text(8), model="llama-lora"))["pod-0"] == 0.0
    assert router.scores(completion(text(8), model="llama", cache_salt="tenant"))["pod-0"] == 0.0


def test_requests_follow_their_prefixes_across_endpoints():
    router = _Router()
    prompts = {tag: text(12, tag=tag) for tag in "abc"}
    homes = {tag: router.route(completion(prompts[tag]), to=i)[0] for i, tag in enumerate("abc")}
    for tag in "abc":
        target, scores = router.route(completion(prompts[tag] + " follow-up"))
        assert target == homes[tag]
        assert scores[target] == 1.0
        assert sorted(scores.values()) == [0.0, 0.0, 0.0, 1.0]


def test_a_longer_conversation_extends_what_its_endpoint_holds():
    router = _Router()
    turn1 = text(6)
    router.route(completion(turn1), to=3)
    turn2 = turn1 + text(6, tag="t2")
    scores = router.scores(completion(turn2))
    assert scores["pod-3"] == pytest.approx(0.5)
    router.route(completion(turn2))
    assert router.scores(completion(turn2))["pod-3"] == 1.0


def test_an_endpoint_that_left_the_pool_no_longer_attracts_its_prefix():
    router = _Router(n_endpoints=2)
    a, b = router.pool.endpoints
    router.route(completion(text(5)), to=0)
    router.pool.replace([b])
    router.pool.replace([a, b])  # back at the same address: a new pod, cold cache
    assert router.scores(completion(text(5))) == {"pod-0": 0.0, "pod-1": 0.0}


def test_the_match_length_weight_prefers_long_absolute_matches():
    router = _Router(scorer_params={"matchLengthWeight": 1.0, "matchLengthScaleTokens": 16 * 8, "blockSizeTokens": 8})
    router.route(completion(text(4)), to=0)  # 256 characters = 8 blocks of 8 tokens (32 characters)
    # 8 of 8 blocks matched = 64 tokens of a 128-token scale: (64/128)² = 0.25, though the ratio is 1.
    assert router.scores(completion(text(4)))["pod-0"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------
# Wiring check at load time


def _handle_with(**plugins):
    handle = PluginHandle(make_pool(1))
    handle.plugins.update(plugins)
    return handle


def test_binding_succeeds_when_the_named_producer_exists_and_produces_match_info():
    handle = _handle_with()
    handle.plugins[PRODUCER] = producer(handle.pool)
    scorer().bind(handle)  # no error
    custom = _handle_with()
    custom.plugins["mine"] = producer(custom.pool, name="mine")
    scorer({"prefixMatchInfoProducerName": "mine"}).bind(custom)


def test_binding_refuses_a_producer_name_that_names_no_producer_and_lists_the_ones_defined():
    handle = _handle_with()
    handle.plugins["my-approx"] = producer(handle.pool, name="my-approx")
    with pytest.raises(ConfigError, match=r"no plugin is named 'approx-prefix-cache-producer'.*\(defined: my-approx\)"):
        scorer().bind(handle)


def test_binding_refuses_a_plugin_that_does_not_produce_match_info():
    handle = _handle_with()
    handle.plugins["queue"] = object()
    with pytest.raises(ConfigError, match="the plugin named 'queue' does not produce PrefixCacheMatchInfo"):
        scorer({"prefixMatchInfoProducerName": "queue"}).bind(handle)


def test_a_scorer_reading_another_producer_does_not_pull_in_the_approximate_one():
    from epp.config import load_config
    from epp.datastore.pool import Pool
    from epp.scheduling.registry import PluginHandle

    config = load_config(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: precise-prefix-cache-producer\n- type: prefix-cache-scorer\n"
        "  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}\n",
        "--config-text", PluginHandle(Pool()))
    assert "approx-prefix-cache-producer" not in config.plugins
    assert [p.type for p in config.producers] == ["precise-prefix-cache-producer"]


# ---------------------------------------------------------------------------------------------------------
# The scheduler's fast path

_infos = st.one_of(
    st.none(),
    st.builds(PrefixMatchInfo, st.integers(-2, 12), st.integers(-1, 10), st.sampled_from([1, 16])),
    st.builds(PrefixMatchInfo, st.floats(allow_nan=True), st.floats(allow_nan=True), st.just(16)),
)


@settings(max_examples=200, deadline=None)
@given(infos=st.lists(_infos, max_size=10), weight=st.sampled_from([0.0, 0.0, 0.4, 1.0]))
def test_score_values_are_the_scores_clamped_as_the_scheduler_clamps(infos, weight):
    s = scorer({"matchLengthWeight": weight, "matchLengthScaleTokens": 64})
    eps = [_endpoint(info) for info in infos]
    expected = clamped_scores(s.score(CycleState(), completion("x"), eps), eps)
    assert s.score_values(CycleState(), completion("x"), eps) == expected
