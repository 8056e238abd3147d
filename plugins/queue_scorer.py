"""`queue-scorer`: prefer endpoints with fewer requests waiting in the model server's queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import CycleState


def min_max_scores(endpoints: Sequence[Endpoint], values: Sequence[float]) -> dict[Endpoint, float]:
    """Min–max scaling over the candidates, lower is better: (max − v)/(max − min), so the least loaded scores
    1.0 and the most loaded 0.0. When every value is equal (including a single candidate) all score 1.0."""
    if not values:
        return {}
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return dict.fromkeys(endpoints, 1.0)
    span = hi - lo
    return {ep: (hi - v) / span for ep, v in zip(endpoints, values, strict=True)}


@register
class QueueScorer:
    """Scores each candidate by its waiting queue (`vllm:num_requests_waiting`, `metrics.waiting_queue_size`),
    min–max scaled over the candidates: (max − q)/(max − min); all equal ⇒ 1.0 for every candidate.

    A queue means the server has no room to batch the request now, so its time to first token grows with the
    queue. The scale is relative: a queue of 1 against 0 scores as badly as 100 against 0. It is wrong between
    scrapes (a burst of requests all see the same short queue and pile onto it), and for never-scraped
    endpoints, whose queue reads 0.
    """

    type: ClassVar[str] = "queue-scorer"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def score(
        self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        return min_max_scores(endpoints, [ep.metrics.waiting_queue_size for ep in endpoints])
