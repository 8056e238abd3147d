"""The scheduler: filters in order, scores clamped to [0, 1], weighted and summed, then the picker; the
profile handler decides which profiles run and which result is primary."""

import math

import pytest

from epp.datastore.endpoint import Endpoint
from epp.request import header_only_request
from epp.scheduling.scheduler import Scheduler, SchedulerProfile, WeightedScorer
from epp.scheduling.types import ProfileResult, SchedulingError, SchedulingResult

A, B, C = (Endpoint(n, f"10.0.0.{i}", 8000) for i, n in enumerate("abc", 1))
REQ = header_only_request("r", {})


class FixedScorer:
    type = "fixed"

    def __init__(self, scores):
        self.name, self.scores = "fixed", scores

    def score(self, state, request, endpoints):
        return {ep: s for ep, s in self.scores.items() if ep in endpoints}


class KeepFilter:
    type = "keep"

    def __init__(self, keep, log):
        self.name, self.keep, self.log = f"keep-{len(keep)}", keep, log

    def filter(self, state, request, endpoints):
        self.log.append((self.name, [e.name for e in endpoints]))
        return [e for e in endpoints if e in self.keep]


class RecordingPicker:
    type = "recording"
    name = "recording"

    def __init__(self):
        self.seen = None

    def pick(self, state, scores):
        self.seen = dict(scores)
        return ProfileResult((max(scores, key=scores.get),)) if scores else ProfileResult(())


class SingleHandler:
    type = "single"
    name = "single"

    def pick_profiles(self, state, request, profiles, results):
        return [] if results else list(profiles.values())

    def process_results(self, state, request, results):
        (name,) = results
        return SchedulingResult(dict(results), name)


def run(profile):
    return Scheduler(SingleHandler(), {profile.name: profile}).schedule(REQ, [A, B, C])


def test_scores_are_clamped_weighted_and_summed():
    picker = RecordingPicker()
    profile = SchedulerProfile("p", scorers=[
        WeightedScorer(FixedScorer({A: 2.0, B: 0.5, C: -1.0}), 2.0),  # clamped to 1, 0.5, 0
        WeightedScorer(FixedScorer({A: 0.0, B: 1.0, C: math.nan}), 3.0),  # NaN counts as 0
    ], picker=picker)
    result = run(profile)
    assert picker.seen == {A: 2.0, B: 4.0, C: 0.0}
    assert result.target_endpoints == (B,)


def test_an_endpoint_a_scorer_leaves_out_scores_zero_from_it():
    picker = RecordingPicker()
    run(SchedulerProfile("p", scorers=[WeightedScorer(FixedScorer({A: 1.0}), 1.0)], picker=picker))
    assert picker.seen == {A: 1.0, B: 0.0, C: 0.0}


def test_filters_run_in_order_each_on_the_previous_output():
    log = []
    picker = RecordingPicker()
    run(SchedulerProfile("p", filters=[KeepFilter([A, B], log), KeepFilter([B], log)], picker=picker))
    assert log == [("keep-2", ["a", "b", "c"]), ("keep-1", ["a", "b"])]
    assert list(picker.seen) == [B]


def test_a_filter_that_removes_everything_fails_the_profile_with_503():
    with pytest.raises(SchedulingError) as err:
        run(SchedulerProfile("p", filters=[KeepFilter([], [])], picker=RecordingPicker()))
    assert err.value.status == 503


def test_no_candidates_is_503():
    profile = SchedulerProfile("p", picker=RecordingPicker())
    with pytest.raises(SchedulingError) as err:
        Scheduler(SingleHandler(), {"p": profile}).schedule(REQ, [])
    assert err.value.status == 503


def test_the_handler_is_asked_until_it_picks_no_profile():
    class TwoStep(SingleHandler):
        def __init__(self):
            self.calls = []

        def pick_profiles(self, state, request, profiles, results):
            self.calls.append(sorted(results))
            if "first" not in results:
                return [profiles["first"]]
            if "second" not in results:
                return [profiles["second"]]
            return []

        def process_results(self, state, request, results):
            return SchedulingResult(dict(results), "second")

    handler = TwoStep()
    profiles = {n: SchedulerProfile(n, scorers=[WeightedScorer(FixedScorer({A: 1.0}), 1.0)],
                                    picker=RecordingPicker()) for n in ("first", "second")}
    result = Scheduler(handler, profiles).schedule(REQ, [A, B])
    assert handler.calls == [[], ["first"], ["first", "second"]]
    assert result.primary_profile == "second" and result.target_endpoints == (A,)
