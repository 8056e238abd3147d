"""`load-aware-scorer` (llm-d): a bounded score that falls linearly with the waiting queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState


@dataclass(frozen=True, slots=True)
class LoadAwareParams:
    threshold: int = 128  # waiting requests at which the score reaches 0

    def validate(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"`threshold` must be at least 1 (waiting requests), got {self.threshold}")


@register
class LoadAwareScorer:
    """Scores each candidate from its waiting queue (`metrics.waiting_queue_size`) against a fixed
    `threshold`: 0.5 when nothing waits, 0.5·(1 − waiting/threshold) below the threshold, 0 at or above it.

    Unlike `queue-scorer` the scale is absolute (a queue of 1 hardly changes the score) and capped at 0.5, as
    in llm-d, so it nudges rather than dominates when combined with affinity scorers of the same weight. It is
    stale between scrapes, and never-scraped endpoints read an empty queue.
    """

    type: ClassVar[str] = "load-aware-scorer"
    Params = LoadAwareParams

    def __init__(self, name: str, params: LoadAwareParams, handle: PluginHandle) -> None:
        self.name = name
        self.threshold = params.threshold

    def score(
        self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        threshold = self.threshold
        scale = 0.5 / threshold
        out: dict[Endpoint, float] = {}
        for ep in endpoints:
            waiting = ep.metrics.waiting_queue_size
            out[ep] = 0.5 if waiting <= 0 else 0.0 if waiting >= threshold else 0.5 - waiting * scale
        return out
