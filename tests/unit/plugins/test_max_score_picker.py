"""Spec: `max-score-picker` returns the top `maxNumOfEndpoints` by score, ties broken at random."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.scheduling import registry
from epp.scheduling.interfaces import Picker
from epp.scheduling.registry import PluginHandle
from epp.scheduling.types import CycleState
from plugins.max_score_picker import MaxScorePicker, PickerParams

from .conftest import _endpoint

TYPE = "max-score-picker"
RUNS = 400


def picked_names(picker, candidates) -> list[str]:
    return [ep.name for ep in picker.pick(CycleState(), candidates).endpoints]


def seeded(picker, seed: int = 7):
    picker.rng = random.Random(seed)
    return picker


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is MaxScorePicker


def test_is_a_picker_returning_one_endpoint_by_default(make_plugin):
    picker = make_plugin(TYPE)
    assert isinstance(picker, Picker)
    assert picker.max_num_of_endpoints == 1


@pytest.mark.parametrize(
    ("scores", "n", "expected"),
    [
        ({"a": 0.1, "b": 0.9, "c": 0.5}, 1, ["b"]),
        ({"a": 2.5, "b": 0.0, "c": 1.0}, 1, ["a"]),  # totals of weighted scorers can exceed 1
        ({"a": 0.1, "b": 0.9, "c": 0.5}, 2, ["b", "c"]),
        ({"a": 0.1, "b": 0.9, "c": 0.5}, 3, ["b", "c", "a"]),
        ({"a": 0.1, "b": 0.9, "c": 0.5}, 10, ["b", "c", "a"]),  # fewer candidates than asked: all, best first
        ({"only": 0.0}, 1, ["only"]),
        ({}, 1, []),
        ({}, 3, []),
    ],
)
def test_returns_the_best_scored_endpoints_best_first(make_plugin, scored, scores, n, expected):
    picker = seeded(make_plugin(TYPE, {"maxNumOfEndpoints": n}))
    assert picked_names(picker, scored(scores)) == expected


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_every_tied_best_endpoint_wins_sometimes_and_no_lower_one_ever(make_plugin, scored, position):
    scores = {"low-1": 0.2, "tie-1": 0.8, "tie-2": 0.8, "tie-3": 0.8, "low-2": 0.5}
    order = {
        "first": ["tie-1", "tie-2", "tie-3", "low-1", "low-2"],
        "middle": ["low-1", "tie-1", "tie-2", "tie-3", "low-2"],
        "last": ["low-1", "low-2", "tie-1", "tie-2", "tie-3"],
    }[position]
    candidates = scored({k: scores[k] for k in order})
    picker = seeded(make_plugin(TYPE))
    wins = Counter(picked_names(picker, candidates)[0] for _ in range(RUNS))
    assert set(wins) == {"tie-1", "tie-2", "tie-3"}
    # uniform among the three: each close to RUNS/3
    for name in ("tie-1", "tie-2", "tie-3"):
        assert RUNS / 3 * 0.7 < wins[name] < RUNS / 3 * 1.3, wins


def test_several_endpoints_are_distinct_best_first_with_ties_at_the_cut_random(make_plugin, scored):
    candidates = scored({"best": 0.9, "tie-a": 0.5, "tie-b": 0.5, "tie-c": 0.5, "worst": 0.1})
    picker = seeded(make_plugin(TYPE, {"maxNumOfEndpoints": 2}))
    seconds = Counter()
    for _ in range(RUNS):
        picked = picked_names(picker, candidates)
        assert len(picked) == 2
        assert picked[0] == "best"
        seconds[picked[1]] += 1
    assert set(seconds) == {"tie-a", "tie-b", "tie-c"}


def test_several_tied_endpoints_come_in_every_order(make_plugin, scored):
    candidates = scored({"a": 1.0, "b": 1.0, "c": 1.0})
    picker = seeded(make_plugin(TYPE, {"maxNumOfEndpoints": 3}))
    orders = Counter(tuple(picked_names(picker, candidates)) for _ in range(RUNS))
    assert len(orders) == 6  # all permutations of three tied endpoints
    assert all(sorted(order) == ["a", "b", "c"] for order in orders)


def test_each_picker_has_its_own_random_source(make_plugin):
    assert make_plugin(TYPE).rng is not make_plugin(TYPE).rng


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_bad_max_num_of_endpoints_is_a_config_error_naming_the_key(make_plugin, bad):
    with pytest.raises(registry.ConfigError, match="maxNumOfEndpoints"):
        make_plugin(TYPE, {"maxNumOfEndpoints": bad})


def test_unknown_parameter_is_a_config_error_naming_it(make_plugin):
    with pytest.raises(registry.ConfigError, match="maxEndpoints"):
        make_plugin(TYPE, {"maxEndpoints": 2})


# ---------------------------------------------------------------------------------------------------------
# The shortcuts pick exactly what the plain walk picks, and leave the random source in the same state


def _reservoir(rng: random.Random, scores) -> object:
    """The plain walk: the first best, replaced by a later tie with probability 1/ties."""
    it = iter(scores.items())
    best, best_score = next(it)
    ties = 1
    for ep, score in it:
        if score > best_score:
            best, best_score, ties = ep, score, 1
        elif score == best_score:
            ties += 1
            if rng.random() * ties < 1.0:
                best = ep
    return best


_POOL = [_endpoint(f"e{i}") for i in range(8)]
_totals = st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 3, math.nan, math.inf]), st.floats(0, 4))


@settings(max_examples=400, deadline=None)
@given(per_endpoint=st.lists(_totals, min_size=1, max_size=8), order=st.lists(st.integers(0, 7), min_size=1,
       max_size=10), seed=st.integers(0, 2**32))
def test_pick_and_pick_values_equal_the_plain_walk_and_draw_the_same_numbers(per_endpoint, order, seed):
    # Candidates in some order, an endpoint possibly listed twice (with its one total, as the scheduler sums).
    endpoints = [_POOL[i % len(per_endpoint)] for i in order]
    totals = [per_endpoint[i % len(per_endpoint)] for i in order]
    scores = dict(zip(endpoints, totals, strict=True))  # what pick() is handed: each endpoint once
    reference = random.Random(seed)
    expected = _reservoir(reference, scores)
    for call in ("pick", "pick_values"):
        picker = MaxScorePicker(TYPE, PickerParams(), PluginHandle())
        picker.rng = random.Random(seed)
        if call == "pick":
            result = picker.pick(CycleState(), scores)
        else:
            result = picker.pick_values(CycleState(), endpoints, totals)
        assert result.endpoints == (expected,)
        assert picker.rng.getstate() == reference.getstate()


def test_pick_values_with_several_endpoints_is_pick_of_the_dict():
    endpoints, totals = _POOL[:5], [0.5, 0.9, 0.5, 0.1, 0.9]
    a = MaxScorePicker(TYPE, PickerParams(max_num_of_endpoints=3), PluginHandle())
    b = MaxScorePicker(TYPE, PickerParams(max_num_of_endpoints=3), PluginHandle())
    a.rng, b.rng = random.Random(3), random.Random(3)
    for _ in range(20):
        expected = b.pick(CycleState(), dict(zip(endpoints, totals, strict=True)))
        assert a.pick_values(CycleState(), endpoints, totals) == expected
