"""Builders shared by the SLO plugin specs: a pool with the approximate prefix producer and the latency
predictor wired as the config loader wires them, requests, and a response played through the hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epp.datastore.endpoint import Endpoint, Metrics
from epp.datastore.pool import Pool
from epp.request import COMPLETIONS, LLMRequest
from epp.scheduling.registry import PluginHandle, create, load_builtin_plugins
from epp.scheduling.types import ProfileResult, ResponseInfo, SchedulingResult
from plugins.slo import OBJECTIVES_KEY, LatencyPrediction, Objectives

load_builtin_plugins()

PREDICTOR = "predicted-latency-producer"
PREFIX = "approx-prefix-cache-producer"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Stack:
    pool: Pool
    handle: PluginHandle
    prefix: Any
    predictor: Any
    clock: Clock = field(default_factory=Clock)

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self.pool.endpoints)

    def ep(self, name: str) -> Endpoint:
        found = self.pool.get(name)
        assert found is not None
        return found


def stack(n: int = 2, params: dict[str, Any] | None = None, **metrics: Any) -> Stack:
    pool = Pool()
    pool.replace(Endpoint(f"pod-{i}", f"127.0.0.{i + 2}", 8000, metrics=Metrics(**metrics)) for i in range(n))
    handle = PluginHandle(pool)
    prefix = create(PREFIX, PREFIX, None, handle)
    handle.plugins[PREFIX] = prefix
    predictor = create(PREDICTOR, PREDICTOR, params, handle)
    handle.plugins[PREDICTOR] = predictor
    predictor.bind(handle)
    s = Stack(pool, handle, prefix, predictor)
    predictor._clock = s.clock
    return s


def completion(prompt: str, *, stream: bool = True, request_id: str = "r", objectives: Objectives | None = None,
               priority: int = 0) -> LLMRequest:
    req = LLMRequest(request_id=request_id, api=COMPLETIONS, model="m", target_model="m", body={"prompt": prompt},
                     headers={}, size_bytes=len(prompt), prompt=prompt, stream=stream, priority=priority)
    if objectives is not None:
        req.scratch[OBJECTIVES_KEY] = objectives
    return req


def routed_to(endpoint: Endpoint) -> SchedulingResult:
    return SchedulingResult({"default": ProfileResult((endpoint,))}, "default")


def prepare(s: Stack, request: LLMRequest) -> dict[str, LatencyPrediction]:
    """Run both producers over the pool; the predictions by endpoint name."""
    s.prefix.prepare(request, s.endpoints)
    s.predictor.prepare(request, s.endpoints)
    return {ep.name: ep.attributes[PREDICTOR] for ep in s.endpoints}


def decide(s: Stack, request: LLMRequest, endpoint: Endpoint) -> None:
    """Prepare, then the PreRequest hooks for a decision for `endpoint`."""
    prepare(s, request)
    s.predictor.pre_request(request, routed_to(endpoint))
    s.prefix.pre_request(request, routed_to(endpoint))


def respond(s: Stack, request: LLMRequest, endpoint: Endpoint, *, ttft_s: float | None, tpot_s: float = 0.01,
            tokens: int | None = 11, status: int = 200, streaming: bool = True, aborted: bool = False) -> ResponseInfo:
    """Play a response through the hooks on the test clock: headers at once, the first chunk `ttft_s` after
    the decision (None: no body at all), `tokens` completion tokens `tpot_s` apart, then the end."""
    p = s.predictor
    resp = ResponseInfo(status=status, streaming=streaming)
    start = s.clock.now
    p.response_headers(request, resp, endpoint)
    if ttft_s is not None:
        s.clock.now = start + ttft_s
        resp.first_chunk_time = s.clock.now
        p.response_body(request, resp, endpoint, b"data: {}\n\n")
        if tokens is not None and tokens > 1:
            s.clock.now += tpot_s * (tokens - 1)
        resp.completion_tokens = tokens
        resp.prompt_tokens = 100
        resp.end_of_stream = not aborted
    resp.aborted = aborted
    p.response_complete(request, resp, endpoint)
    return resp
