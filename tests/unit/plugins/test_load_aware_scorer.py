"""Spec: `load-aware-scorer` scores 0.5 for an empty queue, 0.5·(1 − waiting/threshold) below the threshold,
0 at or above it."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Scorer
from epp.scheduling.types import CycleState
from plugins.load_aware_scorer import LoadAwareScorer

TYPE = "load-aware-scorer"


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is LoadAwareScorer


def test_is_a_scorer_with_threshold_128_by_default(make_plugin):
    scorer = make_plugin(TYPE)
    assert isinstance(scorer, Scorer)
    assert scorer.threshold == 128


@pytest.mark.parametrize(
    ("threshold", "waiting", "expected"),
    [
        (128, 0, 0.5),
        (128, 32, 0.375),
        (128, 64, 0.25),
        (128, 127, 0.5 * (1 - 127 / 128)),
        (128, 128, 0.0),
        (128, 500, 0.0),
        (10, 1, 0.45),
        (10, 5, 0.25),
        (10, 10, 0.0),
        (1, 0, 0.5),
        (1, 1, 0.0),
    ],
)
def test_scores_the_waiting_queue_against_the_threshold(
    make_plugin, endpoint, request_for, threshold, waiting, expected
):
    scorer = make_plugin(TYPE, {"threshold": threshold})
    ep = endpoint("a", waiting_queue_size=waiting)
    assert scorer.score(CycleState(), request_for(), [ep]) == {ep: pytest.approx(expected)}


def test_scores_are_absolute_per_endpoint(make_plugin, endpoint, request_for):
    scorer = make_plugin(TYPE, {"threshold": 100})
    endpoints = [endpoint("a", waiting_queue_size=50), endpoint("b", waiting_queue_size=60)]
    scores = scorer.score(CycleState(), request_for(), endpoints)
    # unlike queue-scorer, a 10-request gap on a 100 threshold is a small difference
    assert {ep.name: s for ep, s in scores.items()} == pytest.approx({"a": 0.25, "b": 0.2})


@pytest.mark.parametrize("bad", [0, -5, "lots", 1.5])
def test_bad_threshold_is_a_config_error_naming_the_key(make_plugin, bad):
    with pytest.raises(registry.ConfigError, match="threshold"):
        make_plugin(TYPE, {"threshold": bad})
