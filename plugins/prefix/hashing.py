"""Pure functions of prefix hashing: which bytes of a request are hashed, and their chained block hashes.

The approximate prefix cache has no tokenizer. It hashes the request's user input in blocks of
`block_size_tokens * CHARS_PER_TOKEN` bytes (UTF-8; equal to characters for ASCII text, as the reference
EPP's Go strings), each block's hash covering the whole prefix up to and including its block, for one model
and cache salt:

    seed = xxh64(target_model ‖ cache_salt)
    h_i  = xxh64(seed as 8 bytes little-endian ‖ block_0 ‖ … ‖ block_i)

computed with one streaming xxh64 state (update with a block, read the digest), two C calls a block. The
reference EPP chains h_i = xxh64(block_i ‖ h_{i-1}) instead; both make equal hashes mean equal prefixes, and
the index is private to one EPP, so only determinism matters. Streaming costs half as much per block.

Only full blocks are hashed (a trailing partial block is ignored), at most `max_blocks` of them.

Hashing costs two C calls a block (256 blocks take tens of microseconds), and requests share long prefixes
(system prompts, earlier turns): `BlockHashCache` remembers the hashes of recently seen prefixes in chunks
of blocks and returns exactly what `block_hashes` returns, hashing only past the longest remembered prefix.
"""

from __future__ import annotations

import json
import struct
from functools import lru_cache
from typing import Any

import orjson
import xxhash

from epp.request import CHAT_COMPLETIONS, COMPLETIONS, CONVERSATIONS, EMBEDDINGS, RESPONSES, LLMRequest

# The fixed characters-per-token estimate that turns a block size in tokens into one in characters.
CHARS_PER_TOKEN = 4

# `request.scratch` key of the bytes hashed for a request (see `user_input_bytes`). Every prefix plugin
# (approximate index, consistent hashing) reads the same bytes, computed once per request.
USER_INPUT_KEY = "prefix.user_input"

_xxh64 = xxhash.xxh64_intdigest


def user_input_bytes(request: LLMRequest) -> bytes:
    """The bytes whose prefix identifies what a model server can have cached for `request`, computed once
    and kept in `request.scratch[USER_INPUT_KEY]`."""
    cached = request.scratch.get(USER_INPUT_KEY)
    if cached is None:
        cached = serialise_user_input(request)
        request.scratch[USER_INPUT_KEY] = cached
    return cached


def serialise_user_input(request: LLMRequest) -> bytes:
    """The text hashed for each API (deterministic; not byte-identical to the reference EPP's Go JSON):

    completions       the prompt (a list prompt is already joined with a space by the parser)
    chat/completions  JSON of `messages`
    responses         JSON of [{"instructions": …}, {"tools": …}, {"input": …}], the first two only if set
    conversations     JSON of `items` (the parser keeps them in `input`)
    embeddings        JSON of `input`
    anything else     empty (no blocks, so every endpoint matches nothing)

    JSON is compact with sorted object keys, so that clients ordering keys differently share prefixes.
    """
    api = request.api
    if api == COMPLETIONS:
        if isinstance(request.prompt, str):
            return _utf8(request.prompt)
        return _json(request.body.get("prompt"))
    if api == CHAT_COMPLETIONS:
        return _json(request.messages if request.messages is not None else request.body.get("messages"))
    if api == RESPONSES:
        parts: list[dict[str, Any]] = []
        if request.instructions is not None:
            parts.append({"instructions": request.instructions})
        if request.tools is not None:
            parts.append({"tools": request.tools})
        parts.append({"input": request.input})
        return _json(parts)
    if api == CONVERSATIONS:
        return _json(request.input if request.input is not None else request.body.get("items"))
    if api == EMBEDDINGS:
        return _json(request.input if request.input is not None else request.body.get("input"))
    return b""


def _utf8(text: str) -> bytes:
    # surrogatepass: JSON may carry lone surrogates ("\ud800"); they must hash, not raise.
    return text.encode("utf-8", "surrogatepass")


