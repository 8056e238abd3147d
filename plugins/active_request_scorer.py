"""`active-request-scorer` (llm-d): prefer endpoints with fewer requests the EPP itself has in flight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import Duration, PluginHandle, register
from epp.scheduling.types import CycleState


@dataclass(frozen=True, slots=True)
class ActiveRequestParams:
    idle_threshold: int = 0  # at or below this many in-flight requests an endpoint counts as idle
    max_busy_score: float = 1.0  # the best score a busy (non-idle) endpoint can get
    # Deprecated: llm-d once expired tracked requests after this timeout; lifecycle now ends with the response.
    request_timeout: Duration | None = None

    def validate(self) -> None:
        if self.idle_threshold < 0:
            raise ValueError(f"`idleThreshold` must be 0 or more (requests), got {self.idle_threshold}")
        if not 0.0 <= self.max_busy_score <= 1.0:
            raise ValueError(f"`maxBusyScore` must be between 0 and 1, got {self.max_busy_score}")


@register
class ActiveRequestScorer:
    """Scores each candidate from `endpoint.in_flight`, the requests the EPP routed there that have not
    finished (kept by the director, so it is fresh on every request, unlike scraped metrics):

      count <= idleThreshold  ⇒ 1.0
      otherwise               ⇒ maxBusyScore · (maxCount − count) / maxCount

    where maxCount is the largest count among the candidates. The busiest candidate scores 0, and a busy
    endpoint never outscores an idle one (count > idleThreshold >= 0 makes the fraction < 1). `requestTimeout`
    is accepted for compatibility with older llm-d configs and ignored: requests leave the count when their
    response ends or aborts, not after a timeout.

    It is wrong when other clients (another EPP replica, direct traffic) also load the servers, since it only
    counts this EPP's requests, and it treats a 10-token and a 10,000-token request alike.
    """

    type: ClassVar[str] = "active-request-scorer"
    Params = ActiveRequestParams

    def __init__(self, name: str, params: ActiveRequestParams, handle: PluginHandle) -> None:
        self.name = name
        self.idle_threshold = params.idle_threshold
        self.max_busy_score = params.max_busy_score

    def score(
        self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        idle = self.idle_threshold
        max_count = max((ep.in_flight for ep in endpoints), default=0)
        if max_count <= idle:
            return dict.fromkeys(endpoints, 1.0)
        scale = self.max_busy_score / max_count
        out: dict[Endpoint, float] = {}
        for ep in endpoints:
            count = ep.in_flight
            out[ep] = 1.0 if count <= idle else (max_count - count) * scale
        return out
