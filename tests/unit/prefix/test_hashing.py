"""Specification of prefix hashing: the bytes hashed per API, and chained block hashes."""

from __future__ import annotations

import json

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.request import CHAT_COMPLETIONS, CONVERSATIONS, EMBEDDINGS, RESPONSES, LLMRequest
from plugins.prefix.hashing import (
    CHARS_PER_TOKEN,
    USER_INPUT_KEY,
    BlockHashCache,
    block_hashes,
    block_size_chars,
    chain_seed,
    max_blocks_to_match,
    serialise_user_input,
    user_input_bytes,
)

from .helpers import chat, completion


def _request(api: str, body: dict, **fields) -> LLMRequest:
    return LLMRequest(request_id="r", api=api, model="m", target_model="m", body=body, headers={},
                      size_bytes=0, **fields)


def _reference_chain(data: bytes, block: int, seed: int) -> list[int]:
    """The formula, written out plainly: h_i = xxh64(seed little-endian ‖ block_0 ‖ … ‖ block_i)."""
    head = seed.to_bytes(8, "little")
    return [xxhash.xxh64(head + data[: (i + 1) * block]).intdigest() for i in range(len(data) // block)]


# ---------------------------------------------------------------------------------------------------------
# What is hashed


def test_completions_hash_the_prompt_text_as_utf8():
    assert serialise_user_input(completion("héllo wörld")) == "héllo wörld".encode()


def test_chat_hashes_json_of_the_messages_independent_of_key_order():
    a = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    b = chat([{"content": "be brief", "role": "system"}, {"content": "hi", "role": "user"}])
    assert serialise_user_input(a) == serialise_user_input(b)
    assert json.loads(serialise_user_input(a)) == a.messages


def test_chat_conversations_sharing_leading_messages_share_a_byte_prefix():
    system = {"role": "system", "content": "s" * 500}
    one = serialise_user_input(chat([system, {"role": "user", "content": "question one"}]))
    two = serialise_user_input(chat([system, {"role": "user", "content": "another question"}]))
    common = next(i for i, (x, y) in enumerate(zip(one, two, strict=False)) if x != y)
    assert common > 500  # the whole system message, then the user messages differ


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"input": "hello"}, [{"input": "hello"}]),
        ({"input": "hello", "instructions": "be brief"}, [{"instructions": "be brief"}, {"input": "hello"}]),
        (
            {"input": [{"role": "user", "content": "x"}], "instructions": "i", "tools": [{"type": "web"}]},
            [{"instructions": "i"}, {"tools": [{"type": "web"}]}, {"input": [{"content": "x", "role": "user"}]}],
        ),
    ],
    ids=["input-only", "instructions-then-input", "instructions-tools-input"],
)
def test_responses_hash_instructions_tools_and_input_in_that_order_when_present(fields, expected):
    assert json.loads(serialise_user_input(_request(RESPONSES, {}, **fields))) == expected


def test_embeddings_hash_json_of_the_input():
    assert json.loads(serialise_user_input(_request(EMBEDDINGS, {}, input=["a", "b"]))) == ["a", "b"]


def test_conversations_hash_json_of_the_items():
    items = [{"type": "message", "content": "x"}]
    assert json.loads(serialise_user_input(_request(CONVERSATIONS, {"items": items}))) == items


def test_unknown_api_hashes_nothing():
    assert serialise_user_input(_request("", {"prompt": "x" * 100})) == b""


def test_lone_surrogates_are_hashed_not_refused():
    req = chat([{"role": "user", "content": "a\ud800b" * 50}])
    assert len(serialise_user_input(req)) > 100
    assert serialise_user_input(completion("a\ud800b")) == "a\ud800b".encode("utf-8", "surrogatepass")


def test_the_user_input_is_computed_once_and_kept_in_request_scratch():
    req = completion("first prompt")
    first = user_input_bytes(req)
    assert req.scratch[USER_INPUT_KEY] is first
    req.prompt = "changed afterwards"
    assert user_input_bytes(req) is first


def test_a_chat_request_without_parsed_messages_falls_back_to_the_body():
    messages = [{"role": "user", "content": "hi"}]
    req = _request(CHAT_COMPLETIONS, {"messages": messages})
    assert serialise_user_input(req) == serialise_user_input(chat(messages))


# ---------------------------------------------------------------------------------------------------------
# Chained block hashes


def test_hashes_follow_the_chain_formula_seeded_by_model_and_salt():
    data = bytes(range(256)) * 3
    seed = xxhash.xxh64(b"llama" + b"salt").intdigest()
    assert chain_seed("llama", "salt") == seed
    assert chain_seed("llama") == xxhash.xxh64(b"llama").intdigest()
    assert block_hashes(data, 64, 0, seed) == _reference_chain(data, 64, seed)


