"""Builders of realistic Prometheus expositions, shaped like what vLLM (prometheus_client) and SGLang serve.

`vllm_exposition()` with its defaults is about 40 KB: the process/GC families, vLLM's gauges and counters
(each counter with its `_created` twin), and vLLM's histogram families with their real bucket boundaries,
every sample labelled `engine` and `model_name`. The extractor needs six families out of all that, which is
what makes the selective parser worth having.
"""

from __future__ import annotations

import random

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_TOKEN_BUCKETS = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
    20000,
    50000,
    100000,
    131072,
)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)

# (family, help, buckets)
VLLM_HISTOGRAMS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _LATENCY_BUCKETS),
    ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", _TPOT_BUCKETS),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _TPOT_BUCKETS),
    (
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        _REQUEST_LATENCY_BUCKETS,
    ),
    (
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        _REQUEST_LATENCY_BUCKETS,
    ),
    (
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        _REQUEST_LATENCY_BUCKETS,
    ),
    (
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        _REQUEST_LATENCY_BUCKETS,
    ),
    (
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        _REQUEST_LATENCY_BUCKETS,
    ),
    ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKEN_BUCKETS),
    ("vllm:request_generation_tokens", "Number of generation tokens processed.", _TOKEN_BUCKETS),
    ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", _ITERATION_BUCKETS),
    (
        "vllm:request_max_num_generation_tokens",
        "Histogram of maximum number of requested generation tokens.",
        _TOKEN_BUCKETS,
    ),
    ("vllm:request_params_n", "Histogram of the n request parameter.", _N_BUCKETS),
    ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", _TOKEN_BUCKETS),
)

