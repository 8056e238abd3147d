"""The scheduler: filters in order, scores clamped to [0, 1], weighted and summed, then the picker; the
profile handler decides which profiles run and which result is primary."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datastore.endpoint import Endpoint
from epp.request import header_only_request
from epp.scheduling.scheduler import (
    Scheduler,
    SchedulerProfile,
    WeightedScorer,
    clamped_scores,
    weighted_totals,
)
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


# ---------------------------------------------------------------------------------------------------------
# The list-based sums equal the previous per-endpoint dict sums, bit for bit

POOL = [Endpoint(f"e{i}", f"10.0.1.{i + 1}", 8000) for i in range(6)]
_scores = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-300, 2.0, -1.0]),
    st.integers(min_value=-3, max_value=3),
)


def _reference_totals(columns, endpoints):
    """How SchedulerProfile.run summed before: a dict per endpoint, positive scores only, clamped at 1."""
    totals = dict.fromkeys(endpoints, 0.0)
    for weight, scores in columns:
        for ep, s in scores.items():
            if s > 0.0 and ep in totals:
                totals[ep] += weight if s >= 1.0 else weight * s
    return totals


class ListScorer(FixedScorer):
    """A scorer offering the fast path: the same scores as a list, clamped."""

    def score_values(self, state, request, endpoints):
        return clamped_scores(self.score(state, request, endpoints), endpoints)


@settings(max_examples=300, deadline=None)
@given(
    columns=st.lists(
        st.tuples(st.one_of(st.sampled_from([1.0, 2.0, 3.0, 0.0, 0.5, -1.0, math.inf, math.nan]),
                            st.floats(min_value=-10, max_value=10)),
                  st.dictionaries(st.sampled_from(POOL), _scores)),
        max_size=5,
    ),
    candidates=st.lists(st.sampled_from(POOL), min_size=1, max_size=8),  # may repeat an endpoint
    fast=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_totals_equal_the_per_endpoint_sums_bit_for_bit(columns, candidates, fast):
    picker = RecordingPicker()
    scorers = [WeightedScorer((ListScorer if f else FixedScorer)(scores), w)
               for (w, scores), f in zip(columns, fast, strict=False)]
    SchedulerProfile("p", scorers=scorers, picker=picker).run(None, REQ, list(candidates))
    expected = _reference_totals(columns, candidates)
    assert list(picker.seen) == list(expected)
    for ep, total in expected.items():
        got = picker.seen[ep]
        if math.isnan(total):
            assert math.isnan(got)
        else:  # equal, and with the same sign when zero
            assert (got, math.copysign(1, got)) == (total, math.copysign(1, total))


def test_weighted_totals_add_in_scorer_order_from_zero():
    # 0.1 + 0.2 + 0.3 rounds differently from 0.1 + (0.2 + 0.3): the order must be the scorers' order.
    cols = [(1.0, [0.1]), (1.0, [0.2]), (1.0, [0.3])]
    assert weighted_totals(cols, 1) == [(0.0 + 0.1) + 0.2 + 0.3]
    assert weighted_totals([], 2) == [0.0, 0.0]
    (zero,) = weighted_totals([(-1.0, [0.0])], 1)  # -1 × 0.0 is -0.0; added to 0.0 it is 0.0
    assert zero == 0.0 and math.copysign(1, zero) == 1


def test_a_picker_offering_pick_values_gets_the_same_totals_without_a_dict():
    class ListPicker(RecordingPicker):
        def pick_values(self, state, endpoints, totals):
            self.values = (list(endpoints), list(totals))
            return self.pick(state, dict(zip(endpoints, totals, strict=True)))

    picker = ListPicker()
    profile = SchedulerProfile("p", scorers=[WeightedScorer(FixedScorer({A: 0.5, B: 1.0}), 2.0)], picker=picker)
    assert run(profile).target_endpoints == (B,)
    assert picker.values == ([A, B, C], [1.0, 2.0, 0.0])


def test_a_list_scorer_adds_its_weighted_scores_to_zero():
    rng = random.Random(5)
    scores = {ep: rng.random() for ep in POOL}
    picker = RecordingPicker()
    SchedulerProfile("p", scorers=[WeightedScorer(ListScorer(scores), 2.0)], picker=picker).run(None, REQ, POOL)
    assert picker.seen == {ep: 0.0 + 2.0 * s for ep, s in scores.items()}
