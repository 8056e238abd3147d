"""Spec: `predicted-latency-producer` writes a TTFT/TPOT prediction for every candidate, from the uncached
prompt tokens (after the prefix match), the prefill this EPP has pending on the endpoint and the scraped
load; it learns TTFT at the first streamed chunk and TPOT from usage, only from successful streamed
responses, and exports predicted-vs-actual, attainment and learning metrics."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.config import ConfigError, load_config
from epp.datastore.endpoint import Endpoint, Metrics
from epp.scheduling import registry
from epp.scheduling.interfaces import (
    DataProducer,
    MetricsCollector,
    PreRequest,
    ResponseBodyHook,
    ResponseCompleteHook,
    ResponseHeaderHook,
)
from epp.scheduling.registry import PluginHandle
from epp.scheduling.types import SchedulingResult
from plugins.slo import LatencyPrediction, Objectives
from plugins.slo.latency_predictor import TPOT_HEADER, TTFT_HEADER, PredictedLatencyProducer
from plugins.slo.predictor import tpot_features, ttft_features
from tests.unit.plugins.slo.helpers import (
    PREDICTOR,
    completion,
    decide,
    prepare,
    respond,
    stack,
)

BLOCK = "x" * 64  # one 16-token block of the approximate producer (4 characters per token)


def prompt(blocks: int, tag: str = "a") -> str:
    return "".join(f"{tag}{i:05d}".ljust(64, ".") for i in range(blocks))


def test_is_registered_with_its_alias_and_implements_every_hook_it_needs():
    registry.load_builtin_plugins()
    assert registry.lookup(PREDICTOR) is PredictedLatencyProducer
    assert registry.lookup("latency-predictor") is PredictedLatencyProducer
    p = stack().predictor
    for point in (DataProducer, PreRequest, ResponseHeaderHook, ResponseBodyHook, ResponseCompleteHook,
                  MetricsCollector):
        assert isinstance(p, point), point.__name__


# ------------------------------------------------------------------------------------------ predictions


def test_every_candidate_gets_a_finite_non_negative_prediction():
    s = stack(4)
    predictions = prepare(s, completion(prompt(10)))
    assert set(predictions) == {"pod-0", "pod-1", "pod-2", "pod-3"}
    for p in predictions.values():
        assert isinstance(p, LatencyPrediction)
        assert 0.0 < p.ttft_ms < math.inf and 0.0 < p.tpot_ms < math.inf
        assert p.uncached_tokens == 160


def test_an_endpoint_holding_the_prefix_is_predicted_faster_by_the_uncached_tokens():
    s = stack(2)
    decide(s, completion(prompt(40), stream=False), s.ep("pod-0"))  # pod-0 now holds 40 blocks
    predictions = prepare(s, completion(prompt(40) + prompt(10, "b")))
    cached, cold = predictions["pod-0"], predictions["pod-1"]
    assert (cached.uncached_tokens, cold.uncached_tokens) == (160, 800)
    # The prior: 1e6 / 15928 ms per thousand uncached tokens.
    assert cold.ttft_ms - cached.ttft_ms == pytest.approx(640 * 1e3 / 15928.0)
    assert cached.tpot_ms == cold.tpot_ms


def test_without_a_prefix_producer_every_prompt_token_counts_as_uncached():
    config = load_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
- type: queue-scorer
dataLayer: {sources: []}
""", "test", PluginHandle())
    predictor = config.plugins[PREDICTOR]
    ep = Endpoint("pod", "127.0.0.2", 8000)
    predictor.prepare(completion(prompt(5)), [ep])
    assert ep.attributes[PREDICTOR].uncached_tokens == 80