def test_hashing_is_deterministic():
    data = b"the same prompt " * 40
    assert block_hashes(data, 64, 0, 7) == block_hashes(bytes(data), 64, 0, 7)


@pytest.mark.parametrize("k", [0, 1, 5, 9])
def test_a_change_in_block_k_changes_hashes_from_k_on_only(k):
    data = bytearray(b"x" * 64 * 10)
    before = block_hashes(bytes(data), 64, 0, 1)
    data[k * 64 + 17] ^= 1
    after = block_hashes(bytes(data), 64, 0, 1)
    assert after[:k] == before[:k]
    assert all(a != b for a, b in zip(after[k:], before[k:], strict=True))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=64, max_size=64 * 12), pos=st.integers(min_value=0), block=st.sampled_from([8, 64]))
def test_any_single_byte_change_keeps_earlier_hashes_and_changes_later_ones(data, pos, block):
    pos %= len(data)
    changed = bytearray(data)
    changed[pos] ^= 0xFF
    before, after = block_hashes(data, block, 0, 3), block_hashes(bytes(changed), block, 0, 3)
    k = pos // block
    assert after[:k] == before[:k]
    assert all(a != b for a, b in zip(after[k:], before[k:], strict=True))


@pytest.mark.parametrize(
    "seed_a, seed_b",
    [(("m1", None), ("m2", None)), (("m", "tenant-a"), ("m", "tenant-b")), (("m", None), ("m", "salt"))],
    ids=["model", "salt", "salt-vs-none"],
)
def test_model_and_cache_salt_change_every_hash(seed_a, seed_b):
    data = b"shared prompt text " * 20
    a = block_hashes(data, 64, 0, chain_seed(*seed_a))
    b = block_hashes(data, 64, 0, chain_seed(*seed_b))
    assert len(a) == len(b) == 5
    assert not set(a) & set(b)


@pytest.mark.parametrize(
    "length, block, max_blocks, expected",
    [
        (0, 64, 256, 0),
        (63, 64, 256, 0),  # shorter than one block: nothing to match
        (64, 64, 256, 1),
        (127, 64, 256, 1),  # trailing partial block ignored
        (640, 64, 256, 10),
        (640, 64, 3, 3),  # capped
        (640, 64, 0, 10),  # 0 = no cap
        (64 * 300, 64, 256, 256),
        (64 * 300, 64, 0, 300),
    ],
)
def test_only_full_blocks_are_hashed_up_to_the_cap(length, block, max_blocks, expected):
    assert len(block_hashes(b"z" * length, block, max_blocks, 0)) == expected


def test_a_trailing_partial_block_does_not_affect_the_hashes():
    assert block_hashes(b"q" * 128, 64, 0, 5) == block_hashes(b"q" * 128 + b"tail", 64, 0, 5)


