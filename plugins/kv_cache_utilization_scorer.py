"""`kv-cache-utilization-scorer`: prefer endpoints with more free KV-cache memory."""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import CycleState


@register
class KVCacheUtilizationScorer:
    """Scores each candidate 1 − KV-cache usage (`vllm:kv_cache_usage_perc`, `metrics.kv_cache_usage_percent`,
    a fraction in [0, 1]); out-of-range readings are clamped by the scheduler.

    Free KV blocks are what lets a server admit a new request without preempting others. The score is
    absolute, not relative to the other candidates. It is wrong between scrapes, counts blocks that merely
    hold reusable prefix cache as used (vLLM keeps freed blocks cached until evicted), and gives never-scraped
    endpoints, which read 0, the best score.
    """

    type: ClassVar[str] = "kv-cache-utilization-scorer"
    aliases: ClassVar[tuple[str, ...]] = ("kv-cache-scorer",)  # its name in the reference EPP up to v0.5

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def score(
        self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        return {ep: 1.0 - ep.metrics.kv_cache_usage_percent for ep in endpoints}

    def score_values(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[float]:
        """`score()` as a list aligned with `endpoints`, clamped to [0, 1] as the scheduler clamps (NaN and
        non-positive scores are 0.0)."""
        return [
            s if 0.0 <= (s := 1.0 - ep.metrics.kv_cache_usage_percent) <= 1.0 else (1.0 if s > 1.0 else 0.0)
            for ep in endpoints
        ]
