"""The EPP's own metrics on the request path: updated through bound shortcuts (`incrementer`, `observer`)
that must expose exactly what prometheus_client's `inc`/`observe` expose."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from epp.observability.metrics import incrementer, observer
from tests.unit.extproc_helpers import (
    CHAT_HEADERS,
    DecodedSession,
    body_msg,
    chat_body,
    headers_msg,
    make_director,
)

FAST = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
SIZES = (64, 256, 1024, 4096)


def _metrics():
    r = CollectorRegistry()
    return r, (Histogram("fast", "h", ["m"], buckets=FAST, registry=r),
               Histogram("sizes", "h", buckets=SIZES, registry=r),
               Counter("requests", "c", ["m"], registry=r),
               Gauge("running", "g", ["m"], registry=r))


def _exposed(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


_amounts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(FAST + SIZES + (0, -0.0, -1.0, 5000, math.nextafter(0.1, 1), math.nextafter(64.0, 0))),
    st.integers(min_value=-10, max_value=10**6),
)


@settings(max_examples=200, deadline=None)
@given(amounts=st.lists(_amounts, max_size=40))
def test_shortcuts_expose_exactly_what_inc_and_observe_expose(amounts):
    plain, (h1, s1, c1, g1) = _metrics()
    fast, (h2, s2, c2, g2) = _metrics()
    h1, c1, g1 = h1.labels("x"), c1.labels("x"), g1.labels("x")
    observe_fast, observe_size = observer(h2.labels("x")), observer(s2)
    count, run = incrementer(c2.labels("x")), incrementer(g2.labels("x"))
    for amount in amounts:
        h1.observe(amount)
        s1.observe(amount)
        c1.inc()
        g1.inc()
        observe_fast(amount)
        observe_size(amount)
        count()
        run()
    assert _exposed(fast) == _exposed(plain)


def test_a_routed_request_updates_the_same_series_as_before():
    director = make_director()
    s = DecodedSession(director, 1 << 20)
    s.handle(headers_msg(CHAT_HEADERS))
    s.handle(body_msg(chat_body("hello"), True))
    registry = director.metrics.registry
    model = {"model_name": "m", "target_model_name": "m"}

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    assert value("inference_extension_scheduler_attempts_total", status="success") == 1.0
    assert value("inference_extension_scheduler_e2e_duration_seconds_count") == 1.0
    assert value("inference_extension_request_processing_seconds_count") == 1.0
    assert value("inference_objective_request_total", priority="0", **model) == 1.0
    assert value("inference_objective_request_sizes_count", **model) == 1.0
    assert value("inference_objective_request_sizes_sum", **model) == len(chat_body("hello"))
    assert value("inference_objective_running_requests", model_name="m") == 1.0
    s.close()
    assert value("inference_objective_running_requests", model_name="m") == 0.0


def test_plugin_timings_are_recorded_per_extension_point_and_plugin():
    director = make_director()
    for _ in range(2):  # the first request is timed (then one in PLUGIN_TIMING_SAMPLE)
        s = DecodedSession(director, 1 << 20)
        s.handle(headers_msg(CHAT_HEADERS))
        s.handle(body_msg(chat_body("hello"), True))
        s.close()
    count = director.metrics.registry.get_sample_value(
        "inference_extension_plugin_duration_seconds_count",
        {"extension_point": "Scorer", "plugin_type": "queue-scorer", "plugin_name": "queue-scorer"})
    assert count == 1.0
