"""The approximate prefix index: which endpoints are believed to hold which prefix blocks.

Two structures, kept consistent with each other:
  holders: block hash -> (frozen) set of endpoint names believed to hold that block
  lrus:    endpoint name -> its block hashes, least recently used first, at most `capacity` of them

An endpoint's LRU stands in for its KV cache: adding a hash beyond the capacity evicts the least recently
used one, and the endpoint is then removed from that hash's holders (a hash nobody holds is dropped).
Owned by one producer; used only from the event loop, so there is no locking.

The per-request work is kept to C-level passes over the request's hashes (`map`, `filterfalse`, bulk dict
updates) with Python loops only where holder sets differ from block to block. Two shortcuts leave every
observable result as it was:
  - a walk is remembered with the index's version (bumped by every change to the holders): `match` of the
    same hashes at the same version returns the remembered counts, and `add` after it (the producer's order:
    match in prepare, add in pre_request) reads from the walk whether the endpoint already holds them all;
  - an `add` that only makes held hashes more recent (no new hash, nothing to evict) does not reorder the
    LRU at once: the chain is queued and the moves are applied, in order, before anything reads or evicts
    from that LRU. A queued chain that is touched again later is dropped from the queue, since its later
    touch decides the order of its hashes and moving a hash does not change the order of the others.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from itertools import filterfalse, repeat, takewhile

_NOBODY: frozenset[str] = frozenset()

# Deferred touches kept per endpoint before they are applied anyway (bounds the memory they hold).
_MAX_PENDING = 32
# Walks remembered (keyed by their last hash); all are forgotten when the limit is reached.
_MAX_WALKS = 256

# A walk: (its hashes, the version it was made at, whether every hash was held, the distinct holder sets
# walked, the counts).
_Walk = tuple[list[int], int, bool, Iterable[frozenset[str]], dict[str, int]]


class PrefixIndex:
    def __init__(self) -> None:
        # Holder sets are immutable and shared: the consecutive blocks of a chain learned by the same
        # endpoints point at one frozenset, which keeps the lookup proportional to the number of distinct
        # holder sets on the walk rather than to blocks × holders.
        self._holders: dict[int, frozenset[str]] = {}
        self._lrus: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        # endpoint -> chains whose touch (move to most recent, last block first) is not applied yet, by their
        # last hash, oldest first; every hash in them is in the endpoint's LRU.
        self._pending: dict[str, dict[int, list[int]]] = {}
        # Bumped whenever holders (and so LRU membership) change; a walk is valid while it is unchanged.
        self._version = 0
        self._walk: _Walk | None = None  # the last walk
        self._walks: dict[int, _Walk] = {}  # recent walks by their last hash

    # -- lookup ------------------------------------------------------------------------------------------

    def match(self, hashes: Iterable[int]) -> dict[str, int]:
        """Blocks matched per endpoint: walk `hashes` in order, stop at the first one no endpoint holds,
        and count one for every endpoint holding each hash walked. (An endpoint is not required to hold
        every earlier block; the walk stops only when nobody holds a block.)"""
        hashes = list(hashes)  # also the walk's record, which the caller cannot change
        if not hashes:
            return {}
        version = self._version
        walk = self._walks.get(hashes[-1])
        if walk is not None and walk[1] == version and walk[0] == hashes:
            self._walk = walk
            return dict(walk[4])
        holders = self._holders
        if hashes[-1] in holders:
            # Probably held all along: look every hash up, then cut at the first one nobody holds.
            walked = list(map(holders.get, hashes, repeat(_NOBODY)))
            first = walked[0]
            if first is not _NOBODY and walked.count(first) == len(walked):
                return self._remember((hashes, version, True, (first,), dict.fromkeys(first, len(walked))))
            try:
                del walked[walked.index(_NOBODY) :]  # empty sets are never stored: _NOBODY marks a missing hash
            except ValueError:
                pass
        else:
            # The walk stops before the end: look up only as far as it goes (holder sets are never empty).
            walked = list(takewhile(bool, map(holders.get, hashes)))
        counts: dict[str, int] = {}
        if not walked:
            return self._remember((hashes, version, False, (), counts))
        get = counts.get
        distinct = set(walked)  # few in practice: a chain learned together shares one holder set
        if len(distinct) <= 8:
            runs: Iterable[tuple[frozenset[str], int]] = ((s, walked.count(s)) for s in distinct)
        else:
            runs = Counter(walked).items()
        for owners, n in runs:
            for endpoint in owners:
                counts[endpoint] = get(endpoint, 0) + n
        return self._remember((hashes, version, len(walked) == len(hashes), distinct, counts))

    def _remember(self, walk: _Walk) -> dict[str, int]:
        self._walk = walk
        walks = self._walks
        if len(walks) >= _MAX_WALKS:
            walks.clear()
        walks[walk[0][-1]] = walk
        return dict(walk[4])

    # -- learning ----------------------------------------------------------------------------------------

    def add(self, endpoint: str, hashes: Sequence[int], capacity: int) -> None:
        """Record that `endpoint` now holds `hashes` (a request's chain, first block first) and make them
        its most recently used entries, then evict down to `capacity`.

        The chain is inserted last block first, so that the first blocks are the most recent: under
        pressure an endpoint loses the tail of a prompt before its head, as vLLM frees a request's blocks
        in reverse order. (The reference EPP inserts in order, which evicts block 0 first and so breaks
        the whole chain at once.)
        """
        if capacity <= 0:
            raise ValueError(f"LRU capacity must be positive, got {capacity}")
        lru = self._lrus.get(endpoint)
        if lru is None:
            lru = self._lrus[endpoint] = OrderedDict()
        self._capacity[endpoint] = capacity
        walk = self._walk
        if walk is not None and walk[1] == self._version and walk[0] == hashes:
            # `match` just walked these hashes: the endpoint holds them all iff it is in every set walked.
            if walk[2] and len(lru) <= capacity and all(endpoint in owners for owners in walk[3]):
                self._defer_touch(endpoint, lru, walk[0])
                return
            new = None
        else:
            new = list(dict.fromkeys(filterfalse(lru.__contains__, hashes)))
            if not new and len(lru) <= capacity:
                self._defer_touch(endpoint, lru, list(hashes))
                return
        self._version += 1
        self._apply_pending(endpoint, lru)
        if new is None:
            new = list(dict.fromkeys(filterfalse(lru.__contains__, hashes)))
        if new:
            self._add_holder(endpoint, new)
        if len(new) == len(hashes):  # every hash is new (and they are distinct): insert, last block first
            lru.update(zip(reversed(hashes), repeat(None)))
        else:
            lru.update(zip(new, repeat(None)))
            deque(map(lru.move_to_end, reversed(hashes)), maxlen=0)
        excess = len(lru) - capacity
        if excess > 0:
            self._drop_holder(endpoint, [lru.popitem(last=False)[0] for _ in range(excess)])

    def remove_endpoint(self, endpoint: str) -> bool:
        """Forget everything about `endpoint` (it left the pool). Returns whether it was known."""
        lru = self._lrus.pop(endpoint, None)
        self._capacity.pop(endpoint, None)
        self._pending.pop(endpoint, None)
        if lru is None:
            return False
        self._version += 1
        self._drop_holder(endpoint, list(lru))
        return True

    def _defer_touch(self, endpoint: str, lru: OrderedDict[int, None], chain: list[int]) -> None:
        if not chain:
            return  # touches nothing
        pending = self._pending.get(endpoint)
        if pending is None:
            self._pending[endpoint] = {chain[-1]: chain}
            return
        last = chain[-1]
        earlier = pending.get(last)
        if earlier is not None:
            if earlier != chain:  # another chain ending in the same hash: apply the queue to keep the order
                self._apply_pending(endpoint, lru)
                self._pending[endpoint] = {last: chain}
                return
            del pending[last]  # touched again now: its earlier touch no longer decides anything
        pending[last] = chain
        if len(pending) > _MAX_PENDING:
            self._apply_pending(endpoint, lru)

    def _apply_pending(self, endpoint: str, lru: OrderedDict[int, None]) -> None:
        chains = self._pending.pop(endpoint, None)
        if chains:
            touch = lru.move_to_end
            for chain in chains.values():
                deque(map(touch, reversed(chain)), maxlen=0)

    def _add_holder(self, endpoint: str, hashes: list[int]) -> None:
        """Add `endpoint` to the holders of `hashes` (distinct, none held by it yet)."""
        holders = self._holders
        alone = frozenset((endpoint,))
        owners = list(map(holders.get, hashes))
        first = owners[0]
        if owners.count(first) == len(owners):  # the common case: all unheld, or all held by the same set
            holders.update(zip(hashes, repeat(alone if first is None else first | alone)))
            return
        grown: dict[frozenset[str], frozenset[str]] = {}  # old holder set -> it plus `endpoint`
        for h, old in zip(hashes, owners, strict=True):
            if old is None:
                holders[h] = alone
            else:
                new = grown.get(old)
                if new is None:
                    new = grown[old] = old | alone
                holders[h] = new

    def _drop_holder(self, endpoint: str, hashes: list[int]) -> None:
        """Remove `endpoint` from the holders of `hashes` (distinct)."""
        holders = self._holders
        gone = frozenset((endpoint,))
        owners = list(map(holders.get, hashes))
        first = owners[0] if owners else None
        if first is not None and owners.count(first) == len(owners):
            rest = first - gone
            if rest:
                holders.update(zip(hashes, repeat(rest)))
            else:
                deque(map(holders.__delitem__, hashes), maxlen=0)
            return
        shrunk: dict[frozenset[str], frozenset[str]] = {}  # old holder set -> it minus `endpoint`
        for h, old in zip(hashes, owners, strict=True):
            if old is None:
                continue
            new = shrunk.get(old)
            if new is None:
                new = shrunk[old] = old - gone
            if new:
                holders[h] = new
            else:
                del holders[h]

    # -- introspection -----------------------------------------------------------------------------------

    def size(self) -> int:
        """Distinct block hashes in the index (the reference's `prefix_indexer_size`)."""
        return len(self._holders)

    def entries(self) -> int:
        """(hash, endpoint) pairs in the index: the sum of all endpoints' LRU lengths."""
        return sum(len(lru) for lru in self._lrus.values())

    def endpoints(self) -> list[str]:
        """Names of the endpoints the index holds blocks for, sorted."""
        return sorted(self._lrus)

    def hashes_of(self, endpoint: str) -> list[int]:
        """`endpoint`'s hashes, least recently used first (empty if unknown)."""
        lru = self._lrus.get(endpoint)
        if lru is None:
            return []
        self._apply_pending(endpoint, lru)
        return list(lru)

    def holders_of(self, h: int) -> frozenset[str]:
        return frozenset(self._holders.get(h, ()))

    def capacity_of(self, endpoint: str) -> int | None:
        """The LRU capacity last used for `endpoint` (None if unknown)."""
        return self._capacity.get(endpoint)
