"""`latency-scorer`: prefer endpoints with lower predicted latency (or, optionally, pack requests with an
objective onto the endpoints that just meet it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState
from plugins.slo import (
    OBJECTIVES_KEY,
    OBJECTIVES_PRODUCER_TYPE,
    PREDICTED_LATENCY,
    PREDICTOR_TYPE,
    SLO_OBJECTIVES,
    LatencyPrediction,
    Objectives,
    check_predictor,
    meets,
)


@dataclass(frozen=True)
class LatencyScorerParams:
    """predictorName             the predicted-latency-producer whose predictions are read
    ttftWeight / tpotWeight   blend of the TTFT and TPOT terms (llm-d's defaults 0.8 / 0.2)
    ttftToleranceMs           softening of the TTFT ratio: differences well below it barely count
                              (default 100)
    tpotToleranceMs           the same for TPOT (default 10)
    headroomSelectionStrategy `most` (default): lower predicted latency is better, i.e. the most headroom;
                              `least`: a request with objectives prefers the endpoints that meet them with
                              the least headroom (packing, keeping fast endpoints free for tighter
                              objectives); requests without objectives, or that no endpoint meets, score
                              as with `most`
    bufferFactor              as the headroom filter's, for `least`
    """

    predictor_name: str = PREDICTOR_TYPE
    ttft_weight: float = 0.8
    tpot_weight: float = 0.2
    ttft_tolerance_ms: float = 100.0
    tpot_tolerance_ms: float = 10.0
    headroom_selection_strategy: Literal["most", "least"] = "most"
    buffer_factor: float = 1.0

    def validate(self) -> None:
        if self.ttft_weight < 0 or self.tpot_weight < 0 or self.ttft_weight + self.tpot_weight <= 0:
            raise ValueError(f"ttftWeight and tpotWeight must be >= 0 and not both 0, got {self.ttft_weight} "
                             f"and {self.tpot_weight}")
        if self.ttft_tolerance_ms <= 0 or self.tpot_tolerance_ms <= 0:
            raise ValueError("ttftToleranceMs and tpotToleranceMs must be > 0")
        if not 0.5 <= self.buffer_factor <= 10.0:
            raise ValueError(f"bufferFactor must be in [0.5, 10], got {self.buffer_factor}")


def ratio_scores(predictions: Sequence[LatencyPrediction | None], ttft_weight: float, tpot_weight: float,
                 ttft_tol: float, tpot_tol: float) -> list[float]:
    """Per prediction, w_t·(t_min + c_t)/(t + c_t) + w_p·(p_min + c_p)/(p + c_p) over normalized weights: the
    best endpoint scores 1 and one predicted twice as slow (well above the tolerance c) about 0.5. A ratio,
    not a min-max scale, so that small differences in predicted latency stay small next to the other
    scorers (prefix affinity). A missing prediction scores 0."""
    present = [p for p in predictions if p is not None]
    if not present:
        return [0.0] * len(predictions)
    t_min = min(p.ttft_ms for p in present) + ttft_tol
    p_min = min(p.tpot_ms for p in present) + tpot_tol
    total = ttft_weight + tpot_weight
    wt, wp = ttft_weight / total, tpot_weight / total
    return [0.0 if p is None else wt * t_min / (p.ttft_ms + ttft_tol) + wp * p_min / (p.tpot_ms + tpot_tol)
            for p in predictions]


def packing_score(p: LatencyPrediction, objectives: Objectives, buffer: float, ttft_weight: float,
                  tpot_weight: float) -> float:
    """For an endpoint that meets `objectives`: how close its predictions come to them, in [0, 1] (1 = right
    at the objective), blended over the kinds the request sets."""
    parts = []
    if objectives.ttft_ms is not None:
        parts.append((ttft_weight, min(1.0, p.ttft_ms * buffer / objectives.ttft_ms)))
    if objectives.tpot_ms is not None:
        parts.append((tpot_weight, min(1.0, p.tpot_ms * buffer / objectives.tpot_ms)))
    weight = sum(w for w, _ in parts)
    if weight <= 0:
        return sum(v for _, v in parts) / len(parts)
    return sum(w * v for w, v in parts) / weight


@register
class LatencyScorer:
    """Scores each endpoint by its predicted latency for the request: with the default strategy `most`, a
    softened ratio to the best candidate's prediction, 0.8·TTFT + 0.2·TPOT (see ratio_scores); with
    `least`, requests with objectives prefer the endpoints that meet them most narrowly.

    Signal: the `LatencyPrediction` of predictorName (which already counts the request's uncached prompt
    tokens on each endpoint, so a cache hit lowers the prediction) and the request's `Objectives`.

    When it is wrong: used alone it collapses under overload. Once backlogs dominate the predictions it
    spreads requests by backlog, stops following prefixes, and the extra prefill deepens every backlog (the
    issue's simulation: hit rate 35% → 21%, median TTFT 11 s → 118 s). Always pair it with a prefix-affinity
    scorer and a load scorer; the ratio form keeps its pull moderate (TTFT predictions of 1.0 s and 1.2 s
    differ by about 0.12 in score, where a min-max scale would make the difference 1).
    """

    type: ClassVar[str] = "latency-scorer"
    requires: ClassVar[tuple[str, ...]] = (OBJECTIVES_PRODUCER_TYPE, PREDICTOR_TYPE)
    consumes: ClassVar[frozenset[str]] = frozenset({PREDICTED_LATENCY, SLO_OBJECTIVES})
    Params = LatencyScorerParams

    def __init__(self, name: str, params: LatencyScorerParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params

    def bind(self, handle: PluginHandle) -> None:
        check_predictor(handle.plugins, self.params.predictor_name)

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        p = self.params
        key = p.predictor_name
        predictions = [ep.attributes.get(key) for ep in endpoints]
        objectives = request.scratch.get(OBJECTIVES_KEY)
        if p.headroom_selection_strategy == "least" and objectives is not None:
            meeting = [meets(pred, objectives, p.buffer_factor) for pred in predictions]
            if any(meeting):
                return {ep: packing_score(pred, objectives, p.buffer_factor, p.ttft_weight, p.tpot_weight) if ok
                        else 0.0 for ep, pred, ok in zip(endpoints, predictions, meeting, strict=True)}
        scores = ratio_scores(predictions, p.ttft_weight, p.tpot_weight, p.ttft_tolerance_ms, p.tpot_tolerance_ms)
        return dict(zip(endpoints, scores, strict=True))
