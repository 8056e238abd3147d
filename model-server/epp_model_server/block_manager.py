"""The paged KV-cache block manager shared by both engines (modelled on vLLM V1's BlockPool).

- `num_blocks` physical blocks of `block_size` token slots each; a sequence holds a list of block ids.
- Prefix reuse: a full block, once computed, is registered under its chained hash (see `hashing`); a new
  sequence whose leading block hashes are registered reuses those blocks instead of recomputing them.
  Only full blocks are shared. One physical block per hash: a block whose hash is already registered
  elsewhere (two identical prompts computed concurrently) stays private and is never published.
- Reference counts: a block is in use while any sequence holds it; at zero it joins the free queue but
  keeps its hash, so it can still be hit until it is reused.
- LRU eviction: allocation takes the block at the head of the free queue; a cached block taken this way
  loses its hash (a `BlockRemoved` event). Freed blocks join the tail, a sequence's blocks in reverse
  order (its last block first), so the tail of a prefix is evicted before its head. A hit on a free
  block takes it out of the queue, so the next free puts it back at the tail (recently used).
- Events (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`) are appended to `events` in the order the
  changes happen; the engine drains them after each step and publishes them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .events import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from .hashing import event_hash


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.events: list[KVEvent] = []

    # ---- state -----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by sequences (vLLM's kv_cache_usage_perc), in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids in eviction order (first = next to be reused)."""
        return list(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- lookup and allocation -------------------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """Block ids of the longest registered prefix of `hashes` (at most `max_blocks` of them)."""
        if not self.enable_caching:
            return []
        out = []
        cached = self._cached
        for h in hashes[:max_blocks]:
            block = cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def can_allocate(self, num_new: int, hits: Sequence[int] = ()) -> bool:
        free_hits = sum(1 for b in hits if self._ref[b] == 0)
        return num_new <= len(self._free) - free_hits

    def allocate(self, num_new: int, hits: Sequence[int] = ()) -> list[int] | None:
        """Takes a reference on the hit blocks and allocates `num_new` fresh blocks; all or nothing.

        Returns the fresh block ids, or None (and changes nothing) when there are not enough free blocks.
        """
        if not self.can_allocate(num_new, hits):
            return None
        for b in hits:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        return [self._take_free() for _ in range(num_new)]

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash[block]
        if h is not None:
            self._hash[block] = None
            if self._cached.get(h) == block:
                del self._cached[h]
            self.events.append(BlockRemoved(block_hashes=[event_hash(h)], medium=MEDIUM_GPU))
        self._ref[block] = 1
        return block

    def free(self, block_ids: Sequence[int]) -> None:
        """Drops one reference on each block; blocks reaching zero join the free queue, last block first."""
        for b in reversed(block_ids):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
            elif self._ref[b] < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")

    # ---- caching ---------------------------------------------------------------------------------

    def cache_full_blocks(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[bytes],
        start: int,
        end: int,
        token_ids: Sequence[int],
        *,
        lora_id: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Registers a sequence's full blocks `start..end-1` (their hashes in `hashes`) and publishes them.

        Emits one BlockStored per run of consecutive newly registered blocks, with the parent hash of the
        run and the run's tokens (`token_ids` are the sequence's tokens).
        """
        if not self.enable_caching or end <= start:
            return
        bs = self.block_size
        run: list[int] = []

        def flush() -> None:
            if not run:
                return
            first, last = run[0], run[-1]
            extra = [(cache_salt,) if (i == 0 and cache_salt) else None for i in run]
            self.events.append(
                BlockStored(
                    block_hashes=[event_hash(hashes[i]) for i in run],
                    parent_block_hash=event_hash(hashes[first - 1]) if first > 0 else None,
                    token_ids=list(token_ids[first * bs : (last + 1) * bs]),
                    block_size=bs,
                    lora_id=lora_id,
                    medium=MEDIUM_GPU,
                    lora_name=lora_name,
                    extra_keys=extra if any(e is not None for e in extra) else None,
                )
            )
            run.clear()

        for i in range(start, end):
            block, h = block_ids[i], hashes[i]
            if self._hash[block] is not None or h in self._cached:
                flush()  # already registered (a hit) or a duplicate of another block: not published
                continue
            self._hash[block] = h
            self._cached[h] = block
            run.append(i)
        flush()

    def reset(self) -> None:
        """Forgets every registered hash (blocks in use stay allocated) and emits AllBlocksCleared."""
        for block in self._cached.values():
            self._hash[block] = None
        self._cached.clear()
        self.events.append(AllBlocksCleared())

    def drain_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
