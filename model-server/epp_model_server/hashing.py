"""Prefix-caching block hashes, computed the way vLLM's V1 engine computes them (pure functions).

A block's hash covers its parent block's hash, its token ids and its extra keys, so equal hashes mean
equal prefixes (vLLM `hash_block_tokens`):

    hash(block i) = H((hash(block i-1) or NONE_HASH, tuple(token_ids of block i), extra_keys or None))

- Only full blocks are hashed.
- `H` is `--prefix-caching-hash-algo`: `sha256` (vLLM's default: SHA-256 of the pickled tuple, protocol
  5) or `sha256_cbor` (SHA-256 of the canonical CBOR encoding, reproducible in any language).
- `NONE_HASH = H(seed)` where the seed is the `PYTHONHASHSEED` string. vLLM draws a random NONE_HASH when
  PYTHONHASHSEED is unset; this server defaults the seed to "0" instead, so hashes are reproducible.
- Extra keys (vLLM `generate_block_hash_extra_keys`): the LoRA adapter's name on every block, then the
  request's `cache_salt` on block 0 only. Different adapters and different salts therefore never share a
  block.
- The hash published in KV events is the digest's last 8 bytes read big-endian (vLLM's
  `maybe_convert_block_hash` with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1): an unsigned 64-bit int.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

HASH_ALGOS = ("sha256", "sha256_cbor")
DEFAULT_HASH_SEED = "0"

HashFn = Callable[[Any], bytes]


def sha256_pickle(obj: Any) -> bytes:
    """vLLM's `sha256`: SHA-256 of `pickle.dumps(obj, protocol=HIGHEST_PROTOCOL)`."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    if value < 1 << 8:
        return bytes([major << 5 | 24, value])
    if value < 1 << 16:
        return bytes([major << 5 | 25]) + value.to_bytes(2, "big")
    if value < 1 << 32:
        return bytes([major << 5 | 26]) + value.to_bytes(4, "big")
    if value < 1 << 64:
        return bytes([major << 5 | 27]) + value.to_bytes(8, "big")
    raise ValueError(f"integer {value} does not fit CBOR's 64-bit heads")


def cbor_encode(obj: Any) -> bytes:
    """Canonical CBOR (RFC 8949 deterministic encoding) of None, bools, ints, bytes, str, lists/tuples."""
    out = bytearray()

    def enc(x: Any) -> None:
        if x is None:
            out.append(0xF6)
        elif x is True:
            out.append(0xF5)
        elif x is False:
            out.append(0xF4)
        elif isinstance(x, int):
            out.extend(_cbor_head(0, x) if x >= 0 else _cbor_head(1, -1 - x))
        elif isinstance(x, bytes | bytearray):
            out.extend(_cbor_head(2, len(x)))
            out.extend(x)
        elif isinstance(x, str):
            data = x.encode("utf-8")
            out.extend(_cbor_head(3, len(data)))
            out.extend(data)
        elif isinstance(x, list | tuple):
            out.extend(_cbor_head(4, len(x)))
            for item in x:
                enc(item)
        else:
            raise TypeError(f"cannot CBOR-encode {type(x).__name__}")

    enc(obj)
    return bytes(out)


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's `sha256_cbor`: SHA-256 of the canonical CBOR encoding."""
    return hashlib.sha256(cbor_encode(obj)).digest()


def hash_function(algo: str) -> HashFn:
    if algo == "sha256":
        return sha256_pickle
    if algo == "sha256_cbor":
        return sha256_cbor
    raise ValueError(f"unknown prefix-caching hash algorithm {algo!r}; choose one of {', '.join(HASH_ALGOS)}")


def none_hash(hash_fn: HashFn, seed: str = DEFAULT_HASH_SEED) -> bytes:
    """The parent hash of a sequence's first block."""
    return hash_fn(seed)


def extra_keys(block_index: int, lora_name: str | None, cache_salt: str | None) -> tuple | None:
    """The extra keys vLLM mixes into a block's hash: LoRA name (every block), cache_salt (block 0)."""
    keys: list[Any] = []
    if lora_name:
        keys.append(lora_name)
    if cache_salt and block_index == 0:
        keys.append(cache_salt)
    return tuple(keys) if keys else None


def hash_block(hash_fn: HashFn, parent: bytes, token_ids: Sequence[int], extra: tuple | None) -> bytes:
    return hash_fn((parent, tuple(token_ids), extra))


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    hash_fn: HashFn,
    root: bytes,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    start: int = 0,
    parent: bytes | None = None,
) -> list[bytes]:
    """Hashes of the full blocks of `token_ids` from block `start` on (`parent`: hash of block start-1)."""
    out = []
    prev = root if start == 0 else parent
    if prev is None:
        raise ValueError("parent is required when start > 0")
    for i in range(start, len(token_ids) // block_size):
        prev = hash_block(
            hash_fn, prev, token_ids[i * block_size : (i + 1) * block_size], extra_keys(i, lora_name, cache_salt)
        )
        out.append(prev)
    return out


def event_hash(digest: bytes) -> int:
    """The 64-bit integer vLLM publishes for a block hash: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big")
