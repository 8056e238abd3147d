"""The precise block index: events in, longest consecutive cached prefix per endpoint out."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.prefix.precise.events import BlockStored
from plugins.prefix.precise.index import (
    APPLIED,
    BLOCK_SIZE,
    EXTRA_KEYS,
    SKIPPED_GROUP,
    TOKEN_COUNT,
    UNKNOWN_BLOCK,
    UNKNOWN_PARENT,
    BlockIndex,
    Match,
)

from .helpers import FakeEngine, le32, tokens

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
M = "model"


def keys_for(index: BlockIndex, toks, salt=None, model=M):
    return index.request_keys(model, le32(toks), salt)


def matched(index: BlockIndex, toks, pods=None, salt=None, model=M) -> dict[str, int]:
    return {p: m.blocks for p, m in index.longest_prefix(keys_for(index, toks, salt, model), pods).items()}


@pytest.fixture
def index():
    idx = BlockIndex(16)
    yield idx
    idx.check()


def test_a_stored_chain_matches_block_by_block(index):
    engine, doc = FakeEngine(), tokens(6)
    assert index.apply_stored(A, M, engine.stored(doc, 0, 4)) == APPLIED
    assert matched(index, doc) == {A: 4}
    assert matched(index, doc[: 16 * 2 + 5]) == {A: 2}
    assert index.apply_stored(A, M, engine.stored(doc, 4, 6)) == APPLIED  # continues from block 3's hash
    assert matched(index, doc) == {A: 6}
    assert index.size() == 6 and index.num_keys() == 6


def test_keys_do_not_depend_on_the_engines_hash_function_or_seed(index):
    doc = tokens(4)
    index.apply_stored(A, M, FakeEngine(seed="0").stored(doc))
    index.apply_stored(B, M, FakeEngine(seed="12345").stored(doc))
    assert matched(index, doc) == {A: 4, B: 4}
    assert index.num_keys() == 4  # both engines' blocks land on the same keys


def test_a_store_whose_parent_was_never_seen_is_dropped(index):
    engine, doc = FakeEngine(), tokens(4)
    assert index.apply_stored(A, M, engine.stored(doc, 2, 4)) == UNKNOWN_PARENT
    assert matched(index, doc) == {} and index.size() == 0


def test_the_match_is_the_consecutive_prefix_from_the_first_block(index):
    engine, doc = FakeEngine(), tokens(5)
    index.apply_stored(A, M, engine.stored(doc))
    index.apply_stored(B, M, engine.stored(doc))
    assert index.apply_removed(A, engine.removed(doc, [3])) == APPLIED
    assert index.apply_removed(B, engine.removed(doc, [0])) == APPLIED
    assert matched(index, doc) == {A: 3}  # B still holds blocks 1-4, but not block 0
    assert index.apply_removed(A, engine.removed(doc, [3])) == UNKNOWN_BLOCK  # gone already


def test_candidates_restrict_the_answer(index):
    engine, doc = FakeEngine(), tokens(3)
    for pod in (A, B, C):
        index.apply_stored(pod, M, engine.stored(doc))
    assert matched(index, doc, pods={A, C}) == {A: 3, C: 3}
    assert matched(index, doc, pods={"10.9.9.9:8000"}) == {}


def test_pods_drop_out_where_they_stop_holding(index):
    engine, doc = FakeEngine(), tokens(8)
    index.apply_stored(A, M, engine.stored(doc, 0, 8))
    index.apply_stored(B, M, engine.stored(doc, 0, 5))
    index.apply_stored(C, M, engine.stored(doc, 0, 2))
    assert matched(index, doc) == {A: 8, B: 5, C: 2}
    other = tokens(3, tag=9)
    assert matched(index, other) == {}


@pytest.mark.parametrize(
    ("engine_block", "ours", "outcome", "keys_per_block"),
    [(16, 16, APPLIED, 1), (64, 16, APPLIED, 4), (32, 16, APPLIED, 2), (24, 16, BLOCK_SIZE, 0), (8, 16, BLOCK_SIZE, 0)],
)
def test_engine_blocks_must_be_a_multiple_of_ours(engine_block, ours, outcome, keys_per_block):
    index = BlockIndex(ours)
    engine, doc = FakeEngine(block_size=engine_block), tokens(6, block_size=engine_block)
    assert index.apply_stored(A, M, engine.stored(doc, 0, 3)) == outcome
    if outcome == APPLIED:
        index.apply_stored(A, M, engine.stored(doc, 3, 6))
        assert index.num_keys() == 6 * keys_per_block
        assert matched(index, doc) == {A: 6 * keys_per_block}
        index.apply_removed(A, engine.removed(doc, [5]))
        assert matched(index, doc) == {A: 5 * keys_per_block}
    index.check()


def test_a_store_whose_tokens_do_not_fill_its_blocks_is_dropped(index):
    event = FakeEngine().stored(tokens(2))
    bad = BlockStored(event.block_hashes, None, event.token_bytes[:-4], 16)
    assert index.apply_stored(A, M, bad) == TOKEN_COUNT
    worse = BlockStored(event.block_hashes, None, event.token_bytes, 16, extra_keys=(None,))
    assert index.apply_stored(A, M, worse) == EXTRA_KEYS


def test_a_salted_prompt_matches_only_requests_with_the_same_salt(index):
    engine, doc = FakeEngine(), tokens(3)
    index.apply_stored(A, M, engine.stored(doc, salt="tenant-1"))
    assert matched(index, doc, salt="tenant-1") == {A: 3}
    assert matched(index, doc, salt="tenant-2") == {}
    assert matched(index, doc) == {}


def test_lora_adapters_have_chains_of_their_own(index):
    doc = tokens(3)
    index.apply_stored(A, "sql-lora", FakeEngine(lora="sql-lora").stored(doc))
    index.apply_stored(B, M, FakeEngine().stored(doc))
    assert matched(index, doc, model="sql-lora") == {A: 3}
    assert matched(index, doc, model=M) == {B: 3}


def test_topics_without_a_model_serve_requests_for_any_model_name():
    index = BlockIndex(16)
    doc = tokens(2)
    assert index.request_model("llama") == "llama"
    index.apply_stored(A, "", FakeEngine().stored(doc))
    assert index.request_model("llama") == ""
    assert matched(index, doc, model="llama") == {A: 2}
    index.apply_stored(A, "lora-x", FakeEngine(lora="lora-x").stored(doc))
    assert index.request_model("lora-x") == "lora-x"


def test_tiers_weigh_blocks(index):
    engine, doc = FakeEngine(), tokens(4)
    index.apply_stored(A, M, engine.stored(doc))
    placeholder = BlockStored(tuple(engine.hashes(doc)[:2]), None, b"", 0, "cpu")  # offloaded: no tokens
    assert index.apply_stored(A, M, placeholder) == APPLIED
    index.apply_removed(A, engine.removed(doc, [0, 1, 2]))  # gone from the GPU; 0 and 1 remain on the CPU
    result = index.longest_prefix(keys_for(index, doc))
    assert result == {A: Match(2, pytest.approx(1.6))}
    index.apply_removed(A, engine.removed(doc, [0], medium="cpu"))
    assert matched(index, doc) == {}


def test_a_cpu_placeholder_for_unknown_blocks_is_dropped(index):
    assert index.apply_stored(A, M, BlockStored((1, 2), None, b"", 0, "cpu")) == UNKNOWN_BLOCK


def test_configured_tier_weights_and_unknown_tiers():
    index = BlockIndex(16, {"gpu": 1.0, "cpu": 0.5})
    engine, doc = FakeEngine(), tokens(2)
    index.apply_stored(A, M, engine.stored(doc, medium="cpu"))
    index.apply_stored(B, M, engine.stored(doc, medium="disk"))  # not configured: the smallest weight
    result = index.longest_prefix(keys_for(index, doc))
    assert result[A] == Match(2, 1.0) and result[B] == Match(2, 1.0)
    index.check()
    with pytest.raises(ValueError, match="must be in"):
        BlockIndex(16, {"gpu": 1.5})


def test_a_block_stored_twice_leaves_with_its_second_removal(index):
    engine, doc = FakeEngine(), tokens(2)
    index.apply_stored(A, M, engine.stored(doc))
    index.apply_stored(A, M, engine.stored(doc))  # the same hashes in two physical blocks
    index.apply_removed(A, engine.removed(doc, [0, 1]))
    assert matched(index, doc) == {A: 2}
    index.apply_removed(A, engine.removed(doc, [0, 1]))
    assert matched(index, doc) == {} and index.size() == 0


def test_two_engine_blocks_on_one_key_are_counted(index):
    doc = tokens(2)
    index.apply_stored(A, M, FakeEngine(seed="1").stored(doc))
    index.apply_stored(A, M, FakeEngine(seed="2").stored(doc))  # other hashes, same tokens: same keys
    index.apply_removed(A, FakeEngine(seed="1").removed(doc, [0, 1]))
    assert matched(index, doc) == {A: 2}
    index.apply_removed(A, FakeEngine(seed="2").removed(doc, [0, 1]))
    assert matched(index, doc) == {}


def test_clear_forgets_one_pod_only(index):
    engine, doc = FakeEngine(), tokens(3)
    index.apply_stored(A, M, engine.stored(doc))
    index.apply_stored(B, M, engine.stored(doc))
    assert index.clear(A) == 3
    assert matched(index, doc) == {B: 3}
    assert index.apply_stored(A, M, engine.stored(doc, 1, 3)) == UNKNOWN_PARENT  # its history is gone too


def test_hma_groups_other_than_full_attention_are_skipped(index):
    engine, doc = FakeEngine(), tokens(2)
    base = engine.stored(doc)
    window = BlockStored(base.block_hashes, None, base.token_bytes, 16, group_idx=1,
                         kv_cache_spec_kind="sliding_window")
    assert index.apply_stored(A, M, window) == SKIPPED_GROUP
    full = BlockStored(base.block_hashes, None, base.token_bytes, 16, group_idx=0, kv_cache_spec_kind="full_attention")
    assert index.apply_stored(A, M, full) == APPLIED


def test_the_cap_forgets_the_oldest_entries_of_the_largest_pod_first():
    index = BlockIndex(16, max_entries=100)
    engine = FakeEngine()
    small = tokens(10, tag=1)
    index.apply_stored(B, M, engine.stored(small))
    docs = [tokens(10, tag=10 + i) for i in range(9)]
    for doc in docs:
        index.apply_stored(A, M, engine.stored(doc))
    assert index.size() == 100 and index.evictions == 0
    for doc in docs[:-1]:
        index.apply_stored(A, M, engine.stored(doc, 0, 1))  # a new store of block 0 makes it recent again
    newest = tokens(5, tag=99)
    index.apply_stored(A, M, engine.stored(newest))  # 105 entries: down to 99, from A's oldest
    assert index.size() == 99 and index.evictions == 6
    assert matched(index, docs[0]) == {A: 1}  # blocks 1-6 of the oldest document went; block 0 was refreshed
    assert matched(index, docs[1]) == {A: 10}
    assert matched(index, newest) == {A: 5}
    assert matched(index, small) == {B: 10}  # the small pod keeps everything
    index.check()


def test_speculative_holds_match_until_they_expire(index):
    doc = tokens(3)
    keys = keys_for(index, doc)
    index.add_speculative(A, keys, expires=10.0)
    index.add_speculative(A, keys[:1], expires=20.0)
    assert matched(index, doc) == {A: 3}
    assert index.longest_prefix(keys)[A].weighted == 3.0  # as the best tier
    assert index.expire(10.0) == 1
    assert matched(index, doc) == {A: 1}
    index.expire(20.0)
    assert matched(index, doc) == {} and index.num_keys() == 0


def test_speculative_holds_and_real_blocks_coexist(index):
    engine, doc = FakeEngine(), tokens(3)
    index.add_speculative(A, keys_for(index, doc), expires=1.0)
    index.apply_stored(A, M, engine.stored(doc, 0, 2))
    index.expire(1.0)
    assert matched(index, doc) == {A: 2}


def test_clearing_a_pod_voids_its_speculative_holds(index):
    doc = tokens(2)
    index.add_speculative(A, keys_for(index, doc), expires=5.0)
    index.clear(A)
    assert matched(index, doc) == {}
    index.add_speculative(A, keys_for(index, doc), expires=9.0)
    index.expire(5.0)  # the voided hold must not release the new one
    assert matched(index, doc) == {A: 2}


# -- a model check: random event streams against a plain model of each pod's blocks ------------------------

DOCS = [tokens(6, tag=t) for t in range(3)]
PODS = [A, B]

op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(PODS), st.integers(0, 2), st.integers(0, 5), st.integers(1, 6),
              st.sampled_from(["gpu", "cpu"])),
    st.tuples(st.just("remove"), st.sampled_from(PODS), st.integers(0, 2), st.integers(0, 5),
              st.sampled_from(["gpu", "cpu"])),
    st.tuples(st.just("clear"), st.sampled_from(PODS)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_random_event_streams_keep_the_index_equal_to_each_pods_cache(ops):
    index = BlockIndex(16, {"gpu": 1.0, "cpu": 0.5})
    engine = FakeEngine()
    # the model: pod -> doc -> block -> tier -> physical copies stored and not yet removed
    held: dict[str, dict[int, dict[int, Counter]]] = {p: {d: {} for d in range(3)} for p in PODS}
    for o in ops:
        if o[0] == "store":
            _, pod, d, first, n, tier = o
            last = min(6, first + n)
            blocks = held[pod][d]
            outcome = index.apply_stored(pod, M, engine.stored(DOCS[d], first, last, tier))
            if first > 0 and not +blocks.get(first - 1, Counter()):
                assert outcome == UNKNOWN_PARENT
                continue
            assert outcome == APPLIED
            for b in range(first, last):
                blocks.setdefault(b, Counter())[tier] += 1
        elif o[0] == "remove":
            _, pod, d, b, tier = o
            index.apply_removed(pod, engine.removed(DOCS[d], [b], tier))
            copies = held[pod][d].get(b)
            if copies and copies[tier] > 0:
                copies[tier] -= 1
        else:
            index.clear(o[1])
            held[o[1]] = {d: {} for d in range(3)}
        index.check()
    weight = {"gpu": 1.0, "cpu": 0.5}
    for d, doc in enumerate(DOCS):
        expected = {}
        for pod in PODS:
            n, w = 0, 0.0
            while tiers := +held[pod][d].get(n, Counter()):
                w += max(weight[t] for t in tiers)
                n += 1
            if n:
                expected[pod] = Match(n, pytest.approx(w))
        assert index.longest_prefix(keys_for(index, doc)) == expected
