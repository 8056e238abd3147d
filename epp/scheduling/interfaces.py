"""Extension points. A plugin implements one or more of these Protocols; the config loader slots each
plugin instance into every extension point it implements (checked structurally at load time).

Scheduling-path methods are synchronous and must not block: they run on the event loop for every request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from epp.datastore.endpoint import Endpoint, Metrics
from epp.request import LLMRequest
from epp.scheduling.types import (
    CycleState,
    ProfileResult,
    ResponseInfo,
    SchedulingResult,
)

if TYPE_CHECKING:
    from epp.scheduling.scheduler import SchedulerProfile


@runtime_checkable
class Plugin(Protocol):
    type: ClassVar[str]
    name: str


@runtime_checkable
class Filter(Protocol):
    """Keeps the endpoints a request may go to. Returning an empty list fails the profile."""

    def filter(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores each endpoint in [0, 1] (higher is better). Out-of-range scores are clamped by the
    scheduler; endpoints missing from the result score 0.

    Optional, for the hot path: `score_values(state, request, endpoints) -> list[float]`, the scores of
    `endpoints` in their order, already clamped to [0, 1] (NaN as 0). When a scorer has it, the scheduler
    calls it instead of `score` (saving a dict per scorer per request); both must agree."""

    def score(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Mapping[Endpoint, float]: ...


@runtime_checkable
class Picker(Protocol):
    """Chooses the target endpoints from the candidates and their weighted total scores
    (`{endpoint: score}`, in candidate order), best first.

    Optional: `pick_values(state, endpoints, totals)` with the totals as a list aligned with `endpoints`,
    equal to `pick(state, dict(zip(endpoints, totals)))`; the scheduler prefers it when present."""

    def pick(self, state: CycleState, scores: Mapping[Endpoint, float]) -> ProfileResult: ...


@runtime_checkable
class ProfileHandler(Protocol):
    """Decides which profiles run (called until it returns none) and turns their results into one."""

    def pick_profiles(
        self,
        state: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> list[SchedulerProfile]: ...

    def process_results(
        self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult: ...


@runtime_checkable
class DataProducer(Protocol):
    """Runs before scheduling to compute per-endpoint data (stored in `Endpoint.attributes[self.name]`
    or in `request.scratch`) that scorers and filters read."""

    def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None: ...


@runtime_checkable
class PreRequest(Protocol):
    """Runs after the decision, before the request is forwarded (e.g. an index learns where it went)."""

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None: ...


@runtime_checkable
class ResponseHeaderHook(Protocol):
    def response_headers(self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint) -> None: ...


@runtime_checkable
class ResponseBodyHook(Protocol):
    """Called for every response body chunk the EPP sees (streamed) or once (buffered)."""

    def response_body(self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint, chunk: bytes) -> None: ...


@runtime_checkable
class ResponseCompleteHook(Protocol):
    """Called exactly once for every scheduled request when it ends: completed, failed, or aborted
    (`response.aborted`). The place to release per-request state."""

    def response_complete(self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint) -> None: ...


@runtime_checkable
class Admitter(Protocol):
    """Admission after the data producers ran and before scheduling: returns None to admit the request, or
    the reason it is rejected with 429 (e.g. a sheddable request no endpoint can serve within its
    objective). Every admitter is asked, in config order; the first reason wins."""

    def admit(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> str | None: ...


@runtime_checkable
class SaturationDetector(Protocol):
    """Pool saturation: >= 1.0 means saturated (sheddable requests are rejected with 429)."""

    def saturation(self, endpoints: Sequence[Endpoint]) -> float: ...


@runtime_checkable
class Parser(Protocol):
    """Turns a request body into an LLMRequest (raising epp.errors.RequestError for a bad request), and
    reads token usage from response bodies."""

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str) -> LLMRequest: ...

    def parse_response_chunk(self, response: ResponseInfo, chunk: bytes, streaming: bool) -> None: ...


@runtime_checkable
class MetricsSource(Protocol):
    """Where and how often to scrape an endpoint (the `metrics-data-source` plugin)."""

    interval_s: float
    timeout_s: float
    insecure_skip_verify: bool

    def url(self, endpoint: Endpoint) -> str: ...

    def set_interval(self, seconds: float) -> None: ...


@runtime_checkable
class MetricsExtractor(Protocol):
    """Maps one Prometheus text exposition to a Metrics snapshot (the `core-metrics-extractor` plugin).
    Raises ValueError when the exposition lacks what the endpoint's engine must report."""

    def extract(self, text: bytes, endpoint: Endpoint, now: float) -> Metrics: ...


@runtime_checkable
class Lifecycle(Protocol):
    """A plugin with background work (e.g. a KV-event subscriber). The EPP awaits `start()` before it
    serves and `stop()` when it shuts down, on the event loop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class MetricsCollector(Protocol):
    """A plugin that exports its own Prometheus metrics: `collect()` yields prometheus_client metric
    families (e.g. GaugeMetricFamily), called at scrape time."""

    def collect(self) -> Iterable[Any]: ...
