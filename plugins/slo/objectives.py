"""`slo-objectives-producer`: a request's latency objectives, from its headers or per-objective defaults."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.errors import RequestError
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from plugins.slo import OBJECTIVES_KEY, OBJECTIVES_PRODUCER_TYPE, SLO_OBJECTIVES, Objectives

# Header names, current (llm-d) first: when both are present the first wins and the other is not read.
TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")

# A plain decimal number, optionally with a fraction and an exponent (no sign, no units, no `inf`/`nan`).
_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_ms(header: str, value: str) -> float:
    """The positive, finite number of milliseconds that header `header` carries. Raises RequestError(400)
    naming the header and the allowed form otherwise."""
    text = value.strip()
    ms = float(text) if _NUMBER.fullmatch(text) else math.nan
    if not (0.0 < ms < math.inf):
        raise RequestError(
            400,
            f"header {header}: {value!r} is not a latency objective; write a positive number of "
            f"milliseconds, e.g. '{header}: 500' or '{header}: 12.5'",
        )
    return ms


def header_ms(headers: Mapping[str, str], names: Sequence[str]) -> float | None:
    """The objective of the first header of `names` present in `headers` (lower-case names, as Envoy sends
    them), or None when none is present."""
    for name in names:
        value = headers.get(name)
        if value is not None:
            return parse_ms(name, value)
    return None


@dataclass(frozen=True)
class ObjectiveDefaults:
    """Objectives in milliseconds for requests that carry no objective header (0 = none)."""

    ttft_ms: float = 0.0
    tpot_ms: float = 0.0

    def validate(self) -> None:
        for key, v in (("ttftMs", self.ttft_ms), ("tpotMs", self.tpot_ms)):
            if not (0.0 <= v < math.inf):
                raise ValueError(f"{key} must be a finite number of milliseconds >= 0 (0 = none), got {v}")


@dataclass(frozen=True)
class ObjectivesParams:
    """defaultTtftMs / defaultTpotMs  objectives for requests without headers and without a per-objective
                                     default (0 = none)
    objectives                       per-objective defaults: InferenceObjective name (the request's
                                     `x-gateway-inference-objective`) -> {ttftMs, tpotMs}

    A header always wins over a default, kind by kind (a request may set only its TTFT and take the TPOT of
    its objective)."""

    default_ttft_ms: float = 0.0
    default_tpot_ms: float = 0.0
    objectives: dict[str, ObjectiveDefaults] = field(default_factory=dict)

    def validate(self) -> None:
        ObjectiveDefaults(self.default_ttft_ms, self.default_tpot_ms).validate()
        for name, d in self.objectives.items():
            try:
                d.validate()
            except ValueError as exc:
                raise ValueError(f"objectives.{name}: {exc}") from None


def resolve(headers: Mapping[str, str], objective: str | None,
            defaults: Mapping[str, ObjectiveDefaults], fallback: ObjectiveDefaults) -> Objectives | None:
    """A request's objectives: each kind from its header, else from the defaults of the request's objective
    name, else from `fallback`; None when neither kind is set. Raises RequestError(400) for a malformed
    header."""
    ttft = header_ms(headers, TTFT_HEADERS)
    tpot = header_ms(headers, TPOT_HEADERS)
    if ttft is None or tpot is None:
        d = defaults.get(objective) if objective else None
        if ttft is None:
            ttft = (d.ttft_ms if d is not None and d.ttft_ms > 0 else fallback.ttft_ms) or None
        if tpot is None:
            tpot = (d.tpot_ms if d is not None and d.tpot_ms > 0 else fallback.tpot_ms) or None
    if ttft is None and tpot is None:
        return None
    return Objectives(ttft, tpot)


@register
class SLOObjectivesProducer:
    """Reads each request's latency objectives and keeps them in `request.scratch[OBJECTIVES_KEY]` (an
    `Objectives`, or None) for the SLO filter, scorer and admitter and for the predictor's attainment
    counters. Scores nothing itself.

    Signal: the headers `x-llm-d-slo-ttft-ms` / `x-llm-d-slo-tpot-ms` (llm-d's names; the older
    `x-slo-ttft-ms` / `x-slo-tpot-ms` are still read, the new name winning when both are sent), each a
    positive number of milliseconds. A malformed value is a 400 that names the header and the allowed form.
    Requests without headers take the defaults of their objective name (`objectives`), then
    defaultTtftMs/defaultTpotMs.

    Hook for InferenceObjective: `set_objective_defaults()` replaces the per-objective map at run time (for
    a watcher of InferenceObjective resources, should they carry latency objectives).

    When it is wrong: an objective is the client's wish, not a contract; nothing checks that it is
    achievable at all (a 100 ms TTFT for a 30,000-token prompt is simply missed, or shed if sheddable).
    """

    type: ClassVar[str] = OBJECTIVES_PRODUCER_TYPE
    produces: ClassVar[frozenset[str]] = frozenset({SLO_OBJECTIVES})
    consumes: ClassVar[frozenset[str]] = frozenset()
    Params = ObjectivesParams

    def __init__(self, name: str, params: ObjectivesParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self._fallback = ObjectiveDefaults(params.default_ttft_ms, params.default_tpot_ms)
        self._defaults: Mapping[str, ObjectiveDefaults] = dict(params.objectives)

    def set_objective_defaults(self, defaults: Mapping[str, ObjectiveDefaults]) -> None:
        """Replace the per-objective defaults (objective name -> ObjectiveDefaults)."""
        for name, d in defaults.items():
            try:
                d.validate()
            except ValueError as exc:
                raise ValueError(f"objective {name!r}: {exc}") from None
        self._defaults = dict(defaults)

    def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        request.scratch[OBJECTIVES_KEY] = resolve(request.headers, request.objective, self._defaults,
                                                  self._fallback)
