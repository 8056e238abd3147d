"""`slo-admitter`: 429 for a sheddable request that no endpoint is predicted to serve within its objective."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from plugins.slo import (
    OBJECTIVES_KEY,
    OBJECTIVES_PRODUCER_TYPE,
    PREDICTED_LATENCY,
    PREDICTOR_TYPE,
    SLO_OBJECTIVES,
    LatencyPrediction,
    Objectives,
    check_predictor,
    is_idle,
    meets,
)


@dataclass(frozen=True)
class SLOAdmitterParams:
    """predictorName  the predicted-latency-producer whose predictions are read
    bufferFactor   as the headroom filter's: a prediction times this must be within the objective
    """

    predictor_name: str = PREDICTOR_TYPE
    buffer_factor: float = 1.0

    def validate(self) -> None:
        if not 0.5 <= self.buffer_factor <= 10.0:
            raise ValueError(f"bufferFactor must be in [0.5, 10], got {self.buffer_factor}")


def _describe(objectives: Objectives) -> str:
    parts = []
    if objectives.ttft_ms is not None:
        parts.append(f"TTFT <= {objectives.ttft_ms:g} ms")
    if objectives.tpot_ms is not None:
        parts.append(f"TPOT <= {objectives.tpot_ms:g} ms")
    return " and ".join(parts)


@register
class SLOAdmitter:
    """Rejects a sheddable request (priority < 0) that carries latency objectives when no candidate endpoint
    is predicted to meet them (predictions times bufferFactor) and none is idle; the 429's reason names the
    objectives and the best predictions. Critical and standard requests (priority >= 0) and requests without
    objectives always pass (the pool's saturation detector still sheds sheddable requests under
    saturation). An idle endpoint (nothing in flight from this EPP, nothing running or waiting when last
    scraped) admits the request whatever its prediction, as llm-d's latency-slo-admitter does: an idle
    server is the best chance the request has, and a prediction for it may be stale.

    Signal: the `LatencyPrediction` of predictorName per candidate; the request's priority and `Objectives`.

    When it is wrong: it sheds on predictions, so a pessimistic predictor sheds requests that would have
    met their objective (watch inference_extension_slo_prediction_relative_error).
    """

    type: ClassVar[str] = "slo-admitter"
    aliases: ClassVar[tuple[str, ...]] = ("latency-slo-admitter",)
    requires: ClassVar[tuple[str, ...]] = (OBJECTIVES_PRODUCER_TYPE, PREDICTOR_TYPE)
    consumes: ClassVar[frozenset[str]] = frozenset({PREDICTED_LATENCY, SLO_OBJECTIVES})
    Params = SLOAdmitterParams

    def __init__(self, name: str, params: SLOAdmitterParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params

    def bind(self, handle: PluginHandle) -> None:
        check_predictor(handle.plugins, self.params.predictor_name)

    def admit(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> str | None:
        if request.priority >= 0:
            return None
        objectives: Objectives | None = request.scratch.get(OBJECTIVES_KEY)
        if objectives is None:
            return None
        key = self.params.predictor_name
        buffer = self.params.buffer_factor
        best: tuple[float, float, str] | None = None
        for ep in candidates:
            prediction: LatencyPrediction | None = ep.attributes.get(key)
            if meets(prediction, objectives, buffer) or is_idle(ep):
                return None
            if prediction is not None and (best is None or prediction.ttft_ms < best[0]):
                best = (prediction.ttft_ms, prediction.tpot_ms, ep.name)
        seen = (f"; the best prediction is TTFT {best[0]:.0f} ms, TPOT {best[1]:.1f} ms on {best[2]}"
                if best is not None else "")
        return (f"no endpoint is predicted to meet the objective of this sheddable request "
                f"(priority {request.priority}): {_describe(objectives)}{seen}, and none of the {len(candidates)} "
                f"candidates is idle; retry later, or send it with a looser objective or a higher priority")
