"""Our own chained block keys (pure functions).

The index is keyed by keys we compute ourselves from token ids, never by the engine's block hashes, so it
works whatever hash algorithm (`--prefix-caching-hash-algo`) and PYTHONHASHSEED the engines use (llm-d's
"dual key" design, reference notes 2.4 b). The same function runs on both sides:

  event side    parent key (looked up from the event's parent engine hash, or the model's root) +
                the event's token ids + its extra keys
  request side  the model's root + the request's token ids + the cache salt on block 0

    root(model)  = xxh3_64("model\\0" ‖ model, seed = xxh3_64(hashSeed) or 0)
    key_i        = xxh3_64(tokens of block i as uint32 LE ‖ extra_i, seed = key_{i-1})   (key_{-1} = root)

A block is `block_size` token ids; only full blocks get keys (a trailing partial block is ignored, as vLLM
caches full blocks only). `extra_i` is empty, or 0xFF followed by the canonical msgpack of the block's
extra keys (vLLM's cache salt and multimodal hashes; the LoRA adapter's name is left out because it is
already in the root). Equal keys therefore mean equal model, equal token prefix and equal extras.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import msgpack
import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
_EXTRA_MARK = b"\xff"
# Blocks are cut by struct in chunks of up to _CHUNK blocks per C call.
_CHUNK = 64


def root_key(model: str, hash_seed: str = "") -> int:
    """The key a chain of `model` (a base model or a LoRA adapter name) starts from."""
    seed = _xxh3(hash_seed.encode("utf-8", "surrogatepass")) if hash_seed else 0
    return _xxh3(b"model\x00" + model.encode("utf-8", "surrogatepass"), seed)


def extra_bytes(extra: Any, lora_name: str | None = None) -> bytes:
    """The bytes mixed into a block's key for its extra keys (b"" when there are none). Items equal to
    `lora_name` are dropped: vLLM puts the adapter's name in every block's extra keys, and it is part
    of the root already."""
    if extra is None:
        return b""
    if isinstance(extra, list | tuple):
        items = [x for x in extra if not (lora_name and x == lora_name)]
        if not items:
            return b""
        extra = items
    return _EXTRA_MARK + msgpack.packb(extra, use_bin_type=True)


def salt_extra(cache_salt: str | None) -> bytes:
    """The request-side extra bytes of block 0 for a `cache_salt` (vLLM puts `[salt]` on block 0)."""
    return extra_bytes([cache_salt]) if cache_salt else b""


@lru_cache(maxsize=4 * _CHUNK)
def _splitter(block_bytes: int, count: int) -> struct.Struct:
    return struct.Struct(f"{block_bytes}s" * count)


def chain_keys(
    parent: int,
    token_bytes: bytes,
    block_size: int,
    extras: Sequence[bytes] | None = None,
    max_blocks: int = 0,
) -> list[int]:
    """Keys of the full `block_size`-token blocks of `token_bytes` (uint32 LE ids), chained from `parent`.

    `extras[i]` (when given and non-empty) is mixed into block i's key; at most `max_blocks` keys are
    computed (0 = all)."""
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    size = block_size * 4
    count = len(token_bytes) // size
    if max_blocks > 0 and count > max_blocks:
        count = max_blocks
    out: list[int] = []
    append = out.append
    offset = 0
    index = 0
    while count > 0:
        n = count if count < _CHUNK else _CHUNK
        blocks = _splitter(size, n).unpack_from(token_bytes, offset)
        if extras is None:
            for block in blocks:
                parent = _xxh3(block, parent)
                append(parent)
        else:
            for block in blocks:
                extra = extras[index] if index < len(extras) else b""
                parent = _xxh3(block + extra if extra else block, parent)
                append(parent)
                index += 1
        offset += n * size
        count -= n
    return out


def request_keys(
    root: int, token_bytes: bytes, block_size: int, cache_salt: str | None = None, max_blocks: int = 0
) -> list[int]:
    """The keys of a request's prompt: its chain from the model's root, the salt mixed into block 0."""
    extras = [salt_extra(cache_salt)] if cache_salt else None
    return chain_keys(root, token_bytes, block_size, extras, max_blocks)
