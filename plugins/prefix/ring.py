"""A consistent-hash ring of endpoint names with bounded loads. Pure: no plugin, pool or request code.

Ring. Every endpoint name owns `virtual_nodes` points on a circle of 2**64 positions. Point i of endpoint
`name` sits at

    position(name, i) = xxh64(utf8(f"{name}#{i}"), seed=0)

so the ring depends only on the set of names and the virtual-node count: every process that builds it from
the same pool builds the same ring, whatever the order of the names, across restarts and versions (the
tests pin golden positions). Points are sorted by (position, name); two points at the same position (a
64-bit collision, not seen in practice) are thus ordered by name, deterministically.

A key (a 64-bit integer) belongs to the first point clockwise from it: the first point whose position is
>= key, wrapping past 2**64 - 1 to the first point. Finding it is one bisect, O(log(V·n)) for n endpoints
of V points each. Walking on from there visits each endpoint once, in the order its first point comes up.

Bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018). Given
the loads (in-flight requests) of the candidate endpoints, no candidate may exceed

    capacity = ceil(c · (Σ loads + 1) / n_candidates)

after taking the request, c > 1 being the load factor. The key goes to the first candidate on its walk
whose load is below capacity; endpoints that are not candidates (filtered out, or not in `loads`) are
skipped. Some candidate is always below capacity: the least loaded holds at most the mean Σ/n, and
c·(Σ+1)/n > Σ/n. A key whose owner is full thus spills to the next endpoints on its walk, the same ones in
every process, and only as many keys move as the bound forces.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

import xxhash

_xxh64 = xxhash.xxh64_intdigest

RING_SIZE = 1 << 64  # positions are xxh64 digests, 0 … 2**64 - 1


def vnode_position(name: str, index: int) -> int:
    """The position of virtual node `index` of endpoint `name`: xxh64 (seed 0) of the UTF-8 string
    `"<name>#<index>"`, e.g. `"10.0.0.1:8000#0"`."""
    return _xxh64(f"{name}#{index}".encode("utf-8", "surrogatepass"))


def bounded_capacity(total_load: int, candidates: int, load_factor: float) -> int:
    """The most in-flight requests any of `candidates` endpoints may hold once one more request (the one
    being placed) is added to `total_load`: ceil(load_factor · (total_load + 1) / candidates)."""
    if candidates <= 0:
        raise ValueError(f"candidates must be > 0, got {candidates}")
    if load_factor <= 1.0:
        raise ValueError(f"load factor must be > 1.0, got {load_factor}")
    # The tiny slack keeps float error from rounding a whole product up (1.1 × 50 is 55.00000000000001).
    return math.ceil(load_factor * (total_load + 1) / candidates - 1e-9)


class HashRing:
    """An immutable ring over a set of endpoint names (see the module docstring). Build a new one when the
    set changes; building costs O(V·n log(V·n)), a few milliseconds for 64 endpoints of 128 points."""

    __slots__ = ("names", "virtual_nodes", "positions", "owners", "_members", "_size")

    def __init__(self, names: Iterable[str], virtual_nodes: int) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self._members = frozenset(names)
        self.names: tuple[str, ...] = tuple(sorted(self._members))
        self.virtual_nodes = virtual_nodes
        points = sorted((vnode_position(name, i), name) for name in self.names for i in range(virtual_nodes))
        self.positions: list[int] = [p for p, _ in points]
        self.owners: list[str] = [name for _, name in points]
        self._size = len(points)

    def __len__(self) -> int:
        """The number of endpoints (not points) on the ring."""
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def start(self, key: int) -> int:
        """The index in `positions`/`owners` of the first point clockwise from `key` (position >= key,
        wrapping to 0). The ring must not be empty."""
        i = bisect_left(self.positions, key)
        return 0 if i == self._size else i

    def owner(self, key: int) -> str | None:
        """The endpoint that owns `key` when loads are ignored; None on an empty ring."""
        if not self._size:
            return None
        return self.owners[self.start(key)]

    def walk(self, key: int) -> Iterator[str]:
        """Every endpoint once, in the order its first point comes up clockwise from `key`."""
        size = self._size
        if not size:
            return
        owners = self.owners
        remaining = len(self.names)
        seen: set[str] = set()
        i = self.start(key)
        for _ in range(size):
            name = owners[i]
            if name not in seen:
                seen.add(name)
                yield name
                remaining -= 1
                if not remaining:
                    return
            i += 1
            if i == size:
                i = 0

    def bounded(self, key: int, loads: Mapping[str, int], load_factor: float, ranked: int = 1) -> list[str]:
        """Up to `ranked` candidates for `key` under bounded loads, best first.

        `loads` maps every candidate endpoint's name to its in-flight requests; names not in it are not
        candidates, and candidates not on the ring are never returned (but count in the capacity, as they
        share the load). The first name is the first candidate on the key's walk whose load is below
        `bounded_capacity(Σ loads, len(loads), load_factor)`; the others are the next such candidates on
        the walk. Returns [] only when no candidate is on the ring.
        """
        if not self._size or not loads:
            return []
        on_ring = len(self._members & loads.keys())
        if not on_ring:
            return []
        capacity = bounded_capacity(sum(loads.values()), len(loads), load_factor)
        return self.walk_below(key, loads.get, capacity, ranked, on_ring)

    def walk_below(
        self, key: int, load_of: Callable[[str], int | None], capacity: int, ranked: int, candidates: int
    ) -> list[str]:
        """The walk behind `bounded`, for callers that know their loads without building a mapping: the
        first `ranked` endpoints clockwise from `key` whose `load_of(name)` is below `capacity`, where
        `load_of` returns None for an endpoint that is not a candidate. It is called for every point passed,
        so it should be cheap (a dict's `get`). `candidates` is how many candidates are on the ring: the walk
        stops once it has met them all (so a short candidate list does not cost a turn of the whole ring)."""
        size = self._size
        if not size or ranked < 1 or candidates < 1:
            return []
        owners = self.owners
        out: list[str] = []
        seen: set[str] = set()
        i = self.start(key)
        for _ in range(size):
            name = owners[i]
            load = load_of(name)
            if load is not None and name not in seen:
                seen.add(name)
                if load < capacity:
                    out.append(name)
                    if len(out) == ranked:
                        break
                candidates -= 1
                if not candidates:
                    break
            i += 1
            if i == size:
                i = 0
        return out

    def shares(self) -> dict[str, float]:
        """Each endpoint's fraction of the key space (the arcs that end at its points; they sum to 1)."""
        out = dict.fromkeys(self.names, 0.0)
        size = self._size
        if not size:
            return out
        positions, owners = self.positions, self.owners
        # The arc ending at point 0 starts after the last point and wraps around.
        out[owners[0]] += (positions[0] + RING_SIZE - positions[-1]) / RING_SIZE if size > 1 else 1.0
        for j in range(1, size):
            out[owners[j]] += (positions[j] - positions[j - 1]) / RING_SIZE
        return out
