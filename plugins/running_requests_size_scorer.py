"""`running-requests-size-scorer`: prefer endpoints running fewer requests in their current batch."""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import CycleState
from plugins.queue_scorer import min_max_scores


@register
class RunningRequestsSizeScorer:
    """Scores each candidate by the requests it is running (`vllm:num_requests_running`,
    `metrics.running_requests_size`), min–max scaled over the candidates: (max − r)/(max − min); all equal ⇒
    1.0 for every candidate.

    A larger running batch means slower decoding for every request in it (higher time per output token). It
    says nothing about queued work, is relative (1 against 0 scores like 100 against 0), and is stale between
    scrapes; never-scraped endpoints read 0 and look idle.
    """

    type: ClassVar[str] = "running-requests-size-scorer"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def score(
        self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        return min_max_scores(endpoints, [ep.metrics.running_requests_size for ep in endpoints])
