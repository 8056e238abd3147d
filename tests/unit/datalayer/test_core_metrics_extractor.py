"""`core-metrics-extractor`: engine choice by label, per-engine maps, LoRA and cache-info extraction,
disabled metrics, and the errors a user can cause."""

from __future__ import annotations

from typing import Any

import pytest

import plugins.core_metrics_extractor  # noqa: F401  (registers the plugin type)
from epp.datalayer.engines import BUILTIN_ENGINES, EngineConfig, EngineMetrics
from epp.datastore.endpoint import Endpoint, Metrics
from epp.scheduling import registry
from epp.scheduling.registry import ConfigError, PluginHandle

from .expositions import sglang_exposition, vllm_exposition

GIE_KEY = "inference.networking.k8s.io/engine-type"
LLMD_KEY = "llm-d.ai/engine-type"


def make(parameters: dict[str, Any] | None = None):
    return registry.create("core-metrics-extractor", "core", parameters, PluginHandle(), where="config.yaml")


def ep(labels: dict[str, str] | None = None, name: str = "pod-a") -> Endpoint:
    return Endpoint(name=name, address="127.0.0.2", port=8000, labels=dict(labels or {}))


# ---------------------------------------------------------------------------------------------------------
# vLLM


def test_vllm_page_maps_to_a_metrics_snapshot():
    page = vllm_exposition(waiting=3, running=9, kv=0.42, block_size=32, num_gpu_blocks=1234)
    m = make().extract(page, ep(), now=123.5)
    assert m == Metrics(
        waiting_queue_size=3,
        running_requests_size=9,
        kv_cache_usage_percent=0.42,
        cache_block_size=32,
        cache_num_blocks=1234,
        update_time=123.5,
    )


def test_lora_info_comes_from_the_series_with_the_largest_value():
    page = vllm_exposition(
        lora_series=[
            (1700000001.0, "old-a,old-b", "", 4),
            (1700000009.0, "sql-lora,chat-lora", "queued-lora", 8),  # newest update: this one wins
            (1700000005.0, "mid", "mid-w", 2),
        ]
    )
    m = make().extract(page, ep(), now=1.0)
    assert m.active_models == frozenset({"sql-lora", "chat-lora"})
    assert m.waiting_models == frozenset({"queued-lora"})
    assert m.max_active_models == 8


def test_empty_adapter_lists_give_empty_sets():
    m = make().extract(vllm_exposition(lora_series=[(1.0, "", "", 4)]), ep(), now=1.0)
    assert (m.active_models, m.waiting_models, m.max_active_models) == (frozenset(), frozenset(), 4)


def test_a_server_without_lora_has_no_adapters_and_no_error():
    m = make().extract(vllm_exposition(lora_series=None), ep(), now=1.0)
    assert (m.active_models, m.waiting_models, m.max_active_models) == (frozenset(), frozenset(), 0)


def test_cache_geometry_not_yet_known_reads_as_zero():
    # vLLM writes num_gpu_blocks="None" before the KV cache is sized.
    m = make().extract(vllm_exposition(num_gpu_blocks="None"), ep(), now=1.0)
    assert (m.cache_block_size, m.cache_num_blocks) == (16, 0)


def test_each_extraction_returns_a_new_snapshot_with_the_time_given():
    extractor = make()
    first = extractor.extract(vllm_exposition(waiting=1), ep(), now=10.0)
    second = extractor.extract(vllm_exposition(waiting=2), ep(), now=10.05)
    assert first is not second
    assert (first.waiting_queue_size, first.update_time) == (1, 10.0)
    assert (second.waiting_queue_size, second.update_time) == (2, 10.05)


# ---------------------------------------------------------------------------------------------------------
# Engine choice


@pytest.mark.parametrize(
    ("labels", "expected_queue"),
    [
        ({}, 3),  # defaultEngine vllm
        ({GIE_KEY: "vllm"}, 3),
        ({GIE_KEY: "sglang"}, 5),
        ({LLMD_KEY: "sglang"}, 5),  # llm-d's label when the primary one is absent
        ({GIE_KEY: "vllm", LLMD_KEY: "sglang"}, 3),  # the primary label wins
        ({GIE_KEY: "", LLMD_KEY: "sglang"}, 5),  # an empty primary label counts as absent
    ],
)
def test_the_engine_is_chosen_by_the_endpoint_label(labels, expected_queue):
    page = vllm_exposition(waiting=3) + sglang_exposition(queue=5)
    assert make().extract(page, ep(labels), now=1.0).waiting_queue_size == expected_queue


