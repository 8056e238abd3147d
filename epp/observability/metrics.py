"""The EPP's Prometheus metrics, named as the reference EPP names them where a counterpart exists.

One `EppMetrics` per process, holding its own CollectorRegistry (no global registry)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.values import MutexValue

from epp import __version__
from epp.datastore.pool import Pool

_LATENCY_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20,
                    30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_FAST_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
PLUGIN_TIMING_SAMPLE = 16
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


# The per-request series below are updated through `incrementer` and `observer`: the same changes to the
# exposed values as prometheus_client's `inc`/`observe`, with its per-call checks done once. Where the value
# is prometheus_client's in-process MutexValue, the float is updated directly instead of under its lock: those
# series are written only from the event loop (the request path), and the lock guards only against writers
# in other threads; readers still take it, and see the value before or after an update, as with the lock.


def _plain(value: Any) -> bool:
    """Whether `value` is prometheus_client's in-process MutexValue holding a float (updated directly)."""
    return type(value) is MutexValue and isinstance(getattr(value, "_value", None), float)


def incrementer(metric: Any) -> Callable[[], None]:
    """`metric.inc()` for a Counter or Gauge child (or one without labels)."""
    value = getattr(metric, "_value", None)
    if value is None or not metric._is_observable() or not callable(getattr(value, "inc", None)):
        return metric.inc
    if _plain(value):

        def inc() -> None:
            value._value += 1.0

        return inc
    return partial(value.inc, 1)


def observer(histogram: Any) -> Callable[[float], None]:
    """`histogram.observe` for a Histogram child (or one without labels): the same effect on the exposed
    samples (the sum, and one count in the first bucket whose upper bound is >= the amount; none for NaN),
    with the bucket found by bisection instead of prometheus_client's scan of every bound."""
    try:
        bounds = tuple(histogram._upper_bounds)
        buckets = tuple(histogram._buckets)
        total = histogram._sum
    except AttributeError:
        return histogram.observe
    if not histogram._is_observable() or len(bounds) != len(buckets) or list(bounds) != sorted(bounds):
        return histogram.observe
    count = len(bounds)
    if _plain(total) and all(_plain(b) for b in buckets):

        def observe(amount: float) -> None:
            total._value += amount
            i = bisect_left(bounds, amount)
            if i < count and amount <= bounds[i]:
                buckets[i]._value += 1.0

        return observe

    def observe_locked(amount: float) -> None:
        total.inc(amount)
        i = bisect_left(bounds, amount)
        if i < count and amount <= bounds[i]:
            buckets[i].inc(1)

    return observe_locked


