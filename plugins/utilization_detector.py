"""`utilization-detector`: pool saturation from queue depth and KV-cache use; as a filter, drops overloaded or
stale endpoints."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import Duration, PluginHandle, register
from epp.scheduling.types import CycleState


@dataclass(frozen=True, slots=True)
class UtilizationParams:
    queue_depth_threshold: int = 5  # waiting requests at which an endpoint counts as full
    kv_cache_util_threshold: float = 0.8  # KV-cache use (fraction) at which an endpoint counts as full
    metrics_staleness_threshold: Duration = Duration(0.2)  # older metrics count as saturated
    headroom: float = 0.0  # the filter tolerates this fraction above the thresholds

    def validate(self) -> None:
        if self.queue_depth_threshold < 1:
            raise ValueError(f"`queueDepthThreshold` must be at least 1, got {self.queue_depth_threshold}")
        if not 0.0 < self.kv_cache_util_threshold <= 1.0:
            raise ValueError(
                f"`kvCacheUtilThreshold` must be in (0, 1] (a fraction of the KV cache), got "
                f"{self.kv_cache_util_threshold}"
            )
        if self.metrics_staleness_threshold.seconds <= 0:
            raise ValueError(
                f"`metricsStalenessThreshold` must be a positive duration such as '200ms', got "
                f"{self.metrics_staleness_threshold.seconds}s"
            )
        if self.headroom < 0:
            raise ValueError(
                f"`headroom` must be 0 or more (a fraction above the thresholds), got {self.headroom}"
            )


@register
class UtilizationDetector:
    """Saturation detector and filter on scraped metrics: waiting queue (`metrics.waiting_queue_size`) and
    KV-cache use (`metrics.kv_cache_usage_percent`), each against a threshold.

    As the SaturationDetector (the default one), the pool's saturation is the mean over its endpoints of
    max(queue / queueDepthThreshold, kv / kvCacheUtilThreshold). An endpoint whose metrics are older than
    `metricsStalenessThreshold` (by `time.monotonic`), or that was never scraped, counts 1.0 (saturated):
    an endpoint we cannot see is not spare capacity. No endpoints ⇒ 1.0. At >= 1.0, sheddable requests
    (priority < 0) are refused with 429. The mean is not capped per endpoint, so one badly overloaded endpoint
    can push the pool over 1.0 while others idle.

    As a Filter, it drops stale or never-scraped endpoints and those with queue > queueDepthThreshold·(1 +
    headroom) or KV use > min(1, kvCacheUtilThreshold·(1 + headroom)); if that would drop every candidate it
    returns the candidates unchanged (better an overloaded endpoint than a 503).

    It is wrong between scrapes (a burst is invisible until the next scrape) and when the KV-cache figure
    counts reusable prefix-cache blocks as used. `clock` is the time source (replaceable in tests).
    """

    type: ClassVar[str] = "utilization-detector"
    Params = UtilizationParams

    def __init__(self, name: str, params: UtilizationParams, handle: PluginHandle) -> None:
        self.name = name
        self.queue_depth_threshold = params.queue_depth_threshold
        self.kv_cache_util_threshold = params.kv_cache_util_threshold
        self.staleness_s = params.metrics_staleness_threshold.seconds
        self.headroom = params.headroom
        self.clock: Callable[[], float] = time.monotonic

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        oldest_fresh = self.clock() - self.staleness_s
        q_thr = float(self.queue_depth_threshold)
        kv_thr = self.kv_cache_util_threshold
        total = 0.0
        for ep in endpoints:
            m = ep.metrics
            t = m.update_time
            if t == 0.0 or t < oldest_fresh:
                total += 1.0
                continue
            q = m.waiting_queue_size / q_thr
            kv = m.kv_cache_usage_percent / kv_thr
            total += q if q > kv else kv
        return total / len(endpoints)

    def filter(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        oldest_fresh = self.clock() - self.staleness_s
        factor = 1.0 + self.headroom
        q_max = self.queue_depth_threshold * factor
        kv_max = min(1.0, self.kv_cache_util_threshold * factor)
        kept: list[Endpoint] = []
        for ep in endpoints:
            m = ep.metrics
            t = m.update_time
            if t == 0.0 or t < oldest_fresh:
                continue
            if m.waiting_queue_size > q_max or m.kv_cache_usage_percent > kv_max:
                continue
            kept.append(ep)
        return kept if kept else endpoints
