"""Prometheus metrics with vLLM's names, types and labels, rendered as text without a global registry.

The EPP scrapes /metrics every 50 ms from every pod, so rendering is cheap: counters and gauges are a few
formatted lines, and a histogram re-renders its ~25 lines only when it observed something since the last
scrape. Every series carries vLLM's labels `model_name` (the first served model name) and `engine` ("0",
the engine index). Names follow vLLM V1 (`vllm/v1/metrics/loggers.py`): counters end in `_total`, TTFT /
ITL / e2e histograms use vLLM's buckets.

Disaggregated prefill/decode adds our own counters next to vLLM's (vLLM has no equivalent names), with the
same labels: `epp_model_server_pd_prefill_legs_total` and `epp_model_server_pd_decode_legs_total` (legs
served here), `epp_model_server_kv_transfer_tokens_total` and `epp_model_server_kv_transfer_seconds_total`
(KV received from prefillers, and the modelled time it took), and, for the decode sidecar's calls to
prefillers, `epp_model_server_pd_prefill_calls_total{outcome="ok"|"error"}` and
`epp_model_server_pd_prefill_retries_total`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


def token_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to `max_value` (used for token-count histograms)."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exponent
            if v > max_value:
                return tuple(out)
            out.append(float(v))
        exponent += 1


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels: Mapping[str, str]) -> str:
    return ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v))


class Histogram:
    """A histogram with fixed buckets; its text is rebuilt only after new observations."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: str) -> None:
        self.name = name
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0
        sep = "," if labels else ""
        self._header = f"# HELP {name} {help_text}\n# TYPE {name} histogram\n"
        self._bucket_prefixes = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} '
                                 for b in (*self.buckets, float("inf"))]
        self._count_prefix = f"{name}_count{{{labels}}} "
        self._sum_prefix = f"{name}_sum{{{labels}}} "
        self._text: str | None = None

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1
        self._text = None

    def render(self) -> str:
        if self._text is None:
            parts = [self._header]
            cumulative = 0
            for prefix, c in zip(self._bucket_prefixes, self.counts, strict=True):
                cumulative += c
                parts.append(f"{prefix}{cumulative}.0\n")
            parts.append(f"{self._count_prefix}{self.count}.0\n{self._sum_prefix}{_num(self.total)}\n")
            self._text = "".join(parts)
        return self._text


def gauge_text(name: str, help_text: str, samples: Iterable[tuple[str, float]]) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines.extend(f"{name}{{{labels}}} {_num(v)}" for labels, v in samples)
    return "\n".join(lines) + "\n"


def counter_text(name: str, help_text: str, samples: Iterable[tuple[str, float]]) -> str:
    """A counter family; `name` ends in `_total`, as prometheus_client writes vLLM's counters."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    lines.extend(f"{name}{{{labels}}} {_num(v)}" for labels, v in samples)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class EngineGauges:
    """The engine state a scrape reads."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    running_loras: Sequence[str]
    waiting_loras: Sequence[str]