def test_a_custom_engine_label_key_is_read_first():
    extractor = make({"engineLabelKey": "example.com/engine"})
    page = vllm_exposition(waiting=3) + sglang_exposition(queue=5)
    assert (
        extractor.extract(
            page, ep({"example.com/engine": "sglang", GIE_KEY: "vllm"}), now=1.0
        ).waiting_queue_size
        == 5
    )
    # Without the custom label, the well-known labels are still honoured.
    assert extractor.extract(page, ep({GIE_KEY: "sglang"}), now=1.0).waiting_queue_size == 5


def test_default_engine_applies_to_unlabelled_endpoints():
    m = make({"defaultEngine": "sglang"}).extract(sglang_exposition(queue=2, running=6), ep(), now=1.0)
    assert (m.waiting_queue_size, m.running_requests_size) == (2, 6)


def test_an_unknown_engine_label_is_an_error_naming_it_and_the_known_engines():
    with pytest.raises(ValueError) as info:
        make().extract(vllm_exposition(), ep({GIE_KEY: "tgi"}), now=1.0)
    msg = str(info.value)
    assert "'tgi'" in msg and "pod-a" in msg
    for name in ("vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm"):
        assert name in msg


# ---------------------------------------------------------------------------------------------------------
# SGLang and the TensorRT-LLM engines


def test_sglang_page_maps_queue_running_token_usage_and_pages():
    page = sglang_exposition(queue=4, running=11, token_usage=0.75, page_size=16, num_pages=5000)
    m = make().extract(page, ep({GIE_KEY: "sglang"}), now=2.0)
    assert m == Metrics(
        waiting_queue_size=4,
        running_requests_size=11,
        kv_cache_usage_percent=0.75,
        cache_block_size=16,
        cache_num_blocks=5000,
        update_time=2.0,
    )