@pytest.mark.parametrize(
    ("loaded", "slower"),
    [
        ({"waiting_queue_size": 4}, {"ttft"}),
        ({"running_requests_size": 60}, {"ttft", "tpot"}),
        ({"in_flight": 60}, {"ttft", "tpot"}),  # the EPP's own count stands in for a stale scrape
    ],
)
def test_a_loaded_endpoint_is_predicted_slower(loaded, slower):
    s = stack(2)
    busy = s.ep("pod-1")
    if "in_flight" in loaded:
        busy.in_flight = loaded["in_flight"]
    else:
        busy.metrics = Metrics(**loaded)
    p = prepare(s, completion(prompt(4)))
    assert (p["pod-1"].ttft_ms > p["pod-0"].ttft_ms) == ("ttft" in slower)
    assert (p["pod-1"].tpot_ms > p["pod-0"].tpot_ms) == ("tpot" in slower)


def test_streamed_requests_count_as_pending_prefill_until_their_first_chunk():
    s = stack(2)
    pod = s.ep("pod-0")
    first = completion(prompt(100, "a"), request_id="first")
    decide(s, first, pod)
    assert (s.predictor.pending_prefill_tokens("pod-0"), s.predictor.pending_requests("pod-0")) == (1600, 1)
    later = prepare(s, completion(prompt(1, "z")))
    # The prior: its 1,600 tokens at 15,928 tokens/s, and one 10 ms step for the request waiting ahead.
    assert later["pod-0"].ttft_ms == pytest.approx(later["pod-1"].ttft_ms + 1600 * 1e3 / 15928.0 + 10.0)
    respond(s, first, pod, ttft_s=0.2)
    assert (s.predictor.pending_prefill_tokens("pod-0"), s.predictor.pending_requests("pod-0")) == (0, 0)


def test_a_fully_cached_streamed_request_still_waits_in_the_queue():
    s = stack(1)
    pod = s.ep("pod-0")
    decide(s, completion(prompt(10), stream=False), pod)
    cached = completion(prompt(10), request_id="cached")
    decide(s, cached, pod)
    assert (s.predictor.pending_prefill_tokens("pod-0"), s.predictor.pending_requests("pod-0")) == (0, 1)
    respond(s, cached, pod, ttft_s=0.05)
    assert s.predictor.pending_requests("pod-0") == 0


@pytest.mark.parametrize("how", ["aborted before a byte", "failed", "answered without a body"])
def test_pending_prefill_is_released_when_a_request_ends_without_a_first_chunk(how):
    s = stack(1)
    pod = s.ep("pod-0")
    req = completion(prompt(10))
    decide(s, req, pod)
    assert (s.predictor.pending_prefill_tokens("pod-0"), s.predictor.pending_requests("pod-0")) == (160, 1)
    if how == "aborted before a byte":
        respond(s, req, pod, ttft_s=None, aborted=True)
    elif how == "failed":
        respond(s, req, pod, ttft_s=None, status=503)
    else:
        respond(s, req, pod, ttft_s=None)
    assert (s.predictor.pending_prefill_tokens("pod-0"), s.predictor.pending_requests("pod-0")) == (0, 0)


def test_non_streamed_requests_are_not_counted_as_pending_prefill():
    # Their first body byte is the whole answer, so the count would last the whole decode.
    s = stack(1)
    decide(s, completion(prompt(10), stream=False), s.ep("pod-0"))
    assert (s.predictor.pending_prefill_tokens("pod-0"), s.predictor.pending_requests("pod-0")) == (0, 0)


counts = st.integers(min_value=-5, max_value=500)
fractions = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(counts, counts, counts, fractions), min_size=1, max_size=4),
       st.integers(min_value=0, max_value=300), st.booleans())
