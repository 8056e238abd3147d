"""Spec: `bounded-load-filter` keeps the endpoints whose load after this request stays within
ceil(loadFactor × (Σ load + 1) / n); load = in-flight requests (+ the scraped waiting queue with includeQueue)."""

from __future__ import annotations

import pytest

from epp.config import ConfigError
from epp.scheduling.interfaces import Filter
from epp.scheduling.types import CycleState

TYPE = "bounded-load-filter"


def test_is_a_filter_with_c_1_25_counting_queues_by_default(make_plugin):
    f = make_plugin(TYPE)
    assert isinstance(f, Filter)
    assert (f.load_factor, f.include_queue) == (1.25, True)


@pytest.mark.parametrize(
    ("params", "loads", "kept"),
    [
        # (in_flight, waiting) per endpoint; capacity = ceil(c * (total + 1) / n)
        ({}, {"a": (0, 0), "b": (0, 0)}, {"a", "b"}),  # idle pool: everyone (capacity 1)
        ({}, {"a": (4, 0), "b": (0, 0), "c": (0, 0), "d": (0, 0)}, {"b", "c", "d"}),  # capacity 2
        ({}, {"a": (2, 0), "b": (2, 0), "c": (2, 0), "d": (1, 0)}, {"a", "b", "c", "d"}),  # capacity 3
        ({}, {"a": (1, 3), "b": (1, 0)}, {"b"}),  # a's queue counts: loads 4 and 1, capacity 4
        ({"includeQueue": False}, {"a": (1, 3), "b": (1, 0)}, {"a", "b"}),  # capacity 2
        ({"loadFactor": 2.0}, {"a": (4, 0), "b": (0, 0), "c": (0, 0), "d": (0, 0)}, {"b", "c", "d"}),  # cap 3
        ({"loadFactor": 4.0}, {"a": (4, 0), "b": (0, 0), "c": (0, 0), "d": (0, 0)}, {"a", "b", "c", "d"}),  # capacity 5
        ({}, {"only": (50, 9)}, {"only"}),  # a single candidate is never filtered
    ],
)
def test_keeps_endpoints_within_the_bound(make_plugin, endpoint, params, loads, kept):
    f = make_plugin(TYPE, params)
    eps = [endpoint(name, in_flight=i, waiting_queue_size=w) for name, (i, w) in loads.items()]
    assert {e.name for e in f.filter(CycleState(), None, eps)} == kept


def test_the_least_loaded_endpoint_always_survives(make_plugin, endpoint):
    f = make_plugin(TYPE, {"loadFactor": 1.0})
    for loads in ([5, 5, 5], [9, 0, 3, 7], [1, 2], [0, 0, 0, 100]):
        eps = [endpoint(f"e{i}", in_flight=n) for i, n in enumerate(loads)]
        kept = f.filter(CycleState(), None, eps)
        assert min(eps, key=lambda e: e.in_flight) in kept


@pytest.mark.parametrize("bad", [0.5, float("inf"), float("nan")])
def test_load_factor_below_one_or_not_finite_is_a_config_error(make_plugin, bad):
    with pytest.raises(ConfigError, match="loadFactor"):
        make_plugin(TYPE, {"loadFactor": bad})
