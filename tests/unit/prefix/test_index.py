"""Specification of the approximate prefix index: lookup walk, per-endpoint LRU, removal."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.prefix.index import PrefixIndex

# ---------------------------------------------------------------------------------------------------------
# Lookup


def test_an_empty_index_matches_nothing():
    assert PrefixIndex().match([1, 2, 3]) == {}


def test_the_walk_counts_each_holder_and_stops_at_the_first_hash_nobody_holds():
    idx = PrefixIndex()
    idx.add("a", [1, 2, 3, 4], 100)
    idx.add("b", [1, 2], 100)
    idx.add("c", [9, 10], 100)  # holds nothing of the request's chain
    assert idx.match([1, 2, 3, 4]) == {"a": 4, "b": 2}
    assert idx.match([1, 2, 7, 4]) == {"a": 2, "b": 2}  # 7 held by nobody: 4 is never looked at
    assert idx.match([5, 1, 2]) == {}


def test_an_endpoint_need_not_hold_every_earlier_block_to_count_a_later_one():
    # As the reference: the walk only stops when *no* endpoint has a block.
    idx = PrefixIndex()
    idx.add("a", [1, 2, 3], 100)
    idx.add("b", [2, 3], 100)
    assert idx.match([1, 2, 3]) == {"a": 3, "b": 2}


# ---------------------------------------------------------------------------------------------------------
# LRU per endpoint


def test_a_chain_is_stored_head_most_recent_so_the_tail_is_evicted_first():
    idx = PrefixIndex()
    idx.add("a", [10, 11, 12, 13, 14], capacity=3)
    assert idx.hashes_of("a") == [12, 11, 10]  # least recently used first
    assert idx.match([10, 11, 12, 13, 14]) == {"a": 3}


def test_the_least_recently_used_request_is_evicted_first():
    idx = PrefixIndex()
    idx.add("a", [1, 2], capacity=4)
    idx.add("a", [3, 4], capacity=4)
    idx.add("a", [5], capacity=4)
    assert idx.hashes_of("a") == [1, 4, 3, 5]  # block 2 (tail of the oldest request) went first
    idx.add("a", [6, 7], capacity=4)
    assert idx.hashes_of("a") == [3, 5, 7, 6]


def test_adding_a_held_hash_again_makes_it_most_recent():
    idx = PrefixIndex()
    idx.add("a", [1], capacity=2)
    idx.add("a", [2], capacity=2)
    idx.add("a", [1], capacity=2)  # touch 1: now 2 is the oldest
    idx.add("a", [3], capacity=2)
    assert sorted(idx.hashes_of("a")) == [1, 3]
    assert idx.holders_of(2) == frozenset()


def test_eviction_removes_only_that_endpoint_from_the_hash_and_drops_hashes_nobody_holds():
    idx = PrefixIndex()
    idx.add("a", [1, 2], capacity=2)
    idx.add("b", [1, 2], capacity=10)
    idx.add("a", [3, 4], capacity=2)  # a evicts 1 and 2
    assert idx.holders_of(1) == frozenset({"b"})
    assert idx.match([1, 2]) == {"b": 2}
    idx.add("b", [5, 6], capacity=2)  # b evicts 1 and 2 too: nobody holds them any more
    assert idx.holders_of(1) == idx.holders_of(2) == frozenset()
    assert idx.size() == 4  # 3, 4 (a) and 5, 6 (b)


def test_capacity_is_per_endpoint():
    idx = PrefixIndex()
    chain = list(range(100, 110))
    idx.add("small", chain, capacity=2)
    idx.add("large", chain, capacity=8)
    assert len(idx.hashes_of("small")) == 2
    assert len(idx.hashes_of("large")) == 8
    assert idx.match(chain) == {"small": 2, "large": 8}
    assert idx.entries() == 10
    assert idx.size() == 8


def test_a_smaller_capacity_on_a_later_add_evicts_down_to_it():
    idx = PrefixIndex()
    idx.add("a", [1, 2, 3, 4, 5, 6], capacity=10)
    idx.add("a", [7], capacity=3)
    assert idx.hashes_of("a") == [2, 1, 7]
    assert idx.capacity_of("a") == 3


@pytest.mark.parametrize("capacity", [0, -1])
def test_the_capacity_must_be_positive(capacity):
    with pytest.raises(ValueError, match="capacity"):
        PrefixIndex().add("a", [1], capacity)


# ---------------------------------------------------------------------------------------------------------
# Removal and size


def test_removing_an_endpoint_forgets_its_blocks_but_keeps_other_holders():
    idx = PrefixIndex()
    idx.add("a", [1, 2, 3], 100)
    idx.add("b", [1, 2], 100)
    assert idx.remove_endpoint("a") is True
    assert idx.endpoints() == ["b"]
    assert idx.match([1, 2, 3]) == {"b": 2}
    assert idx.size() == 2
    assert idx.remove_endpoint("a") is False
    assert idx.remove_endpoint("b") is True
    assert idx.size() == 0 and idx.entries() == 0 and idx.endpoints() == []


# ---------------------------------------------------------------------------------------------------------
# Against a plain model: any sequence of adds and removals


class _Model:
    """The index's meaning, written the slow and obvious way."""

    def __init__(self) -> None:
        self.lrus: dict[str, list[int]] = {}  # least recently used first

    def add(self, ep: str, hashes: list[int], capacity: int) -> None:
        lru = self.lrus.setdefault(ep, [])
        for h in reversed(hashes):
            if h in lru:
                lru.remove(h)
            lru.append(h)
        del lru[: max(0, len(lru) - capacity)]

    def remove(self, ep: str) -> None:
        self.lrus.pop(ep, None)

    def match(self, hashes: list[int]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in hashes:
            owners = [ep for ep, lru in self.lrus.items() if h in lru]
            if not owners:
                break
            for ep in owners:
                counts[ep] = counts.get(ep, 0) + 1
        return counts


_endpoints = st.sampled_from(["a", "b", "c", "d"])
_chains = st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=8, unique=True)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _endpoints, _chains, st.integers(min_value=1, max_value=6)),
        st.tuples(st.just("remove"), _endpoints),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, probe=_chains)
