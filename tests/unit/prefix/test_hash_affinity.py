"""Specification of `prefix-hash-affinity-scorer`: the key, the scores, bounded loads, filters, the pool, the
parameters and the `prefix-hash` profile."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import fields

import pytest
import yaml

from epp.config import load_profile
from epp.datastore.endpoint import Endpoint, Metrics
from epp.datastore.pool import Pool
from epp.scheduling.interfaces import Scorer
from epp.scheduling.registry import ConfigError, PluginHandle, create, param_key
from epp.scheduling.types import CycleState
from plugins.prefix.hash_affinity import (
    DEFAULT_PREFIX_BLOCKS,
    PrefixHashAffinityParams,
    PrefixHashAffinityScorer,
    prefix_key,
    token_bytes,
)
from plugins.prefix.hashing import block_hashes, chain_seed, user_input_bytes
from plugins.prefix.ring import bounded_capacity

from .helpers import BLOCK, chat, completion, make_pool, text

TYPE = "prefix-hash-affinity-scorer"
SEED_M = chain_seed("m")


def hash_scorer(pool: Pool, params: dict | None = None, name: str = TYPE) -> PrefixHashAffinityScorer:
    return create(TYPE, name, params, PluginHandle(pool))


def ranked(scores: dict[Endpoint, float]) -> list[tuple[str, float]]:
    """The non-zero scores, best first, by endpoint name."""
    return sorted(((ep.name, s) for ep, s in scores.items() if s > 0), key=lambda t: -t[1])


# ---------------------------------------------------------------------------------------------------------
# The key


def test_key_golden_values():
    # Hard-coded: a change here moves every prefix to another endpoint after an upgrade, and makes EPP
    # replicas of two versions disagree.
    assert SEED_M == 13415755381228090088
    assert prefix_key(text(10).encode(), BLOCK, 8, SEED_M) == 16950840350452702913
    assert prefix_key(text(10).encode(), BLOCK, 8, chain_seed("m", "salt")) == 920581859126450726
    assert prefix_key(b"hello", BLOCK, 8, SEED_M) == 7300317192710740390
    assert prefix_key(b"", BLOCK, 8, SEED_M) == 5346709587062871019
    s = hash_scorer(make_pool(2))
    assert s.key(completion(text(10))) == 16950840350452702913


@pytest.mark.parametrize("blocks", [1, 2, 7, 8, 9, 30])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_the_key_is_the_chained_block_hash_of_the_last_hashed_block(blocks, k):
    data = (text(blocks) + "tail shorter than a block").encode()
    assert prefix_key(data, BLOCK, k, SEED_M) == block_hashes(data, BLOCK, k, SEED_M)[-1]


def _key(prompt: str, k: int = 8, model: str = "m", salt: str | None = None) -> int:
    return hash_scorer(make_pool(1), {"prefixBlocks": k}).key(completion(prompt, model=model, cache_salt=salt))


@pytest.mark.parametrize(
    "a, b, same, rule",
    [
        (text(8) + text(4, "x"), text(8) + text(4, "y"), True, "only the first k = 8 blocks count"),
        (text(8), text(7) + text(1, "z"), False, "block k - 1 counts"),
        (text(3) + "abc", text(3) + "xyz", True, "fewer than k blocks: the full ones; the partial tail is left out"),
        (text(3), text(4), False, "fewer than k blocks: every full block counts"),
        ("short prompt", "short prompt", True, "shorter than one block: the whole prompt"),
        ("short prompt", "short prompt!", False, "shorter than one block: the whole prompt"),
        ("x" * (BLOCK - 1), "x" * BLOCK, False, "a full block is hashed without any tail"),
    ],
)
def test_which_part_of_the_prompt_the_key_covers(a, b, same, rule):
    assert (_key(a) == _key(b)) is same, rule


def test_model_and_cache_salt_seed_the_key():
    prompt = text(10)
    base = _key(prompt)
    assert _key(prompt, model="other") != base
    assert _key(prompt, salt="tenant-a") != base
    assert _key(prompt, salt="tenant-a") != _key(prompt, salt="tenant-b")
    # The target model (after a rewrite) seeds the key, not the model the client named.
    req = completion(prompt, model="alias")
    req.target_model = "m"
    assert hash_scorer(make_pool(1)).key(req) == base


def test_chat_requests_are_keyed_by_their_messages_so_a_growing_conversation_keeps_its_key():
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text(9)}]
    later = [*first, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    s = hash_scorer(make_pool(1))
    assert s.key(chat(first)) == s.key(chat(later))
    assert s.key(chat(first)) == prefix_key(user_input_bytes(chat(first)), BLOCK, DEFAULT_PREFIX_BLOCKS, SEED_M)


def test_token_ids_become_unsigned_32_bit_little_endian_bytes():
    assert token_bytes([1, 256, 2**32 - 1]) == b"\x01\x00\x00\x00" b"\x00\x01\x00\x00" b"\xff\xff\xff\xff"
    # A block of 16 tokens is 64 bytes, the block length the character estimate uses.
    assert len(token_bytes(range(16))) == BLOCK


_CHILD = """
import json, sys
from plugins.prefix.hash_affinity import prefix_key
from plugins.prefix.hashing import chain_seed
from plugins.prefix.ring import HashRing
ring = HashRing([f"10.0.0.{i}:8000" for i in range(1, 9)], 128)
data = sys.stdin.buffer.read()
print(json.dumps({"key": prefix_key(data, 64, 8, chain_seed("m", "s")), "positions": ring.positions,
                  "owners": ring.owners}))
