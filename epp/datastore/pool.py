"""Pool: the current set of endpoints, owned by one source (a static list or the Kubernetes watcher).

Mutated only from the event loop. Listeners hear about additions and removals, so that scrapers, KV-event
subscribers and indexes can follow the pool without polling it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from epp.datastore.endpoint import Endpoint

PoolListener = Callable[[list[Endpoint], list[Endpoint]], None]  # (added, removed)


class Pool:
    def __init__(self, name: str = "static", namespace: str = "default") -> None:
        self.name = name
        self.namespace = namespace
        self._by_name: dict[str, Endpoint] = {}
        self._endpoints: tuple[Endpoint, ...] = ()
        self._listeners: list[PoolListener] = []
        self.synced = False  # True once the source has delivered the pool at least once

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """All endpoints, in a stable order (by name). A new tuple after every change."""
        return self._endpoints

    def get(self, name: str) -> Endpoint | None:
        return self._by_name.get(name)

    def add_listener(self, listener: PoolListener) -> None:
        self._listeners.append(listener)
        if self._endpoints:
            listener(list(self._endpoints), [])

    def remove_listener(self, listener: PoolListener) -> None:
        """Stop notifying `listener` (no error if it was not registered)."""
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the pool exactly `endpoints`. Endpoints whose name is kept keep their object (and so their
        metrics and in-flight counts) when address, port and labels are unchanged."""
        incoming: dict[str, Endpoint] = {}
        for ep in endpoints:
            if ep.name in incoming:
                raise ValueError(f"duplicate endpoint name {ep.name!r} in pool {self.name!r}")
            incoming[ep.name] = ep
        added: list[Endpoint] = []
        removed: list[Endpoint] = []
        merged: dict[str, Endpoint] = {}
        for name, ep in incoming.items():
            old = self._by_name.get(name)
            if old is not None and old.address == ep.address and old.port == ep.port:
                old.labels = ep.labels
                merged[name] = old
            else:
                if old is not None:
                    removed.append(old)
                added.append(ep)
                merged[name] = ep
        for name, old in self._by_name.items():
            if name not in incoming:
                removed.append(old)
        self._by_name = merged
        self._endpoints = tuple(sorted(merged.values(), key=lambda e: e.name))
        self.synced = True
        if added or removed:
            for listener in self._listeners:
                listener(added, removed)
