"""Spec: `random-picker` returns `maxNumOfEndpoints` distinct endpoints uniformly at random, ignoring
scores."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Picker
from epp.scheduling.types import CycleState
from plugins.random_picker import RandomPicker

TYPE = "random-picker"
RUNS = 2000


def picked_names(picker, candidates) -> list[str]:
    return [ep.name for ep in picker.pick(CycleState(), candidates).endpoints]


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is RandomPicker


def test_is_a_picker_returning_one_endpoint_by_default(make_plugin):
    picker = make_plugin(TYPE)
    assert isinstance(picker, Picker)
    assert picker.max_num_of_endpoints == 1


def test_every_endpoint_is_equally_likely_whatever_its_score(make_plugin, scored):
    candidates = scored({"zero": 0.0, "low": 0.1, "mid": 0.5, "high": 5.0})
    picker = make_plugin(TYPE)
    picker.rng = random.Random(11)
    wins = Counter(picked_names(picker, candidates)[0] for _ in range(RUNS))
    assert set(wins) == {"zero", "low", "mid", "high"}
    for name, count in wins.items():
        assert abs(count / RUNS - 0.25) < 0.04, (name, wins)


@pytest.mark.parametrize(
    ("n", "size", "expected_len"), [(2, 5, 2), (5, 5, 5), (8, 3, 3), (3, 0, 0), (1, 0, 0)]
)
def test_returns_min_n_candidates_distinct_endpoints(make_plugin, scored, n, size, expected_len):
    candidates = scored({f"ep-{i}": 0.5 for i in range(size)})
    picker = make_plugin(TYPE, {"maxNumOfEndpoints": n})
    picker.rng = random.Random(3)
    for _ in range(50):
        picked = picked_names(picker, candidates)
        assert len(picked) == expected_len
        assert len(set(picked)) == expected_len


def test_several_endpoints_come_in_every_order(make_plugin, scored):
    candidates = scored({"a": 0.9, "b": 0.5, "c": 0.1})
    picker = make_plugin(TYPE, {"maxNumOfEndpoints": 3})
    picker.rng = random.Random(5)
    orders = Counter(tuple(picked_names(picker, candidates)) for _ in range(400))
    assert len(orders) == 6


@pytest.mark.parametrize("bad", [0, -3, "1"])
def test_bad_max_num_of_endpoints_is_a_config_error_naming_the_key(make_plugin, bad):
    with pytest.raises(registry.ConfigError, match="maxNumOfEndpoints"):
        make_plugin(TYPE, {"maxNumOfEndpoints": bad})