def test_trtllm_serve_reads_geometry_from_gauges():
    page = b"""# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting 2
trtllm_num_requests_running 7
trtllm_kv_cache_utilization 0.5
trtllm_kv_cache_tokens_per_block 64
trtllm_kv_cache_max_blocks 900
"""
    m = make().extract(page, ep({GIE_KEY: "trtllm-serve"}), now=3.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (2, 7, 0.5)
    assert (m.cache_block_size, m.cache_num_blocks) == (64, 900)


def test_triton_reads_series_chosen_by_label_matchers():
    page = b"""# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="ensemble",request_type="context"} 1
nv_trt_llm_request_metrics{model="ensemble",request_type="scheduled"} 6
nv_trt_llm_request_metrics{model="ensemble",request_type="waiting"} 3
nv_trt_llm_request_metrics{model="ensemble",request_type="max"} 64
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble"} 4096
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="ensemble"} 1024
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="ensemble"} 32
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="ensemble"} 0.25
"""
    m = make().extract(page, ep({GIE_KEY: "triton-tensorrt-llm"}), now=4.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (3, 6, 0.25)
    assert (m.cache_block_size, m.cache_num_blocks) == (32, 4096)


# ---------------------------------------------------------------------------------------------------------
# Missing and disabled metrics


@pytest.mark.parametrize(
    ("drop", "key"),
    [
        ("vllm:num_requests_waiting", "queuedRequestsSpec"),
        ("vllm:num_requests_running", "runningRequestsSpec"),
        ("vllm:kv_cache_usage_perc", "kvUsageSpec"),
    ],
)
def test_a_missing_required_metric_is_an_error_naming_the_metric_and_the_endpoint(drop, key):
    page = b"".join(
        line + b"\n" for line in vllm_exposition().splitlines() if not line.startswith(drop.encode())
    )
    with pytest.raises(ValueError) as info:
        make().extract(page, ep(name="pod-7"), now=1.0)
    msg = str(info.value)
    assert drop in msg and key in msg
    assert "pod-7" in msg and "127.0.0.2:8000" in msg


def test_a_page_of_another_engine_fails_on_the_first_required_metric():
    with pytest.raises(ValueError, match="vllm:num_requests_waiting"):
        make().extract(sglang_exposition(), ep(), now=1.0)


def test_series_present_but_not_matching_the_labels_say_so():
    extractor = make({"defaultEngine": "triton-tensorrt-llm"})
    page = b'nv_trt_llm_request_metrics{request_type="context"} 1\n'
    with pytest.raises(ValueError, match="none matches the labels"):
        extractor.extract(page, ep(), now=1.0)


def test_a_nan_gauge_is_an_error():
    page = (
        vllm_exposition()
        .replace(b"vllm:kv_cache_usage_perc{", b"vllm:kv_cache_usage_perc_x{")
        .replace(
            b"# TYPE vllm:kv_cache_usage_perc gauge\n",
            b"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc NaN\n",
        )
    )
    with pytest.raises(ValueError, match="NaN"):
        make().extract(page, ep(), now=1.0)


def test_an_engine_config_replaces_the_builtin_wholesale_and_empty_specs_disable_metrics():
    extractor = make(
        {
            "engineConfigs": [
                {
                    "name": "vllm",
                    "queuedRequestsSpec": "vllm:num_requests_waiting",
                    "runningRequestsSpec": "vllm:num_requests_running",
                    "kvUsageSpec": "",  # disabled: not required, reads as 0
                    "loraSpec": "",  # disabled: LoRA series are ignored
                }
            ]
        }
    )
    page = vllm_exposition(waiting=4, running=1, kv=0.9, lora_series=[(1.0, "a", "b", 2)])
    page = b"".join(line + b"\n" for line in page.splitlines() if b"kv_cache_usage_perc" not in line)
    m = extractor.extract(page, ep(), now=1.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (4, 1, 0.0)
    assert (m.active_models, m.max_active_models) == (frozenset(), 0)
    # Wholesale: the built-in cacheInfoSpec was not restated, so cache geometry is not read either.
    assert (m.cache_block_size, m.cache_num_blocks) == (0, 0)


def test_an_engine_config_can_add_an_engine_with_its_own_names():
    extractor = make(
        {
            "engineConfigs": [
                {
                    "name": "my-engine",
                    "queuedRequestsSpec": 'queue_depth{kind="pending"}',
                    "runningRequestsSpec": "active_requests",
                    "kvUsageSpec": "kv_fraction",
                    "cacheInfoSpec": "engine_info",
                    "cacheBlockSizeLabelName": "page",
                }
            ]
        }
    )
    page = b"""queue_depth{kind="done"} 100
queue_depth{kind="pending"} 6
active_requests 2
kv_fraction 0.3
engine_info{page="8",version="1"} 1
"""
    m = extractor.extract(page, ep({GIE_KEY: "my-engine"}), now=1.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (6, 2, 0.3)
    assert (m.cache_block_size, m.cache_num_blocks) == (8, 0)
    # The built-in engines remain.
    assert extractor.extract(vllm_exposition(waiting=1), ep(), now=1.0).waiting_queue_size == 1


def test_a_gauge_spec_for_cache_geometry_wins_over_the_info_label():
    cfg = EngineConfig(
        name="x",
        queued_requests_spec="q",
        cache_info_spec="info",
        cache_block_size_label_name="bs",
        cache_block_size_spec="block_size_gauge",
    )
    m = EngineMetrics(cfg).extract(b'q 1\ninfo{bs="16"} 1\nblock_size_gauge 64\n', now=1.0)
    assert m.cache_block_size == 64
    m = EngineMetrics(cfg).extract(b'q 1\ninfo{bs="16"} 1\n', now=1.0)
    assert m.cache_block_size == 16


# ---------------------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.parametrize(
    ("parameters", "complaint"),
    [
        ({"defaultEngine": "tgi"}, "'defaultEngine' is 'tgi'"),
        ({"engineLabelKey": ""}, "'engineLabelKey' must not be empty"),
        ({"engineConfigs": [{"queuedRequestsSpec": "q"}]}, "needs a `name`"),
        (
            {"engineConfigs": [{"name": "e", "queuedRequestsSpec": "q{"}]},
            "queuedRequestsSpec: invalid metric selector",
        ),
        (
            {"engineConfigs": [{"name": "e", "kvUsageSpec": "kv{a==b}"}]},
            "kvUsageSpec: invalid metric selector",
        ),
        ({"engineConfigs": [{"name": "e", "loraSpec": "9x"}]}, "loraSpec: invalid metric selector"),
        (
            {"engineConfigs": [{"name": "e", "queuedRequestsSpec": "q", "cacheBlockSizeLabelName": "bs"}]},
            "cacheInfoSpec, which is empty",
        ),
        ({"engineConfigs": [{"name": "e"}]}, "every spec is empty"),
        (
            {
                "engineConfigs": [
                    {"name": "e", "queuedRequestsSpec": "q"},
                    {"name": "e", "queuedRequestsSpec": "q"},
                ]
            },
            "names engine 'e' twice",
        ),
        (
            {"engineConfigs": [{"name": "e", "queuedRequestSpec": "q"}]},
            "unknown parameter 'queuedRequestSpec'",
        ),
        ({"engineConfigs": [{"name": "e", "queuedRequestsSpec": 5}]}, "expected a string"),
        ({"engineConfigs": {"name": "e"}}, "expected a list"),
        ({"engineType": "vllm"}, "unknown parameter 'engineType'"),
    ],
)
def test_bad_parameters_are_config_errors_naming_the_plugin_and_key(parameters, complaint):
    with pytest.raises(ConfigError) as info:
        make(parameters)
    msg = str(info.value)
    assert complaint in msg
    assert msg.startswith("config.yaml: plugin 'core'")


def test_a_custom_engine_may_be_the_default():
    extractor = make({"defaultEngine": "e", "engineConfigs": [{"name": "e", "queuedRequestsSpec": "q"}]})
    assert extractor.extract(b"q 3\n", ep(), now=1.0).waiting_queue_size == 3


def test_the_builtin_maps_use_the_reference_metric_names():
    assert BUILTIN_ENGINES["vllm"].queued_requests_spec == "vllm:num_requests_waiting"
    assert BUILTIN_ENGINES["vllm"].kv_usage_spec == "vllm:kv_cache_usage_perc"
    assert BUILTIN_ENGINES["vllm"].lora_spec == "vllm:lora_requests_info"
    assert BUILTIN_ENGINES["sglang"].kv_usage_spec == "sglang:token_usage"
    assert BUILTIN_ENGINES["trtllm-serve"].running_requests_spec == "trtllm_num_requests_running"
    assert "request_type" in BUILTIN_ENGINES["triton-tensorrt-llm"].queued_requests_spec
    for cfg in BUILTIN_ENGINES.values():
        cfg.validate()


def test_constructed_directly_with_no_parameters_it_uses_the_defaults():
    extractor = plugins.core_metrics_extractor.CoreMetricsExtractor("core")
    assert extractor.engine_label_key == GIE_KEY
    assert extractor.extract(vllm_exposition(running=2), ep(), now=1.0).running_requests_size == 2


@pytest.mark.parametrize("name,expected", [("vllm", (16, 25000)), ("my-engine", (16, 25000))])
def test_a_cache_info_spec_without_label_names_reads_the_builtin_or_vllm_labels(name, expected):
    """The reference's own example restates the vllm engine with `cacheInfoSpec` alone: the label names are
    those of the built-in engine of that name, or vLLM's for an engine we do not know."""
    specs = {"name": name, "queuedRequestsSpec": "vllm:num_requests_waiting",
             "runningRequestsSpec": "vllm:num_requests_running", "kvUsageSpec": "vllm:kv_cache_usage_perc",
             "cacheInfoSpec": "vllm:cache_config_info"}
    extractor = registry.create("core-metrics-extractor", "x", {"engineConfigs": [specs], "defaultEngine": name},
                                PluginHandle())
    page = (b"vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n"
            b'vllm:cache_config_info{block_size="16",num_gpu_blocks="25000"} 1\n')
    m = extractor.extract(page, Endpoint("a", "10.0.0.1", 8000), 1.0)
    assert (m.cache_block_size, m.cache_num_blocks) == expected
