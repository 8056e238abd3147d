"""Spec: `utilization-detector` — saturation is the mean over endpoints of max(queue/qThr, kv/kvThr), stale or
never-scraped endpoints counting 1.0; as a filter it drops stale and over-threshold endpoints, unless that
drops all of them."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Filter, SaturationDetector
from epp.scheduling.types import CycleState
from plugins.utilization_detector import UtilizationDetector

TYPE = "utilization-detector"
NOW = 1000.0
FRESH = NOW - 0.05  # scraped 50 ms ago; the default staleness threshold is 200 ms


def detector(make_plugin, params=None):
    plugin = make_plugin(TYPE, params)
    plugin.clock = lambda: NOW
    return plugin


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is UtilizationDetector


def test_is_both_a_saturation_detector_and_a_filter_with_reference_defaults(make_plugin):
    plugin = make_plugin(TYPE)
    assert isinstance(plugin, SaturationDetector)
    assert isinstance(plugin, Filter)
    assert (
        plugin.queue_depth_threshold,
        plugin.kv_cache_util_threshold,
        plugin.staleness_s,
        plugin.headroom,
    ) == (
        5,
        0.8,
        pytest.approx(0.2),
        0.0,
    )


# each endpoint: (waiting queue, kv usage, scraped at)
@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ([(0, 0.0, FRESH)], 0.0),
        ([(5, 0.0, FRESH)], 1.0),  # queue at threshold
        ([(0, 0.8, FRESH)], 1.0),  # kv at threshold
        ([(2, 0.2, FRESH)], 0.4),  # max(2/5, 0.2/0.8) = 0.4
        ([(1, 0.6, FRESH)], 0.75),  # max(0.2, 0.75)
        ([(10, 0.0, FRESH)], 2.0),  # not capped per endpoint
        ([(0, 0.0, FRESH), (5, 0.0, FRESH)], 0.5),  # mean
        ([(0, 0.0, FRESH), (2, 0.4, FRESH), (5, 0.0, FRESH), (0, 0.0, FRESH)], (0 + 0.5 + 1 + 0) / 4),
        ([(0, 0.0, NOW - 0.5)], 1.0),  # stale counts as saturated
        ([(0, 0.0, 0.0)], 1.0),  # never scraped counts as saturated
        ([(0, 0.0, FRESH), (0, 0.0, NOW - 0.5)], 0.5),
        ([(0, 0.0, NOW - 0.2)], 0.0),  # exactly at the threshold is still fresh
        ([], 1.0),  # nothing to serve with
    ],
)
def test_saturation_with_default_thresholds(make_plugin, endpoint, endpoints, expected):
    eps = [
        endpoint(f"ep-{i}", waiting_queue_size=q, kv_cache_usage_percent=kv, update_time=t)
        for i, (q, kv, t) in enumerate(endpoints)
    ]
    assert detector(make_plugin).saturation(eps) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("params", "queue", "kv", "age", "expected"),
    [
        ({"queueDepthThreshold": 1}, 1, 0.0, 0.05, 1.0),
        ({"queueDepthThreshold": 10}, 5, 0.0, 0.05, 0.5),
        ({"kvCacheUtilThreshold": 0.5}, 0, 0.25, 0.05, 0.5),
        ({"metricsStalenessThreshold": "1s"}, 0, 0.0, 0.5, 0.0),  # 500 ms old is fresh under a 1 s threshold
        ({"metricsStalenessThreshold": "100ms"}, 0, 0.0, 0.15, 1.0),
        ({"headroom": 0.5}, 5, 0.0, 0.05, 1.0),  # headroom is for the filter only
    ],
)
def test_saturation_follows_the_parameters(make_plugin, endpoint, params, queue, kv, age, expected):
    ep = endpoint("a", waiting_queue_size=queue, kv_cache_usage_percent=kv, update_time=NOW - age)
    assert detector(make_plugin, params).saturation([ep]) == pytest.approx(expected)


# each endpoint: name -> (waiting queue, kv usage, scraped at)
POOL = {
    "idle": (0, 0.1, FRESH),
    "queue-at-limit": (5, 0.1, FRESH),
    "queue-over": (6, 0.1, FRESH),
    "kv-at-limit": (0, 0.8, FRESH),
    "kv-over": (0, 0.85, FRESH),
    "stale": (0, 0.0, NOW - 1.0),
    "never-scraped": (0, 0.0, 0.0),
}


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        ({}, ["idle", "queue-at-limit", "kv-at-limit"]),
        ({"headroom": 0.2}, ["idle", "queue-at-limit", "queue-over", "kv-at-limit", "kv-over"]),  # 6, 0.96
        ({"headroom": 0.1}, ["idle", "queue-at-limit", "kv-at-limit", "kv-over"]),  # 5.5, 0.88
        (
            {"queueDepthThreshold": 100, "kvCacheUtilThreshold": 1.0},
            ["idle", "queue-at-limit", "queue-over", "kv-at-limit", "kv-over"],
        ),
        ({"metricsStalenessThreshold": "2s"}, ["idle", "queue-at-limit", "kv-at-limit", "stale"]),
    ],
)
def test_filter_drops_stale_and_overloaded_endpoints(make_plugin, endpoint, request_for, params, kept):
    eps = [
        endpoint(name, waiting_queue_size=q, kv_cache_usage_percent=kv, update_time=t)
        for name, (q, kv, t) in POOL.items()
    ]
    out = detector(make_plugin, params).filter(CycleState(), request_for(), eps)
    assert [ep.name for ep in out] == kept


def test_filter_kv_limit_never_exceeds_full(make_plugin, endpoint, request_for):
    # 0.9 · (1 + 0.5) = 1.35 is capped to 1.0: a full cache is kept, since nothing can exceed 1.0
    eps = [
        endpoint("full", kv_cache_usage_percent=1.0, update_time=FRESH),
        endpoint("idle", update_time=FRESH),
    ]
    out = detector(make_plugin, {"kvCacheUtilThreshold": 0.9, "headroom": 0.5}).filter(
        CycleState(), request_for(), eps
    )
    assert [ep.name for ep in out] == ["full", "idle"]


def test_filter_returns_everything_when_it_would_drop_everything(make_plugin, endpoint, request_for):
    eps = [
        endpoint("busy", waiting_queue_size=50, update_time=FRESH),
        endpoint("stale", update_time=NOW - 10),
        endpoint("never-scraped"),
    ]
    out = detector(make_plugin).filter(CycleState(), request_for(), eps)
    assert out == eps


def test_the_clock_decides_what_is_stale(make_plugin, endpoint):
    plugin = make_plugin(TYPE)
    ep = endpoint("a", update_time=500.0)
    plugin.clock = lambda: 500.1
    assert plugin.saturation([ep]) == 0.0
    plugin.clock = lambda: 500.3
    assert plugin.saturation([ep]) == 1.0


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"queueDepthThreshold": 0}, "queueDepthThreshold"),
        ({"queueDepthThreshold": 2.5}, "queueDepthThreshold"),
        ({"kvCacheUtilThreshold": 0}, "kvCacheUtilThreshold"),
        ({"kvCacheUtilThreshold": 80}, "kvCacheUtilThreshold"),
        ({"metricsStalenessThreshold": "0s"}, "metricsStalenessThreshold"),
        ({"metricsStalenessThreshold": "fast"}, "metricsStalenessThreshold"),
        ({"headroom": -0.1}, "headroom"),
        ({"queueThreshold": 5}, "queueThreshold"),
    ],
)
def test_bad_parameters_are_config_errors_naming_the_key(make_plugin, params, key):
    with pytest.raises(registry.ConfigError, match=key):
        make_plugin(TYPE, params)


def test_never_scraped_is_stale_even_when_the_clock_is_younger_than_the_threshold(
    make_plugin, endpoint, request_for
):
    # time.monotonic() can be small right after boot: update_time 0.0 means "never", not "long ago"
    plugin = make_plugin(TYPE)
    plugin.clock = lambda: 0.1
    never, scraped = endpoint("never-scraped"), endpoint("scraped", update_time=0.05)
    assert plugin.saturation([never]) == 1.0
    assert plugin.filter(CycleState(), request_for(), [never, scraped]) == [scraped]
