"""Spec: `kv-cache-utilization-scorer` scores 1 − KV-cache usage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.scheduling import registry
from epp.scheduling.interfaces import Scorer
from epp.scheduling.registry import NoParams, PluginHandle
from epp.scheduling.scheduler import clamped_scores
from epp.scheduling.types import CycleState
from plugins.kv_cache_utilization_scorer import KVCacheUtilizationScorer

from .conftest import _endpoint

TYPE = "kv-cache-utilization-scorer"


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is KVCacheUtilizationScorer


def test_is_a_scorer_without_parameters(make_plugin):
    assert isinstance(make_plugin(TYPE), Scorer)
    with pytest.raises(registry.ConfigError, match="takes no parameters"):
        make_plugin(TYPE, {"threshold": 0.8})


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"empty": 0.0, "quarter": 0.25, "full": 1.0}, {"empty": 1.0, "quarter": 0.75, "full": 0.0}),
        ({"a": 0.6, "b": 0.6}, {"a": 0.4, "b": 0.4}),  # absolute, not min–max: equal usage is not 1.0
        ({"a": 0.9}, {"a": 0.1}),
        ({}, {}),
    ],
)
def test_scores_one_minus_kv_cache_usage(make_plugin, endpoint, request_for, usage, expected):
    endpoints = [endpoint(name, kv_cache_usage_percent=u) for name, u in usage.items()]
    scores = make_plugin(TYPE).score(CycleState(), request_for(), endpoints)
    assert {ep.name: s for ep, s in scores.items()} == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(usage=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                st.sampled_from([0.0, -0.0, 1.0, 2.0, -1.0, 0.5])), max_size=12))
def test_the_scheduler_fast_path_is_the_clamped_score(usage):
    endpoints = [_endpoint(f"e{i}", kv_cache_usage_percent=u) for i, u in enumerate(usage)]
    scorer = KVCacheUtilizationScorer(TYPE, NoParams(), PluginHandle())
    expected = clamped_scores(scorer.score(CycleState(), None, endpoints), endpoints)
    got = scorer.score_values(CycleState(), None, endpoints)
    # The same contribution to every total: equal values (a kept -0.0 adds nothing, as a dropped score).
    assert got == expected
