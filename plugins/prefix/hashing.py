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
    count = len(text) // block_size
    if max_blocks > 0 and count > max_blocks:
        count = max_blocks
    out: list[int] = []
    append = out.append
    state = xxhash.xxh64(seed.to_bytes(8, "little"))
    update, digest = state.update, state.intdigest
    offset = 0
    while count > 0:
        n = count if count < _CHUNK else _CHUNK
        for block in _splitter(block_size, n).unpack_from(text, offset):
            update(block)
            append(digest())
        offset += n * block_size
        count -= n
    return out


def block_size_chars(block_size_tokens: int) -> int:
    """Characters (bytes) per block for a block size in tokens."""
    return block_size_tokens * CHARS_PER_TOKEN
