import hashlib
import pickle

import pytest

from epp_model_server.hashing import (
    block_hashes,
    cbor_encode,
    event_hash,
    extra_keys,
    hash_function,
    none_hash,
    sha256_cbor,
    sha256_pickle,
)


def vllm_sha256(obj) -> bytes:
    """vLLM's `sha256` hash function, written out from its definition."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


@pytest.mark.parametrize(
    ("value", "hex_encoding"),  # RFC 8949 appendix A examples
    [
        (0, "00"), (23, "17"), (24, "1818"), (100, "1864"), (1000, "1903e8"), (1000000, "1a000f4240"),
        (1 << 32, "1b0000000100000000"), (-1, "20"), (-100, "3863"), (None, "f6"), (True, "f5"),
        ("a", "6161"), (b"\x01\x02\x03\x04", "4401020304"), ([1, [2, 3], [4, 5]], "8301820203820405"),
        ((), "80"),
    ],
)
def test_cbor_encoding_matches_the_rfc_examples(value, hex_encoding):
    assert cbor_encode(value).hex() == hex_encoding


def test_first_block_hash_is_the_vllm_recipe_over_none_hash():
    root = none_hash(sha256_pickle, "0")
    assert root == vllm_sha256("0")
    tokens = list(range(100, 116))
    assert block_hashes(tokens, 16, sha256_pickle, root) == [vllm_sha256((root, tuple(tokens), None))]


def test_hashes_chain_so_a_change_in_block_0_changes_every_later_block():
    root = none_hash(sha256_pickle)
    a = block_hashes(list(range(48)), 16, sha256_pickle, root)
    b = block_hashes([999, *range(1, 48)], 16, sha256_pickle, root)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b, strict=True))


def test_only_full_blocks_are_hashed():
    root = none_hash(sha256_pickle)
    assert len(block_hashes(list(range(47)), 16, sha256_pickle, root)) == 2


def test_hashing_can_resume_from_a_parent():
    root = none_hash(sha256_cbor)
    tokens = list(range(64))
    full = block_hashes(tokens, 16, sha256_cbor, root)
    assert block_hashes(tokens, 16, sha256_cbor, root, start=2, parent=full[1]) == full[2:]


@pytest.mark.parametrize(
    ("block", "lora", "salt", "expected"),
    [
        (0, None, None, None),
        (0, "ad", None, ("ad",)),
        (3, "ad", None, ("ad",)),
        (0, None, "s", ("s",)),
        (1, None, "s", None),
        (0, "ad", "s", ("ad", "s")),
    ],
)
def test_extra_keys_are_lora_name_on_every_block_and_salt_on_block_0(block, lora, salt, expected):
    assert extra_keys(block, lora, salt) == expected


def test_adapters_and_salts_never_share_blocks():
    root = none_hash(sha256_pickle)
    tokens = list(range(32))
    plain = block_hashes(tokens, 16, sha256_pickle, root)
    lora = block_hashes(tokens, 16, sha256_pickle, root, lora_name="ad")
    salted = block_hashes(tokens, 16, sha256_pickle, root, cache_salt="s")
    assert len({plain[1], lora[1], salted[1]}) == 3
    assert lora[0] == vllm_sha256((root, tuple(range(16)), ("ad",)))


def test_seed_changes_every_hash():
    tokens = list(range(16))
    assert block_hashes(tokens, 16, sha256_pickle, none_hash(sha256_pickle, "1")) != block_hashes(
        tokens, 16, sha256_pickle, none_hash(sha256_pickle, "2"))


def test_event_hash_is_the_last_eight_bytes_big_endian():
    digest = bytes(range(32))
    assert event_hash(digest) == int.from_bytes(bytes(range(24, 32)), "big")
    assert 0 <= event_hash(b"\xff" * 32) == (1 << 64) - 1


def test_unknown_algorithm_names_the_choices():
    with pytest.raises(ValueError, match="sha256, sha256_cbor"):
        hash_function("md5")
