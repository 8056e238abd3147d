"""Spec: `slo-admitter` rejects a sheddable request (priority < 0) with objectives when no candidate is
predicted to meet them and none is idle; every other request passes."""

from __future__ import annotations

import pytest

from epp.datastore.endpoint import Metrics
from epp.scheduling import registry
from epp.scheduling.interfaces import Admitter
from plugins.slo import Objectives
from plugins.slo.slo_admitter import SLOAdmitter
from tests.unit.plugins.slo.helpers import completion
from tests.unit.plugins.slo.test_slo_headroom_filter import pods

TYPE = "slo-admitter"


def busy_pods(**predictions):
    endpoints = pods(**predictions)
    for ep in endpoints:
        ep.metrics = Metrics(running_requests_size=3)
    return endpoints


def test_is_a_registered_admitter_also_under_llm_d_s_name(make_plugin):
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is SLOAdmitter
    assert registry.lookup("latency-slo-admitter") is SLOAdmitter
    assert isinstance(make_plugin(TYPE), Admitter)


@pytest.mark.parametrize(
    ("priority", "objectives", "admitted"),
    [
        (-1, Objectives(100.0, None), False),  # sheddable, nobody meets 100 ms
        (-1, Objectives(None, 5.0), False),
        (-1, Objectives(500.0, None), True),  # "fast" meets it
        (-1, Objectives(500.0, 5.0), False),  # both kinds must be met on one endpoint
        (-1, None, True),  # no objective: nothing to judge
        (0, Objectives(100.0, None), True),  # standard requests always pass
        (5, Objectives(1.0, 1.0), True),  # critical ones too
    ],
)
def test_sheds_only_sheddable_requests_no_endpoint_can_serve_in_time(make_plugin, priority, objectives, admitted):
    endpoints = busy_pods(fast=(300.0, 20.0), slow=(900.0, 40.0))
    reason = make_plugin(TYPE).admit(completion("hi", objectives=objectives, priority=priority), endpoints)
    assert (reason is None) == admitted


def test_an_idle_endpoint_admits_whatever_its_prediction(make_plugin):
    endpoints = busy_pods(busy=(900.0, 40.0), idle=(900.0, 40.0))
    endpoints[1].metrics = Metrics()
    request = completion("hi", objectives=Objectives(100.0, None), priority=-1)
    assert make_plugin(TYPE).admit(request, endpoints) is None
    endpoints[1].in_flight = 1  # this EPP just sent it a request: no longer idle
    assert make_plugin(TYPE).admit(request, endpoints) is not None


def test_the_reason_names_the_objective_and_the_best_prediction(make_plugin):
    endpoints = busy_pods(**{"pod-a": (900.0, 40.0), "pod-b": (650.0, 45.5)})
    reason = make_plugin(TYPE).admit(completion("hi", objectives=Objectives(500.0, 30.0), priority=-2), endpoints)
    assert reason is not None
    for part in ("sheddable", "priority -2", "TTFT <= 500 ms and TPOT <= 30 ms", "TTFT 650 ms", "TPOT 45.5 ms",
                 "pod-b", "none of the 2 candidates is idle", "retry later"):
        assert part in reason, part


@pytest.mark.parametrize(("buffer", "admitted"), [(1.0, True), (1.5, False)])
def test_the_buffer_factor_asks_for_a_margin(make_plugin, buffer, admitted):
    endpoints = busy_pods(a=(400.0, 10.0))
    request = completion("hi", objectives=Objectives(500.0, None), priority=-1)
    assert (make_plugin(TYPE, {"bufferFactor": buffer}).admit(request, endpoints) is None) == admitted


def test_no_prediction_admits_nothing_sheddable(make_plugin):
    endpoints = busy_pods(unknown=None)
    reason = make_plugin(TYPE).admit(completion("hi", objectives=Objectives(5000.0, None), priority=-1), endpoints)
    assert reason is not None and "best prediction" not in reason