class EppMetrics:
    def __init__(self, pool: Pool, staleness_s: float = 2.0, clock: Callable[[], float] | None = None) -> None:
        import time

        self.registry = CollectorRegistry(auto_describe=True)
        self._pool = pool
        self._staleness_s = staleness_s
        self._clock = clock or time.monotonic
        r = self.registry
        model = ["model_name", "target_model_name"]
        self.request_total = Counter("inference_objective_request_total", "Requests routed, by model and priority.",
                                     [*model, "priority"], registry=r)
        self.request_error_total = Counter("inference_objective_request_error_total",
                                           "Requests that failed, by model and error code.", [*model, "error_code"],
                                           registry=r)
        self.request_duration = Histogram("inference_objective_request_duration_seconds",
                                          "Request latency from the EPP's view (request headers to response end).",
                                          model, buckets=_LATENCY_BUCKETS, registry=r)
        self.request_sizes = Histogram("inference_objective_request_sizes", "Request body sizes in bytes.", model,
                                       buckets=_SIZE_BUCKETS, registry=r)
        self.response_sizes = Histogram("inference_objective_response_sizes", "Response body sizes in bytes.", model,
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.input_tokens = Histogram("inference_objective_input_tokens", "Prompt tokens per request (from usage).",
                                      model, buckets=_TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram("inference_objective_output_tokens",
                                       "Completion tokens per request (from usage).", model, buckets=_TOKEN_BUCKETS,
                                       registry=r)
        self.cached_tokens = Histogram("inference_objective_prompt_cached_tokens",
                                       "Prompt tokens served from the prefix cache (from usage).", model,
                                       buckets=_TOKEN_BUCKETS, registry=r)
        self.running_requests = Gauge("inference_objective_running_requests", "Requests in flight, by model.",
                                      ["model_name"], registry=r)
        self.ttft = Histogram("inference_objective_request_ttft_seconds",
                              "Time to first response byte as the EPP sees it.", model, buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.scheduler_e2e = Histogram("inference_extension_scheduler_e2e_duration_seconds",
                                       "Scheduling time per request (producers, profiles, picker).",
                                       buckets=_FAST_BUCKETS, registry=r)
        self.scheduler_attempts = Counter("inference_extension_scheduler_attempts_total",
                                          "Scheduling attempts by outcome.", ["status"], registry=r)
        self.plugin_duration = Histogram("inference_extension_plugin_duration_seconds",
                                         "Time spent in each plugin, by extension point (sampled: one request in 16 "
                                         "is timed, to keep timing off the hot path).",
                                         ["extension_point", "plugin_type", "plugin_name"], buckets=_FAST_BUCKETS,
                                         registry=r)
        self.request_overhead = Histogram("inference_extension_request_processing_seconds",
                                          "EPP time from the complete request body to the routing answer.",
                                          buckets=_FAST_BUCKETS, registry=r)
        self.scrape_errors = Counter("inference_extension_model_server_scrape_errors_total",
                                     "Failed metric scrapes of model servers.", ["endpoint"], registry=r)
        self.info = Gauge("inference_extension_info", "EPP build information.", ["commit", "build_ref"], registry=r)
        self.info.labels(commit="", build_ref=__version__).set(1)
        r.register(_PoolCollector(self))
        self._plugin_children: dict[tuple[str, int], Callable[[float], None]] = {}
        self._model_series: dict[tuple[str, str], ModelSeries] = {}
        # The per-request updates, bound once (see `incrementer` and `observer`).
        self.observe_scheduler_e2e = observer(self.scheduler_e2e)
        self.observe_request_overhead = observer(self.request_overhead)
        self.count_scheduled = incrementer(self.scheduler_attempts.labels("success"))

    def model_series(self, model: str, target: str) -> ModelSeries:
        """The per-model children, looked up once per (model, target) pair rather than per request."""
        series = self._model_series.get((model, target))
        if series is None:
            labels = (model, target)
            series = ModelSeries(
                requests={}, request_total=self.request_total, errors={}, error_total=self.request_error_total,
                labels=labels, request_sizes=self.request_sizes.labels(*labels),
                response_sizes=self.response_sizes.labels(*labels), duration=self.request_duration.labels(*labels),
                ttft=self.ttft.labels(*labels), input_tokens=self.input_tokens.labels(*labels),
                output_tokens=self.output_tokens.labels(*labels), cached_tokens=self.cached_tokens.labels(*labels),
                running=self.running_requests.labels(model))
            self._model_series[(model, target)] = series
        return series

    def add_plugin_collectors(self, plugins: Iterable[object]) -> None:
        """Export the metrics of plugins that implement MetricsCollector (their `collect()` runs at scrape
        time)."""
        from epp.scheduling.interfaces import MetricsCollector

        collectors = [p for p in plugins if isinstance(p, MetricsCollector)]
        if collectors:
            self.registry.register(_PluginCollector(collectors))

    def observe_plugin(self, extension_point: str, plugin: object, seconds: float) -> None:
        key = (extension_point, id(plugin))
        observe = self._plugin_children.get(key)
        if observe is None:
            observe = observer(self.plugin_duration.labels(
                extension_point, getattr(plugin, "type", type(plugin).__name__), getattr(plugin, "name", "")))
            self._plugin_children[key] = observe
        observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class ModelSeries:
    labels: tuple[str, str]
    requests: dict[int, Callable[[], None]]  # priority -> its request_total child's increment
    request_total: Counter
    errors: dict[str, Any]  # error code -> request_error_total child
    error_total: Counter
    request_sizes: Any
    response_sizes: Any
    duration: Any
    ttft: Any
    input_tokens: Any
    output_tokens: Any
    cached_tokens: Any
    running: Any
    # request_sizes.observe and running.inc for the request path, bound once (see `observer`, `incrementer`).
    observe_request_size: Callable[[float], None] = field(init=False, repr=False, compare=False)
    running_inc: Callable[[], None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.observe_request_size = observer(self.request_sizes)
        self.running_inc = incrementer(self.running)

    def request(self, priority: int) -> None:
        inc = self.requests.get(priority)
        if inc is None:
            inc = self.requests[priority] = incrementer(self.request_total.labels(*self.labels, str(priority)))
        inc()

    def error(self, code: str) -> None:
        child = self.errors.get(code)
        if child is None:
            child = self.errors[code] = self.error_total.labels(*self.labels, code)
        child.inc()


class _PluginCollector:
    def __init__(self, plugins: list) -> None:
        self._plugins = plugins

    def describe(self):
        return []

    def collect(self):
        for plugin in self._plugins:
            yield from plugin.collect()


class _PoolCollector:
    """Pool gauges computed at scrape time from the datastore (no background refresh task)."""

    def __init__(self, m: EppMetrics) -> None:
        self._m = m

    def describe(self):
        return []

    def collect(self):
        m = self._m
        pool = m._pool
        now = m._clock()
        eps = pool.endpoints
        fresh = [e for e in eps if e.metrics.update_time and now - e.metrics.update_time <= m._staleness_s]
        labels = ["name"]
        ready = GaugeMetricFamily("inference_pool_ready_pods", "Endpoints in the pool.", labels=labels)
        ready.add_metric([pool.name], len(eps))
        q = GaugeMetricFamily("inference_pool_average_queue_size", "Mean waiting queue over fresh endpoints.",
                              labels=labels)
        kv = GaugeMetricFamily("inference_pool_average_kv_cache_utilization",
                               "Mean KV-cache utilization over fresh endpoints.", labels=labels)
        run = GaugeMetricFamily("inference_pool_average_running_requests",
                                "Mean running requests over fresh endpoints.", labels=labels)
        n = len(fresh)
        q.add_metric([pool.name], sum(e.metrics.waiting_queue_size for e in fresh) / n if n else 0.0)
        kv.add_metric([pool.name], sum(e.metrics.kv_cache_usage_percent for e in fresh) / n if n else 0.0)
        run.add_metric([pool.name], sum(e.metrics.running_requests_size for e in fresh) / n if n else 0.0)
        per_pod = GaugeMetricFamily("inference_pool_per_pod_queue_size", "Waiting queue per endpoint.",
                                    labels=["name", "model_server_pod"])
        inflight = GaugeMetricFamily("inference_extension_endpoint_in_flight_requests",
                                     "Requests the EPP routed to each endpoint that have not finished.",
                                     labels=["name", "model_server_pod"])
        for e in eps:
            per_pod.add_metric([pool.name, e.name], e.metrics.waiting_queue_size)
            inflight.add_metric([pool.name, e.name], e.in_flight)
        yield from (ready, q, kv, run, per_pod, inflight)