def test_the_inline_hot_path_equals_the_model(pods, blocks, trained):
    s = stack(len(pods))
    for ep, (queue, running, in_flight, kv) in zip(s.endpoints, pods, strict=True):
        ep.metrics = Metrics(waiting_queue_size=queue, running_requests_size=running, kv_cache_usage_percent=kv)
        ep.in_flight = in_flight
    model = s.predictor.model
    if trained:  # coefficients away from the prior and per-endpoint corrections in place
        rng = random.Random(blocks)
        for _ in range(30):
            for ep in s.endpoints:
                model.learn_ttft(ep.name, ttft_features(rng.uniform(0, 3000), 0, 1, 5, 0.2), rng.uniform(50, 900))
                model.learn_tpot(ep.name, tpot_features(rng.randint(0, 20), 0, 0.2), rng.uniform(5, 50))
    s.predictor._pending["pod-0"] = 1234
    s.predictor._pending_requests["pod-0"] = 3
    req = completion(prompt(blocks) + "tail" if blocks else "tiny")
    predictions = prepare(s, req)
    tokens = PredictedLatencyProducer.prompt_tokens(req)
    for ep in s.endpoints:
        m = ep.metrics
        pending, waiting = s.predictor.pending_prefill_tokens(ep.name), s.predictor.pending_requests(ep.name)
        queue = max(m.waiting_queue_size, waiting)
        batch = max(m.running_requests_size, ep.in_flight - waiting)
        kv = m.kv_cache_usage_percent
        got = predictions[ep.name]
        assert got.uncached_tokens == tokens
        assert got.ttft_ms == pytest.approx(model.predict_ttft(ep.name, ttft_features(tokens, pending, queue, batch, kv)),
                                            rel=1e-9, abs=1e-9)
        assert got.tpot_ms == pytest.approx(model.predict_tpot(ep.name, tpot_features(batch, pending, kv)),
                                            rel=1e-9, abs=1e-9)
        assert 0.0 <= got.ttft_ms < math.inf and 0.0 <= got.tpot_ms < math.inf


# ------------------------------------------------------------------------------------------ learning


def serve(s, n: int, ttft_of, tpot_s: float, rng: random.Random) -> None:
    """n sequential streamed requests of random length, each served with ttft_of(uncached tokens)."""
    for i in range(n):
        pod = s.endpoints[i % len(s.endpoints)]
        req = completion(prompt(rng.randint(1, 200), tag=f"r{i}-"), request_id=f"r{i}")
        decide(s, req, pod)
        uncached = req.scratch[s.predictor._track_key].uncached
        respond(s, req, pod, ttft_s=ttft_of(uncached), tpot_s=tpot_s, tokens=rng.randint(2, 64))


def test_learns_ttft_and_tpot_from_the_responses_it_routes():
    s = stack(2)
    rng = random.Random(1)

    def ttft(uncached: int) -> float:  # a pod prefilling 4,000 tokens/s after a 40 ms overhead
        return 0.040 + uncached / 4000.0

    serve(s, 300, ttft, 0.025, rng)
    req = completion(prompt(150, "new"))
    p = prepare(s, req)["pod-0"]
    assert p.ttft_ms == pytest.approx(ttft(p.uncached_tokens) * 1e3, rel=0.05)
    assert p.tpot_ms == pytest.approx(25.0, rel=0.05)
    assert (s.predictor.model.ttft.samples, s.predictor.model.tpot.samples) == (300, 300)


@pytest.mark.parametrize(
    ("kwargs", "learned"),
    [
        ({}, {"ttft", "tpot"}),
        ({"streaming": False}, set()),  # a non-streamed body arrives whole: not a first token
        ({"status": 500}, set()),
        ({"status": 0}, set()),  # no response headers seen
        ({"aborted": True}, set()),
        ({"ttft_s": None}, set()),
        ({"tokens": None}, {"ttft"}),  # no usage: no TPOT
        ({"tokens": 1}, {"ttft"}),  # one token has no inter-token time
        ({"ttft_s": 0.0}, {"tpot"}),  # a zero TTFT is not an observation (the TPOT still is)
    ],
)
def test_learns_only_from_complete_successful_streamed_responses(kwargs, learned):
    s = stack(1)
    pod = s.ep("pod-0")
    req = completion(prompt(4))
    decide(s, req, pod)
    respond(s, req, pod, **{"ttft_s": 0.1, **kwargs})
    model = s.predictor.model
    assert {k for k, lin in (("ttft", model.ttft), ("tpot", model.tpot)) if lin.samples} == learned