"""


def test_keys_and_rings_are_the_same_in_another_process():
    from plugins.prefix.ring import HashRing

    data = text(12).encode()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashes differ between the two processes
    out = subprocess.run([sys.executable, "-c", _CHILD], input=data, capture_output=True, env=env, check=True,
                         timeout=60)
    child = json.loads(out.stdout)
    ring = HashRing([f"10.0.0.{i}:8000" for i in range(8, 0, -1)], 128)
    assert child == {"key": prefix_key(data, 64, 8, chain_seed("m", "s")), "positions": ring.positions,
                     "owners": ring.owners}


# ---------------------------------------------------------------------------------------------------------
# Scores


def test_it_is_a_registered_scorer():
    s = hash_scorer(make_pool(2))
    assert isinstance(s, PrefixHashAffinityScorer) and isinstance(s, Scorer)
    assert s.type == TYPE and s.name == TYPE


def test_the_ring_owner_scores_one_and_the_next_endpoints_on_its_walk_one_half_and_one_quarter():
    pool = make_pool(8)
    s = hash_scorer(pool)
    req = completion(text(10))
    walk = list(s.ring.walk(s.key(req)))
    scores = s.score(CycleState(), req, list(pool.endpoints))
    assert ranked(scores) == [(walk[0], 1.0), (walk[1], 0.5), (walk[2], 0.25)]
    assert all(scores.get(ep, 0.0) == 0.0 for ep in pool.endpoints if ep.name not in walk[:3])


@pytest.mark.parametrize("count, expected", [(1, [1.0]), (2, [1.0, 0.5]), (5, [1.0, 0.5, 0.25, 0.125, 0.0625])])
def test_ranked_endpoints_sets_how_many_get_a_score(count, expected):
    pool = make_pool(8)
    s = hash_scorer(pool, {"rankedEndpoints": count})
    scores = s.score(CycleState(), completion(text(10)), list(pool.endpoints))
    assert [v for _, v in ranked(scores)] == expected


def test_requests_sharing_their_first_k_blocks_score_the_same_endpoint_first():
    pool = make_pool(16)
    s = hash_scorer(pool)
    firsts = {ranked(s.score(CycleState(), completion(text(8, "sys") + text(3, tail)), list(pool.endpoints)))[0]
              for tail in ("a", "b", "c", "d")}
    assert len(firsts) == 1


def test_different_prefixes_spread_over_the_pool():
    pool = make_pool(8)
    s = hash_scorer(pool)
    owners = {ranked(s.score(CycleState(), completion(text(8, f"p{i}")), list(pool.endpoints)))[0][0]
              for i in range(200)}
    assert owners == {ep.name for ep in pool.endpoints}


def test_no_candidates_or_an_empty_pool_score_nothing():
    s = hash_scorer(make_pool(4))
    assert s.score(CycleState(), completion(text(2)), []) == {}
    empty = hash_scorer(Pool())
    stray = Endpoint("pod-0", "127.0.0.2", 8000)
    assert empty.score(CycleState(), completion(text(2)), [stray]) == {}


def test_candidates_that_are_not_endpoints_of_the_pool_are_never_ranked():
    pool = make_pool(4)
    s = hash_scorer(pool)
    strangers = [Endpoint(f"pod-{i}", "10.9.9.9", 8000) for i in range(4)]  # same names, other objects
    assert s.score(CycleState(), completion(text(2)), strangers) == {}
    # Mixed with one endpoint of the pool: only that one is ranked, whatever the walk order.
    (member,) = [ep for ep in pool.endpoints if ep.name == "pod-2"]
    for i in range(20):
        assert s.score(CycleState(), completion(text(3, f"m{i}")), [*strangers[:2], strangers[3], member]) == {
            member: 1.0}


# ---------------------------------------------------------------------------------------------------------
# Bounded loads


def test_an_owner_at_capacity_scores_zero_and_the_next_endpoint_on_the_walk_scores_one():
    pool = make_pool(4)
    s = hash_scorer(pool)
    req = completion(text(10))
    walk = [pool.get(name) for name in s.ring.walk(s.key(req))]
    # Σ in-flight 8 over 4 candidates: capacity ceil(1.25 × 9 / 4) = 3.
    for ep, n in zip(walk, [3, 2, 2, 1], strict=True):
        ep.in_flight = n
    assert bounded_capacity(8, 4, 1.25) == 3
    scores = s.score(CycleState(), req, list(pool.endpoints))
    assert ranked(scores) == [(walk[1].name, 1.0), (walk[2].name, 0.5), (walk[3].name, 0.25)]
    assert scores.get(walk[0], 0.0) == 0.0
    # A looser bound lets the owner keep the prefix.
    assert ranked(hash_scorer(pool, {"loadFactor": 2.0}).score(CycleState(), req, list(pool.endpoints)))[0] == (
        walk[0].name, 1.0)


def test_a_hot_prefix_never_puts_an_endpoint_above_capacity_and_spills_along_the_ring():
    pool = make_pool(8)
    s = hash_scorer(pool)
    req = completion(text(10))  # every request has the same prompt: one key
    walk = [pool.get(name) for name in s.ring.walk(s.key(req))]
    for placed in range(120):  # nothing finishes, as under a burst
        scores = s.score(CycleState(), req, list(pool.endpoints))
        target = max(scores, key=scores.__getitem__)
        assert scores[target] == 1.0
        assert target.in_flight < bounded_capacity(placed, 8, 1.25)
        target.in_flight += 1
    loads = [ep.in_flight for ep in walk]
    assert max(loads) <= bounded_capacity(119, 8, 1.25)  # = ceil(1.25 × 120 / 8): the mean × c, rounded up
    assert loads == sorted(loads, reverse=True) and loads[1] > 0


def test_only_candidates_count_in_the_capacity():
    pool = make_pool(4)
    s = hash_scorer(pool)
    req = completion(text(10))
    walk = [pool.get(name) for name in s.ring.walk(s.key(req))]
    walk[0].in_flight, walk[1].in_flight = 2, 2
    walk[2].in_flight = walk[3].in_flight = 100  # busy, but filtered out: they do not raise the bound
    # Over the two candidates: capacity ceil(1.25 × 5 / 2) = 4, so the owner (2) stays first.
    assert ranked(s.score(CycleState(), req, walk[:2]))[0] == (walk[0].name, 1.0)
    # Owner 5, successor 2: capacity ceil(1.25 × 8 / 2) = 5, so the owner is full.
    walk[0].in_flight = 5
    assert ranked(s.score(CycleState(), req, walk[:2])) == [(walk[1].name, 1.0)]


# ---------------------------------------------------------------------------------------------------------
# Filters


def test_endpoints_removed_by_filters_are_skipped_on_the_walk():
    pool = make_pool(8)
    s = hash_scorer(pool)
    req = completion(text(10))
    walk = [pool.get(name) for name in s.ring.walk(s.key(req))]
    candidates = [walk[6], walk[2], walk[4]]  # the owner and its first successor were filtered out
    scores = s.score(CycleState(), req, candidates)
    assert ranked(scores) == [(walk[2].name, 1.0), (walk[4].name, 0.5), (walk[6].name, 0.25)]
    assert set(scores) <= set(candidates)


@pytest.mark.parametrize("count", [1, 2, 5, 16, 17, 40, 64])
def test_the_scores_rank_what_the_ring_ranks_under_bounded_loads_for_any_candidate_subset(count):
    pool = make_pool(64)
    s = hash_scorer(pool)
    rng = random.Random(count)
    for trial in range(30):
        for ep in pool.endpoints:
            ep.in_flight = rng.randint(0, 12)
        candidates = rng.sample(list(pool.endpoints), count)
        req = completion(text(9, f"t{trial}"))
        expected = s.ring.bounded(s.key(req), {ep.name: ep.in_flight for ep in candidates}, 1.25, ranked=3)
        assert ranked(s.score(CycleState(), req, candidates)) == list(zip(expected, [1.0, 0.5, 0.25], strict=False))


def test_a_single_candidate_scores_one():
    pool = make_pool(64)
    s = hash_scorer(pool)
    only = pool.endpoints[17]
    only.in_flight = 50
    assert s.score(CycleState(), completion(text(10)), [only]) == {only: 1.0}


# ---------------------------------------------------------------------------------------------------------
# The pool


def _names_pool(names: list[str]) -> Pool:
    pool = Pool()
    pool.replace(Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(names))
    return pool


def test_replicas_with_the_same_pool_decide_the_same():
    names = [f"vllm-{i}-rank-0" for i in range(12)]
    one = hash_scorer(_names_pool(names))
    other_pool = _names_pool(list(reversed(names)))
    other = hash_scorer(other_pool)
    for i in range(50):
        req = completion(text(9, f"r{i}"))
        assert ranked(one.score(CycleState(), req, list(one._pool.endpoints))) == ranked(
            other.score(CycleState(), req, list(other_pool.endpoints)))


def test_the_ring_follows_the_pool_and_is_not_rebuilt_per_request():
    pool = make_pool(4)
    s = hash_scorer(pool)
    ring = s.ring
    assert ring.names == tuple(f"pod-{i}" for i in range(4))
    s.score(CycleState(), completion(text(3)), list(pool.endpoints))
    assert s.ring is ring
    pool.replace([*pool.endpoints, Endpoint("pod-9", "127.0.0.99", 8000)])
    assert s.ring is not ring and "pod-9" in s.ring
    pool.replace([ep for ep in pool.endpoints if ep.name != "pod-0"])
    assert "pod-0" not in s.ring and len(s.ring) == 4


def test_an_endpoint_replaced_under_the_same_name_keeps_its_points_and_gets_scored_as_the_new_object():
    pool = make_pool(3)
    s = hash_scorer(pool)
    ring = s.ring
    moved = [Endpoint(ep.name, f"10.1.0.{i}", 8000) for i, ep in enumerate(pool.endpoints)]
    pool.replace(moved)
    assert s.ring is ring
    scores = s.score(CycleState(), completion(text(10)), list(pool.endpoints))
    assert set(scores) <= set(moved) and max(scores.values()) == 1.0


def test_an_emptied_pool_scores_nothing():
    pool = make_pool(3)
    s = hash_scorer(pool)
    eps = list(pool.endpoints)
    pool.replace([])
    assert len(s.ring) == 0
    assert s.score(CycleState(), completion(text(3)), eps) == {}


# ---------------------------------------------------------------------------------------------------------
# Parameters


def test_defaults_and_camel_case_keys():
    keys = {param_key(f): f.default for f in fields(PrefixHashAffinityParams)}
    assert keys == {"blockSizeTokens": 16, "prefixBlocks": 8, "virtualNodes": 128, "loadFactor": 1.25,
                    "rankedEndpoints": 3}
    s = hash_scorer(make_pool(2), {"blockSizeTokens": 32, "prefixBlocks": 2, "virtualNodes": 16,
                                   "loadFactor": 1.5, "rankedEndpoints": 1})
    assert (s.params.block_size_tokens, s.params.prefix_blocks, s.params.virtual_nodes, s.params.load_factor,
            s.params.ranked_endpoints) == (32, 2, 16, 1.5, 1)
    assert s.ring.virtual_nodes == 16 and len(s.ring.positions) == 32


def test_block_size_in_tokens_sets_the_characters_hashed():
    pool = make_pool(1)
    s = hash_scorer(pool, {"blockSizeTokens": 32, "prefixBlocks": 1})  # one block of 128 characters
    assert s.key(completion(text(2) + "x")) == s.key(completion(text(2) + "y"))
    assert s.key(completion(text(2))) != s.key(completion(text(1) + text(1, "b")))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"blockSizeTokens": 0}, "blockSizeTokens must be > 0"),
        ({"prefixBlocks": 0}, "prefixBlocks must be >= 1"),
        ({"virtualNodes": 0}, "virtualNodes must be between 1 and 4096"),
        ({"virtualNodes": 5000}, "virtualNodes must be between 1 and 4096"),
        ({"loadFactor": 1.0}, "loadFactor must be a finite number > 1.0"),
        ({"loadFactor": 0.5}, "loadFactor must be a finite number > 1.0"),
        ({"loadFactor": float("inf")}, "loadFactor must be a finite number > 1.0"),
        ({"rankedEndpoints": 0}, "rankedEndpoints must be >= 1"),
        ({"prefixBlocks": "eight"}, "parameter 'prefixBlocks': expected an integer"),
        ({"prefixTokens": 128}, "unknown parameter 'prefixTokens'"),
    ],
)
def test_bad_parameters_are_refused_naming_the_plugin_and_the_key(params, message):
    with pytest.raises(ConfigError, match=message) as exc:
        hash_scorer(make_pool(1), params, name="affinity")
    assert "plugin 'affinity' (type 'prefix-hash-affinity-scorer')" in str(exc.value)


# ---------------------------------------------------------------------------------------------------------
# The prefix-hash profile


def _profile_yaml() -> dict:
    from importlib import resources

    return yaml.safe_load((resources.files("epp") / "profiles" / "prefix-hash.yaml").read_text())


def test_prefix_hash_profile_loads_with_the_scorer_two_load_scorers_and_the_max_score_picker():
    pool = make_pool(4)
    config = load_profile("prefix-hash", PluginHandle(pool))
    [(name, profile)] = config.scheduler.profiles.items()
    assert name == "default"
    assert [(type(ws.scorer).type, ws.weight) for ws in profile.scorers] == [
        (TYPE, 3.0), ("queue-scorer", 1.0), ("kv-cache-utilization-scorer", 1.0)]
    assert type(profile.picker).type == "max-score-picker" and profile.filters == []
    assert config.producers == []  # no prefix index: the profile is stateless
    assert len(config.plugins[TYPE].ring) == 4


def test_prefix_hash_profile_spells_out_the_scorer_defaults():
    (plugin,) = [p for p in _profile_yaml()["plugins"] if p["type"] == TYPE]
    defaults = {param_key(f): f.default for f in fields(PrefixHashAffinityParams)}
    assert plugin["parameters"] == defaults


def _scheduled(pool: Pool, req) -> str:
    config = load_profile("prefix-hash", PluginHandle(pool))
    result = config.scheduler.schedule(req, list(pool.endpoints))
    return result.target_endpoints[0].name


BAD = Metrics(waiting_queue_size=10, kv_cache_usage_percent=1.0)  # the worst reading on both load scorers


@pytest.mark.parametrize(
    "metrics_along_the_walk, lands_on",
    [
        ({}, 0),  # all equal: the ring's choice
        ({0: Metrics(waiting_queue_size=10)}, 0),  # the longest queue alone does not move it
        ({0: Metrics(kv_cache_usage_percent=1.0)}, 0),  # a full KV cache alone does not move it
        ({0: BAD}, 1),  # both: the ring's second choice (3 + 0 + 0 < 1.5 + 1 + 1)
        ({0: BAD, 1: BAD}, 0),  # never further: the third choice has at most 0.75 + 1 + 1 < 3
    ],
)
def test_in_the_profile_load_scorers_move_the_pick_at_most_to_the_rings_second_choice(metrics_along_the_walk,
                                                                                      lands_on):
    pool = make_pool(8)
    req = completion(text(10))
    s = hash_scorer(pool)
    walk = list(s.ring.walk(s.key(req)))
    for index, metrics in metrics_along_the_walk.items():
        pool.get(walk[index]).metrics = metrics
    assert _scheduled(pool, req) == walk[lands_on]


def test_in_the_profile_a_hot_prefix_spreads_as_the_director_counts_requests_in_flight():
    pool = make_pool(8)
    config = load_profile("prefix-hash", PluginHandle(pool))
    req = completion(text(10))
    for placed in range(80):
        (target,) = config.scheduler.schedule(req, list(pool.endpoints)).target_endpoints
        assert target.in_flight < bounded_capacity(placed, 8, 1.25)
        target.in_flight += 1  # as the Director does until the response ends
    assert max(ep.in_flight for ep in pool.endpoints) <= bounded_capacity(79, 8, 1.25)
    assert sum(ep.in_flight > 0 for ep in pool.endpoints) >= 2