@pytest.mark.parametrize("n_blocks", [1, 63, 64, 65, 128, 200])
def test_long_inputs_hash_like_the_plain_formula_across_internal_chunks(n_blocks):
    data = bytes((i * 31 + i // 7) % 251 for i in range(64 * n_blocks + 5))
    assert block_hashes(data, 64, 0, 11) == _reference_chain(data, 64, 11)


def test_the_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block size"):
        block_hashes(b"x" * 100, 0, 0, 0)


@pytest.mark.parametrize(
    "block_tokens, max_tokens, max_blocks, expected",
    [
        (16, 0, 256, 256),  # default: maxPrefixBlocksToMatch
        (16, 4096, 256, 256),  # tokens win when set
        (16, 1024, 256, 64),
        (64, 1024, 256, 16),  # auto-tuned block size changes the token cap in blocks
        (16, 8, 256, 1),  # less than one block still hashes one
        (16, 0, 0, 0),  # no cap
    ],
)
def test_max_blocks_come_from_max_tokens_when_set_else_max_blocks(block_tokens, max_tokens, max_blocks, expected):
    assert max_blocks_to_match(block_tokens, max_tokens, max_blocks) == expected


def test_a_block_of_n_tokens_is_four_characters_per_token():
    assert CHARS_PER_TOKEN == 4
    assert block_size_chars(16) == 64


def test_conversations_read_the_items_the_parser_keeps_in_input():
    items = [{"type": "message", "content": "y"}]
    assert json.loads(serialise_user_input(_request(CONVERSATIONS, {"items": items}, input=items))) == items


# ---------------------------------------------------------------------------------------------------------
# BlockHashCache: block_hashes with a memory of shared prefixes


def _prompts(shared: int, tails: int, tail_len: int, seed: int = 0) -> list[bytes]:
    head = bytes((i * 7 + seed) % 251 for i in range(shared))
    return [head + bytes((i * 13 + t * 29 + seed) % 253 for i in range(tail_len)) for t in range(tails)]


def test_the_cache_returns_exactly_block_hashes_for_requests_sharing_prefixes():
    cache = BlockHashCache(chunk_blocks=4)
    prompts = _prompts(64 * 20, 3, 64 * 9 + 5) * 3  # each prompt three times: noted, remembered, found
    for text in prompts:
        assert cache.block_hashes(text, 64, 0, 9) == _reference_chain(text, 64, 9)
        assert cache.block_hashes(text, 64, 16, 9) == _reference_chain(text, 64, 9)[:16]


def test_a_prefix_is_remembered_the_second_time_it_is_seen():
    cache = BlockHashCache(chunk_blocks=4)
    text = _prompts(64 * 16, 1, 0)[0]
    cache.block_hashes(text, 64, 0, 1)
    assert len(cache) == 1  # only the root: the first chunk's last hash is noted, nothing is kept
    cache.block_hashes(text, 64, 0, 1)
    assert len(cache) == 1 + 4  # the root and the four chunks of 4 blocks
    assert cache.block_hashes(text, 64, 0, 1) == _reference_chain(text, 64, 1)
    assert len(cache) == 5  # found, nothing added


def test_a_prompt_differing_inside_a_remembered_chunk_is_hashed_from_the_chunk_before():
    cache = BlockHashCache(chunk_blocks=4)
    text = _prompts(64 * 16, 1, 0)[0]
    for _ in range(2):
        cache.block_hashes(text, 64, 0, 1)
    changed = bytearray(text)
    changed[64 * 9 + 3] ^= 1  # inside the third chunk (blocks 8-11)
    assert cache.block_hashes(bytes(changed), 64, 0, 1) == _reference_chain(bytes(changed), 64, 1)
    assert cache.block_hashes(text, 64, 0, 1) == _reference_chain(text, 64, 1)


@pytest.mark.parametrize("other", [dict(seed=2), dict(block=32)], ids=["seed", "block-size"])
def test_remembered_chunks_are_kept_apart_by_seed_and_block_size(other):
    cache = BlockHashCache(chunk_blocks=2)
    text = _prompts(64 * 8, 1, 0)[0]
    for _ in range(2):
        cache.block_hashes(text, 64, 0, 1)
    block, seed = other.get("block", 64), other.get("seed", 1)
    for _ in range(3):
        assert cache.block_hashes(text, block, 0, seed) == _reference_chain(text, block, seed)


def test_the_memory_is_bounded_and_dropped_when_full():
    cache = BlockHashCache(max_chunks=6, chunk_blocks=2)
    for text in _prompts(0, 12, 64 * 8, seed=5) * 2:
        assert cache.block_hashes(text, 64, 0, 3) == _reference_chain(text, 64, 3)
        assert len(cache) <= 6


def test_non_bytes_input_hashes_like_its_bytes():
    cache = BlockHashCache(chunk_blocks=2)
    text = _prompts(64 * 6, 1, 0)[0]
    for value in (text, bytearray(text), memoryview(text), text):
        assert cache.block_hashes(value, 64, 0, 4) == _reference_chain(text, 64, 4)


def test_the_cache_refuses_what_block_hashes_refuses_and_bad_sizes():
    with pytest.raises(ValueError, match="block size"):
        BlockHashCache().block_hashes(b"x" * 100, 0, 0, 0)
    with pytest.raises(ValueError, match="max_chunks"):
        BlockHashCache(max_chunks=0)
    with pytest.raises(ValueError, match="chunk_blocks"):
        BlockHashCache(chunk_blocks=0)


@settings(max_examples=80, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 700), st.binary(max_size=200), st.sampled_from([8, 16, 64]),
                  st.sampled_from([0, 3, 40]), st.sampled_from([0, 1, 2**64 - 1])),
        min_size=1, max_size=30,
    ),
    heads=st.lists(st.binary(min_size=0, max_size=700), min_size=4, max_size=4),
    chunk_blocks=st.sampled_from([1, 2, 3, 8]),
    max_chunks=st.sampled_from([1, 4, 100]),
)
def test_the_cache_always_equals_block_hashes(requests, heads, chunk_blocks, max_chunks):
    cache = BlockHashCache(max_chunks=max_chunks, chunk_blocks=chunk_blocks)
    for head, cut, tail, block, max_blocks, seed in requests:
        text = heads[head][:cut] + tail
        assert cache.block_hashes(text, block, max_blocks, seed) == block_hashes(text, block, max_blocks, seed)
        assert len(cache) <= max_chunks
