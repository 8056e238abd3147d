"""The benchmark's routing oracle: longest cached prefix over pods with LRU caches, counted as the pods count."""

from __future__ import annotations

import pytest

from bench.oracle import Prompt, prompts_of, simulate
from epp_model_server.hashing import block_hashes, hash_function, none_hash
from epp_model_server.tokenizer import BuiltinTokenizer


def prompt(name: str, blocks: int, *, extra_tokens: int = 1, out: int = 1, shared: str | None = None,
           shared_blocks: int = 0) -> Prompt:
    """A prompt of `blocks` full blocks plus `extra_tokens`; its first `shared_blocks` blocks equal those of
    every prompt naming the same `shared` prefix."""
    hashes = tuple(f"{shared}/{i}".encode() if i < shared_blocks else f"{name}/{i}".encode() for i in range(blocks))
    return Prompt(blocks * 16 + extra_tokens, hashes, out)


def test_a_repeated_prompt_hits_every_full_block_but_never_its_last_token():
    p = prompt("a", 4, extra_tokens=0)  # 64 tokens: at most 63 from the cache, so 3 blocks
    r = simulate([p, p], [0.0, 1.0], pods=2, blocks=100)
    assert r.per_request == (0, 48)
    assert r.queries == 128 and r.hits == 48 and r.hit_rate == pytest.approx(48 / 128)


def test_requests_go_to_the_pod_that_holds_their_prefix():
    a, b = prompt("a", 10), prompt("b", 10)
    r = simulate([a, b, a, b, a], [0, 0.01, 0.02, 0.03, 0.04], pods=2, blocks=100)
    assert r.per_pod == (3, 2)  # a stays on pod 0, b on pod 1 (the least loaded when it first came)
    assert r.per_request == (0, 0, 160, 160, 160)


def test_with_nothing_cached_anywhere_the_least_loaded_pod_takes_the_request():
    ps = [prompt(f"p{i}", 4) for i in range(4)]
    r = simulate(ps, [0.0, 0.0, 0.0, 0.0], pods=4, blocks=100)
    assert r.per_pod == (1, 1, 1, 1)


def test_lru_eviction_forgets_the_least_recently_used_prefix():
    a, b, c = prompt("a", 6), prompt("b", 6), prompt("c", 6)
    # One pod of 14 blocks: a and b fit (7 blocks each with the partial last block), c evicts a.
    r = simulate([a, b, c, b, a], [0, 10, 20, 30, 40], pods=1, blocks=14)
    assert r.per_request[3] == 96  # b was used after a, so it survived
    assert r.per_request[4] == 0  # a was evicted


def test_a_shared_first_block_herds_every_new_conversation_unless_near_ties_count_as_ties():
    convs = [prompt(f"c{i}", 8, shared="sys", shared_blocks=1) for i in range(8)]
    times = [i * 0.001 for i in range(8)]  # all in flight together
    herded = simulate(convs, times, pods=4, blocks=1000)
    spread = simulate(convs, times, pods=4, blocks=1000, tie_blocks=2)
    assert herded.per_pod == (8, 0, 0, 0)
    assert max(spread.per_pod) <= 3


def test_a_load_bound_spreads_one_prefix_every_request_shares_over_all_pods():
    reqs = [prompt(f"u{i}", 20, shared="global", shared_blocks=16, out=100) for i in range(40)]
    times = [i * 0.01 for i in range(40)]  # each runs about a second: all 40 overlap
    literal = simulate(reqs, times, pods=4, blocks=10_000)
    bounded = simulate(reqs, times, pods=4, blocks=10_000, load_factor=1.25)
    assert literal.per_pod == (40, 0, 0, 0)
    assert bounded.skew < 1.3
    assert bounded.hits >= literal.hits - 3 * 16 * 16  # at most one miss of the shared prefix per other pod


def test_hit_rate_of_a_stage_counts_only_its_requests():
    a = prompt("a", 10)
    ps = [a, a, a, prompt("z", 10)]
    r = simulate(ps, [0, 1, 2, 3], pods=1, blocks=100)
    assert r.hit_rate_of(ps, 0, 1) == 0.0
    assert r.hit_rate_of(ps, 1, 2) == pytest.approx(160 / 161)
    assert r.hit_rate_of(ps, 3, 1) == 0.0


def test_prompts_are_hashed_as_the_model_server_hashes_them():
    text = " ".join(["abc"] * 40)
    (p,) = prompts_of([text], [5])
    ids = BuiltinTokenizer().encode(text)
    fn = hash_function("sha256")
    assert p.num_tokens == len(ids) == 40 and p.max_tokens == 5
    assert p.hashes == tuple(block_hashes(ids, 16, fn, none_hash(fn, "0")))
    assert len(p.hashes) == 2


def test_a_request_larger_than_the_cache_is_refused_with_its_size():
    with pytest.raises(ValueError, match="does not fit in 4 blocks"):
        simulate([prompt("big", 10)], [0.0], pods=1, blocks=4)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="1 prompts but 2 arrival times"):
        simulate([prompt("a", 1)], [0.0, 1.0], pods=1, blocks=10)
