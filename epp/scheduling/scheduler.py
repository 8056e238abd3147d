"""Scheduler and SchedulerProfile: filters in order, every scorer (clamped to [0, 1], weighted, summed),
then the picker. The profile handler decides which profiles run and which result is primary."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
        totals = dict.fromkeys(endpoints, 0.0)
        for ws in self.scorers:
            t0 = perf_counter()
            scores = ws.scorer.score(state, request, endpoints)
            if timer is not None:
                timer("Scorer", ws.scorer, perf_counter() - t0)
            w = ws.weight
            for ep, s in scores.items():
                # Clamp to [0, 1] (NaN counts as 0); endpoints a scorer adds that are not candidates are ignored.
                if s > 0.0 and ep in totals:
                    totals[ep] += w if s >= 1.0 else w * s
        if self.picker is None:
            raise RuntimeError(f"profile {self.name!r} has no picker")
        t0 = perf_counter()
        result = self.picker.pick(state, totals)
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
        if not any(r is not None for r in results.values()):
            raise SchedulingError("failed to find a target endpoint: every profile filtered out all endpoints", status=503)
        t0 = perf_counter()
        outcome = self.handler.process_results(state, request, results)
        if timer is not None:
            timer("ProcessProfilesResults", self.handler, perf_counter() - t0)
        return outcome
