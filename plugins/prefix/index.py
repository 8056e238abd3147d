"""The approximate prefix index: which endpoints are believed to hold which prefix blocks.

Two structures, kept consistent with each other:
  holders: block hash -> (frozen) set of endpoint names believed to hold that block
  lrus:    endpoint name -> its block hashes, least recently used first, at most `capacity` of them

An endpoint's LRU stands in for its KV cache: adding a hash beyond the capacity evicts the least recently
used one, and the endpoint is then removed from that hash's holders (a hash nobody holds is dropped).
Owned by one producer; used only from the event loop, so there is no locking.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from itertools import repeat

_NOBODY: frozenset[str] = frozenset()


class PrefixIndex:
    def __init__(self) -> None:
        # Holder sets are immutable and shared: the consecutive blocks of a chain learned by the same
        # endpoints point at one frozenset, which keeps the lookup proportional to the number of distinct
        # holder sets on the walk rather than to blocks × holders.
        self._holders: dict[int, frozenset[str]] = {}
        self._lrus: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}

    # -- lookup ------------------------------------------------------------------------------------------

    def match(self, hashes: Iterable[int]) -> dict[str, int]:
        """Blocks matched per endpoint: walk `hashes` in order, stop at the first one no endpoint holds,
        and count one for every endpoint holding each hash walked. (An endpoint is not required to hold
        every earlier block; the walk stops only when nobody holds a block.)"""
        walked = list(map(self._holders.get, hashes, repeat(_NOBODY)))
        try:
            del walked[walked.index(_NOBODY) :]  # empty sets are never stored: _NOBODY marks a missing hash
        except ValueError:
            pass
        counts: dict[str, int] = {}
        if not walked:
            return counts
        get = counts.get
        distinct = set(walked)  # few in practice: a chain learned together shares one holder set
        if len(distinct) <= 8:
            runs: Iterable[tuple[frozenset[str], int]] = ((s, walked.count(s)) for s in distinct)
        else:
            runs = Counter(walked).items()
        for owners, n in runs:
            for endpoint in owners:
                counts[endpoint] = get(endpoint, 0) + n
        return counts

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
        holders = self._holders
        touch = lru.move_to_end
        alone = frozenset((endpoint,))
        grown: dict[frozenset[str], frozenset[str]] = {}  # old holder set -> it plus `endpoint`
        for h in reversed(hashes):
            if h in lru:
                touch(h)
                continue
            lru[h] = None
            owners = holders.get(h)
            if owners is None:
                holders[h] = alone
            else:
                new = grown.get(owners)
                if new is None:
                    new = grown[owners] = owners | alone
                holders[h] = new
        excess = len(lru) - capacity
        if excess > 0:
            self._drop_holder(endpoint, [lru.popitem(last=False)[0] for _ in range(excess)])

    def remove_endpoint(self, endpoint: str) -> bool:
        """Forget everything about `endpoint` (it left the pool). Returns whether it was known."""
        lru = self._lrus.pop(endpoint, None)
        self._capacity.pop(endpoint, None)
        if lru is None:
            return False
        self._drop_holder(endpoint, lru)
        return True

    def _drop_holder(self, endpoint: str, hashes: Iterable[int]) -> None:
        holders = self._holders
        gone = frozenset((endpoint,))
        shrunk: dict[frozenset[str], frozenset[str]] = {}  # old holder set -> it minus `endpoint`
        for h in hashes:
            owners = holders.get(h)
            if owners is None:
                continue
            new = shrunk.get(owners)
            if new is None:
                new = shrunk[owners] = owners - gone
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
        return list(self._lrus.get(endpoint, ()))

    def holders_of(self, h: int) -> frozenset[str]:
        return frozenset(self._holders.get(h, ()))

    def capacity_of(self, endpoint: str) -> int | None:
        """The LRU capacity last used for `endpoint` (None if unknown)."""
        return self._capacity.get(endpoint)
