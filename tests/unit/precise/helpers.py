"""Helpers for the precise prefix cache's tests: a fake engine that emits vLLM-shaped events."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import msgpack

from plugins.prefix.precise.events import AllBlocksCleared, BlockRemoved, BlockStored, encode_event


def le32(ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


class FakeEngine:
    """Block hashes and events the way a vLLM engine makes them, with a hash function of its own (seeded,
    like vLLM's PYTHONHASHSEED), so tests can show the index does not depend on it."""

    def __init__(self, block_size: int = 16, seed: str = "0", lora: str | None = None) -> None:
        self.block_size = block_size
        self.seed = seed
        self.lora = lora

    def hashes(self, tokens: Sequence[int], salt: str | None = None) -> list[int]:
        bs = self.block_size
        parent = b"root:" + self.seed.encode()
        out = []
        for i in range(len(tokens) // bs):
            extra = (self.lora, salt if i == 0 else None)
            parent = hashlib.blake2b(repr((parent, tuple(tokens[i * bs : (i + 1) * bs]), extra)).encode(),
                                     digest_size=8).digest()
            out.append(int.from_bytes(parent, "big"))
        return out

    def stored(self, tokens: Sequence[int], first: int = 0, last: int | None = None, medium: str = "gpu",
               salt: str | None = None) -> BlockStored:
        """BlockStored for blocks first..last-1 of `tokens` (a run continuing from block first-1)."""
        bs = self.block_size
        hashes = self.hashes(tokens, salt)
        last = len(hashes) if last is None else last
        extra = None
        if salt is not None or self.lora is not None:
            extra = tuple(
                [k for k in (self.lora, salt if i == 0 else None) if k] or None for i in range(first, last)
            )
        return BlockStored(
            block_hashes=tuple(hashes[first:last]),
            parent_block_hash=hashes[first - 1] if first > 0 else None,
            token_bytes=le32(tokens[first * bs : last * bs]),
            block_size=bs,
            medium=medium,
            lora_name=self.lora,
            extra_keys=extra,
        )

    def removed(self, tokens: Sequence[int], blocks: Sequence[int], medium: str = "gpu",
                salt: str | None = None) -> BlockRemoved:
        hashes = self.hashes(tokens, salt)
        return BlockRemoved(tuple(hashes[i] for i in blocks), medium)


def batch_payload(events, shape: str = "map", ts: float = 0.0, rank: int = 0) -> bytes:
    return msgpack.packb([ts, [encode_event(e, shape) for e in events], rank], use_bin_type=True)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=seq < 0)


CLEARED = AllBlocksCleared()


def tokens(n_blocks: int, tag: int = 0, block_size: int = 16) -> list[int]:
    """`n_blocks` full blocks of token ids; different tags give different first blocks."""
    return [tag * 1_000_000 + i for i in range(n_blocks * block_size)]
