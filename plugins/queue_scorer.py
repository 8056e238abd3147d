"""`queue-scorer`: prefer endpoints with fewer requests waiting in the model server's queue."""

from __future__ import annotations

import math
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


def min_max_values(values: Sequence[float]) -> list[float]:
    """`min_max_scores` as a list in the order of `values`, clamped to [0, 1] as the scheduler clamps (for
    `score_values`). Queues take few distinct values, so the extremes are read from the set of them: without
    NaN or infinities that gives the very objects `min`/`max` of the list give (the first of equal values), and
    every score is already in [0, 1]; otherwise the list is read as `min_max_scores` reads it, and clamped."""
    if not values:
        return []
    distinct = set(values)
    try:
        finite = math.isfinite(sum(distinct))  # no NaN or infinity among the values
    except OverflowError:  # an int beyond float range: take the general path
        finite = False
    if finite:
        lo = min(distinct)
        hi = max(distinct)
    else:
        lo = min(values)
        hi = max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    scores = [(hi - v) / span for v in values]
    if finite and math.isfinite(span):
        return scores
    return [(s if s < 1.0 else 1.0) if s > 0.0 else 0.0 for s in scores]


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

    def score_values(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[float]:
        """`score()` as a list aligned with `endpoints`, clamped to [0, 1] (the scheduler's fast path)."""
        return min_max_values([ep.metrics.waiting_queue_size for ep in endpoints])