def test_the_observation_is_timed_from_the_decision():
    s = stack(1)
    pod = s.ep("pod-0")
    req = completion(prompt(4))
    decide(s, req, pod)
    respond(s, req, pod, ttft_s=0.25, tpot_s=0.02, tokens=11)
    assert s.predictor._observed_s == pytest.approx({"ttft": 0.25, "tpot": 0.02})


@pytest.mark.parametrize(
    ("objectives", "met"),
    [
        (Objectives(300.0, 30.0), {("ttft", "met"): 1, ("tpot", "met"): 1}),
        (Objectives(100.0, 10.0), {("ttft", "missed"): 1, ("tpot", "missed"): 1}),
        (Objectives(300.0, None), {("ttft", "met"): 1}),
        (Objectives(None, 10.0), {("tpot", "missed"): 1}),
        (None, {}),
    ],
)
def test_counts_objectives_met_and_missed(objectives, met):
    s = stack(1)
    pod = s.ep("pod-0")
    req = completion(prompt(4), objectives=objectives)
    decide(s, req, pod)
    respond(s, req, pod, ttft_s=0.2, tpot_s=0.02, tokens=11)
    assert {k: v for k, v in s.predictor._attainment.items() if v} == met


def test_exposes_the_chosen_endpoints_predictions_as_response_headers_when_asked():
    s = stack(1, {"exposeHeaders": True})
    pod = s.ep("pod-0")
    req = completion(prompt(4))
    decide(s, req, pod)
    expected = pod.attributes[PREDICTOR]
    resp = respond(s, req, pod, ttft_s=0.1)
    assert float(resp.set_headers[TTFT_HEADER]) == pytest.approx(expected.ttft_ms, abs=0.05)
    assert float(resp.set_headers[TPOT_HEADER]) == pytest.approx(expected.tpot_ms, abs=0.005)


def test_sets_no_response_headers_by_default():
    s = stack(1)
    pod = s.ep("pod-0")
    req = completion(prompt(4))
    decide(s, req, pod)
    assert respond(s, req, pod, ttft_s=0.1).set_headers == {}


def test_hooks_without_a_decision_do_nothing():
    s = stack(1)
    pod = s.ep("pod-0")
    req = completion(prompt(4))
    respond(s, req, pod, ttft_s=0.1)  # never decided: nothing to learn from
    s.predictor.pre_request(req, SchedulingResult({"default": None}, "default"))  # a profile without result
    assert req.scratch.get(s.predictor._track_key) is None
    assert s.predictor.model.ttft.samples == 0


def test_an_endpoint_leaving_the_pool_is_forgotten():
    s = stack(2)
    gone = s.ep("pod-1")
    req = completion(prompt(10))
    decide(s, req, gone)
    for _ in range(10):
        s.predictor.model.learn_ttft("pod-1", ttft_features(0, 0, 0, 0, 0.0), 500.0)
    assert s.predictor.model.ttft_correction.factor("pod-1") != 1.0
    s.pool.replace([s.ep("pod-0")])
    assert (s.predictor.pending_prefill_tokens("pod-1"), s.predictor.pending_requests("pod-1")) == (0, 0)
    assert s.predictor.model.ttft_correction.factor("pod-1") == 1.0
    respond(s, req, gone, ttft_s=0.1)  # its late response changes nothing
    assert (s.predictor.pending_prefill_tokens("pod-1"), s.predictor.pending_requests("pod-1")) == (0, 0)


# ------------------------------------------------------------------------------------------ metrics