_COUNTERS = (
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    ("vllm:prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "Number of generation tokens processed."),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
)


def _fmt(v: float) -> str:
    # prometheus_client writes floats with repr(); integers as e.g. "3.0".
    return repr(float(v))


def _le(v: float) -> str:
    return repr(float(v))


def _process_families(rng: random.Random) -> list[str]:
    out = []
    out.append("# HELP python_gc_objects_collected_total Objects collected during gc")
    out.append("# TYPE python_gc_objects_collected_total counter")
    for gen in range(3):
        out.append(f'python_gc_objects_collected_total{{generation="{gen}"}} {_fmt(rng.randint(100, 90000))}')
    out.append("# HELP python_gc_collections_total Number of times this generation was collected")
    out.append("# TYPE python_gc_collections_total counter")
    for gen in range(3):
        out.append(f'python_gc_collections_total{{generation="{gen}"}} {_fmt(rng.randint(10, 9000))}')
    out.append("# HELP python_info Python platform information")
    out.append("# TYPE python_info gauge")
    out.append(
        'python_info{implementation="CPython",major="3",minor="12",patchlevel="9",version="3.12.9"} 1.0'
    )
    for name, help_ in (
        ("process_virtual_memory_bytes", "Virtual memory size in bytes."),
        ("process_resident_memory_bytes", "Resident memory size in bytes."),
        ("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
        ("process_cpu_seconds_total", "Total user and system CPU time spent in seconds."),
        ("process_open_fds", "Number of open file descriptors."),
        ("process_max_fds", "Maximum number of open file descriptors."),
    ):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
        out.append(f"{name} {_fmt(rng.uniform(1, 1e10))}")
    return out


def vllm_exposition(
    *,
    waiting: int = 2,
    running: int = 5,
    kv: float = 0.25,
    lora_series: list[tuple[float, str, str, int]] | None = None,
    block_size: int = 16,
    num_gpu_blocks: int | str = 27912,
    model: str = MODEL,
    engine: str = "0",
    histograms: bool = True,
    seed: int = 7,
) -> bytes:
    """A vLLM v1 `/metrics` page. `lora_series` is a list of (value, running, waiting, max_lora); None
    means vLLM was started without LoRA and has no `vllm:lora_requests_info` family."""
    rng = random.Random(seed)
    common = f'engine="{engine}",model_name="{model}"'
    out = _process_families(rng)

    def gauge(name: str, help_: str, value: float) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} gauge")
        out.append(f"{name}{{{common}}} {_fmt(value)}")

    gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running)
    gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
    gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv)
    if lora_series is not None:
        out.append("# HELP vllm:lora_requests_info Running stats on lora requests.")
        out.append("# TYPE vllm:lora_requests_info gauge")
        for value, run, wait, max_lora in lora_series:
            out.append(
                f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{run}",'
                f'waiting_lora_adapters="{wait}"}} {_fmt(value)}'
            )
    out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
    out.append("# TYPE vllm:cache_config_info gauge")
    out.append(
        f'vllm:cache_config_info{{block_size="{block_size}",cache_dtype="auto",calculate_kv_scales="False",'
        f'cpu_offload_gb="0",enable_prefix_caching="True",engine="{engine}",gpu_memory_utilization="0.9",'
        f'is_attention_free="False",num_cpu_blocks="None",num_gpu_blocks="{num_gpu_blocks}",'
        f'num_gpu_blocks_override="None",prefix_caching_hash_algo="sha256",sliding_window="None",'
        f'swap_space="4",swap_space_bytes="4294967296"}} 1.0'
    )
    for name, help_ in _COUNTERS:
        out.append(f"# HELP {name}_total {help_}")
        out.append(f"# TYPE {name}_total counter")
        out.append(f"{name}_total{{{common}}} {_fmt(rng.randint(0, 10**7))}")
        out.append(f"# HELP {name}_created {help_}")
        out.append(f"# TYPE {name}_created gauge")
        out.append(f"{name}_created{{{common}}} {_fmt(1.7e9 + rng.random())}")
    out.append("# HELP vllm:request_success_total Count of successfully processed requests.")
    out.append("# TYPE vllm:request_success_total counter")
    for reason in ("stop", "length", "abort"):
        out.append(
            f'vllm:request_success_total{{{common},finished_reason="{reason}"}} {_fmt(rng.randint(0, 9999))}'
        )
    if histograms:
        for name, help_, buckets in VLLM_HISTOGRAMS:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            count = 0
            for b in buckets:
                count += rng.randint(0, 500)
                out.append(
                    f'{name}_bucket{{engine="{engine}",le="{_le(b)}",model_name="{model}"}} {_fmt(count)}'
                )
            out.append(f'{name}_bucket{{engine="{engine}",le="+Inf",model_name="{model}"}} {_fmt(count)}')
            out.append(f"{name}_count{{{common}}} {_fmt(count)}")
            out.append(f"{name}_sum{{{common}}} {_fmt(rng.uniform(0, 1e5))}")
            out.append(f"# HELP {name}_created {help_}")
            out.append(f"# TYPE {name}_created gauge")
            out.append(f"{name}_created{{{common}}} {_fmt(1.7e9 + rng.random())}")
    return ("\n".join(out) + "\n").encode()


def sglang_exposition(
    *, queue: int = 1, running: int = 4, token_usage: float = 0.5, page_size: int = 1, num_pages: int = 200000
) -> bytes:
    """An SGLang `/metrics` page (the families the extractor reads, plus a histogram to skip)."""
    labels = f'model_name="{MODEL}"'
    lines = [
        "# HELP sglang:num_running_reqs The number of running requests.",
        "# TYPE sglang:num_running_reqs gauge",
        f"sglang:num_running_reqs{{{labels}}} {_fmt(running)}",
        "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.",
        "# TYPE sglang:num_queue_reqs gauge",
        f"sglang:num_queue_reqs{{{labels}}} {_fmt(queue)}",
        "# HELP sglang:token_usage The token usage.",
        "# TYPE sglang:token_usage gauge",
        f"sglang:token_usage{{{labels}}} {_fmt(token_usage)}",
        "# HELP sglang:cache_config_info Cache configuration.",
        "# TYPE sglang:cache_config_info gauge",
        f'sglang:cache_config_info{{{labels},num_pages="{num_pages}",page_size="{page_size}"}} 1.0',
        "# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# TYPE sglang:time_to_first_token_seconds histogram",
    ]
    for b in _LATENCY_BUCKETS:
        lines.append(f'sglang:time_to_first_token_seconds_bucket{{le="{_le(b)}",{labels}}} 3.0')
    lines.append(f'sglang:time_to_first_token_seconds_bucket{{le="+Inf",{labels}}} 3.0')
    return ("\n".join(lines) + "\n").encode()
