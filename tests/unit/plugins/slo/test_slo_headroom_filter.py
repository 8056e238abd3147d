"""Spec: `slo-headroom-filter` keeps the endpoints predicted to meet the request's objectives (predictions
times bufferFactor); every endpoint when the request has none, when none or all meet them, and, with
probability explorationProbability, to keep learning about the others."""

from __future__ import annotations

import pytest

from epp.config import ConfigError, load_config
from epp.datastore.endpoint import Endpoint
from epp.scheduling import registry
from epp.scheduling.interfaces import Filter
from epp.scheduling.registry import PluginHandle
from epp.scheduling.types import CycleState
from plugins.slo import LatencyPrediction, Objectives
from plugins.slo.slo_headroom_filter import SLOHeadroomFilter
from tests.unit.plugins.slo.helpers import PREDICTOR, completion

TYPE = "slo-headroom-filter"


def pods(**predictions: tuple[float, float] | None) -> list[Endpoint]:
    """Endpoints named by the keys, each with (TTFT ms, TPOT ms) predicted (None: no prediction)."""
    out = []
    for i, (name, p) in enumerate(predictions.items()):
        ep = Endpoint(name, f"127.0.0.{i + 2}", 8000)
        if p is not None:
            ep.attributes[PREDICTOR] = LatencyPrediction(*p)
        out.append(ep)
    return out


def kept(plugin, endpoints: list[Endpoint], objectives: Objectives | None) -> list[str]:
    return [ep.name for ep in plugin.filter(CycleState(), completion("hi", objectives=objectives), endpoints)]


def test_is_a_registered_filter(make_plugin):
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is SLOHeadroomFilter
    assert isinstance(make_plugin(TYPE), Filter)


@pytest.mark.parametrize(
    ("objectives", "expected"),
    [
        (Objectives(300.0, 30.0), ["fast"]),
        (Objectives(300.0, None), ["fast", "slow-decode"]),  # only the objectives set are checked
        (Objectives(None, 30.0), ["fast", "slow-prefill"]),
        (Objectives(900.0, 90.0), ["fast", "slow-prefill", "slow-decode", "both-slow"]),  # all meet: all kept
        (Objectives(50.0, 5.0), ["fast", "slow-prefill", "slow-decode", "both-slow"]),  # none meets: all kept
        (None, ["fast", "slow-prefill", "slow-decode", "both-slow"]),  # no objectives: nothing to filter
    ],
)
def test_keeps_the_endpoints_predicted_to_meet_the_objectives(make_plugin, objectives, expected):
    endpoints = pods(**{"fast": (200.0, 20.0), "slow-prefill": (800.0, 20.0), "slow-decode": (200.0, 80.0),
                        "both-slow": (800.0, 80.0)})
    assert kept(make_plugin(TYPE, {"explorationProbability": 0}), endpoints, objectives) == expected


def test_an_endpoint_without_a_prediction_does_not_meet_an_objective(make_plugin):
    endpoints = pods(known=(100.0, 10.0), unknown=None)
    assert kept(make_plugin(TYPE, {"explorationProbability": 0}), endpoints, Objectives(500.0, None)) == ["known"]


@pytest.mark.parametrize(("buffer", "expected"), [(1.0, ["a", "b"]), (1.2, ["a"]), (0.8, ["a", "b", "c"])])
def test_the_buffer_factor_asks_for_a_margin(make_plugin, buffer, expected):
    endpoints = pods(a=(50.0, 1.0), b=(95.0, 1.0), c=(120.0, 1.0))
    plugin = make_plugin(TYPE, {"bufferFactor": buffer, "explorationProbability": 0})
    assert kept(plugin, endpoints, Objectives(100.0, None)) == expected


def test_explores_with_the_configured_probability(make_plugin):
    endpoints = pods(fast=(100.0, 10.0), slow=(900.0, 10.0))
    plugin = make_plugin(TYPE, {"seed": 7})  # the default probability, 0.01
    runs = [kept(plugin, endpoints, Objectives(500.0, None)) for _ in range(4000)]
    explored = sum(1 for r in runs if r == ["fast", "slow"])
    assert all(r in (["fast"], ["fast", "slow"]) for r in runs)
    assert 20 <= explored <= 65  # 40 expected


@pytest.mark.parametrize(("p", "expected"), [(0.0, ["fast"]), (1.0, ["fast", "slow"])])
def test_exploration_bounds(make_plugin, p, expected):
    plugin = make_plugin(TYPE, {"explorationProbability": p})
    endpoints = pods(fast=(100.0, 10.0), slow=(900.0, 10.0))
    assert {tuple(kept(plugin, endpoints, Objectives(500.0, None))) for _ in range(50)} == {tuple(expected)}


def test_the_same_seed_explores_the_same_way(make_plugin):
    endpoints = pods(fast=(100.0, 10.0), slow=(900.0, 10.0))
    a, b = (make_plugin(TYPE, {"seed": 3, "explorationProbability": 0.3}) for _ in range(2))
    runs_a = [kept(a, endpoints, Objectives(500.0, None)) for _ in range(100)]
    assert runs_a == [kept(b, endpoints, Objectives(500.0, None)) for _ in range(100)]
    assert ["fast"] in runs_a and ["fast", "slow"] in runs_a


@pytest.mark.parametrize(
    ("params", "message"),
    [({"bufferFactor": 0.1}, "bufferFactor must be in"), ({"explorationProbability": 2}, "explorationProbability"),
     ({"epsilon": 0.1}, "unknown parameter 'epsilon'")],
)
def test_bad_parameters_are_config_errors(make_plugin, params, message):
    with pytest.raises(registry.ConfigError, match=message):
        make_plugin(TYPE, params)


def test_the_producers_it_needs_are_added_when_not_declared():
    config = load_config(f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: {TYPE}
- type: queue-scorer
dataLayer: {{sources: []}}
""", "test", PluginHandle())
    assert {"slo-objectives-producer", PREDICTOR} <= set(config.plugins)
    assert [type(p).type for p in config.producers] == ["slo-objectives-producer", PREDICTOR]


def test_a_predictor_name_that_names_no_predictor_is_a_config_error():
    with pytest.raises(ConfigError, match="predictorName.*defined: predicted-latency-producer"):
        load_config(f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: {TYPE}
  parameters: {{predictorName: queue-scorer}}
- type: queue-scorer
dataLayer: {{sources: []}}
""", "test", PluginHandle())
