"""`predicted-latency-producer`: predicts each candidate's TTFT and TPOT inside the EPP and learns from the
responses it routes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any, ClassVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import ConfigError, PluginHandle, register
from epp.scheduling.types import ResponseInfo, SchedulingResult
from plugins.prefix import APPROX_PRODUCER_TYPE, PREFIX_CACHE_MATCH_INFO
from plugins.prefix.hashing import CHARS_PER_TOKEN, user_input_bytes
from plugins.slo import OBJECTIVES_KEY, PREDICTED_LATENCY, PREDICTOR_TYPE, LatencyPrediction, Objectives
from plugins.slo.predictor import (
    MAX_MS,
    TPOT_FEATURES,
    TTFT_FEATURES,
    LatencyModel,
    Priors,
    tpot_features,
    ttft_features,
)

# Response headers with the chosen endpoint's predictions (only with exposeHeaders).
TTFT_HEADER = "x-epp-predicted-ttft-ms"
TPOT_HEADER = "x-epp-predicted-tpot-ms"

# Upper bounds of the relative-error histogram, |predicted − actual| / actual.
ERROR_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
KINDS = ("ttft", "tpot")


@dataclass(frozen=True)
class PredictorParams:
    """prefixMatchInfoProducerName  the producer whose PrefixMatchInfo gives each endpoint's cached prefix
                                 (the uncached prompt tokens are the prompt estimate minus that match; an
                                 endpoint without it counts as holding nothing)
    forgettingFactor             λ of the weighted least squares, in [0.9, 1]: memory of about 1/(1−λ)
                                 responses (default 0.998: 500)
    priorPrefillTokensPerS       prior: prefill throughput of uncached tokens (default 15928, an 8B model on
                                 one H100, llm-d's peakPrefillThroughput)
    priorStepMs                  prior: one engine step with one sequence (default 10)
    priorDecodeMsPerSeq          prior: what each further decoding sequence adds to a step (default 0.1)
    residualCorrection           correct the shared model per endpoint by its observed bias (default true)
    exposeHeaders                set x-epp-predicted-ttft-ms / x-epp-predicted-tpot-ms on responses (the
                                 chosen endpoint's predictions; for benchmarks and debugging)
    """

    prefix_match_info_producer_name: str = APPROX_PRODUCER_TYPE
    forgetting_factor: float = 0.998
    prior_prefill_tokens_per_s: float = 15928.0
    prior_step_ms: float = 10.0
    prior_decode_ms_per_seq: float = 0.1
    residual_correction: bool = True
    expose_headers: bool = False

    def validate(self) -> None:
        if not 0.9 <= self.forgetting_factor <= 1.0:
            raise ValueError(f"forgettingFactor must be in [0.9, 1], got {self.forgetting_factor}")
        if not 0.0 < self.prior_prefill_tokens_per_s < math.inf:
            raise ValueError(f"priorPrefillTokensPerS must be > 0, got {self.prior_prefill_tokens_per_s}")
        for key, v in (("priorStepMs", self.prior_step_ms), ("priorDecodeMsPerSeq", self.prior_decode_ms_per_seq)):
            if not 0.0 <= v < math.inf:
                raise ValueError(f"{key} must be a finite number >= 0, got {v}")


class _Track:
    """One routed request, from the decision to its end (kept in request.scratch)."""

    __slots__ = ("endpoint", "start", "x_ttft", "x_tpot", "ttft_ms", "tpot_ms", "uncached", "prefilling",
                 "objectives")

    def __init__(self, endpoint: str, start: float, x_ttft: tuple[float, ...], x_tpot: tuple[float, ...],
                 ttft_ms: float, tpot_ms: float, uncached: int, objectives: Objectives | None) -> None:
        self.endpoint = endpoint
        self.start = start
        self.x_ttft = x_ttft
        self.x_tpot = x_tpot
        self.ttft_ms = ttft_ms
        self.tpot_ms = tpot_ms
        self.uncached = uncached
        self.prefilling = False
        self.objectives = objectives


class _Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(ERROR_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        i = 0
        while i < len(ERROR_BUCKETS) and v > ERROR_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += v
        self.n += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, c in zip((*map(str, ERROR_BUCKETS), "+Inf"), self.counts, strict=True):
            acc += c
            out.append((bound, acc))
        return out


@register
class PredictedLatencyProducer:
    """Predicts, for every candidate endpoint, the request's time to first token and time per output token,
    and writes a `LatencyPrediction` to `endpoint.attributes[<this plugin's name>]` for the SLO filter,
    latency scorer and SLO admitter. No sidecar: the model (plugins/slo/predictor.py) is a pair of linear
    models learned online (exponentially weighted least squares, coefficients >= 0) from the responses this
    EPP routes, shared by the endpoints, with a per-endpoint residual correction and physical priors before
    any data.

    Signals: the request's uncached prompt tokens on each endpoint (prompt estimate at 4 characters per
    token, minus the prefix match of prefixMatchInfoProducerName); the streamed requests this EPP has sent to
    the endpoint that have no first token yet (their count and uncached tokens: the work queued ahead, fresh
    between scrapes); the scraped waiting queue, running requests and KV-cache use; and the EPP's in-flight
    count (see predictor.py for how they combine).

    Learning: at the decision (PreRequest) the chosen endpoint's features and predictions are kept with the
    request; TTFT is observed at the first streamed response chunk (from the decision, i.e. when the request
    leaves the EPP), TPOT as (end − first chunk) / (completion tokens − 1) from the response's usage. Only
    successful streamed responses teach (a non-streamed body arrives whole, so its first byte is not the
    first token); TPOT also needs `usage` (stream_options.include_usage). Because it reads response bodies,
    this plugin makes every response body pass through the EPP.

    Metrics: predicted and observed seconds, the relative error |predicted − actual| / actual, attainment of
    the request's objectives (met / missed), samples learned or rejected, the coefficients and the pending
    prefill tokens.

    When it is wrong: the features are linear proxies (a near-full KV cache or a burst of preemptions makes
    latency grow faster than linearly); pending prefill counts only this EPP's streamed traffic (other
    routers show up only through the scraped queue, one scrape late); the prompt token count is an estimate;
    and the model learns only from the endpoints it routes to, so an endpoint it avoids keeps its old
    correction (the headroom filter's exploration exists for that).
    """

    type: ClassVar[str] = PREDICTOR_TYPE
    aliases: ClassVar[tuple[str, ...]] = ("latency-predictor",)
    produces: ClassVar[frozenset[str]] = frozenset({PREDICTED_LATENCY})
    consumes: ClassVar[frozenset[str]] = frozenset({PREFIX_CACHE_MATCH_INFO})
    Params = PredictorParams

    def __init__(self, name: str, params: PredictorParams, handle: PluginHandle, clock=monotonic) -> None:
        self.name = name
        self.params = params
        self.model = LatencyModel(
            Priors(params.prior_prefill_tokens_per_s, params.prior_step_ms, params.prior_decode_ms_per_seq),
            params.forgetting_factor, params.residual_correction)
        self._prefix_key = params.prefix_match_info_producer_name or APPROX_PRODUCER_TYPE
        self._track_key = f"slo.track/{name}"
        self._clock = clock
        self._pending: dict[str, int] = {}  # endpoint name -> pending prefill tokens
        self._pending_requests: dict[str, int] = {}  # endpoint name -> requests without a first token yet
        self._error = {k: _Histogram() for k in KINDS}
        self._predicted_s = dict.fromkeys(KINDS, 0.0)
        self._observed_s = dict.fromkeys(KINDS, 0.0)
        self._attainment = {(k, o): 0 for k in KINDS for o in ("met", "missed")}
        handle.pool.add_listener(self._on_pool_change)

    def bind(self, handle: PluginHandle) -> None:
        """The prefix producer read, when one is named and defined, must produce PrefixMatchInfo."""
        producer = handle.plugins.get(self._prefix_key)
        if producer is not None and PREFIX_CACHE_MATCH_INFO not in getattr(producer, "produces", ()):
            raise ConfigError(
                f"the plugin named {self._prefix_key!r}, which prefixMatchInfoProducerName names, does not "
                f"produce {PREFIX_CACHE_MATCH_INFO}; name a prefix producer such as {APPROX_PRODUCER_TYPE}"
            )

    # -- features ----------------------------------------------------------------------------------------

    def _uncached(self, tokens: int, ep: Endpoint) -> int:
        info = ep.attributes.get(self._prefix_key)
        if info is None:
            return tokens
        # The precise producer's match_blocks is tier-weighted; its cached_blocks is the plain count.
        blocks = getattr(info, "cached_blocks", info.match_blocks)
        return max(0, tokens - int(blocks * info.block_size_tokens))

    def _features(self, ep: Endpoint, uncached: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        m = ep.metrics
        pending = self._pending.get(ep.name, 0)
        waiting = self._pending_requests.get(ep.name, 0)
        queue = max(m.waiting_queue_size, waiting)
        batch = max(m.running_requests_size, ep.in_flight - waiting)
        return (ttft_features(uncached, pending, queue, batch, m.kv_cache_usage_percent),
                tpot_features(batch, pending, m.kv_cache_usage_percent))

    @staticmethod
    def prompt_tokens(request: LLMRequest) -> int:
        """The prompt's token estimate: the bytes the prefix plugins hash, at 4 characters per token."""
        return len(user_input_bytes(request)) // CHARS_PER_TOKEN

    # -- DataProducer ------------------------------------------------------------------------------------

    def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        """Write every candidate's LatencyPrediction. This is the per-request hot path, so the feature
        vectors and dot products of predictor.py are written out inline here (the equality of the two is
        a unit test): with 64 endpoints it must stay far below a millisecond."""
        tokens = self.prompt_tokens(request)
        snap = self.model.snapshot()
        a0, a1, a2, a3, a4, a5 = snap.ttft
        b0, b1, b2, b3 = snap.tpot
        a1 /= 1000.0
        a2 /= 1000.0
        a4 /= 10.0
        b1 /= 10.0
        b2 /= 1000.0
        ttft_factor = snap.ttft_factors.get
        tpot_factor = snap.tpot_factors.get
        pending_of = self._pending.get
        waiting_of = self._pending_requests.get
        prefix_key = self._prefix_key
        key = self.name
        top = MAX_MS
        for ep in endpoints:
            info = ep.attributes.get(prefix_key)
            if info is None:
                uncached = tokens
            else:
                uncached = tokens - int(getattr(info, "cached_blocks", info.match_blocks) * info.block_size_tokens)
                if uncached < 0:
                    uncached = 0
            m = ep.metrics
            name = ep.name
            pending = pending_of(name, 0)
            waiting = waiting_of(name, 0)
            batch = m.running_requests_size
            if ep.in_flight - waiting > batch:
                batch = ep.in_flight - waiting
            if batch < 0:
                batch = 0
            queue = m.waiting_queue_size
            if waiting > queue:
                queue = waiting
            if queue < 0:
                queue = 0
            kv = m.kv_cache_usage_percent
            if not 0.0 <= kv <= 1.0:
                kv = 1.0 if 1.0 < kv < math.inf else 0.0
            t = a0 + a1 * uncached + a2 * pending + a3 * queue + a4 * batch + a5 * kv
            p = b0 + b1 * batch + b2 * pending + b3 * kv
            f = ttft_factor(name)
            if f is not None:
                t *= f
            f = tpot_factor(name)
            if f is not None:
                p *= f
            if not t > 0.0:
                t = 0.0
            elif t > top:
                t = top
            if not p > 0.0:
                p = 0.0
            elif p > top:
                p = top
            ep.attributes[key] = LatencyPrediction(t, p, uncached)

    # -- PreRequest --------------------------------------------------------------------------------------

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """Keep the chosen endpoint's features and predictions with the request; count its uncached tokens
        as pending prefill there until its first token (streamed requests only)."""
        primary = result.profile_results.get(result.primary_profile)
        if primary is None or not primary.endpoints:
            return
        ep = primary.endpoints[0]
        uncached = self._uncached(self.prompt_tokens(request), ep)
        x_ttft, x_tpot = self._features(ep, uncached)
        track = _Track(ep.name, self._clock(), x_ttft, x_tpot, self.model.predict_ttft(ep.name, x_ttft),
                       self.model.predict_tpot(ep.name, x_tpot), uncached, request.scratch.get(OBJECTIVES_KEY))
        request.scratch[self._track_key] = track
        if request.stream:
            track.prefilling = True
            self._pending[ep.name] = self._pending.get(ep.name, 0) + uncached
            self._pending_requests[ep.name] = self._pending_requests.get(ep.name, 0) + 1

    def _release(self, track: _Track) -> None:
        track.prefilling = False
        name = track.endpoint
        n = self._pending_requests.get(name)
        if n is None:
            return  # the endpoint left the pool meanwhile
        if n > 1:
            self._pending_requests[name] = n - 1
            self._pending[name] = max(0, self._pending.get(name, 0) - track.uncached)
        else:
            self._pending_requests.pop(name, None)
            self._pending.pop(name, None)

    # -- response hooks ----------------------------------------------------------------------------------

    def response_headers(self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint) -> None:
        if not self.params.expose_headers:
            return
        track = request.scratch.get(self._track_key)
        if track is not None:
            response.set_headers[TTFT_HEADER] = f"{track.ttft_ms:.1f}"
            response.set_headers[TPOT_HEADER] = f"{track.tpot_ms:.2f}"

    def response_body(self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint, chunk: bytes) -> None:
        """The first body chunk ends the request's prefill: it is no longer pending."""
        track = request.scratch.get(self._track_key)
        if track is not None and track.prefilling and response.first_chunk_time is not None:
            self._release(track)

    def response_complete(self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint) -> None:
        """Learn TTFT and TPOT from a successful streamed response; count the objectives met or missed."""
        track: _Track | None = request.scratch.pop(self._track_key, None)
        if track is None:
            return
        if track.prefilling:
            self._release(track)
        if response.aborted or not 200 <= response.status < 300 or not response.streaming:
            return
        first = response.first_chunk_time
        if first is None:
            return
        ttft_ms = (first - track.start) * 1e3
        if self.model.learn_ttft(track.endpoint, track.x_ttft, ttft_ms):
            self._observed("ttft", track.ttft_ms, ttft_ms, track.objectives)
        n = response.completion_tokens
        if n is not None and n >= 2:
            tpot_ms = (self._clock() - first) * 1e3 / (n - 1)
            if self.model.learn_tpot(track.endpoint, track.x_tpot, tpot_ms):
                self._observed("tpot", track.tpot_ms, tpot_ms, track.objectives)

    def _observed(self, kind: str, predicted_ms: float, actual_ms: float, objectives: Objectives | None) -> None:
        self._error[kind].observe(abs(predicted_ms - actual_ms) / actual_ms)
        self._predicted_s[kind] += predicted_ms / 1e3
        self._observed_s[kind] += actual_ms / 1e3
        if objectives is not None:
            target = objectives.ttft_ms if kind == "ttft" else objectives.tpot_ms
            if target is not None:
                self._attainment[(kind, "met" if actual_ms <= target else "missed")] += 1

    # -- pool and introspection --------------------------------------------------------------------------

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            self._pending.pop(ep.name, None)
            self._pending_requests.pop(ep.name, None)
            self.model.forget(ep.name)

    def pending_prefill_tokens(self, endpoint: str) -> int:
        return self._pending.get(endpoint, 0)

    def pending_requests(self, endpoint: str) -> int:
        return self._pending_requests.get(endpoint, 0)

    def collect(self) -> Iterable[Any]:
        """MetricsCollector: predicted vs observed latency, SLO attainment, learning counters, coefficients."""
        labels = ["plugin", "kind"]
        err = HistogramMetricFamily(
            "inference_extension_slo_prediction_relative_error",
            "Relative error |predicted - actual| / actual of the chosen endpoint's predicted latency.", labels=labels)
        predicted = CounterMetricFamily("inference_extension_slo_predicted_seconds",
                                        "Sum of the predicted latencies of the observed responses.", labels=labels)
        observed = CounterMetricFamily("inference_extension_slo_observed_seconds",
                                       "Sum of the observed latencies (TTFT, TPOT) of the responses learned from.",
                                       labels=labels)
        for kind in KINDS:
            h = self._error[kind]
            err.add_metric([self.name, kind], h.buckets(), h.total)
            predicted.add_metric([self.name, kind], self._predicted_s[kind])
            observed.add_metric([self.name, kind], self._observed_s[kind])
        attainment = CounterMetricFamily("inference_extension_slo_attainment",
                                         "Responses whose observed latency met or missed the request's objective.",
                                         labels=["plugin", "kind", "outcome"])
        for (kind, outcome), n in self._attainment.items():
            attainment.add_metric([self.name, kind, outcome], n)
        samples = CounterMetricFamily("inference_extension_slo_predictor_samples",
                                      "Observations the predictor learned from, or rejected (non-finite, "
                                      "non-positive, or numerically unusable).", labels=["plugin", "kind", "outcome"])
        coefficients = GaugeMetricFamily("inference_extension_slo_predictor_coefficient",
                                         "Current coefficients of the shared linear latency models (ms per "
                                         "feature unit).", labels=["plugin", "kind", "feature"])
        for kind, lin, names in (("ttft", self.model.ttft, TTFT_FEATURES), ("tpot", self.model.tpot, TPOT_FEATURES)):
            samples.add_metric([self.name, kind, "learned"], lin.samples)
            samples.add_metric([self.name, kind, "rejected"], lin.rejected)
            for feature, value in zip(names, lin.theta, strict=True):
                coefficients.add_metric([self.name, kind, feature], value)
        pending = GaugeMetricFamily("inference_extension_slo_pending_prefill_tokens",
                                    "Uncached prompt tokens of streamed requests routed to the endpoint that have "
                                    "not produced a first token yet.", labels=["plugin", "endpoint"])
        for endpoint, tokens in sorted(self._pending.items()):
            pending.add_metric([self.name, endpoint], tokens)
        waiting = GaugeMetricFamily("inference_extension_slo_pending_requests",
                                    "Streamed requests routed to the endpoint that have not produced a first token "
                                    "yet.", labels=["plugin", "endpoint"])
        for endpoint, n in sorted(self._pending_requests.items()):
            waiting.add_metric([self.name, endpoint], n)
        yield from (err, predicted, observed, attainment, samples, coefficients, pending, waiting)
