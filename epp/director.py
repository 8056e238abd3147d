"""The Director: one request through admission, candidates, data producers, the scheduler and the hooks;
and, on the way back, the response hooks and the EPP's own accounting."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from time import monotonic, perf_counter

import orjson

from epp.config import EppConfig
from epp.datastore.endpoint import Endpoint
from epp.datastore.models import ModelPolicy, RequestPolicy
from epp.datastore.pool import Pool
from epp.errors import RequestError
from epp.observability.metrics import PLUGIN_TIMING_SAMPLE, EppMetrics, ModelSeries
from epp.request import LLMRequest, header_only_request
from epp.scheduling.types import ResponseInfo, SchedulingError, SchedulingResult

log = logging.getLogger("epp.director")


@dataclass(slots=True)
class Routed:
    """A request the EPP has routed, until its response ends."""

    request: LLMRequest
    endpoints: tuple[Endpoint, ...]  # primary first, then fallbacks
    result: SchedulingResult | None  # None for header-only requests (picked at random)
    body: bytes  # the body to forward (rewritten when the model name is rewritten)
    start: float  # monotonic time the request headers arrived
    response: ResponseInfo = field(default_factory=ResponseInfo)
    response_bytes: int = 0
    tokens_estimate: int = 0
    done: bool = False
    series: ModelSeries | None = None  # the request's metric children (None for header-only requests)
    remove_headers: tuple[str, ...] = ()  # client request headers that plugins own and did not set

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[0]

    @property
    def model_rewritten(self) -> bool:
        return self.request.target_model != self.request.model and bool(self.request.model)


@dataclass(frozen=True, slots=True)
class DirectorOptions:
    disable_subset_filter: bool = False


class Director:
    def __init__(
        self,
        config: EppConfig,
        pool: Pool,
        metrics: EppMetrics,
        objectives: Mapping[str, int] | None = None,
        options: DirectorOptions = DirectorOptions(),
        rng: random.Random | None = None,
        policy: RequestPolicy | None = None,
    ) -> None:
        """`policy` sets each request's priority and target model (InferenceObjectives, InferenceModels);
        without one, `objectives` (name -> priority) are looked up for the x-gateway-inference-objective
        header."""
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.policy: RequestPolicy = policy if policy is not None else ModelPolicy(objectives)
        self.options = options
        self.rng = rng or random.Random()
        self._timer = metrics.observe_plugin
        self._timing_countdown = 0
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.response_body_readers = config.response_body_readers
        self._owned_headers = config.owned_request_headers
        self._warned_no_response_body = False

    # ---------------------------------------------------------------- request path

    def candidates(self, subset: Sequence[str] | None) -> list[Endpoint]:
        """Pool endpoints, restricted to the subset hint when one is given. As in the reference, the hint
        matches by IP: every port of a listed address stays eligible. An empty hint leaves none."""
        endpoints = self.pool.endpoints
        if subset is None or self.options.disable_subset_filter:
            return list(endpoints)
        hosts = {_host_of(s) for s in subset}
        return [e for e in endpoints if e.address in hosts]

    def route_header_only(self, headers: Mapping[str, str], request_id: str, subset: Sequence[str] | None,
                          start: float) -> Routed:
        """A request without a body (e.g. GET /v1/models) goes to a random eligible endpoint."""
        candidates = self.candidates(subset)
        if not candidates:
            raise RequestError(503, _no_candidates_message(subset, self.pool))
        ep = self.rng.choice(candidates)
        routed = Routed(header_only_request(request_id, headers), (ep,), None, b"", start)
        ep.in_flight += 1
        return routed

    def route(self, headers: Mapping[str, str], body: bytes, request_id: str, subset: Sequence[str] | None,
              start: float) -> Routed:
        """Parse, admit and schedule one request. Raises RequestError (400, 429, 503) for the client."""
        t0 = perf_counter()
        request = self.config.parser.parse_request(body, headers, request_id)
        self.policy.apply(request, self.rng)
        candidates = self.candidates(subset)
        series = self.metrics.model_series(request.model, request.target_model)
        if not candidates:
            series.error("ServiceUnavailable")
            raise RequestError(503, _no_candidates_message(subset, self.pool))
        detector = self.config.saturation_detector
        if request.priority < 0 and detector is not None and detector.saturation(candidates) >= 1.0:
            series.error("ResourceExhausted")
            raise RequestError(429, f"the pool is saturated and the request is sheddable (objective "
                                    f"{request.objective!r}, priority {request.priority}); retry later")
        # Plugin timings are sampled: one request in PLUGIN_TIMING_SAMPLE is timed plugin by plugin.
        self._timing_countdown -= 1
        timer = None
        if self._timing_countdown <= 0:
            self._timing_countdown = PLUGIN_TIMING_SAMPLE
            timer = self._timer
        for producer in self.config.producers:
            if timer is None:
                producer.prepare(request, candidates)
            else:
                p0 = perf_counter()
                producer.prepare(request, candidates)
                timer("PrepareData", producer, perf_counter() - p0)
        for admitter in self.config.admitters:
            reason = admitter.admit(request, candidates)
            if reason is not None:
                series.error("ResourceExhausted")
                raise RequestError(429, reason)
        try:
            result = self.config.scheduler.schedule(request, candidates, timer)
        except SchedulingError as exc:
            self.metrics.scheduler_attempts.labels("failure").inc()
            series.error("ServiceUnavailable" if exc.status == 503 else "ResourceExhausted")
            raise RequestError(exc.status, str(exc)) from None
        endpoints = result.target_endpoints
        for hook in self.config.pre_request:
            if timer is None:
                hook.pre_request(request, result)
            else:
                p0 = perf_counter()
                hook.pre_request(request, result)
                timer("PreRequest", hook, perf_counter() - p0)
        if request.target_model != request.model:
            rewritten = dict(request.body)
            rewritten["model"] = request.target_model
            body = orjson.dumps(rewritten)
        routed = Routed(request, endpoints, result, body, start)
        if self._owned_headers:
            routed.remove_headers = tuple(h for h in self._owned_headers if h in headers and h not in result.headers)
        routed.tokens_estimate = max(1, request.size_bytes // 4)
        ep = endpoints[0]
        ep.in_flight += 1
        ep.in_flight_tokens += routed.tokens_estimate
        metrics = self.metrics
        metrics.count_scheduled()
        metrics.observe_scheduler_e2e(perf_counter() - t0)
        series.request(request.priority)
        series.observe_request_size(request.size_bytes)
        series.running_inc()
        routed.series = series
        if self._debug:
            log.debug("routed request %s model=%s target=%s to %s (candidates=%d, %.3f ms)", request_id,
                      request.model, request.target_model, ",".join(e.hostport for e in endpoints),
                      len(candidates), (perf_counter() - t0) * 1e3)
        return routed

    # ---------------------------------------------------------------- response path

    def gateway_sends_no_response_body(self) -> None:
        """The gateway's filter is configured not to send response bodies (response_body_mode NONE). Fine
        unless a plugin reads them: then say so once, loudly, since those plugins see no responses."""
        if self.response_body_readers and not self._warned_no_response_body:
            self._warned_no_response_body = True
            log.warning("the gateway's ext_proc filter sends no response bodies (response_body_mode NONE), but "
                        "plugins %s read them and will see none; set response_body_mode FULL_DUPLEX_STREAMED "
                        "(and response_trailer_mode SEND) on the filter", ", ".join(self.response_body_readers))

    def response_headers(self, routed: Routed) -> None:
        for hook in self.config.response_header_hooks:
            hook.response_headers(routed.request, routed.response, routed.endpoint)

    def response_chunk(self, routed: Routed, chunk: bytes) -> None:
        resp = routed.response
        if resp.first_chunk_time is None and chunk:
            resp.first_chunk_time = monotonic()
        routed.response_bytes += len(chunk)
        if routed.result is not None:
            self.config.parser.parse_response_chunk(resp, chunk, resp.streaming)
        for hook in self.config.response_body_hooks:
            hook.response_body(routed.request, resp, routed.endpoint, chunk)

    def complete(self, routed: Routed, aborted: bool = False) -> None:
        """Release the request's state. Idempotent: the first call wins."""
        if routed.done:
            return
        routed.done = True
        ep = routed.endpoint
        ep.in_flight -= 1
        ep.in_flight_tokens -= routed.tokens_estimate
        resp = routed.response
        resp.aborted = aborted and not resp.end_of_stream
        for hook in self.config.response_complete_hooks:
            try:
                hook.response_complete(routed.request, resp, ep)
            except Exception:  # a plugin bug must not leak the rest of the request's state
                log.exception("response_complete hook %s failed", getattr(hook, "name", hook))
        if routed.result is None:
            return
        series = routed.series
        series.running.dec()
        if resp.aborted:
            series.error("Aborted")
            return
        if resp.status and resp.status >= 400:
            series.error("ModelServerError")
        series.duration.observe(monotonic() - routed.start)
        series.response_sizes.observe(routed.response_bytes)
        if resp.first_chunk_time is not None:
            series.ttft.observe(resp.first_chunk_time - routed.start)
        if resp.prompt_tokens is not None:
            series.input_tokens.observe(resp.prompt_tokens)
        if resp.completion_tokens is not None:
            series.output_tokens.observe(resp.completion_tokens)
        if resp.cached_tokens is not None:
            series.cached_tokens.observe(resp.cached_tokens)


def _host_of(hostport: str) -> str:
    hostport = hostport.strip()
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")]
    if hostport.count(":") == 1:
        return hostport.rsplit(":", 1)[0]
    return hostport


def _no_candidates_message(subset: Sequence[str] | None, pool: Pool) -> str:
    if subset is not None:
        return (f"failed to find endpoint candidates for serving the request: the subset hint "
                f"{list(subset)} matches none of the pool's {len(pool.endpoints)} endpoints")
    return "no ready endpoints in the pool"
