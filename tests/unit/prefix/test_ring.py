"""Specification of the consistent-hash ring with bounded loads (plugins/prefix/ring.py)."""

from __future__ import annotations

import math
import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.prefix.ring import RING_SIZE, HashRing, bounded_capacity, vnode_position

# The scorer's default number of points per endpoint, and the balance it promises (see test_balance).
VNODES = 128
SHARE_TOLERANCE = 0.30  # ±30% of the fair share 1/n: about 3.4 standard deviations (1/sqrt(128) = 8.8%)

NAME_FORMATS = ["10.0.{hi}.{lo}:8000", "vllm-{i}-rank-0", "pod-{i}"]


def names(n: int, fmt: str = NAME_FORMATS[0]) -> list[str]:
    return [fmt.format(i=i, hi=i // 250, lo=i % 250 + 1) for i in range(n)]


def keys(count: int, salt: str = "k") -> list[int]:
    """Uniform 64-bit keys, the same in every run."""
    return [xxhash.xxh64_intdigest(f"{salt}{i}".encode()) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------
# Positions: fixed by the names and the point count only


def test_virtual_node_positions_are_xxh64_of_name_hash_index_golden_values():
    # Hard-coded: a change here moves every key of every deployment to another endpoint.
    assert vnode_position("10.0.0.1:8000", 0) == 15619853520533670357
    assert vnode_position("10.0.0.1:8000", 1) == 11077444643843488863
    assert vnode_position("vllm-0-rank-0", 127) == 2272380089748152797
    assert vnode_position("10.0.0.1:8000", 0) == xxhash.xxh64_intdigest(b"10.0.0.1:8000#0")


def test_ring_points_are_sorted_positions_with_their_owners_golden_values():
    ring = HashRing(["10.0.0.2:8000", "10.0.0.1:8000"], 2)
    assert ring.positions == [9733363508579896608, 10195938705137944510, 11077444643843488863, 15619853520533670357]
    assert ring.owners == ["10.0.0.2:8000", "10.0.0.2:8000", "10.0.0.1:8000", "10.0.0.1:8000"]
    assert ring.names == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert len(ring) == 2 and "10.0.0.1:8000" in ring and "10.0.0.3:8000" not in ring


def test_the_ring_depends_on_the_set_of_names_not_their_order_or_repetition():
    base = names(16)
    shuffled = base[:]
    random.Random(3).shuffle(shuffled)
    a, b = HashRing(base, 32), HashRing(shuffled + base[:4], 32)
    assert (a.positions, a.owners) == (b.positions, b.owners)


@pytest.mark.parametrize("bad", [0, -1])
def test_at_least_one_virtual_node_per_endpoint(bad):
    with pytest.raises(ValueError, match="virtual_nodes must be >= 1"):
        HashRing(["a"], bad)


# ---------------------------------------------------------------------------------------------------------
# Lookup: the first point clockwise (position >= key), wrapping


def test_a_key_belongs_to_the_first_point_at_or_after_it_and_wraps_past_the_last():
    ring = HashRing(["10.0.0.2:8000", "10.0.0.1:8000"], 2)
    p = ring.positions
    cases = [
        (0, 0),  # before the first point
        (p[0], 0),  # exactly on a point: that point
        (p[0] + 1, 1),
        (p[2] - 1, 2),
        (p[3], 3),
        (p[3] + 1, 0),  # after the last point: wraps to the first
        (RING_SIZE - 1, 0),
    ]
    for key, index in cases:
        assert ring.start(key) == index, key
        assert ring.owner(key) == ring.owners[index]


def test_the_walk_visits_every_endpoint_once_starting_with_the_owner():
    ring = HashRing(names(16), 8)
    for key in keys(50):
        walk = list(ring.walk(key))
        assert walk[0] == ring.owner(key)
        assert sorted(walk) == sorted(ring.names)


def test_the_walk_lists_endpoints_in_the_order_their_points_come_up():
    ring = HashRing(["10.0.0.2:8000", "10.0.0.1:8000"], 2)
    assert list(ring.walk(ring.positions[2])) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert list(ring.walk(ring.positions[1])) == ["10.0.0.2:8000", "10.0.0.1:8000"]


def test_an_empty_ring_owns_nothing():
    ring = HashRing([], VNODES)
    assert ring.owner(123) is None
    assert list(ring.walk(123)) == []
    assert ring.bounded(123, {"a": 0}, 1.25) == []
    assert ring.shares() == {}


# ---------------------------------------------------------------------------------------------------------
# Balance


@pytest.mark.parametrize("fmt", NAME_FORMATS)
@pytest.mark.parametrize("n", [8, 64])
def test_balance_each_endpoints_share_of_the_key_space_is_within_tolerance(n, fmt):
    shares = HashRing(names(n, fmt), VNODES).shares()
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-12)
    fair = 1 / n
    worst = max(abs(s / fair - 1) for s in shares.values())
    assert worst <= SHARE_TOLERANCE, f"{fmt}: an endpoint has {worst:+.0%} of its fair share"


def test_balance_improves_with_more_virtual_nodes():
    def spread(v: int) -> float:
        shares = HashRing(names(64), v).shares().values()
        return max(shares) / min(shares)

    assert spread(8) > spread(32) > spread(VNODES)


def test_keys_fall_on_endpoints_in_proportion_to_their_shares():
    ring = HashRing(names(8), VNODES)
    sample = keys(40_000)
    counts = dict.fromkeys(ring.names, 0)
    for key in sample:
        counts[ring.owner(key)] += 1
    for name, share in ring.shares().items():
        assert abs(counts[name] / len(sample) - share) < 0.01, name


# ---------------------------------------------------------------------------------------------------------
# Minimal disruption


@pytest.mark.parametrize("n", [8, 32])
def test_adding_an_endpoint_moves_about_one_in_n_keys_all_to_the_new_endpoint(n):
    before = HashRing(names(n), VNODES)
    after = HashRing(names(n + 1), VNODES)
    new = names(n + 1)[-1]
    sample = keys(20_000)
    moved = [k for k in sample if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == new for k in moved), "a key moved between two endpoints that stayed"
    expected = 1 / (n + 1)
    assert 0.6 * expected < len(moved) / len(sample) < 1.4 * expected
    # Exactly the new endpoint's share of the key space moved.
    assert abs(len(moved) / len(sample) - after.shares()[new]) < 0.01


@pytest.mark.parametrize("n", [8, 32])
def test_removing_an_endpoint_moves_only_its_keys_each_to_the_next_endpoint_on_its_walk(n):
    before = HashRing(names(n), VNODES)
    gone = names(n)[n // 2]
    after = HashRing([x for x in names(n) if x != gone], VNODES)
    sample = keys(20_000)
    moved = [k for k in sample if before.owner(k) != after.owner(k)]
    assert moved and all(before.owner(k) == gone for k in moved)
    assert sum(before.owner(k) == gone for k in sample) == len(moved)
    for k in moved[:500]:
        assert after.owner(k) == list(before.walk(k))[1]
    assert 0.6 / n < len(moved) / len(sample) < 1.4 / n


# ---------------------------------------------------------------------------------------------------------
# Bounded loads


@pytest.mark.parametrize(
    "total, candidates, c, capacity",
    [
        (0, 4, 1.25, 1),  # an idle pool: one request each
        (3, 4, 1.25, 2),  # ceil(1.25 × 4 / 4) = ceil(1.25)
        (7, 4, 1.25, 3),  # ceil(2.5)
        (31, 8, 1.25, 5),  # exactly 5.0
        (49, 1, 1.1, 55),  # 1.1 × 50 is 55.00000000000001 in floats: still 55, not 56
        (99, 1, 1.1, 110),
        (99, 10, 1.25, 13),  # ceil(12.5)
        (63, 64, 1.25, 2),
        (9, 2, 1.5, 8),  # ceil(7.5)
        (3, 4, 2.0, 2),
    ],
)
def test_capacity_is_ceil_c_times_total_plus_one_over_candidates(total, candidates, c, capacity):
    assert bounded_capacity(total, candidates, c) == capacity


@pytest.mark.parametrize("candidates, c, message", [(0, 1.25, "candidates must be > 0"),
                                                   (4, 1.0, "load factor must be > 1.0")])
def test_capacity_refuses_no_candidates_and_factors_not_above_one(candidates, c, message):
    with pytest.raises(ValueError, match=message):
        bounded_capacity(5, candidates, c)


def _ring4() -> tuple[HashRing, int, list[str]]:
    ring = HashRing(names(4), VNODES)
    key = keys(1)[0]
    return ring, key, list(ring.walk(key))


def test_with_no_load_the_ring_owner_is_chosen_and_the_walk_ranks_the_rest():
    ring, key, walk = _ring4()
    loads = dict.fromkeys(walk, 0)
    assert ring.bounded(key, loads, 1.25) == [walk[0]]
    assert ring.bounded(key, loads, 1.25, ranked=3) == walk[:3]
    assert ring.bounded(key, loads, 1.25, ranked=10) == walk


def test_a_full_owner_is_skipped_for_the_next_endpoint_on_the_walk():
    ring, key, walk = _ring4()
    # Σ = 8 over 4 candidates: capacity ceil(1.25 × 9 / 4) = 3; the owner holds 3.
    loads = {walk[0]: 3, walk[1]: 2, walk[2]: 2, walk[3]: 1}
    assert ring.bounded(key, loads, 1.25, ranked=3) == [walk[1], walk[2], walk[3]]
    # With a looser bound the owner keeps the key.
    assert ring.bounded(key, loads, 2.0) == [walk[0]]


def test_endpoints_that_are_not_candidates_are_skipped():
    ring, key, walk = _ring4()
    loads = {walk[1]: 0, walk[3]: 0}  # the filters kept two endpoints
    assert ring.bounded(key, loads, 1.25, ranked=3) == [walk[1], walk[3]]


def test_candidates_off_the_ring_share_the_capacity_but_are_never_chosen():
    ring, key, walk = _ring4()
    # Σ = 9 over 2 candidates: capacity ceil(1.25 × 10 / 2) = 7; without the stranger it would be
    # ceil(1.25 × 10 / 1) = 13 and the owner (holding 9) would be chosen.
    assert ring.bounded(key, {walk[0]: 9, "stranger:8000": 0}, 1.25) == []
    # Σ = 6 over 3 candidates: capacity ceil(1.25 × 7 / 3) = 3, so the owner is full and walk[1] is chosen.
    assert ring.bounded(key, {walk[0]: 6, walk[1]: 0, "stranger:8000": 0}, 1.25) == [walk[1]]
    assert ring.bounded(key, {"stranger:8000": 0}, 1.25) == []


def test_walk_below_stops_once_it_has_met_every_candidate():
    ring = HashRing(names(64), VNODES)
    key = keys(1)[0]
    walk = list(ring.walk(key))
    chosen = {walk[5], walk[40]}
    asked: list[str] = []

    def load_of(name: str) -> int | None:
        asked.append(name)
        return 0 if name in chosen else None

    assert ring.walk_below(key, load_of, capacity=1, ranked=3, candidates=2) == [walk[5], walk[40]]
    # Asked in walk order (points of the same endpoint may be asked again), up to the last candidate only.
    assert list(dict.fromkeys(asked)) == walk[:41], "the walk went on after the last candidate"


def test_a_hot_key_fills_its_owner_to_capacity_then_spills_along_its_walk():
    ring = HashRing(names(8), VNODES)
    key = keys(1)[0]
    walk = list(ring.walk(key))
    loads = dict.fromkeys(walk, 0)
    for placed in range(200):  # nothing finishes: every request stays in flight
        (target,) = ring.bounded(key, loads, 1.25)
        assert loads[target] < bounded_capacity(placed, 8, 1.25)
        loads[target] += 1
        assert max(loads.values()) <= math.ceil(1.25 * (placed + 1) / 8)
    in_walk_order = [loads[name] for name in walk]
    assert in_walk_order == sorted(in_walk_order, reverse=True), "the spill does not follow the walk"
    assert in_walk_order[0] == math.ceil(1.25 * 200 / 8)  # the owner holds as much as the bound allows
    assert in_walk_order[1] > 0  # and the key spilled to the next endpoint on its walk


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.lists(st.tuples(st.integers(0, 15), st.integers(0, 40)), min_size=1, max_size=16, unique_by=lambda t: t[0]),
    st.sampled_from([1.05, 1.25, 2.0]),
)
def test_no_candidate_is_chosen_at_or_above_capacity_and_none_below_it_is_passed_over(key, picks, c):
    ring = HashRing(names(16), 16)
    all_names = names(16)
    loads = {all_names[i]: load for i, load in picks}
    capacity = bounded_capacity(sum(loads.values()), len(loads), c)
    chosen = ring.bounded(key, loads, c, ranked=3)
    assert chosen, "some candidate is always below capacity"
    assert all(loads[name] < capacity for name in chosen)
    assert len(set(chosen)) == len(chosen)
    # The chosen are the first candidates below capacity in walk order.
    below = [name for name in ring.walk(key) if name in loads and loads[name] < capacity]
    assert chosen == below[:3]
