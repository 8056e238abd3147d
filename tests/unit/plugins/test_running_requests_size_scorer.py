"""Spec: `running-requests-size-scorer` scores (max − r)/(max − min) over the candidates' running requests;
all equal ⇒ 1.0."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Scorer
from epp.scheduling.types import CycleState
from plugins.running_requests_size_scorer import RunningRequestsSizeScorer

TYPE = "running-requests-size-scorer"


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is RunningRequestsSizeScorer


def test_is_a_scorer_without_parameters(make_plugin):
    assert isinstance(make_plugin(TYPE), Scorer)
    with pytest.raises(registry.ConfigError, match="takes no parameters"):
        make_plugin(TYPE, {"max": 3})


@pytest.mark.parametrize(
    ("running", "expected"),
    [
        ({"a": 0, "b": 8, "c": 32}, {"a": 1.0, "b": 0.75, "c": 0.0}),
        ({"a": 16, "b": 16}, {"a": 1.0, "b": 1.0}),  # all equal
        ({"a": 7}, {"a": 1.0}),
        ({}, {}),
    ],
)
def test_scores_running_requests_min_max_over_the_candidates(
    make_plugin, endpoint, request_for, running, expected
):
    endpoints = [endpoint(name, running_requests_size=r) for name, r in running.items()]
    scores = make_plugin(TYPE).score(CycleState(), request_for(), endpoints)
    assert {ep.name: s for ep, s in scores.items()} == pytest.approx(expected)


def test_reads_only_the_running_requests(make_plugin, endpoint, request_for):
    endpoints = [
        endpoint("a", running_requests_size=2, waiting_queue_size=50),
        endpoint("b", running_requests_size=4, waiting_queue_size=0),
    ]
    scores = make_plugin(TYPE).score(CycleState(), request_for(), endpoints)
    assert {ep.name: s for ep, s in scores.items()} == {"a": 1.0, "b": 0.0}