def _json(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        # orjson refuses lone surrogates and integers beyond 64 bits; the stdlib encoder takes both.
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        return _utf8(text)


def chain_seed(model: str, cache_salt: str | None = None) -> int:
    """The hash that starts a request's chain: requests for different models (or LoRA adapters) or with
    different cache salts never share a block hash."""
    return _xxh64(_utf8(model) + (_utf8(cache_salt) if cache_salt else b""))


def max_blocks_to_match(block_size_tokens: int, max_prefix_tokens: int, max_prefix_blocks: int) -> int:
    """How many blocks to hash at most: `max_prefix_tokens // block_size_tokens` (at least 1) when
    `max_prefix_tokens` > 0, else `max_prefix_blocks`; 0 means no cap."""
    if max_prefix_tokens > 0:
        return max(1, max_prefix_tokens // block_size_tokens)
    return max_prefix_blocks


# Blocks are cut by struct in chunks of up to _CHUNK blocks per C call (much cheaper than slicing block by
# block in Python); the cache holds at most _CHUNK Structs per block size in use.
_CHUNK = 64


@lru_cache(maxsize=4 * _CHUNK)
def _splitter(block_size: int, count: int) -> struct.Struct:
    return struct.Struct(f"{block_size}s" * count)


def block_hashes(text: bytes, block_size: int, max_blocks: int, seed: int) -> list[int]:
    """Chained xxh64 hashes of the full `block_size`-byte blocks of `text`, at most `max_blocks` of them
    (0 = no cap). A change in block k changes hashes k, k+1, …; earlier hashes stay the same."""
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    count = _block_count(len(text), block_size, max_blocks)
    out: list[int] = []
    _hash_blocks(xxhash.xxh64(seed.to_bytes(8, "little")), text, 0, block_size, count, out)
    return out


def _block_count(length: int, block_size: int, max_blocks: int) -> int:
    count = length // block_size
    if max_blocks > 0 and count > max_blocks:
        count = max_blocks
    return count


def _hash_blocks(state: Any, text: bytes, offset: int, block_size: int, count: int, out: list[int]) -> None:
    """Feed `count` blocks of `text` from `offset` to the streaming xxh64 `state`, appending each digest."""
    append = out.append
    update, digest = state.update, state.intdigest
    while count > 0:
        n = count if count < _CHUNK else _CHUNK
        for block in _splitter(block_size, n).unpack_from(text, offset):
            update(block)
            append(digest())
        offset += n * block_size
        count -= n


_PROBE = 16  # bytes at the end of a chunk that key it among the chunks seen after the same prefix

# A remembered chunk: (its bytes, its hashes, the xxh64 state after it, the chunks seen after it keyed by their
# last _PROBE bytes). A root (one per seed and block size) has no bytes and no hashes.
_Node = tuple[bytes, list[int], Any, dict[bytes, Any]]


class BlockHashCache:
    """`block_hashes` with a memory: the prefixes of recent requests are kept as a tree of chunks of
    `chunk_blocks` blocks, one tree per seed and block size. A request walks the tree while its bytes equal a
    remembered chunk's (compared in full, so a hit is exact, never a guess from a hash), takes those chunks'
    hashes, and hashes only the rest, from the xxh64 state stored after the last chunk it found. The result
    is always equal to `block_hashes(...)`.

    New chunks are remembered only when the first of them was seen before (its last hash, which covers the
    whole prefix up to it, is noted the first time), so that traffic without shared prefixes pays for one set
    lookup rather than for copies of bytes it will never see again. Bounded: when more than `max_chunks`
    chunks (or four times as many noted hashes) are held, that memory is dropped and starts again, which
    costs less per request than keeping a recency order. A chunk holds chunk_blocks × block size bytes, its
    hashes and an xxh64 state: about 7.5 KB for 64 blocks of 64 bytes (the default), under 8 MB in all.
    Used from the event loop only.
    """

    def __init__(self, max_chunks: int = 1024, chunk_blocks: int = 64) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
        if chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be at least 1, got {chunk_blocks}")
        self._max_chunks = max_chunks
        self._chunk_blocks = chunk_blocks
        self._roots: dict[tuple[int, int], _Node] = {}
        self._chunks = 0
        self._seen: set[int] = set()  # last hashes of chunks seen once

    def __len__(self) -> int:
        """Chunks (and roots) held."""
        return self._chunks

    def block_hashes(self, text: bytes, block_size: int, max_blocks: int, seed: int) -> list[int]:
        """Exactly `block_hashes(text, block_size, max_blocks, seed)`."""
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        if type(text) is not bytes:
            text = bytes(text)
        count = _block_count(len(text), block_size, max_blocks)
        per_chunk = self._chunk_blocks
        size = per_chunk * block_size
        chunks = count // per_chunk
        if chunks == 0 or size < _PROBE:
            return block_hashes(text, block_size, max_blocks, seed)
        key = (seed, block_size)
        node = self._roots.get(key)
        if node is None:
            if self._chunks >= self._max_chunks:
                self._clear()
            self._chunks += 1  # a root counts as a chunk: many seeds (cache salts) must not grow the memory
            node = self._roots[key] = (b"", [], xxhash.xxh64(seed.to_bytes(8, "little")), {})
        out: list[int] = []
        offset = 0
        done = 0
        # Walk down while the request's chunks are remembered.
        while done < chunks:
            end = offset + size
            child = node[3].get(text[end - _PROBE : end])
            if child is None or not text.startswith(child[0], offset):
                break
            node = child
            out += child[1]
            offset = end
            done += 1
        if done == chunks and count == done * per_chunk:
            return out
        # Hash the rest from the state after the last chunk found.
        state = node[2].copy()
        if done < chunks:
            update, digest = state.update, state.intdigest
            append = out.append
            unpack = _splitter(block_size, per_chunk).unpack_from
            start = len(out)
            for block in unpack(text, offset):
                update(block)
                append(digest())
            # The first new chunk's last hash stands for the whole prefix up to it: seen once before, this
            # request's new chunks are remembered; never seen, it is noted and nothing is kept.
            seen = self._seen
            if out[-1] not in seen:
                if len(seen) >= 4 * self._max_chunks:
                    seen.clear()
                seen.add(out[-1])
                _hash_blocks(state, text, offset + size, block_size, count - (done + 1) * per_chunk, out)
                return out
            copy = state.copy
            while True:
                if self._chunks >= self._max_chunks:
                    self._clear()  # what hangs under `node` from now on is unreachable, and dropped with it
                self._chunks += 1
                end = offset + size
                child = (text[offset:end], out[start:], copy(), {})
                node[3][text[end - _PROBE : end]] = child  # replaces a sibling with the same probe, if any
                node = child
                offset = end
                done += 1
                if done == chunks:
                    break
                start = len(out)
                for block in unpack(text, offset):
                    update(block)
                    append(digest())
        _hash_blocks(state, text, offset, block_size, count - done * per_chunk, out)
        return out

    def _clear(self) -> None:
        self._roots.clear()
        self._chunks = 0


def block_size_chars(block_size_tokens: int) -> int:
    """Characters (bytes) per block for a block size in tokens."""
    return block_size_tokens * CHARS_PER_TOKEN
