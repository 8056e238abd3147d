"""Spec: `active-request-scorer` scores EPP-tracked in-flight requests: 1.0 at or below `idleThreshold`,
otherwise maxBusyScore · (maxCount − count)/maxCount."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Scorer
from epp.scheduling.types import CycleState
from plugins.active_request_scorer import ActiveRequestScorer

TYPE = "active-request-scorer"


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is ActiveRequestScorer


def test_is_a_scorer_with_llm_d_defaults(make_plugin):
    scorer = make_plugin(TYPE)
    assert isinstance(scorer, Scorer)
    assert (scorer.idle_threshold, scorer.max_busy_score) == (0, 1.0)


@pytest.mark.parametrize(
    ("params", "in_flight", "expected"),
    [
        ({}, {"a": 0, "b": 2, "c": 4}, {"a": 1.0, "b": 0.5, "c": 0.0}),
        ({}, {"a": 0, "b": 0}, {"a": 1.0, "b": 1.0}),  # all idle
        ({}, {"a": 3, "b": 3}, {"a": 0.0, "b": 0.0}),  # all equally busy: the busiest scores lowest
        ({}, {"a": 1, "b": 4}, {"a": 0.75, "b": 0.0}),
        ({"idleThreshold": 2}, {"a": 0, "b": 2, "c": 4}, {"a": 1.0, "b": 1.0, "c": 0.0}),
        ({"idleThreshold": 2}, {"a": 3, "b": 6}, {"a": 0.5, "b": 0.0}),
        ({"maxBusyScore": 0.5}, {"a": 0, "b": 2, "c": 4}, {"a": 1.0, "b": 0.25, "c": 0.0}),
        ({"maxBusyScore": 0.0}, {"a": 0, "b": 1}, {"a": 1.0, "b": 0.0}),
        ({"idleThreshold": 2, "maxBusyScore": 0.5}, {"a": 0, "b": 2, "c": 4}, {"a": 1.0, "b": 1.0, "c": 0.0}),
        ({}, {"only": 9}, {"only": 0.0}),
        ({}, {}, {}),
    ],
)
def test_scores_in_flight_requests(make_plugin, endpoint, request_for, params, in_flight, expected):
    endpoints = [endpoint(name, in_flight=n) for name, n in in_flight.items()]
    scores = make_plugin(TYPE, params).score(CycleState(), request_for(), endpoints)
    assert {ep.name: s for ep, s in scores.items()} == pytest.approx(expected)


def test_a_busy_endpoint_never_outscores_an_idle_one(make_plugin, endpoint, request_for):
    scorer = make_plugin(TYPE, {"idleThreshold": 1})
    endpoints = [
        endpoint("idle", in_flight=1),
        endpoint("busy", in_flight=2),
        endpoint("busiest", in_flight=200),
    ]
    scores = {ep.name: s for ep, s in scorer.score(CycleState(), request_for(), endpoints).items()}
    assert scores["idle"] == 1.0 > scores["busy"] > scores["busiest"] == 0.0


def test_reads_the_epp_counter_not_scraped_metrics(make_plugin, endpoint, request_for):
    endpoints = [
        endpoint("a", in_flight=0, running_requests_size=50, waiting_queue_size=10),
        endpoint("b", in_flight=5),
    ]
    scores = make_plugin(TYPE).score(CycleState(), request_for(), endpoints)
    assert {ep.name: s for ep, s in scores.items()} == {"a": 1.0, "b": 0.0}


def test_deprecated_request_timeout_is_accepted_and_ignored(make_plugin, endpoint, request_for):
    endpoints = [endpoint("a", in_flight=1), endpoint("b", in_flight=2)]
    with_timeout = make_plugin(TYPE, {"requestTimeout": "2m"}).score(CycleState(), request_for(), endpoints)
    without = make_plugin(TYPE).score(CycleState(), request_for(), endpoints)
    assert with_timeout == without


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"idleThreshold": -1}, "idleThreshold"),
        ({"idleThreshold": "none"}, "idleThreshold"),
        ({"maxBusyScore": 1.5}, "maxBusyScore"),
        ({"maxBusyScore": -0.1}, "maxBusyScore"),
        ({"requestTimeout": "soon"}, "requestTimeout"),
        ({"timeout": "2m"}, "timeout"),
    ],
)
def test_bad_parameters_are_config_errors_naming_the_key(make_plugin, params, key):
    with pytest.raises(registry.ConfigError, match=key):
        make_plugin(TYPE, params)
