"""Spec: `queue-scorer` scores (max − q)/(max − min) over the candidates' waiting queues; all equal ⇒ 1.0."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Scorer
from epp.scheduling.types import CycleState
from plugins.queue_scorer import QueueScorer

TYPE = "queue-scorer"


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is QueueScorer


def test_is_a_scorer_without_parameters(make_plugin):
    assert isinstance(make_plugin(TYPE), Scorer)
    with pytest.raises(registry.ConfigError, match="takes no parameters"):
        make_plugin(TYPE, {"threshold": 3})


@pytest.mark.parametrize(
    ("queues", "expected"),
    [
        ({"a": 0, "b": 5, "c": 10}, {"a": 1.0, "b": 0.5, "c": 0.0}),
        ({"a": 4, "b": 6}, {"a": 1.0, "b": 0.0}),  # relative: a small gap is the full range
        ({"a": 10, "b": 12, "c": 20}, {"a": 1.0, "b": 0.8, "c": 0.0}),
        ({"a": 3, "b": 3, "c": 3}, {"a": 1.0, "b": 1.0, "c": 1.0}),  # all equal
        ({"a": 0, "b": 0}, {"a": 1.0, "b": 1.0}),
        ({"only": 42}, {"only": 1.0}),
        ({}, {}),
    ],
)
def test_scores_waiting_queues_min_max_over_the_candidates(
    make_plugin, endpoint, request_for, queues, expected
):
    endpoints = [endpoint(name, waiting_queue_size=q) for name, q in queues.items()]
    scores = make_plugin(TYPE).score(CycleState(), request_for(), endpoints)
    assert {ep.name: s for ep, s in scores.items()} == pytest.approx(expected)


def test_reads_only_the_waiting_queue(make_plugin, endpoint, request_for):
    endpoints = [
        endpoint("a", waiting_queue_size=1, running_requests_size=100, kv_cache_usage_percent=0.99),
        endpoint("b", waiting_queue_size=2, running_requests_size=0, kv_cache_usage_percent=0.0),
    ]
    scores = make_plugin(TYPE).score(CycleState(), request_for(), endpoints)
    assert {ep.name: s for ep, s in scores.items()} == {"a": 1.0, "b": 0.0}
