"""Spec: `queue-scorer` scores (max − q)/(max − min) over the candidates' waiting queues; all equal ⇒ 1.0."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.scheduling import registry
from epp.scheduling.interfaces import Scorer
from epp.scheduling.registry import NoParams, PluginHandle
from epp.scheduling.scheduler import clamped_scores
from epp.scheduling.types import CycleState
from plugins.queue_scorer import QueueScorer

from .conftest import _endpoint

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


_queues = st.one_of(
    st.integers(min_value=0, max_value=50),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=200, deadline=None)
@given(queues=st.lists(_queues, max_size=12))
def test_the_scheduler_fast_path_is_the_clamped_score(queues):
    endpoints = [_endpoint(f"e{i}", waiting_queue_size=q) for i, q in enumerate(queues)]
    scorer = QueueScorer(TYPE, NoParams(), PluginHandle())
    expected = clamped_scores(scorer.score(CycleState(), None, endpoints), endpoints)
    got = scorer.score_values(CycleState(), None, endpoints)
    # Equal values, so equal contributions to every total (a -0.0 adds nothing, as a score the clamp drops).
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(queues=st.lists(st.one_of(st.integers(-5, 5), st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e300, -1e300])),
                       max_size=12))
def test_with_finite_queues_the_fast_path_gives_the_very_scores_of_score(queues):
    endpoints = [_endpoint(f"e{i}", waiting_queue_size=q) for i, q in enumerate(queues)]
    scorer = QueueScorer(TYPE, NoParams(), PluginHandle())
    scores = list(scorer.score(CycleState(), None, endpoints).values())
    if all(0.0 <= s <= 1.0 for s in scores):  # nothing for the scheduler to clamp (no overflow to inf)
        assert [repr(s) for s in scorer.score_values(CycleState(), None, endpoints)] == [repr(s) for s in scores]
