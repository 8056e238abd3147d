"""Prometheus series of the Kubernetes integration, registered in the EPP's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class KubeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.api_errors = Counter(
            "inference_extension_kube_api_errors_total",
            "Failed Kubernetes API calls of the watchers and the leader elector, by resource and HTTP status "
            "(0 = no answer).", ["resource", "code"], registry=r)
        self.relists = Counter(
            "inference_extension_kube_relists_total",
            "Lists made again after a watch was lost, by resource and reason (gone = 410, error).",
            ["resource", "reason"], registry=r)
        self.pool_synced = Gauge(
            "inference_extension_kube_pool_synced",
            "1 while the InferencePool and its pods are known (the readiness condition besides leadership).",
            registry=r)
        self.is_leader = Gauge(
            "inference_extension_leader_election_is_leader",
            "1 while this replica holds the leader-election Lease (always 1 without leader election).",
            registry=r)
