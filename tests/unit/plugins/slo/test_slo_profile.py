"""Spec: the built-in `slo` profile — headroom filter, prefix affinity 3, latency 2, queue 1, KV 1, the SLO
admitter — loads, and through the real Director it parses objectives (400 when malformed), sheds only
sheddable requests no pod can serve in time, learns from the responses it routes, steers requests off pods
predicted to miss their objective, and keeps following prefixes when every pod misses."""

from __future__ import annotations

import orjson
import pytest

from epp.config import load_profile
from epp.datastore.endpoint import Endpoint, Metrics
from epp.datastore.pool import Pool
from epp.director import Director
from epp.errors import RequestError
from epp.observability.metrics import EppMetrics
from epp.scheduling.registry import PluginHandle
from tests.unit.plugins.slo.helpers import PREDICTOR

NOW = 5000.0


def type_of(plugin) -> str:
    return type(plugin).type


def test_the_slo_profile_loads_with_its_filter_weights_producers_and_admitter():
    config = load_profile("slo", PluginHandle())
    (profile,) = config.scheduler.profiles.values()
    assert [type_of(f) for f in profile.filters] == ["slo-headroom-filter"]
    assert [(type_of(ws.scorer), ws.weight) for ws in profile.scorers] == [
        ("prefix-cache-scorer", 3.0), ("latency-scorer", 2.0), ("queue-scorer", 1.0),
        ("kv-cache-utilization-scorer", 1.0)]
    assert type_of(profile.picker) == "max-score-picker"
    # The predictor runs after the prefix producer it reads.
    assert [type_of(p) for p in config.producers] == [
        "slo-objectives-producer", "approx-prefix-cache-producer", "predicted-latency-producer"]
    assert [type_of(a) for a in config.admitters] == ["slo-admitter"]
    for hooks in (config.response_header_hooks, config.response_body_hooks, config.response_complete_hooks):
        assert [type_of(h) for h in hooks] == ["predicted-latency-producer"]
    assert "predicted-latency-producer" in [type_of(p) for p in config.pre_request]


# ------------------------------------------------------------------------------------------ through the Director


def director(n: int = 2, objectives: dict[str, int] | None = None, **metrics) -> Director:
    pool = Pool()
    pool.replace(Endpoint(f"pod-{i}", f"127.0.0.{i + 2}", 8000, metrics=Metrics(update_time=NOW, **metrics))
                 for i in range(n))
    config = load_profile("slo", PluginHandle(pool))
    config.saturation_detector.clock = lambda: NOW
    return Director(config, pool, EppMetrics(pool), objectives or {})


def body(prompt: str, stream: bool = True) -> bytes:
    return orjson.dumps({"model": "m", "prompt": prompt, "max_tokens": 8, "stream": stream,
                         "stream_options": {"include_usage": True}})


def headers(**extra: str) -> dict[str, str]:
    return {":path": "/v1/completions", **{k.replace("_", "-"): v for k, v in extra.items()}}


def predictor(d: Director):
    return d.config.plugins[PREDICTOR]


def test_a_malformed_objective_header_is_a_400_naming_it():
    d = director()
    with pytest.raises(RequestError) as info:
        d.route(headers(x_llm_d_slo_ttft_ms="fast please"), body("hi"), "r1", None, NOW)
    assert info.value.status == 400
    assert "x-llm-d-slo-ttft-ms" in info.value.message


def test_learns_from_a_streamed_response_and_counts_its_objective():
    d = director()
    routed = d.route(headers(x_llm_d_slo_ttft_ms="60000", x_llm_d_slo_tpot_ms="60000"),
                     body("a prompt of a few words " * 20), "r1", None, NOW)
    resp = routed.response
    resp.status, resp.streaming = 200, True
    resp.headers = {":status": "200", "content-type": "text/event-stream"}
    d.response_headers(routed)
    d.response_chunk(routed, b'data: {"choices":[{"text":"a"}]}\n\n')
    resp.end_of_stream = True
    d.response_chunk(routed, b'data: {"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":8}}\n\n'
                             b"data: [DONE]\n\n")
    d.complete(routed)
    p = predictor(d)
    assert (p.model.ttft.samples, p.model.tpot.samples) == (1, 1)
    assert p._attainment[("ttft", "met")] == 1 and p._attainment[("tpot", "met")] == 1
    assert p.pending_prefill_tokens(routed.endpoint.name) == 0


@pytest.mark.parametrize(("objective", "status"), [("batch", 429), ("standard", None)])
def test_sheds_only_sheddable_requests_that_no_pod_can_serve_in_time(objective, status):
    d = director(objectives={"batch": -1, "standard": 0}, running_requests_size=5)
    h = headers(x_llm_d_slo_ttft_ms="0.5", x_gateway_inference_objective=objective)
    if status is None:
        assert d.route(h, body("hi"), "r1", None, NOW).endpoint.name in {"pod-0", "pod-1"}
        return
    with pytest.raises(RequestError) as info:
        d.route(h, body("hi"), "r1", None, NOW)
    assert info.value.status == status
    assert "no endpoint is predicted to meet the objective" in info.value.message


LONG = " ".join(f"w{i:04d}" for i in range(2000))  # about 2,500 tokens at 4 characters per token


def warm(d: Director, pod: str) -> None:
    """The approximate index learns that `pod` holds LONG's prefix (a routed, completed request)."""
    others = [ep for ep in d.pool.endpoints if ep.name != pod]
    saved = {ep.name: ep.metrics for ep in others}
    for ep in others:  # make every other pod unattractive for this one request
        ep.metrics = Metrics(update_time=NOW, waiting_queue_size=50, kv_cache_usage_percent=0.99)
    routed = d.route(headers(), body(LONG, stream=False), "warm", None, NOW)
    assert routed.endpoint.name == pod
    d.complete(routed)
    for ep in others:
        ep.metrics = saved[ep.name]


@pytest.mark.parametrize(("objective", "chosen"), [({"x_llm_d_slo_ttft_ms": "1000"}, "pod-1"), ({}, "pod-0")])
def test_a_request_avoids_the_prefix_pod_when_it_is_predicted_to_miss_and_another_meets(objective, chosen):
    d = director()
    warm(d, "pod-0")
    # pod-0 holds the prefix but has 40,000 uncached tokens of streamed prefill ahead (about 2.5 s at the
    # prior's 15,928 tokens/s); pod-1 is idle and can prefill the whole prompt in about 0.2 s. Without an
    # objective the prefix still wins: nothing says that 2.5 s is too slow.
    predictor(d)._pending["pod-0"] = 40_000
    routed = d.route(headers(**objective), body(LONG + " question"), "r1", None, NOW)
    assert routed.endpoint.name == chosen


def test_when_every_pod_misses_the_objective_the_request_still_follows_its_prefix():
    # The collapse guard: under overload a request must not leave the pod holding its prefix for a pod that
    # is only a little less backlogged (the extra prefill would deepen every backlog).
    d = director(waiting_queue_size=20, running_requests_size=100, kv_cache_usage_percent=0.9)
    warm(d, "pod-0")
    p = predictor(d)
    p._pending["pod-0"] = 60_000
    p._pending["pod-1"] = 50_000
    routed = d.route(headers(x_llm_d_slo_ttft_ms="200"), body(LONG + " question"), "r1", None, NOW)
    assert routed.endpoint.name == "pod-0"
