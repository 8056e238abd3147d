"""Specification of `approx-prefix-cache-producer`: lookup before scheduling, learning after it."""

from __future__ import annotations

import logging
import timeit

import pytest

from epp.datastore.endpoint import Endpoint, Metrics
from epp.scheduling.interfaces import DataProducer, PreRequest
from epp.scheduling.registry import ConfigError
from epp.scheduling.types import ProfileResult, SchedulingResult
from plugins.prefix import PrefixMatchInfo, hashes_key
from plugins.prefix.approx_producer import ApproxPrefixCacheProducer
from plugins.prefix.hashing import USER_INPUT_KEY, block_hashes, chain_seed

from .helpers import BLOCK, chat, completion, make_pool, producer, routed_to, text

NAME = "approx-prefix-cache-producer"


def _infos(endpoints, name=NAME) -> dict[str, PrefixMatchInfo]:
    return {ep.name: ep.attributes[name] for ep in endpoints}


# ---------------------------------------------------------------------------------------------------------
# Construction and parameters


def test_it_is_a_data_producer_and_a_pre_request_hook_producing_prefix_match_info():
    p = producer(make_pool(1))
    assert isinstance(p, ApproxPrefixCacheProducer)
    assert isinstance(p, DataProducer) and isinstance(p, PreRequest)
    assert p.type == NAME and p.name == NAME
    assert p.produces == frozenset({"PrefixCacheMatchInfo"}) and p.consumes == frozenset()


def test_defaults_are_the_reference_defaults():
    params = producer(make_pool(1)).params
    assert (params.auto_tune, params.block_size_tokens, params.max_prefix_blocks_to_match,
            params.max_prefix_tokens_to_match, params.lru_capacity_per_server) == (True, 16, 256, 0, 31250)


def test_parameters_are_read_by_their_yaml_names():
    params = producer(make_pool(1), {"autoTune": False, "blockSizeTokens": 32, "maxPrefixBlocksToMatch": 10,
                                     "maxPrefixTokensToMatch": 640, "lruCapacityPerServer": 99}).params
    assert (params.auto_tune, params.block_size_tokens, params.max_prefix_blocks_to_match,
            params.max_prefix_tokens_to_match, params.lru_capacity_per_server) == (False, 32, 10, 640, 99)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"blockSizeTokens": 0}, "blockSizeTokens must be > 0"),
        ({"maxPrefixBlocksToMatch": -1}, "maxPrefixBlocksToMatch must be >= 0"),
        ({"maxPrefixTokensToMatch": -5}, "maxPrefixTokensToMatch must be >= 0"),
        ({"lruCapacityPerServer": 0}, "lruCapacityPerServer must be > 0"),
        ({"autoTune": "yes"}, "autoTune"),
        ({"hashBlockSize": 64}, "unknown parameter 'hashBlockSize'"),
    ],
)
def test_bad_parameters_are_refused_with_the_key_named(params, message):
    with pytest.raises(ConfigError, match=message):
        producer(make_pool(1), params)


def test_the_deprecated_character_block_size_is_accepted_ignored_and_warned_about(caplog):
    pool = make_pool(1)
    with caplog.at_level(logging.WARNING):
        p = producer(pool, {"blockSize": 5, "autoTune": False})
    assert "blockSize is deprecated and ignored" in caplog.text
    req = completion(text(3))
    p.prepare(req, pool.endpoints)
    assert pool.endpoints[0].attributes[NAME] == PrefixMatchInfo(0, 3, 16)  # still 64-character blocks


# ---------------------------------------------------------------------------------------------------------
# prepare


def test_every_candidate_gets_match_info_and_an_unknown_prompt_matches_nothing():
    pool = make_pool(3)
    p = producer(pool)
    p.prepare(completion(text(5) + "partial"), pool.endpoints)
    assert _infos(pool.endpoints) == {f"pod-{i}": PrefixMatchInfo(0, 5, 16) for i in range(3)}


def test_a_prompt_shorter_than_one_block_has_no_blocks():
    pool = make_pool(2)
    p = producer(pool)
    p.prepare(completion("x" * (BLOCK - 1)), pool.endpoints)
    assert {info.total_blocks for info in _infos(pool.endpoints).values()} == {0}


def test_the_attribute_is_keyed_by_the_producers_instance_name():
    pool = make_pool(1)
    p = producer(pool, name="my-prefix")
    p.prepare(completion(text(2)), pool.endpoints)
    assert pool.endpoints[0].attributes["my-prefix"] == PrefixMatchInfo(0, 2, 16)
    assert NAME not in pool.endpoints[0].attributes


