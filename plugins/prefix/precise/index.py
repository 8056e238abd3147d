"""The precise block index: which endpoints hold which blocks, in which tiers, as their KV events say.

Structures (all owned by one producer and touched only from the event loop, so nothing is locked):

  holders   our key -> {pod: tier mask}        what the read path walks
  partial   our key -> number of holders whose best tier weighs less than the best tier of all (CPU
            only, say); absent for the usual all-GPU key, so the walk skips per-pod work there
  pods      pod -> engine hash -> entry         per pod, in least-recently-stored order: the entry's key(s)
                                                and tiers, so that a `BlockRemoved` (which carries only
                                                engine hashes) finds what to remove
  dups      (pod, engine hash, tier) -> count   stores beyond the first of one engine block in one tier
                                                (vLLM may cache one hash in several physical blocks);
                                                the block leaves that tier with its last removal
  refs      (pod, key, tier) -> count           several engine blocks (or speculative holds) on one key

A pod is the endpoint's `ip:port`. An engine block maps to one key, or to several when the engine's block
size is a multiple of ours (vLLM 64, index 16: one engine block = 4 keys). Engine block sizes that are not
a multiple of ours are refused (counted): our keys could not be cut from their tokens.

Bounded memory: at most `max_entries` (pod, engine block) entries. Beyond it, the least recently stored
entries of the pod holding the most entries are forgotten first (each pod's entries are kept in store
order, so within a pod this is LRU; across pods it keeps the cap fair).

Speculative holds (a decision's blocks on its chosen pod, before the engine's events arrive) are a tier of
their own that weighs like the best tier, kept in a queue and released when their TTL passes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import contains

from plugins.prefix.precise.events import DEFAULT_MEDIUM, BlockRemoved, BlockStored, EngineHash
from plugins.prefix.precise.keys import chain_keys, extra_bytes, request_keys, root_key

# HMA groups whose blocks a prefix match can use (reference notes 2.2); sliding-window and mamba groups
# only hold a window of the sequence, so their stores are skipped.
FULL_ATTENTION_KINDS = frozenset({"full_attention", "mla_attention", "sink_full"})

SPECULATIVE = "speculative"
MAX_TIERS = 7  # tiers beyond this many share the last bit (and the smallest configured weight)

# Outcomes of applying an event ("applied" or why it was dropped); the metrics' label values.
APPLIED = "applied"
UNKNOWN_PARENT = "unknown_parent"
UNKNOWN_BLOCK = "unknown_block"
BLOCK_SIZE = "block_size_mismatch"
TOKEN_COUNT = "token_count_mismatch"
SKIPPED_GROUP = "non_full_attention_group"
EXTRA_KEYS = "extra_keys_mismatch"

Key = int


@dataclass(frozen=True, slots=True)
class Match:
    """An endpoint's longest consecutive cached prefix: `blocks` blocks, `weighted` their tier-weighted sum
    (a GPU block counts its tier weight, 1.0 by default; a CPU-only block less)."""

    blocks: int
    weighted: float


class _Entry:
    """One (pod, engine block): its key(s) and the tiers holding it (a bit mask)."""

    __slots__ = ("keys", "mask")

    def __init__(self, keys: tuple[Key, ...], mask: int) -> None:
        self.keys = keys
        self.mask = mask


class BlockIndex:
    def __init__(
        self,
        block_size: int,
        tier_weights: Mapping[str, float] | None = None,
        max_entries: int = 1_000_000,
        hash_seed: str = "",
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        weights = dict(tier_weights if tier_weights is not None else {"gpu": 1.0, "cpu": 0.8})
        if not weights:
            raise ValueError("at least one tier weight is needed (e.g. gpu: 1.0)")
        for tier, w in weights.items():
            if not 0.0 < w <= 1.0:
                raise ValueError(f"tier weight of {tier!r} must be in (0, 1], got {w}")
        self.block_size = block_size
        self.max_entries = max_entries
        self.hash_seed = hash_seed
        self._best = max(weights.values())
        self._fallback_weight = min(weights.values())
        self._tier_bit: dict[str, int] = {}
        self._bit_weight: list[float] = []
        self._spec_bit = self._new_bit(SPECULATIVE, self._best)
        for tier, w in weights.items():
            self._new_bit(tier.lower(), w)
        self._holders: dict[Key, dict[str, int]] = {}
        self._partial: dict[Key, int] = {}
        self._pods: dict[str, OrderedDict[EngineHash, _Entry]] = {}
        self._dups: dict[tuple[str, EngineHash, int], int] = {}
        self._refs: dict[tuple[str, Key, int], int] = {}
        self._entries = 0
        self._spec: deque[tuple[float, str, int, Sequence[Key]]] = deque()
        self._epoch: dict[str, int] = {}  # bumped by clear(pod): older speculative holds are void
        self._roots: dict[str, Key] = {}
        self.models: set[str] = set()  # the models (and LoRA adapters) events have been stored for
        self.evictions = 0

    # -- tiers -------------------------------------------------------------------------------------------

    def _new_bit(self, tier: str, weight: float) -> int:
        if len(self._bit_weight) >= MAX_TIERS + 1:
            return self._tier_bit.setdefault(tier, 1 << MAX_TIERS)
        bit = 1 << len(self._bit_weight)
        self._tier_bit[tier] = bit
        self._bit_weight.append(weight)
        self._mask_weight = [self._weight_of(m) for m in range(1 << len(self._bit_weight))]
        return bit

    def _weight_of(self, mask: int) -> float:
        return max((w for i, w in enumerate(self._bit_weight) if mask >> i & 1), default=0.0)

    def tier_bit(self, medium: str) -> int:
        bit = self._tier_bit.get(medium)
        if bit is None:
            bit = self._new_bit(medium, self._fallback_weight)
        return bit

    def weight(self, mask: int) -> float:
        return self._mask_weight[mask]

    # -- models ------------------------------------------------------------------------------------------

    def root(self, model: str) -> Key:
        key = self._roots.get(model)
        if key is None:
            key = self._roots[model] = root_key(model, self.hash_seed)
        return key

    def request_keys(
        self, model: str, token_bytes: bytes, cache_salt: str | None = None, max_blocks: int = 0
    ) -> list[Key]:
        """A request's keys: its token ids chained from the root of the model it is served by (see
        `request_model`), the cache salt mixed into block 0, at most `max_blocks` (0 = all)."""
        return request_keys(self.root(self.request_model(model)), token_bytes, self.block_size, cache_salt,
                            max_blocks)

    def request_model(self, model: str) -> str:
        """The model whose chain a request for `model` walks: `model` itself when events were stored under
        it (the topic's model, or a LoRA adapter's name); else "" when events came with topics that name
        no model (so one unnamed model is served); else `model` (nothing matches yet)."""
        if model in self.models or "" not in self.models:
            return model
        return ""

    # -- write path --------------------------------------------------------------------------------------

    def apply_stored(self, pod: str, model: str, event: BlockStored) -> str:
        """Index a BlockStored from `pod` for `model` (a LoRA adapter's name when `lora_name` is set).
        Returns APPLIED or why it was dropped."""
        if event.group_idx is not None and event.kv_cache_spec_kind not in FULL_ATTENTION_KINDS:
            if event.kv_cache_spec_kind is not None or event.group_idx != 0:
                return SKIPPED_GROUP
        bit = self.tier_bit(event.medium)
        entries = self._pods.get(pod)
        if entries is None:
            entries = self._pods[pod] = OrderedDict()
        if not event.token_bytes:  # a placeholder (CPU offload): known blocks gain a tier
            known = [entries.get(h) for h in event.block_hashes]
            if not any(known):
                return UNKNOWN_BLOCK
            for h, entry in zip(event.block_hashes, known, strict=True):
                if entry is not None:
                    self._add_tier(pod, h, entry, bit)
                    entries.move_to_end(h)
            return APPLIED
        engine_size = event.block_size
        ours = self.block_size
        if engine_size <= 0 or engine_size % ours:
            return BLOCK_SIZE
        n = len(event.block_hashes)
        if event.num_tokens != n * engine_size:
            return TOKEN_COUNT
        if event.parent_block_hash is None:
            parent = self.root(model)
        else:
            parent_entry = entries.get(event.parent_block_hash)
            if parent_entry is None:
                return UNKNOWN_PARENT
            parent = parent_entry.keys[-1]
        ratio = engine_size // ours
        extras = None
        if event.extra_keys is not None:
            if len(event.extra_keys) != n:
                return EXTRA_KEYS
            raw = [extra_bytes(e, event.lora_name) for e in event.extra_keys]
            if any(raw):
                extras = raw if ratio == 1 else [raw[i // ratio] if i % ratio == 0 else b"" for i in range(n * ratio)]
        keys = chain_keys(parent, event.token_bytes, ours, extras)
        self.models.add(model)
        holders_of = self._holders
        bit_partial = self._mask_weight[bit] < self._best
        for i, h in enumerate(event.block_hashes):
            if ratio == 1:
                key = keys[i]
                block_keys: tuple[Key, ...] = (key,)
                # The common case, inline: a block new to this pod, on a key this pod does not hold yet.
                if h not in entries:
                    holders = holders_of.get(key)
                    if holders is None or pod not in holders:
                        entries[h] = _Entry(block_keys, bit)
                        self._entries += 1
                        if holders is None:
                            holders_of[key] = {pod: bit}
                        else:
                            holders[pod] = bit
                        if bit_partial:
                            self._partial[key] = self._partial.get(key, 0) + 1
                        continue
            else:
                block_keys = tuple(keys[i * ratio : (i + 1) * ratio])
            entry = entries.get(h)
            if entry is not None and entry.keys != block_keys:
                self._forget(pod, h, entry)  # the engine reused a hash for other tokens: start afresh
                del entries[h]
                entry = None
            if entry is None:
                entry = entries[h] = _Entry(block_keys, 0)
                self._entries += 1
            else:
                entries.move_to_end(h)
            self._add_tier(pod, h, entry, bit)
        if self._entries > self.max_entries:
            self._evict()
        return APPLIED

    def apply_removed(self, pod: str, event: BlockRemoved) -> str:
        """Un-index the blocks of a BlockRemoved from `pod` (for its tier). Returns APPLIED, or
        UNKNOWN_BLOCK when none of its blocks was known in that tier."""
        entries = self._pods.get(pod)
        if entries is None:
            return UNKNOWN_BLOCK
        bit = self.tier_bit(event.medium)
        found = False
        for h in event.block_hashes:
            entry = entries.get(h)
            if entry is None or not entry.mask & bit:
                continue
            found = True
            dup = (pod, h, bit)
            count = self._dups.get(dup)
            if count is not None:
                if count > 2:
                    self._dups[dup] = count - 1
                else:
                    del self._dups[dup]
                continue
            entry.mask &= ~bit
            for key in entry.keys:
                self._release(pod, key, bit)
            if not entry.mask:
                del entries[h]
                self._entries -= 1
        return APPLIED if found else UNKNOWN_BLOCK

    def clear(self, pod: str) -> int:
        """Forget everything `pod` holds (AllBlocksCleared, a publisher restart, the endpoint leaving).
        Returns the number of entries dropped."""
        entries = self._pods.pop(pod, None)
        dropped = 0
        holders = self._holders
        if entries:
            dropped = len(entries)
            self._entries -= dropped
            for entry in entries.values():
                for key in entry.keys:
                    self._drop_holder(pod, key, holders.get(key))
        self._epoch[pod] = self._epoch.get(pod, 0) + 1
        for _, spec_pod, _, keys in self._spec:
            if spec_pod == pod:
                for key in keys:
                    self._drop_holder(pod, key, holders.get(key))
        if any(p == pod for p, _, _ in self._dups):
            self._dups = {k: v for k, v in self._dups.items() if k[0] != pod}
        if any(p == pod for p, _, _ in self._refs):
            self._refs = {k: v for k, v in self._refs.items() if k[0] != pod}
        return dropped

    def _drop_holder(self, pod: str, key: Key, holders: dict[str, int] | None) -> None:
        if holders is None:
            return
        mask = holders.pop(pod, None)
        if mask is None:
            return
        if self._mask_weight[mask] < self._best:
            self._dec_partial(key)
        if not holders:
            del self._holders[key]

    # -- speculative holds ---------------------------------------------------------------------------------

    def add_speculative(self, pod: str, keys: Sequence[Key], expires: float) -> None:
        """`pod` is expected to hold `keys` soon (it was just chosen for them); until `expires` (a
        monotonic time) they match as if stored in the best tier."""
        if not keys:
            return
        bit = self._spec_bit
        for key in keys:
            self._hold(pod, key, bit)
        self._spec.append((expires, pod, self._epoch.get(pod, 0), keys))

    def expire(self, now: float) -> int:
        """Release the speculative holds whose TTL has passed; returns how many requests' holds ended."""
        spec = self._spec
        done = 0
        bit = self._spec_bit
        while spec and spec[0][0] <= now:
            _, pod, epoch, keys = spec.popleft()
            done += 1
            if self._epoch.get(pod, 0) != epoch:
                continue
            for key in keys:
                self._release(pod, key, bit)
        return done

    # -- read path ---------------------------------------------------------------------------------------

    def longest_prefix(self, keys: Sequence[Key], pods: Collection[str] | None = None) -> dict[str, Match]:
        """Per pod (only those in `pods` when given), the longest run of `keys` from the first that the pod
        holds, unbroken, and its tier-weighted length. Pods holding no first block are absent.

        The walk is done at C speed: the holder maps of the keys are fetched in one `map`, cut at the
        first key nobody holds, and each pod holding the first key is then looked for along them (one
        `map` per pod; few pods hold a prompt's first block)."""
        if not keys:
            return {}
        walk = list(map(self._holders.get, keys))
        try:
            del walk[walk.index(None) :]
        except ValueError:
            pass
        if not walk:
            return {}
        first = walk[0]
        alive = list(first) if pods is None else [p for p in first if p in pods]
        if not alive:
            return {}
        best = self._best
        length = len(walk)
        runs: dict[str, int] = {}
        for pod in alive:
            held = list(map(contains, walk, repeat(pod)))
            try:
                runs[pod] = held.index(False)
            except ValueError:
                runs[pod] = length
        partial = self._partial
        if not partial:
            return {pod: Match(n, n * best) for pod, n in runs.items()}
        deficit: dict[str, float] = {}
        mask_weight = self._mask_weight
        for i, key in enumerate(keys[:length]):
            if key in partial:
                h = walk[i]
                for pod, n in runs.items():
                    if i < n:
                        w = mask_weight[h[pod]]
                        if w < best:
                            deficit[pod] = deficit.get(pod, 0.0) + (best - w)
        return {pod: Match(n, n * best - deficit.get(pod, 0.0)) for pod, n in runs.items()}

    # -- introspection -----------------------------------------------------------------------------------

    def size(self) -> int:
        """(pod, engine block) entries held (what max_entries caps)."""
        return self._entries

    def num_keys(self) -> int:
        """Distinct keys held by at least one pod (speculative holds included)."""
        return len(self._holders)

    def speculative_count(self) -> int:
        return len(self._spec)

    def pods(self) -> list[str]:
        return [p for p, entries in self._pods.items() if entries]

    def pod_size(self, pod: str) -> int:
        entries = self._pods.get(pod)
        return len(entries) if entries else 0

    def engine_hashes(self, pod: str, medium: str = DEFAULT_MEDIUM) -> set[EngineHash]:
        """The engine hashes `pod` holds in tier `medium` (for tests and debugging)."""
        bit = self._tier_bit.get(medium)
        entries = self._pods.get(pod)
        if bit is None or not entries:
            return set()
        return {h for h, e in entries.items() if e.mask & bit}

    def holds(self, pod: str, key: Key) -> bool:
        h = self._holders.get(key)
        return h is not None and pod in h

    # -- internals ---------------------------------------------------------------------------------------

    def _add_tier(self, pod: str, h: EngineHash, entry: _Entry, bit: int) -> None:
        if entry.mask & bit:
            dup = (pod, h, bit)
            self._dups[dup] = self._dups.get(dup, 1) + 1
            return
        entry.mask |= bit
        for key in entry.keys:
            self._hold(pod, key, bit)

    def _hold(self, pod: str, key: Key, bit: int) -> None:
        holders = self._holders.get(key)
        if holders is None:
            holders = self._holders[key] = {}
        mask = holders.get(pod, 0)
        if mask & bit:
            ref = (pod, key, bit)
            self._refs[ref] = self._refs.get(ref, 1) + 1
            return
        new = mask | bit
        holders[pod] = new
        weights, best = self._mask_weight, self._best
        was_partial = mask != 0 and weights[mask] < best
        is_partial = weights[new] < best
        if is_partial and not was_partial:
            self._partial[key] = self._partial.get(key, 0) + 1
        elif was_partial and not is_partial:
            self._dec_partial(key)

    def _release(self, pod: str, key: Key, bit: int) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        mask = holders.get(pod, 0)
        if not mask & bit:
            return
        ref = (pod, key, bit)
        count = self._refs.get(ref)
        if count is not None:
            if count > 2:
                self._refs[ref] = count - 1
            else:
                del self._refs[ref]
            return
        new = mask & ~bit
        weights, best = self._mask_weight, self._best
        was_partial = weights[mask] < best
        is_partial = new != 0 and weights[new] < best
        if was_partial and not is_partial:
            self._dec_partial(key)
        elif is_partial and not was_partial:
            self._partial[key] = self._partial.get(key, 0) + 1
        if new:
            holders[pod] = new
        else:
            del holders[pod]
            if not holders:
                del self._holders[key]

    def _dec_partial(self, key: Key) -> None:
        n = self._partial.get(key, 0) - 1
        if n > 0:
            self._partial[key] = n
        else:
            self._partial.pop(key, None)

    def _forget(self, pod: str, h: EngineHash, entry: _Entry) -> None:
        """Release every tier of an entry (it is being dropped whole)."""
        mask = entry.mask
        bit = 1
        while mask:
            if mask & 1:
                self._dups.pop((pod, h, bit), None)
                for key in entry.keys:
                    self._release(pod, key, bit)
            mask >>= 1
            bit <<= 1
        self._entries -= 1

    def _evict(self) -> None:
        """Bring the entry count to 1% under the cap, oldest entries of the largest pods first."""
        target = self.max_entries - max(1, self.max_entries // 100)
        while self._entries > target:
            pod, entries = max(self._pods.items(), key=lambda item: len(item[1]))
            excess = self._entries - target
            share = min(excess, max(1, len(entries) // 10))
            for _ in range(share):
                h, entry = entries.popitem(last=False)
                self._forget(pod, h, entry)
                self.evictions += 1

    def check(self) -> None:
        """Assert the internal invariants (for tests): holders and tier masks agree with the entries and
        speculative holds, and the partial counts are right."""
        expected: dict[Key, dict[str, int]] = {}
        count = 0
        for pod, entries in self._pods.items():
            for entry in entries.values():
                count += 1
                assert entry.mask, "an entry without tiers must be dropped"
                for key in entry.keys:
                    per = expected.setdefault(key, {})
                    per[pod] = per.get(pod, 0) | entry.mask
        for _, pod, epoch, keys in self._spec:
            if self._epoch.get(pod, 0) == epoch:
                for key in keys:
                    per = expected.setdefault(key, {})
                    per[pod] = per.get(pod, 0) | self._spec_bit
        assert count == self._entries, (count, self._entries)
        assert expected == self._holders, "holders differ from the entries"
        partial: dict[Key, int] = {}
        for key, per in self._holders.items():
            n = sum(1 for m in per.values() if self._mask_weight[m] < self._best)
            if n:
                partial[key] = n
        assert partial == self._partial, (partial, self._partial)

