"""Our chained block keys: equal keys mean equal model, equal token prefix and equal extras."""

from __future__ import annotations

import struct

import pytest

from plugins.prefix.precise.keys import chain_keys, extra_bytes, request_keys, root_key, salt_extra


def le32(ids) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


TOKENS = list(range(1000, 1064))  # 4 blocks of 16
ROOT = root_key("m")


def test_only_full_blocks_get_keys_and_max_blocks_caps_them():
    assert len(chain_keys(ROOT, le32(TOKENS), 16)) == 4
    assert len(chain_keys(ROOT, le32(TOKENS[:63]), 16)) == 3
    assert chain_keys(ROOT, le32(TOKENS[:15]), 16) == []
    assert chain_keys(ROOT, le32(TOKENS), 16, max_blocks=2) == chain_keys(ROOT, le32(TOKENS), 16)[:2]


def test_a_chain_continued_from_a_parent_equals_the_chain_computed_in_one_go():
    whole = chain_keys(ROOT, le32(TOKENS), 16)
    head = chain_keys(ROOT, le32(TOKENS[:32]), 16)
    tail = chain_keys(head[-1], le32(TOKENS[32:]), 16)
    assert head + tail == whole


def test_a_change_in_block_k_changes_keys_k_and_after_only():
    changed = list(TOKENS)
    changed[40] += 1  # block 2
    a, b = chain_keys(ROOT, le32(TOKENS), 16), chain_keys(ROOT, le32(changed), 16)
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))


def test_more_than_one_chunk_of_blocks_is_keyed_like_block_by_block():
    tokens = list(range(16 * 150))
    keys = chain_keys(ROOT, le32(tokens), 16)
    parent, expected = ROOT, []
    for i in range(150):
        parent = chain_keys(parent, le32(tokens[i * 16 : (i + 1) * 16]), 16)[0]
        expected.append(parent)
    assert keys == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (root_key("m"), root_key("other-model")),
        (root_key("m"), root_key("m", hash_seed="42")),
        (root_key("m"), root_key("")),
    ],
)
def test_models_and_seeds_start_different_chains(a, b):
    assert a != b
    assert chain_keys(a, le32(TOKENS), 16) != chain_keys(b, le32(TOKENS), 16)


def test_extras_change_only_their_block_and_the_ones_after():
    plain = chain_keys(ROOT, le32(TOKENS), 16)
    salted = chain_keys(ROOT, le32(TOKENS), 16, [b"", extra_bytes(["salt"])])
    assert salted[0] == plain[0]
    assert all(x != y for x, y in zip(plain[1:], salted[1:], strict=True))


def test_request_keys_with_a_salt_equal_event_keys_with_vllms_salt_extra_keys():
    # vLLM: extra_keys [[salt], None, None, None]; and with a LoRA adapter: [[lora, salt], [lora], ...]
    event_extras = [extra_bytes(e) for e in (["s1"], None, None, None)]
    assert request_keys(ROOT, le32(TOKENS), 16, cache_salt="s1") == chain_keys(ROOT, le32(TOKENS), 16, event_extras)
    lora_extras = [extra_bytes(e, "lora-a") for e in (["lora-a", "s1"], ["lora-a"], ["lora-a"], ["lora-a"])]
    assert lora_extras[1:] == [b"", b"", b""]
    assert chain_keys(ROOT, le32(TOKENS), 16, lora_extras) == request_keys(ROOT, le32(TOKENS), 16, "s1")
    assert request_keys(ROOT, le32(TOKENS), 16, "s2") != request_keys(ROOT, le32(TOKENS), 16, "s1")


@pytest.mark.parametrize(("extra", "expected_empty"), [(None, True), ([], True), ((), True), (["x"], False),
                                                        ([["mm-hash", 3]], False), ("bare", False)])
def test_extra_bytes_are_empty_only_without_extras(extra, expected_empty):
    assert (extra_bytes(extra) == b"") is expected_empty


def test_salt_extra_is_vllms_block_zero_extra():
    assert salt_extra("s") == extra_bytes(["s"]) == extra_bytes(("s",))
    assert salt_extra(None) == salt_extra("") == b""


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block size must be positive"):
        chain_keys(ROOT, le32(TOKENS), 0)