def test_the_request_bytes_and_hashes_are_kept_in_request_scratch():
    pool = make_pool(1)
    p = producer(pool)
    req = completion(text(4))
    p.prepare(req, pool.endpoints)
    assert req.scratch[USER_INPUT_KEY] == text(4).encode()
    assert len(req.scratch[hashes_key(NAME)]) == 4


@pytest.mark.parametrize(
    "auto_tune, metric_block_size, expected_block_tokens",
    [(True, 32, 32), (True, 0, 16), (False, 32, 16)],
    ids=["tuned-from-metric", "metric-unknown", "auto-tune-off"],
)
def test_auto_tune_takes_the_block_size_of_the_first_candidate(auto_tune, metric_block_size, expected_block_tokens):
    pool = make_pool(2, Metrics(cache_block_size=metric_block_size))
    p = producer(pool, {"autoTune": auto_tune})
    p.prepare(completion("y" * 1280), pool.endpoints)
    expected_blocks = 1280 // (expected_block_tokens * 4)
    assert _infos(pool.endpoints)["pod-0"] == PrefixMatchInfo(0, expected_blocks, expected_block_tokens)


@pytest.mark.parametrize(
    "params, expected_total",
    [
        ({}, 256),
        ({"maxPrefixBlocksToMatch": 10}, 10),
        ({"maxPrefixBlocksToMatch": 0}, 300),
        ({"maxPrefixTokensToMatch": 160}, 10),  # 160 tokens / 16 per block
        ({"maxPrefixTokensToMatch": 160, "maxPrefixBlocksToMatch": 3}, 10),  # tokens win
    ],
)
def test_the_number_of_blocks_is_capped(params, expected_total):
    pool = make_pool(1)
    p = producer(pool, params)
    p.prepare(completion(text(300)), pool.endpoints)
    assert pool.endpoints[0].attributes[NAME].total_blocks == expected_total


def test_no_candidates_is_a_no_op():
    pool = make_pool(1)
    p = producer(pool)
    req = completion(text(2))
    p.prepare(req, [])
    assert NAME not in pool.endpoints[0].attributes


# ---------------------------------------------------------------------------------------------------------
# pre_request: learning the decision


def _schedule(p, pool, req, target: Endpoint, **kw) -> dict[str, PrefixMatchInfo]:
    p.prepare(req, pool.endpoints)
    infos = _infos(pool.endpoints, p.name)
    p.pre_request(req, routed_to(target, **kw))
    return infos


def test_the_primary_target_learns_the_blocks_and_only_it():
    pool = make_pool(3)
    a, b, c = pool.endpoints
    p = producer(pool)
    _schedule(p, pool, completion(text(4)), a)
    assert p.index.endpoints() == ["pod-0"]
    p.prepare(completion(text(4)), pool.endpoints)
    assert _infos(pool.endpoints) == {
        "pod-0": PrefixMatchInfo(4, 4, 16), "pod-1": PrefixMatchInfo(0, 4, 16), "pod-2": PrefixMatchInfo(0, 4, 16)
    }


def test_fallback_endpoints_of_the_primary_profile_do_not_learn():
    pool = make_pool(3)
    a, b, c = pool.endpoints
    p = producer(pool)
    req = completion(text(2))
    p.prepare(req, pool.endpoints)
    p.pre_request(req, routed_to(b, a, c))
    assert p.index.endpoints() == ["pod-1"]


@pytest.mark.parametrize(
    "profiles, learned",
    [
        ({"decode": 0, "prefill": 1}, ["pod-0", "pod-1"]),
        ({"decode": 0, "prefill-x": 1}, ["pod-0"]),  # only a profile named exactly `prefill`
        ({"decode": 0, "prefill": 0}, ["pod-0"]),
        ({"decode": 0, "prefill": None}, ["pod-0"]),  # the prefill profile found no endpoint
    ],
)
def test_the_first_endpoint_of_a_profile_named_prefill_learns_too(profiles, learned):
    pool = make_pool(3)
    p = producer(pool)
    req = completion(text(3))
    p.prepare(req, pool.endpoints)
    results = {
        name: (ProfileResult((pool.endpoints[i], pool.endpoints[2])) if i is not None else None)
        for name, i in profiles.items()
    }
    p.pre_request(req, SchedulingResult(results, "decode"))
    assert p.index.endpoints() == learned


def test_a_failed_primary_profile_still_lets_the_prefill_endpoint_learn():
    pool = make_pool(2)
    p = producer(pool)
    req = completion(text(3))
    p.prepare(req, pool.endpoints)
    p.pre_request(req, SchedulingResult({"decode": None, "prefill": ProfileResult((pool.endpoints[1],))}, "decode"))
    assert p.index.endpoints() == ["pod-1"]


