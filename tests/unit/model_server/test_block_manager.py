"""The block manager: prefix hits and misses, reference counts, LRU eviction order, and its events."""

import pytest

from epp_model_server.block_manager import BlockManager
from epp_model_server.events import AllBlocksCleared, BlockRemoved, BlockStored
from epp_model_server.hashing import event_hash

BS = 4


def h(name: str) -> bytes:
    """A fake 32-byte block hash whose event hash is easy to read."""
    return name.encode().ljust(32, b"\0")


def store(bm: BlockManager, names: list[str], tokens: list[int] | None = None) -> list[int]:
    """Allocates a sequence of len(names) full blocks, registers them, returns the block ids."""
    blocks = bm.allocate(len(names))
    assert blocks is not None
    tokens = tokens if tokens is not None else list(range(len(names) * BS))
    bm.cache_full_blocks(blocks, [h(n) for n in names], 0, len(names), tokens)
    return blocks


def test_lookup_returns_the_longest_registered_prefix_and_stops_at_the_first_miss():
    bm = BlockManager(8, BS)
    blocks = store(bm, ["a", "b", "c"])
    assert bm.lookup([h("a"), h("b"), h("c")], max_blocks=10) == blocks
    assert bm.lookup([h("a"), h("b"), h("x"), h("c")], max_blocks=10) == blocks[:2]
    assert bm.lookup([h("x"), h("a")], max_blocks=10) == []
    assert bm.lookup([h("a"), h("b"), h("c")], max_blocks=1) == blocks[:1]


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, BS)
    blocks = store(bm, ["a", "b"])
    bm.free(blocks)
    assert bm.num_free_blocks == 4
    assert bm.lookup([h("a"), h("b")], 10) == blocks


def test_eviction_takes_least_recently_freed_blocks_and_a_sequence_tail_first():
    bm = BlockManager(4, BS)
    first = store(bm, ["a1", "a2"])  # blocks 0, 1
    second = store(bm, ["b1", "b2"])  # blocks 2, 3
    bm.free(first)
    bm.free(second)
    assert bm.free_queue() == [first[1], first[0], second[1], second[0]]
    bm.drain_events()
    assert bm.allocate(3) is not None
    assert bm.drain_events() == [
        BlockRemoved([event_hash(h("a2"))], "GPU"),
        BlockRemoved([event_hash(h("a1"))], "GPU"),
        BlockRemoved([event_hash(h("b2"))], "GPU"),
    ]
    assert bm.lookup([h("b1")], 10) == [second[0]]
    assert bm.lookup([h("a1")], 10) == []


def test_a_hit_on_a_free_block_makes_it_most_recently_used():
    bm = BlockManager(4, BS)
    a = store(bm, ["a"])
    b = store(bm, ["b"])
    bm.free(a)
    bm.free(b)
    hits = bm.lookup([h("a")], 10)
    assert bm.allocate(0, hits) == []
    bm.free(hits)
    assert bm.free_queue()[-2:] == [b[0], a[0]]


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(4, BS)
    blocks = store(bm, ["a", "b"])
    hits = bm.lookup([h("a"), h("b")], 10)
    bm.allocate(1, hits)
    assert [bm.ref_count(b) for b in blocks] == [2, 2]
    bm.free(blocks)
    assert [bm.ref_count(b) for b in blocks] == [1, 1]
    assert bm.usage() == pytest.approx(3 / 4)


def test_allocation_is_all_or_nothing():
    bm = BlockManager(4, BS)
    bm.free(store(bm, ["a", "b", "c"]))
    store(bm, ["d", "e", "f"])  # three of the four blocks in use again
    bm.drain_events()
    before = bm.free_queue()
    assert bm.allocate(2) is None
    assert bm.free_queue() == before
    assert bm.drain_events() == []  # no eviction happened


def test_hits_on_free_blocks_count_against_the_space_for_new_blocks():
    bm = BlockManager(3, BS)
    blocks = store(bm, ["a", "b"])
    bm.free(blocks)
    hits = bm.lookup([h("a"), h("b")], 10)
    assert not bm.can_allocate(2, hits)
    assert bm.can_allocate(1, hits)


def test_cache_full_blocks_publishes_one_event_per_run_with_parent_and_tokens():
    bm = BlockManager(8, BS)
    blocks = bm.allocate(3)
    tokens = list(range(100, 112))
    hashes = [h("a"), h("b"), h("c")]
    bm.cache_full_blocks(blocks, hashes, 0, 1, tokens, lora_id=2, lora_name="ad", cache_salt="s")
    bm.cache_full_blocks(blocks, hashes, 1, 3, tokens, lora_id=2, lora_name="ad", cache_salt="s")
    assert bm.drain_events() == [
        BlockStored([event_hash(h("a"))], None, tokens[:4], BS, 2, "GPU", "ad", [("s",)]),
        BlockStored([event_hash(h("b")), event_hash(h("c"))], event_hash(h("a")), tokens[4:], BS, 2, "GPU",
                    "ad", None),
    ]


def test_a_duplicate_of_an_already_cached_hash_is_neither_registered_nor_published():
    bm = BlockManager(8, BS)
    original = store(bm, ["a", "b"])
    bm.drain_events()
    twin = bm.allocate(3)
    bm.cache_full_blocks(twin, [h("a"), h("b"), h("c")], 0, 3, list(range(12)))
    assert bm.drain_events() == [BlockStored([event_hash(h("c"))], event_hash(h("b")), list(range(8, 12)), BS,
                                             None, "GPU")]
    assert bm.lookup([h("a"), h("b"), h("c")], 10) == [*original, twin[2]]
    assert bm.block_hash(twin[0]) is None


def test_without_prefix_caching_nothing_is_registered_or_published():
    bm = BlockManager(4, BS, enable_caching=False)
    blocks = bm.allocate(2)
    bm.cache_full_blocks(blocks, [h("a"), h("b")], 0, 2, list(range(8)))
    assert bm.lookup([h("a")], 10) == [] and bm.drain_events() == []


def test_reset_forgets_every_hash_and_emits_all_blocks_cleared():
    bm = BlockManager(4, BS)
    in_use = store(bm, ["a"])
    bm.free(store(bm, ["b"]))
    bm.drain_events()
    bm.reset()
    assert bm.drain_events() == [AllBlocksCleared()]
    assert bm.lookup([h("a")], 10) == [] and bm.lookup([h("b")], 10) == []
    assert bm.ref_count(in_use[0]) == 1 and bm.num_cached_blocks == 0
    bm.allocate(3)
    assert bm.drain_events() == []  # nothing left to evict


def test_freeing_more_often_than_allocated_is_a_bug_that_raises():
    bm = BlockManager(2, BS)
    blocks = bm.allocate(1)
    bm.free(blocks)
    with pytest.raises(RuntimeError):
        bm.free(blocks)