def test_the_index_agrees_with_the_plain_model_after_any_adds_and_removals(ops, probe):
    idx, model = PrefixIndex(), _Model()
    for op in ops:
        if op[0] == "add":
            idx.add(op[1], op[2], op[3])
            model.add(op[1], op[2], op[3])
        else:
            idx.remove_endpoint(op[1])
            model.remove(op[1])
    assert idx.match(probe) == model.match(probe)
    for ep, lru in model.lrus.items():
        assert idx.hashes_of(ep) == lru
    held = {h for lru in model.lrus.values() for h in lru}
    assert idx.size() == len(held)
    for h in range(13):
        assert idx.holders_of(h) == frozenset(ep for ep, lru in model.lrus.items() if h in lru)


# ---------------------------------------------------------------------------------------------------------
# Against the previous algorithm: the fast paths (walk reuse, deferred touches, bulk holder updates) change
# nothing observable, holder-set sharing included


class _Reference:
    """The index as it was before its fast paths: one block at a time, every touch applied at once."""

    def __init__(self) -> None:
        self.holders: dict[int, frozenset[str]] = {}
        self.lrus: dict[str, OrderedDict[int, None]] = {}

    def match(self, hashes: list[int]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in hashes:
            owners = self.holders.get(h)
            if owners is None:
                break
            for ep in owners:
                counts[ep] = counts.get(ep, 0) + 1
        return counts

    def add(self, endpoint: str, hashes: list[int], capacity: int) -> None:
        lru = self.lrus.setdefault(endpoint, OrderedDict())
        alone = frozenset((endpoint,))
        grown: dict[frozenset[str], frozenset[str]] = {}
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            owners = self.holders.get(h)
            if owners is None:
                self.holders[h] = alone
            else:
                self.holders[h] = grown.setdefault(owners, owners | alone)
        excess = len(lru) - capacity
        if excess > 0:
            self.drop(endpoint, [lru.popitem(last=False)[0] for _ in range(excess)])

    def remove(self, endpoint: str) -> bool:
        lru = self.lrus.pop(endpoint, None)
        if lru is None:
            return False
        self.drop(endpoint, list(lru))
        return True

    def drop(self, endpoint: str, hashes: list[int]) -> None:
        gone = frozenset((endpoint,))
        shrunk: dict[frozenset[str], frozenset[str]] = {}
        for h in hashes:
            owners = self.holders.get(h)
            if owners is None:
                continue
            rest = shrunk.setdefault(owners, owners - gone)
            if rest:
                self.holders[h] = rest
            else:
                del self.holders[h]


def _sharing(holders: dict[int, frozenset[str]]) -> list[list[int]]:
    """Which hashes point at the very same holder-set object."""
    groups: dict[int, list[int]] = {}
    for h, owners in holders.items():
        groups.setdefault(id(owners), []).append(h)
    return sorted(sorted(g) for g in groups.values())


_small_chains = st.lists(st.integers(min_value=0, max_value=9), max_size=10)  # repeats and empty chains too
_ref_ops = st.lists(
    st.one_of(
        st.tuples(st.just("match"), _small_chains),
        st.tuples(st.just("match+add"), _small_chains, st.lists(_endpoints, min_size=1, max_size=3),
                  st.integers(min_value=1, max_value=12)),
        st.tuples(st.just("add"), _endpoints, _small_chains, st.integers(min_value=1, max_value=12)),
        st.tuples(st.just("remove"), _endpoints),
        st.tuples(st.just("hashes_of"), _endpoints),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ref_ops)
def test_the_index_behaves_exactly_as_the_previous_algorithm(ops):
    idx, ref = PrefixIndex(), _Reference()
    for op in ops:
        kind = op[0]
        if kind == "match":
            assert idx.match(op[1]) == ref.match(op[1])
        elif kind == "match+add":  # the producer's order: look up, schedule, learn (maybe twice)
            _, chain, endpoints, capacity = op
            assert idx.match(chain) == ref.match(chain)
            for ep in endpoints:
                idx.add(ep, chain, capacity)
                ref.add(ep, chain, capacity)
        elif kind == "add":
            idx.add(op[1], op[2], op[3])
            ref.add(op[1], op[2], op[3])
        elif kind == "remove":
            assert idx.remove_endpoint(op[1]) == ref.remove(op[1])
        else:
            assert idx.hashes_of(op[1]) == list(ref.lrus.get(op[1], ()))
        assert idx.size() == len(ref.holders)
        assert idx.entries() == sum(len(lru) for lru in ref.lrus.values())
    assert idx._holders == ref.holders
    assert _sharing(idx._holders) == _sharing(ref.holders)
    assert idx.endpoints() == sorted(ref.lrus)
    for ep in ref.lrus:
        assert idx.hashes_of(ep) == list(ref.lrus[ep])


def test_a_touch_of_held_blocks_is_applied_in_order_before_anything_reads_or_evicts():
    idx = PrefixIndex()
    idx.add("a", [1, 2], capacity=6)
    idx.add("a", [3, 4], capacity=6)
    idx.add("a", [5, 6], capacity=6)  # full: [2, 1, 4, 3, 6, 5]
    idx.add("a", [1, 2], capacity=6)  # touches only
    idx.add("a", [3, 4], capacity=6)
    idx.add("a", [1, 2], capacity=6)  # touched again: its first touch no longer matters
    assert idx.hashes_of("a") == [6, 5, 4, 3, 2, 1]
    idx.add("a", [3, 4], capacity=6)
    idx.add("a", [7], capacity=6)  # evicts the least recent after the touches: 6
    assert idx.hashes_of("a") == [5, 2, 1, 4, 3, 7]
    assert idx.holders_of(6) == frozenset()


def test_chains_ending_in_the_same_hash_keep_their_touch_order():
    idx = PrefixIndex()
    idx.add("a", [1, 2, 3], capacity=10)
    idx.add("a", [9, 3], capacity=10)  # [2, 1, 3, 9] ... then both touched, in this order:
    idx.add("a", [1, 2, 3], capacity=10)
    idx.add("a", [9, 3], capacity=10)
    assert idx.hashes_of("a") == [2, 1, 3, 9]


def test_an_add_right_after_a_match_of_the_same_chain_is_exact_whatever_changed_in_between():
    idx = PrefixIndex()
    chain = [1, 2, 3]
    idx.add("a", chain, capacity=10)
    assert idx.match(chain) == {"a": 3}
    idx.remove_endpoint("a")  # the walk is stale now
    idx.add("a", chain, capacity=10)  # must learn the chain again, not take it as already held
    assert idx.holders_of(1) == frozenset({"a"}) and idx.hashes_of("a") == [3, 2, 1]
    assert idx.match(chain) == {"a": 3}
    idx.add("b", [2], capacity=10)
    assert idx.match(chain) == {"a": 3, "b": 1}  # a remembered walk is not reused after a change