def exposition(s) -> tuple[str, dict[tuple[str, frozenset], float]]:
    """The predictor's metrics as Prometheus text, and every sample by (name, labels without `plugin`)."""
    reg = CollectorRegistry()

    class Collector:
        def collect(self):
            return s.predictor.collect()

    reg.register(Collector())
    text = generate_latest(reg).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels.pop("plugin") == PREDICTOR
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def test_metrics_exposition():
    s = stack(1)
    pod = s.ep("pod-0")
    for i, ttft in enumerate((0.05, 0.5)):
        req = completion(prompt(4), request_id=f"r{i}", objectives=Objectives(100.0, 50.0))
        decide(s, req, pod)
        respond(s, req, pod, ttft_s=ttft, tpot_s=0.02)
    decide(s, completion(prompt(8), request_id="held"), pod)  # 4 new blocks, still prefilling
    text, samples = exposition(s)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("inference_extension_slo_prediction_relative_error_count", kind="ttft") == 2
    assert value("inference_extension_slo_prediction_relative_error_bucket", kind="tpot", le="+Inf") == 2
    assert value("inference_extension_slo_observed_seconds_total", kind="ttft") == pytest.approx(0.55)
    assert value("inference_extension_slo_observed_seconds_total", kind="tpot") == pytest.approx(0.04)
    assert value("inference_extension_slo_predicted_seconds_total", kind="ttft") > 0
    assert value("inference_extension_slo_attainment_total", kind="ttft", outcome="met") == 1
    assert value("inference_extension_slo_attainment_total", kind="ttft", outcome="missed") == 1
    assert value("inference_extension_slo_attainment_total", kind="tpot", outcome="met") == 2
    assert value("inference_extension_slo_attainment_total", kind="tpot", outcome="missed") == 0
    assert value("inference_extension_slo_predictor_samples_total", kind="tpot", outcome="learned") == 2
    assert value("inference_extension_slo_predictor_samples_total", kind="ttft", outcome="rejected") == 0
    assert value("inference_extension_slo_pending_prefill_tokens", endpoint="pod-0") == 64
    assert value("inference_extension_slo_pending_requests", endpoint="pod-0") == 1
    coefficient = value("inference_extension_slo_predictor_coefficient", kind="ttft", feature="uncached_ktokens")
    assert coefficient == s.predictor.model.ttft.theta[1]
    assert "# TYPE inference_extension_slo_prediction_relative_error histogram" in text


def test_relative_error_buckets_hold_the_observations():
    s = stack(1)
    pod = s.ep("pod-0")
    errors = []
    for i in range(20):
        req = completion(prompt(4), request_id=f"r{i}")
        decide(s, req, pod)
        predicted = req.scratch[s.predictor._track_key].ttft_ms
        actual = 0.02 + 0.01 * i
        respond(s, req, pod, ttft_s=actual)
        errors.append(abs(predicted - actual * 1e3) / (actual * 1e3))
    h = s.predictor._error["ttft"]
    assert h.n == 20 and h.total == pytest.approx(sum(errors))
    assert dict(h.buckets())["0.5"] == sum(1 for e in errors if e <= 0.5)
    assert h.buckets()[-1] == ("+Inf", 20)
    assert statistics.median(errors) >= 0.0


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"forgettingFactor": 0.5}, "forgettingFactor must be in"),
        ({"priorPrefillTokensPerS": 0}, "priorPrefillTokensPerS must be > 0"),
        ({"priorStepMs": -1}, "priorStepMs must be"),
        ({"window": 3}, "unknown parameter 'window'"),
    ],
)
def test_bad_parameters_are_config_errors(make_plugin, params, message):
    with pytest.raises(registry.ConfigError, match=message):
        make_plugin(PREDICTOR, params)


def test_naming_a_prefix_producer_that_produces_no_match_info_is_a_config_error():
    with pytest.raises(ConfigError, match="does not produce PrefixCacheMatchInfo"):
        load_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
  parameters: {prefixMatchInfoProducerName: queue-scorer}
- type: queue-scorer
dataLayer: {sources: []}
""", "test", PluginHandle())
