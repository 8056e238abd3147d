"""Ordering data producers by the data they produce and consume.

A producer class may declare `produces: ClassVar[frozenset[str]]` and `consumes: ClassVar[frozenset[str]]`
(data keys; missing means none). A producer that consumes a key runs after every other producer of that
key; otherwise the declaration order is kept. A plugin reading back its own key is not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class DependencyCycle(ValueError):
    """Producers that depend on each other. `cycle` lists (producer, key it consumes from the next one)."""

    def __init__(self, message: str, cycle: list[tuple[Any, str]]) -> None:
        super().__init__(message)
        self.cycle = cycle


def produces(plugin: Any) -> frozenset[str]:
    return frozenset(getattr(plugin, "produces", None) or ())


def consumes(plugin: Any) -> frozenset[str]:
    return frozenset(getattr(plugin, "consumes", None) or ())


def order_producers(producers: Sequence[Any], name: Any = lambda p: getattr(p, "name", repr(p))) -> list[Any]:
    """`producers` in an order where every producer comes after the producers of the keys it consumes;
    among independent producers the given order is kept. Raises DependencyCycle naming a cycle."""
    n = len(producers)
    made = [produces(p) for p in producers]
    needed = [consumes(p) for p in producers]
    # before[i]: the producers that must run before producer i, with the keys that make it so.
    before: list[dict[int, str]] = [{} for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                shared = needed[i] & made[j]
                if shared:
                    before[i][j] = sorted(shared)[0]
    done: list[bool] = [False] * n
    order: list[Any] = []
    while len(order) < n:
        for i in range(n):
            if not done[i] and all(done[j] for j in before[i]):
                done[i] = True
                order.append(producers[i])
                break
        else:
            cycle = _find_cycle([i for i in range(n) if not done[i]], before)
            text = ", ".join(
                f"{name(producers[i])!s} consumes {key!r} produced by "
                f"{name(producers[cycle[(k + 1) % len(cycle)][0]])!s}"
                for k, (i, key) in enumerate(cycle)
            )
            raise DependencyCycle(
                f"data producers depend on each other in a cycle: {text}",
                [(producers[i], key) for i, key in cycle],
            )
    return order


def _find_cycle(remaining: list[int], before: list[dict[int, str]]) -> list[tuple[int, str]]:
    """One cycle among `remaining` (each of which has a predecessor in `remaining`), as (node, key) pairs
    where node needs `key` from the next node."""
    alive = set(remaining)
    path: list[int] = []
    seen_at: dict[int, int] = {}
    node = remaining[0]
    while node not in seen_at:
        seen_at[node] = len(path)
        path.append(node)
        node = next(j for j in before[node] if j in alive)
    loop = path[seen_at[node] :]
    return [(i, before[i][loop[(k + 1) % len(loop)]]) for k, i in enumerate(loop)]
