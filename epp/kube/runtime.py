"""The Kubernetes mode of the EPP as one component: client, watchers and (optionally) leader election, with
the readiness rule of the reference: ready when the pool is synced and, with leader election, this replica
holds the Lease."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from epp.datastore.models import ModelPolicy
from epp.datastore.pool import Pool
from epp.kube.client import connect
from epp.kube.leader import LeaderElectionOptions, LeaderElector
from epp.kube.metrics import KubeMetrics
from epp.kube.watchers import PoolWatcher, WatchOptions

log = logging.getLogger("epp.kube")


@dataclass(frozen=True)
class KubeOptions:
    watch: WatchOptions
    kubeconfig: str | None = None
    leader_election: LeaderElectionOptions | None = None  # None: every replica is ready once synced


class KubeRuntime:
    def __init__(self, pool: Pool, policy: ModelPolicy, options: KubeOptions, registry=None,
                 api_client=None) -> None:
        self.pool = pool
        self.policy = policy
        self.options = options
        self.metrics = KubeMetrics(registry)
        self._api_client = api_client
        self._own_client = api_client is None
        self.watcher: PoolWatcher | None = None
        self.elector: LeaderElector | None = None
        if options.leader_election is None:
            self.metrics.is_leader.set(1)

    async def start(self) -> None:
        """Connect and start watching (and campaigning). Raises KubeConfigError without a usable kubeconfig;
        API errors do not raise: they are logged and retried, and the EPP stays not ready meanwhile."""
        if self._api_client is None:
            self._api_client = await connect(self.options.kubeconfig)
        self.watcher = PoolWatcher(self._api_client, self.pool, self.policy, self.options.watch, self.metrics)
        await self.watcher.start()
        if self.options.leader_election is not None:
            self.elector = LeaderElector(self._api_client, self.options.leader_election, self.metrics)
            await self.elector.start()

    async def stop(self) -> None:
        """Release the Lease first (so that a standby takes over at once), then stop watching."""
        if self.elector is not None:
            await self.elector.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        if self._own_client and self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    def ready(self) -> bool:
        if not self.pool.synced:
            return False
        if self.options.leader_election is None:
            return True
        return self.elector is not None and self.elector.is_leader

    def status(self) -> str:
        parts = [self.watcher.status() if self.watcher is not None else "not started"]
        if self.elector is not None:
            parts.append("leader" if self.elector.is_leader else "standby (not the leader)")
        return "; ".join(parts)
