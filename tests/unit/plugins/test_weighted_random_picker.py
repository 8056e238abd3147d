"""Spec: `weighted-random-picker` samples endpoints without replacement with probability proportional to
their score (A-Res); zero scores come last; all zero ⇒ uniform."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Picker
from epp.scheduling.types import CycleState
from plugins.weighted_random_picker import WeightedRandomPicker

TYPE = "weighted-random-picker"
RUNS = 20000
TOLERANCE = 0.015  # absolute, on frequencies; ~4 standard deviations at 20,000 draws


def picked_names(picker, candidates) -> list[str]:
    return [ep.name for ep in picker.pick(CycleState(), candidates).endpoints]


def make_seeded(make_plugin, n: int = 1, seed: int = 17):
    picker = make_plugin(TYPE, {"maxNumOfEndpoints": n})
    picker.rng = random.Random(seed)
    return picker


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is WeightedRandomPicker


def test_is_a_picker_returning_one_endpoint_by_default(make_plugin):
    picker = make_plugin(TYPE)
    assert isinstance(picker, Picker)
    assert picker.max_num_of_endpoints == 1


@pytest.mark.parametrize(
    "scores",
    [
        {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0},
        {"a": 0.05, "b": 0.95},
        {"a": 1.5, "b": 0.5, "c": 0.5, "d": 0.5},  # totals of weighted scorers can exceed 1
    ],
)
def test_one_pick_follows_the_score_proportions(make_plugin, scored, scores):
    picker = make_seeded(make_plugin)
    candidates = scored(scores)
    wins = Counter(picked_names(picker, candidates)[0] for _ in range(RUNS))
    total = sum(scores.values())
    for name, score in scores.items():
        assert abs(wins[name] / RUNS - score / total) < TOLERANCE, (name, wins)


def test_a_zero_score_endpoint_is_never_picked_while_a_positive_one_remains(make_plugin, scored):
    picker = make_seeded(make_plugin)
    candidates = scored({"zero-1": 0.0, "tiny": 1e-9, "zero-2": 0.0})
    assert {picked_names(picker, candidates)[0] for _ in range(500)} == {"tiny"}


def test_all_zero_scores_pick_uniformly_like_the_random_picker(make_plugin, scored):
    picker = make_seeded(make_plugin)
    candidates = scored({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0})
    wins = Counter(picked_names(picker, candidates)[0] for _ in range(RUNS))
    for name in "abcd":
        assert abs(wins[name] / RUNS - 0.25) < TOLERANCE, wins


def test_several_picks_are_distinct_and_sampled_without_replacement(make_plugin, scored):
    # weights a=1, b=1, c=2, two picks: P(c first) = 1/2; P(a first) = P(b first) = 1/4, then c with 2/3.
    # So P(c among the two) = 1/2 + 2 · 1/4 · 2/3 = 5/6 and P(c first) = 1/2.
    picker = make_seeded(make_plugin, n=2)
    candidates = scored({"a": 1.0, "b": 1.0, "c": 2.0})
    included, first = Counter(), Counter()
    for _ in range(RUNS):
        picked = picked_names(picker, candidates)
        assert len(picked) == 2 and len(set(picked)) == 2
        included.update(picked)
        first[picked[0]] += 1
    assert abs(included["c"] / RUNS - 5 / 6) < TOLERANCE
    assert abs(first["c"] / RUNS - 1 / 2) < TOLERANCE
    assert abs(included["a"] / RUNS - 7 / 12) < TOLERANCE  # a first 1/4, after b 1/4·1/3, after c 1/2·1/2
    assert included["a"] + included["b"] + included["c"] == 2 * RUNS


def test_zero_score_endpoints_fill_the_list_only_after_every_positive_one(make_plugin, scored):
    picker = make_seeded(make_plugin, n=4)
    candidates = scored({"z1": 0.0, "p1": 0.3, "z2": 0.0, "p2": 0.7, "z3": 0.0})
    tails = Counter()
    for _ in range(300):
        picked = picked_names(picker, candidates)
        assert len(picked) == 4 and len(set(picked)) == 4
        assert set(picked[:2]) == {"p1", "p2"}
        tails.update(picked[2:])
    assert set(tails) == {"z1", "z2", "z3"}  # the zero-score filler is random too


class _TopOfRange(random.Random):
    """A random source whose draw lands on the very top of the range, where rounding can reach the total."""

    def random(self) -> float:
        return 1.0


def test_a_draw_at_the_top_of_the_range_lands_on_the_last_positive_endpoint(make_plugin, scored):
    picker = make_plugin(TYPE)
    picker.rng = _TopOfRange()
    candidates = scored({"p1": 0.3, "p2": 0.7, "z1": 0.0})
    assert picked_names(picker, candidates) == ["p2"]


@pytest.mark.parametrize(("n", "size", "expected_len"), [(3, 2, 2), (2, 0, 0), (1, 0, 0)])
def test_returns_at_most_the_candidates_there_are(make_plugin, scored, n, size, expected_len):
    picker = make_seeded(make_plugin, n=n)
    assert len(picked_names(picker, scored({f"ep-{i}": 0.4 for i in range(size)}))) == expected_len


@pytest.mark.parametrize("bad", [0, -1, "3"])
def test_bad_max_num_of_endpoints_is_a_config_error_naming_the_key(make_plugin, bad):
    with pytest.raises(registry.ConfigError, match="maxNumOfEndpoints"):
        make_plugin(TYPE, {"maxNumOfEndpoints": bad})
