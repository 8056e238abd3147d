"""Scheduler and SchedulerProfile: filters in order, every scorer (clamped to [0, 1], weighted, summed),
then the picker. The profile handler decides which profiles run and which result is primary.

Scores are summed in lists aligned with the candidate list rather than per endpoint in a dict: a scorer may
offer `score_values(state, request, endpoints) -> list[float]`, its scores of `endpoints` in their order and
already clamped to [0, 1] (NaN as 0), which the profile uses instead of `score()`; any other scorer's dict is
read in candidate order and clamped here. Either way each endpoint's total is 0.0 plus, scorer by scorer in
order, weight × clamped score: the same floating-point sums, in the same order, as adding the weighted
positive scores one by one. Likewise a picker may offer `pick_values(state, endpoints, totals)`, equal to
`pick(state, dict(zip(endpoints, totals)))`, which saves building the dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from time import perf_counter

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.interfaces import Filter, Picker, ProfileHandler, Scorer
from epp.scheduling.types import CycleState, ProfileResult, SchedulingError, SchedulingResult

# (extension point, plugin, seconds) -> None; used for inference_extension_plugin_duration_seconds.
PluginTimer = Callable[[str, object, float], None]


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class SchedulerProfile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None

    def run(
        self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint], timer: PluginTimer | None = None
    ) -> ProfileResult | None:
        """Returns None when a filter leaves no endpoint or the picker chooses none."""
        for f in self.filters:
            t0 = perf_counter()
            endpoints = f.filter(state, request, endpoints)
            if timer is not None:
                timer("Filter", f, perf_counter() - t0)
            if not endpoints:
                return None
        columns: list[tuple[float, list[float]]] = []
        for ws in self.scorers:
            scorer = ws.scorer
            values_of = getattr(scorer, "score_values", None)
            t0 = perf_counter()
            if values_of is not None:
                values = values_of(state, request, endpoints)
            else:
                scores = scorer.score(state, request, endpoints)
            if timer is not None:
                timer("Scorer", scorer, perf_counter() - t0)
            columns.append((ws.weight, values if values_of is not None else clamped_scores(scores, endpoints)))
        totals = weighted_totals(columns, len(endpoints))
        picker = self.picker
        if picker is None:
            raise RuntimeError(f"profile {self.name!r} has no picker")
        pick_values = getattr(picker, "pick_values", None)
        if pick_values is not None:
            t0 = perf_counter()
            result = pick_values(state, endpoints, totals)
        else:
            scored = dict(zip(endpoints, totals, strict=True))
            t0 = perf_counter()
            result = picker.pick(state, scored)
        if timer is not None:
            timer("Picker", self.picker, perf_counter() - t0)
        return result if result.endpoints else None


class Scheduler:
    def __init__(self, handler: ProfileHandler, profiles: Mapping[str, SchedulerProfile]) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.handler = handler
        self.profiles = dict(profiles)

    def schedule(
        self, request: LLMRequest, candidates: Sequence[Endpoint], timer: PluginTimer | None = None
    ) -> SchedulingResult:
        """Runs the profiles the handler picks until it picks none. Raises SchedulingError when no
        profile produced an endpoint."""
        if not candidates:
            raise SchedulingError("no candidate endpoints", status=503)
        state = CycleState()
        results: dict[str, ProfileResult | None] = {}
        while True:
            t0 = perf_counter()
            to_run = self.handler.pick_profiles(state, request, self.profiles, results)
            if timer is not None:
                timer("ProfilePicker", self.handler, perf_counter() - t0)
            if not to_run:
                break
            for profile in to_run:
                if profile.name in results:
                    raise RuntimeError(f"profile handler ran profile {profile.name!r} twice")
                results[profile.name] = profile.run(state, request, list(candidates), timer)
        for r in results.values():
            if r is not None:
                break
        else:
            raise SchedulingError("failed to find a target endpoint: every profile filtered out all endpoints", status=503)
        t0 = perf_counter()
        outcome = self.handler.process_results(state, request, results)
        if timer is not None:
            timer("ProcessProfilesResults", self.handler, perf_counter() - t0)
        return outcome


def clamped_scores(scores: Mapping[Endpoint, float], endpoints: Sequence[Endpoint]) -> list[float]:
    """`scores` of `endpoints` in their order, clamped to [0, 1]: missing, NaN and non-positive scores are 0.0,
    scores of 1 or more are 1.0 (endpoints in `scores` that are not in `endpoints` are ignored)."""
    return [(s if s < 1.0 else 1.0) if s > 0.0 else 0.0 for s in map(scores.get, endpoints, repeat(0.0))]


def weighted_totals(columns: Sequence[tuple[float, list[float]]], n: int) -> list[float]:
    """Per endpoint, 0.0 plus weight × clamped score for each (weight, scores) column in order (`n`
    endpoints). A clamped score of 1.0 adds exactly the weight, and one of 0.0 adds ±0.0, which leaves every
    sum as it was (the first term is added to 0.0, so a -0.0 never survives): the sums equal adding only the
    positive scores. A weight that is not finite (inf × 0 is NaN) adds only positive scores."""
    if not columns:
        return [0.0] * n
    isfinite = math.isfinite
    if len(columns) == 3:
        # One pass over the endpoints, the terms added left to right as the loop below would.
        (w0, a), (w1, b), (w2, c) = columns
        if isfinite(w0) and isfinite(w1) and isfinite(w2):
            return [0.0 + w0 * x + w1 * y + w2 * z for x, y, z in zip(a, b, c, strict=True)]
    elif len(columns) == 2:
        (w0, a), (w1, b) = columns
        if isfinite(w0) and isfinite(w1):
            return [0.0 + w0 * x + w1 * y for x, y in zip(a, b, strict=True)]
    elif len(columns) == 1:
        ((w0, a),) = columns
        if isfinite(w0):
            return [0.0 + w0 * x for x in a]
    totals = [0.0] * n
    for w, values in columns:
        if isfinite(w):
            totals = [t + w * v for t, v in zip(totals, values, strict=True)]
        else:
            totals = [t + w * v if v > 0.0 else t for t, v in zip(totals, values, strict=True)]
    return totals
