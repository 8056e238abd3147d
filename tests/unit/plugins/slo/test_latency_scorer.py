"""Spec: `latency-scorer` scores by predicted latency as a softened ratio to the best candidate,
w_t·(t_min + c_t)/(t + c_t) + w_p·(p_min + c_p)/(p + c_p); with strategy `least`, a request with objectives
prefers the endpoints that meet them most narrowly."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Scorer
from epp.scheduling.types import CycleState
from plugins.slo import Objectives
from plugins.slo.latency_scorer import LatencyScorer
from tests.unit.plugins.slo.helpers import completion
from tests.unit.plugins.slo.test_slo_headroom_filter import pods

TYPE = "latency-scorer"


def scores(plugin, endpoints, objectives: Objectives | None = None) -> dict[str, float]:
    return {ep.name: s for ep, s in plugin.score(CycleState(), completion("hi", objectives=objectives),
                                                 endpoints).items()}


def test_is_a_registered_scorer(make_plugin):
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is LatencyScorer
    assert isinstance(make_plugin(TYPE), Scorer)


@pytest.mark.parametrize(
    ("predictions", "expected"),
    [
        # TTFT only (equal TPOT): (100 + 100)/(t + 100) at weight 0.8, plus 0.2.
        ({"a": (100.0, 10.0), "b": (300.0, 10.0)}, {"a": 1.0, "b": 0.8 * 200 / 400 + 0.2}),
        # TPOT only: (10 + 10)/(p + 10) at weight 0.2.
        ({"a": (100.0, 10.0), "b": (100.0, 30.0)}, {"a": 1.0, "b": 0.8 + 0.2 * 20 / 40}),
        ({"a": (5000.0, 10.0), "b": (6000.0, 10.0)}, {"a": 1.0, "b": 0.8 * 5100 / 6100 + 0.2}),
        ({"a": (120.0, 12.0), "b": (120.0, 12.0)}, {"a": 1.0, "b": 1.0}),
        ({"only": (999.0, 99.0)}, {"only": 1.0}),
        ({"a": (100.0, 10.0), "none": None}, {"a": 1.0, "none": 0.0}),
        ({"x": None}, {"x": 0.0}),
    ],
)
def test_scores_the_softened_ratio_to_the_best_prediction(make_plugin, predictions, expected):
    assert scores(make_plugin(TYPE), pods(**predictions)) == pytest.approx(expected)


def test_small_differences_barely_count_and_large_ones_do(make_plugin):
    plugin = make_plugin(TYPE)
    near = scores(plugin, pods(a=(1000.0, 10.0), b=(1200.0, 10.0)))
    far = scores(plugin, pods(a=(100.0, 10.0), b=(1100.0, 10.0)))
    assert 1.0 - near["b"] < 0.15  # 20% slower at a second: a little
    assert 1.0 - far["b"] > 0.6  # a full second slower at a tenth of a second: a lot


@pytest.mark.parametrize(
    ("params", "expected_b"),
    [
        ({"ttftWeight": 1, "tpotWeight": 0}, 200 / 400),
        ({"ttftWeight": 0, "tpotWeight": 1}, 20 / 40),
        ({"ttftWeight": 1, "tpotWeight": 1}, 0.5 * 200 / 400 + 0.5 * 20 / 40),
        ({"ttftToleranceMs": 1000}, 0.8 * 1100 / 1300 + 0.2 * 20 / 40),
    ],
)
def test_weights_and_tolerances(make_plugin, params, expected_b):
    s = scores(make_plugin(TYPE, params), pods(a=(100.0, 10.0), b=(300.0, 30.0)))
    assert s == pytest.approx({"a": 1.0, "b": expected_b})


def test_objectives_do_not_change_the_default_strategy(make_plugin):
    endpoints = pods(a=(100.0, 10.0), b=(300.0, 10.0))
    plugin = make_plugin(TYPE)
    assert scores(plugin, endpoints, Objectives(400.0, None)) == scores(plugin, endpoints)


@pytest.mark.parametrize(
    ("objectives", "expected"),
    [
        # Packing: of the endpoints that meet 400 ms, the one closest to it scores highest; a miss scores 0.
        (Objectives(400.0, None), {"fast": 100 / 400, "near": 350 / 400, "miss": 0.0}),
        (Objectives(400.0, 20.0), {"fast": 0.8 * 100 / 400 + 0.2 * 10 / 20, "near": 0.8 * 350 / 400 + 0.2 * 10 / 20,
                                   "miss": 0.0}),
    ],
)
def test_least_headroom_packs_requests_with_objectives(make_plugin, objectives, expected):
    endpoints = pods(fast=(100.0, 10.0), near=(350.0, 10.0), miss=(500.0, 10.0))
    plugin = make_plugin(TYPE, {"headroomSelectionStrategy": "least"})
    assert scores(plugin, endpoints, objectives) == pytest.approx(expected)


@pytest.mark.parametrize("objectives", [None, Objectives(50.0, None)])
def test_least_headroom_falls_back_to_the_ratio_without_objectives_or_when_none_meets(make_plugin, objectives):
    endpoints = pods(fast=(100.0, 10.0), slow=(300.0, 10.0))
    least = make_plugin(TYPE, {"headroomSelectionStrategy": "least"})
    assert scores(least, endpoints, objectives) == pytest.approx(scores(make_plugin(TYPE), endpoints))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ttftWeight": 0, "tpotWeight": 0}, "not both 0"),
        ({"ttftWeight": -1}, "must be >= 0"),
        ({"ttftToleranceMs": 0}, "ToleranceMs must be > 0"),
        ({"headroomSelectionStrategy": "middle"}, "allowed: 'most', 'least'"),
    ],
)
def test_bad_parameters_are_config_errors(make_plugin, params, message):
    with pytest.raises(registry.ConfigError, match=message):
        make_plugin(TYPE, params)
