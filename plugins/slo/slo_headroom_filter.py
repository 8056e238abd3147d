"""`slo-headroom-filter`: keep the endpoints predicted to meet the request's latency objectives."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

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
    check_predictor,
    meets,
)


@dataclass(frozen=True)
class HeadroomFilterParams:
    """predictorName           the predicted-latency-producer whose predictions are read
    bufferFactor            a prediction times this must be within the objective (>= 1 asks for a margin
                            against prediction error; default 1.0)
    explorationProbability  probability of keeping every endpoint although some meet the objectives (so
                            that endpoints predicted to miss still get a request now and then and their
                            predictions get corrected; default 0.01)
    seed                    seeds the exploration draws (tests, reproducible benchmarks); unset = random
    """

    predictor_name: str = PREDICTOR_TYPE
    buffer_factor: float = 1.0
    exploration_probability: float = 0.01
    seed: int | None = None

    def validate(self) -> None:
        if not 0.5 <= self.buffer_factor <= 10.0:
            raise ValueError(f"bufferFactor must be in [0.5, 10], got {self.buffer_factor}")
        if not 0.0 <= self.exploration_probability <= 1.0:
            raise ValueError(f"explorationProbability must be in [0, 1], got {self.exploration_probability}")


@register
class SLOHeadroomFilter:
    """Keeps the endpoints whose predicted TTFT and TPOT (times bufferFactor) are within the request's
    objectives, so that the scorers choose among endpoints expected to meet them.

    A request without objectives keeps every endpoint. When no endpoint is predicted to meet the objectives,
    every endpoint is kept: dropping the request is the admitter's decision (slo-admitter sheds sheddable
    requests), not the filter's, and the scorers still rank the candidates. With probability
    explorationProbability every endpoint is kept although some meet the objectives (llm-d's
    slo-headroom-tier-filter keeps its negative tier 1% of the time for the same reason).

    Signal: the `LatencyPrediction` of predictorName per endpoint; the request's `Objectives`.

    When it is wrong: it is as good as the predictions; it judges each request alone, so under heavy load it
    may move a request off the endpoint that holds its prefix to one predicted a little faster, which costs
    the pool a prefill (the profile keeps a prefix-affinity scorer to weigh that; the filter itself only acts
    when some endpoint is predicted to meet the objective).
    """

    type: ClassVar[str] = "slo-headroom-filter"
    requires: ClassVar[tuple[str, ...]] = (OBJECTIVES_PRODUCER_TYPE, PREDICTOR_TYPE)
    consumes: ClassVar[frozenset[str]] = frozenset({PREDICTED_LATENCY, SLO_OBJECTIVES})
    Params = HeadroomFilterParams

    def __init__(self, name: str, params: HeadroomFilterParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.rng = random.Random(params.seed)

    def bind(self, handle: PluginHandle) -> None:
        check_predictor(handle.plugins, self.params.predictor_name)

    def filter(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        objectives = request.scratch.get(OBJECTIVES_KEY)
        if objectives is None or not endpoints:
            return endpoints
        key = self.params.predictor_name
        buffer = self.params.buffer_factor
        kept = [ep for ep in endpoints if meets(ep.attributes.get(key), objectives, buffer)]
        if not kept or len(kept) == len(endpoints):
            return endpoints
        p = self.params.exploration_probability
        if p > 0.0 and self.rng.random() < p:
            return endpoints
        return kept
