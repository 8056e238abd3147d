"""/metrics text: vLLM names, types and labels, parsed with prometheus_client's own parser."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_model_server.cost_model import CostModel
from epp_model_server.metrics import EngineGauges, ServerMetrics, token_buckets

GAUGES = EngineGauges(num_running=3, num_waiting=2, kv_cache_usage=0.25, prefix_cache_queries=100,
                      prefix_cache_hits=40, num_preemptions=1, running_loras=["ad1", "ad2"], waiting_loras=["ad3"])
CACHE = {"block_size": "16", "num_gpu_blocks": "1024", "enable_prefix_caching": "True"}


def families(metrics: ServerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render())}


def make(max_loras=None) -> ServerMetrics:
    return ServerMetrics('m"odel', cache_config=CACHE, max_model_len=4096, max_loras=max_loras,
                         gauges=lambda: GAUGES, clock=lambda: 1234.5)


@pytest.mark.parametrize(
    ("family", "kind", "value"),
    [
        ("vllm:num_requests_running", "gauge", 3),
        ("vllm:num_requests_waiting", "gauge", 2),
        ("vllm:kv_cache_usage_perc", "gauge", 0.25),
        ("vllm:prefix_cache_queries", "counter", 100),
        ("vllm:prefix_cache_hits", "counter", 40),
        ("vllm:num_preemptions", "counter", 1),
        ("vllm:prompt_tokens", "counter", 0),
        ("vllm:generation_tokens", "counter", 0),
    ],
)
def test_engine_state_is_exported_under_vllm_names_and_types(family, kind, value):
    f = families(make())[family]
    assert f.type == kind
    (sample,) = f.samples
    assert sample.value == value
    assert sample.labels == {"engine": "0", "model_name": 'm"odel'}


def test_cache_config_info_carries_block_size_and_num_gpu_blocks():
    (sample,) = families(make())["vllm:cache_config_info"].samples
    assert sample.value == 1.0
    assert sample.labels["block_size"] == "16" and sample.labels["num_gpu_blocks"] == "1024"


def test_lora_requests_info_lists_adapters_and_is_stamped_with_the_time():
    (sample,) = families(make(max_loras=2))["vllm:lora_requests_info"].samples
    assert sample.labels == {"max_lora": "2", "running_lora_adapters": "ad1,ad2", "waiting_lora_adapters": "ad3"}
    assert sample.value == 1234.5


def test_lora_requests_info_is_absent_when_lora_is_disabled():
    assert "vllm:lora_requests_info" not in families(make())


def test_request_observations_land_in_histograms_and_counters():
    m = make()
    m.on_first_token(0.15, prompt_tokens=2000)
    m.on_token(None)
    m.on_token(0.012)
    m.on_finished(reason="length", arrival=0.0, first_scheduled=0.01, first_token=0.15, now=0.162,
                  prompt_tokens=2000, generation_tokens=2)
    fams = families(m)
    ttft = {(s.name, s.labels.get("le")): s.value for s in fams["vllm:time_to_first_token_seconds"].samples}
    assert ttft[("vllm:time_to_first_token_seconds_bucket", "0.1")] == 0
    assert ttft[("vllm:time_to_first_token_seconds_bucket", "0.25")] == 1
    assert ttft[("vllm:time_to_first_token_seconds_count", None)] == 1
    assert ttft[("vllm:time_to_first_token_seconds_sum", None)] == pytest.approx(0.15)
    itl = {s.name: s.value for s in fams["vllm:inter_token_latency_seconds"].samples}
    assert itl["vllm:inter_token_latency_seconds_count"] == 1
    success = {s.labels["finished_reason"]: s.value for s in fams["vllm:request_success"].samples}
    assert success == {"stop": 0, "length": 1, "abort": 0, "error": 0}
    assert fams["vllm:prompt_tokens"].samples[0].value == 2000
    assert fams["vllm:generation_tokens"].samples[0].value == 2
    for name in ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_prompt_tokens", "vllm:request_generation_tokens"):
        count = [s for s in fams[name].samples if s.name == name + "_count"]
        assert count[0].value == 1, name


def test_histogram_text_is_rerendered_after_new_observations():
    m = make()
    before = m.render()
    assert m.render() == before
    m.on_first_token(0.5, prompt_tokens=1)
    assert m.render() != before


def test_token_buckets_follow_the_1_2_5_series_up_to_the_limit():
    assert token_buckets(600) == (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)


def test_cost_model_defaults_give_8b_h100_figures():
    cost = CostModel()
    assert cost.step_seconds(0, 1) == pytest.approx(0.0101)  # ITL at batch 1
    assert cost.step_seconds(0, 50) == pytest.approx(0.015)  # ITL at batch 50
    assert 0.060 <= cost.step_seconds(1000, 0) <= 0.120  # TTFT of a 1k uncached prompt
    assert cost.step_seconds(0, 0) == 0.0