class ServerMetrics:
    """All metrics of one server; request observations come from the engine, gauges from a callback."""

    def __init__(
        self,
        model_name: str,
        *,
        cache_config: Mapping[str, str],
        max_model_len: int,
        max_loras: int | None,
        gauges: Callable[[], EngineGauges],
        clock: Callable[[], float] = time.time,
    ) -> None:
        base = {"engine": "0", "model_name": model_name}
        self._labels = label_text(base)
        self._cache_info_labels = label_text({**base, **cache_config})
        self._max_loras = max_loras
        self._gauges = gauges
        self._clock = clock
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.pd_prefill_legs = 0
        self.pd_decode_legs = 0
        self.kv_transfer_tokens = 0
        self.kv_transfer_seconds = 0.0
        self.pd_prefill_calls = {"ok": 0, "error": 0}
        self.pd_prefill_retries = 0
        lb = self._labels
        tb = token_buckets(max_model_len)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS, lb)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS, lb)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds (deprecated alias of "
                              "vllm:inter_token_latency_seconds).", ITL_BUCKETS, lb)
        self.request_tpot = Histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS, lb)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS, lb)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS, lb)
        self.inference = Histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.",
                                   REQUEST_LATENCY_BUCKETS, lb)
        self.prefill = Histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS, lb)
        self.decode = Histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS, lb)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tb, lb)
        self.generation_len = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                        tb, lb)
        self._histograms = [self.ttft, self.itl, self.tpot, self.request_tpot, self.e2e, self.queue,
                            self.inference, self.prefill, self.decode, self.prompt_len, self.generation_len]

    # ---- observations ------------------------------------------------------------------------------

    def on_first_token(self, ttft: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens += prompt_tokens

    def on_token(self, itl: float | None) -> None:
        self.generation_tokens += 1
        if itl is not None:
            self.itl.observe(itl)
            self.tpot.observe(itl)

    def on_kv_transfer(self, tokens: int, seconds: float) -> None:
        """A decode leg's KV arrived from its prefiller."""
        self.kv_transfer_tokens += tokens
        self.kv_transfer_seconds += seconds

    def on_pd_leg(self, leg: str) -> None:
        """A prefill ("prefill") or decode ("decode") leg finished here."""
        if leg == "prefill":
            self.pd_prefill_legs += 1
        elif leg == "decode":
            self.pd_decode_legs += 1
        else:
            raise ValueError(f"unknown P/D leg {leg!r}")

    def on_prefill_call(self, ok: bool, retries: int) -> None:
        """The sidecar's call to a prefiller ended (after `retries` retries)."""
        self.pd_prefill_calls["ok" if ok else "error"] += 1
        self.pd_prefill_retries += retries

    def on_finished(
        self,
        *,
        reason: str,
        arrival: float,
        first_scheduled: float | None,
        first_token: float | None,
        now: float,
        prompt_tokens: int,
        generation_tokens: int,
    ) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1
        self.e2e.observe(now - arrival)
        self.prompt_len.observe(prompt_tokens)
        self.generation_len.observe(generation_tokens)
        if first_scheduled is not None:
            self.queue.observe(first_scheduled - arrival)
            self.inference.observe(now - first_scheduled)
            if first_token is not None:
                self.prefill.observe(first_token - first_scheduled)
        if first_token is not None:
            self.decode.observe(now - first_token)
            if generation_tokens > 1:
                self.request_tpot.observe((now - first_token) / (generation_tokens - 1))

    # ---- exposition --------------------------------------------------------------------------------

    def render(self) -> str:
        g = self._gauges()
        lb = self._labels
        parts = [
            gauge_text("vllm:num_requests_running", "Number of requests in model execution batches.",
                       [(lb, g.num_running)]),
            gauge_text("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                       [(lb, g.num_waiting)]),
            gauge_text("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                       [(lb, g.kv_cache_usage)]),
            gauge_text("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                       [(self._cache_info_labels, 1.0)]),
        ]
        if self._max_loras is not None:
            lora_labels = label_text({
                "max_lora": str(self._max_loras),
                "running_lora_adapters": ",".join(g.running_loras),
                "waiting_lora_adapters": ",".join(g.waiting_loras),
            })
            parts.append(gauge_text("vllm:lora_requests_info", "Running stats on lora requests.",
                                    [(lora_labels, self._clock())]))
        parts += [
            counter_text("vllm:prefix_cache_queries_total",
                         "Prefix cache queries, in terms of number of queried tokens.",
                         [(lb, g.prefix_cache_queries)]),
            counter_text("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.",
                         [(lb, g.prefix_cache_hits)]),
            counter_text("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.",
                         [(lb, g.num_preemptions)]),
            counter_text("vllm:prompt_tokens_total", "Number of prefill tokens processed.",
                         [(lb, self.prompt_tokens)]),
            counter_text("vllm:generation_tokens_total", "Number of generation tokens processed.",
                         [(lb, self.generation_tokens)]),
            counter_text("vllm:request_success_total", "Count of successfully processed requests.",
                         [(f'{lb},finished_reason="{r}"', n) for r, n in self.success.items()]),
            counter_text("epp_model_server_pd_prefill_legs_total",
                         "Prefill legs (requests with kv_transfer_params.do_remote_decode) served here.",
                         [(lb, self.pd_prefill_legs)]),
            counter_text("epp_model_server_pd_decode_legs_total",
                         "Decode legs (requests with kv_transfer_params.do_remote_prefill) served here.",
                         [(lb, self.pd_decode_legs)]),
            counter_text("epp_model_server_kv_transfer_tokens_total",
                         "Prompt tokens whose KV was received from a prefiller instead of computed.",
                         [(lb, self.kv_transfer_tokens)]),
            counter_text("epp_model_server_kv_transfer_seconds_total",
                         "Modelled time spent receiving KV from prefillers.", [(lb, self.kv_transfer_seconds)]),
            counter_text("epp_model_server_pd_prefill_calls_total",
                         "Calls of the decode sidecar to a prefiller (x-prefiller-host-port), by outcome.",
                         [(f'{lb},outcome="{k}"', n) for k, n in self.pd_prefill_calls.items()]),
            counter_text("epp_model_server_pd_prefill_retries_total",
                         "Retries of the decode sidecar's calls to prefillers (502/503/504 or no connection).",
                         [(lb, self.pd_prefill_retries)]),
        ]
        parts.extend(h.render() for h in self._histograms)
        return "".join(parts)