def test_pre_request_without_prepare_learns_nothing():
    pool = make_pool(1)
    p = producer(pool)
    p.pre_request(completion(text(3)), routed_to(pool.endpoints[0]))
    assert p.index.size() == 0


@pytest.mark.parametrize(
    "auto_tune, num_blocks, expected_capacity",
    [(True, 1000, 1000), (True, 0, 77), (False, 1000, 77)],
    ids=["tuned-from-metric", "metric-unknown", "auto-tune-off"],
)
def test_the_lru_capacity_is_the_endpoints_kv_blocks_under_auto_tune(auto_tune, num_blocks, expected_capacity):
    pool = make_pool(1, Metrics(cache_num_blocks=num_blocks))
    p = producer(pool, {"autoTune": auto_tune, "lruCapacityPerServer": 77})
    _schedule(p, pool, completion(text(2)), pool.endpoints[0])
    assert p.index.capacity_of("pod-0") == expected_capacity


def test_an_endpoint_remembers_at_most_its_capacity():
    pool = make_pool(1)
    p = producer(pool, {"autoTune": False, "lruCapacityPerServer": 5})
    _schedule(p, pool, completion(text(8)), pool.endpoints[0])
    assert p.index_size() == 5
    p.prepare(completion(text(8)), pool.endpoints)
    assert pool.endpoints[0].attributes[NAME] == PrefixMatchInfo(5, 8, 16)  # the head survived


# ---------------------------------------------------------------------------------------------------------
# Following the pool


def test_an_endpoint_removed_from_the_pool_is_dropped_from_the_index_at_once():
    pool = make_pool(2)
    a, b = pool.endpoints
    p = producer(pool)
    _schedule(p, pool, completion(text(3)), a)
    _schedule(p, pool, completion(text(3, tag="b")), b)
    assert p.index.endpoints() == ["pod-0", "pod-1"]
    pool.replace([b])
    assert p.index.endpoints() == ["pod-1"]
    assert p.index_size() == 3


def test_an_endpoint_that_comes_back_at_a_new_address_starts_cold():
    pool = make_pool(1)
    p = producer(pool)
    _schedule(p, pool, completion(text(3)), pool.endpoints[0])
    pool.replace([Endpoint("pod-0", "127.0.0.99", 8000)])
    assert p.index.endpoints() == []


def test_a_decision_for_an_endpoint_that_left_the_pool_meanwhile_is_not_learned():
    pool = make_pool(2)
    a, b = pool.endpoints
    p = producer(pool)
    req = completion(text(3))
    p.prepare(req, pool.endpoints)
    pool.replace([b])
    p.pre_request(req, routed_to(a))
    assert p.index.endpoints() == []


# ---------------------------------------------------------------------------------------------------------
# Cost


def test_prepare_for_an_8k_token_chat_prompt_and_64_endpoints_costs_well_under_a_millisecond():
    # A guard against per-character Python, not a benchmark (the report quotes the timeit figure):
    # hashing 32 KB one character at a time would take tens of milliseconds.
    pool = make_pool(64)
    p = producer(pool)
    messages = [{"role": "system", "content": text(200)}, {"role": "user", "content": text(300, tag="u")}]
    for i in range(8):
        req = chat(messages[:1] + [{"role": "user", "content": f"{i}" * 3000}])
        p.prepare(req, pool.endpoints)
        p.pre_request(req, routed_to(pool.endpoints[i]))

    def fresh_prepare():
        req = chat(messages)
        p.prepare(req, pool.endpoints)

    fresh_prepare()
    # The 8 warm endpoints share the system message (200 blocks of the JSON), the others nothing.
    assert sorted(info.match_blocks for info in _infos(pool.endpoints).values()) == [0] * 56 + [200] * 8
    per_call = min(timeit.repeat(fresh_prepare, number=20, repeat=5)) / 20
    assert per_call < 0.002, f"prepare took {per_call * 1e6:.0f} µs"


def test_requests_repeating_a_long_prefix_get_exactly_the_hashes_of_block_hashes():
    pool = make_pool(2)
    p = producer(pool)
    eps = list(pool.endpoints)
    shared = text(200, "system")
    for i in range(4):  # noted, remembered, then found: every time the plain chain
        req = completion(shared + text(100, f"q{i % 2}"))
        p.prepare(req, eps)
        data = req.scratch[USER_INPUT_KEY]
        assert req.scratch[hashes_key(NAME)] == block_hashes(data, BLOCK, 256, chain_seed("m"))
        p.pre_request(req, routed_to(eps[i % 2]))
    assert _infos(eps)["pod-1"].match_blocks == 256  # the last request's chain was learned by pod-1 before
