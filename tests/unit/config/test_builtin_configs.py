"""Real plugins, real configs: our default profile, the reference EPP's default (as the Helm chart writes it
and as its effective form is written out), the reference's small examples and an llm-d benchmark config.

Fixtures are in testdata/; each says which reference section it comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from epp.config import ConfigError, EppConfig, load_config, load_config_file, load_profile, profile_names
from epp.datastore.endpoint import Endpoint, Metrics
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle

TESTDATA = Path(__file__).parent / "testdata"


def type_of(plugin: Any) -> str:
    return type(plugin).type


def summary(config: EppConfig) -> dict[str, Any]:
    """What section 4.3 of the reference notes fixes about the effective default configuration."""
    (name, profile), *others = config.scheduler.profiles.items()
    assert not others
    return {
        "plugins": {n: type_of(p) for n, p in config.plugins.items()},
        "profile": name,
        "filters": [type_of(f) for f in profile.filters],
        "scorers": [(type_of(ws.scorer), ws.weight) for ws in profile.scorers],
        "picker": type_of(profile.picker),
        "max_num_of_endpoints": profile.picker.max_num_of_endpoints,
        "handler": type_of(config.scheduler.handler),
        "producers": [type_of(p) for p in config.producers],
        "pre_request": [type_of(p) for p in config.pre_request],
        "parser": type_of(config.parser),
        "saturation_detector": type_of(config.saturation_detector),
        "data_sources": [(type_of(s), [type_of(e) for e in ex]) for s, ex in config.data_sources],
        "feature_gates": config.feature_gates,
    }


# The reference EPP's effective default (section 4.3) without the flow-control policies.
EFFECTIVE_DEFAULT = {
    "plugins": {
        "queue-scorer": "queue-scorer",
        "kv-cache-utilization-scorer": "kv-cache-utilization-scorer",
        "prefix-cache-scorer": "prefix-cache-scorer",
        "approx-prefix-cache-producer": "approx-prefix-cache-producer",
        "single-profile-handler": "single-profile-handler",
        "max-score-picker": "max-score-picker",
        "metrics-data-source": "metrics-data-source",
        "core-metrics-extractor": "core-metrics-extractor",
        "openai-parser": "openai-parser",
        "utilization-detector": "utilization-detector",
    },
    "profile": "default",
    "filters": [],
    "scorers": [("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0)],
    "picker": "max-score-picker",
    "max_num_of_endpoints": 1,
    "handler": "single-profile-handler",
    "producers": ["approx-prefix-cache-producer"],
    "pre_request": ["approx-prefix-cache-producer"],
    "parser": "openai-parser",
    "saturation_detector": "utilization-detector",
    "data_sources": [("metrics-data-source", ["core-metrics-extractor"])],
    "feature_gates": frozenset(),
}


def load_fixture(name: str) -> EppConfig:
    return load_config_file(TESTDATA / name, PluginHandle())


def test_default_profile_is_the_reference_effective_default():
    config = load_profile("default", PluginHandle())
    assert config.source == "built-in default profile"
    assert summary(config) == EFFECTIVE_DEFAULT


@pytest.mark.parametrize("fixture", ["gie-chart-default-plugins.yaml", "gie-effective-default.yaml"])
def test_reference_default_configs_load_to_the_effective_default(fixture):
    config = load_fixture(fixture)
    assert config.source == str(TESTDATA / fixture)
    assert summary(config) == EFFECTIVE_DEFAULT


def test_chart_data_source_parameters_reach_the_plugins():
    config = load_fixture("gie-chart-default-plugins.yaml")
    source, (extractor,) = config.data_sources[0]
    assert (source.scheme, source.path, source.insecure_skip_verify) == ("http", "/metrics", True)
    assert extractor.params.default_engine == "vllm"
    assert extractor.params.engine_label_key == "inference.networking.k8s.io/engine-type"


def test_prefix_scorer_parameters_reach_the_auto_added_producer():
    config = load_config(
        """
        apiVersion: llm-d.ai/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        - type: prefix-cache-scorer
          parameters: {blockSizeTokens: 64, lruCapacityPerServer: 1000, matchLengthWeight: 0.5}
        """.replace("\n        ", "\n"),
        "--config-text",
        PluginHandle(),
    )
    producer = config.plugins["approx-prefix-cache-producer"]
    assert (producer.params.block_size_tokens, producer.params.lru_capacity_per_server) == (64, 1000)
    assert config.plugins["prefix-cache-scorer"].params.match_length_weight == 0.5


def test_multi_endpoint_example_returns_three_endpoints():
    config = load_fixture("gie-multi-endpoint.yaml")
    picker = config.scheduler.profiles["default"].picker
    assert picker is config.plugins["max-score-picker"]
    assert picker.max_num_of_endpoints == 3


def test_disable_lora_scraping_example_restates_the_vllm_engine():
    config = load_fixture("gie-disable-lora-scraping.yaml")
    ((_, (extractor,)),) = config.data_sources
    (vllm,) = extractor.params.engine_configs
    assert vllm.name == "vllm" and vllm.lora_spec == ""
    assert vllm.queued_requests_spec == "vllm:num_requests_waiting"


def test_custom_detector_example_uses_the_declared_detector_outside_the_profile():
    config = load_fixture("gie-custom-detector.yaml")
    detector = config.saturation_detector
    assert detector is config.plugins["utilization-detector"]
    assert (detector.queue_depth_threshold, detector.kv_cache_util_threshold) == (2, 0.85)
    assert config.scheduler.profiles["default"].filters == []  # the profile lists only queue-scorer


def test_flow_control_example_is_refused_as_not_supported_yet():
    with pytest.raises(ConfigError) as info:
        load_fixture("gie-flow-control.yaml")
    message = str(info.value)
    assert message.startswith(f"{TESTDATA / 'gie-flow-control.yaml'}: featureGates[0] (line 5): ")
    assert "flow control is not supported yet" in message


def test_llm_d_estimated_config_loads_with_the_legacy_kv_cache_scorer_name():
    config = load_fixture("llm-d-estimated-prefix.yaml")
    kv = config.plugins["kv-cache-scorer"]
    assert kv.type == "kv-cache-utilization-scorer"
    weights = {ws.scorer.name: ws.weight for ws in config.scheduler.profiles["default"].scorers}
    assert weights == {"prefix-cache-scorer": 1.0, "kv-cache-scorer": 1.0, "queue-scorer": 1.0}
    producer = config.plugins["approx-prefix-cache-producer"]
    assert producer.params.max_prefix_blocks_to_match == 256 and producer.params.lru_capacity_per_server == 31250


def test_real_plugin_with_unknown_parameter_is_refused_naming_it():
    with pytest.raises(ConfigError) as info:
        load_config(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
            "- type: max-score-picker\n  parameters: {maxNumOfEndpoint: 2}\n",
            "--config-text",
            PluginHandle(),
        )
    message = str(info.value)
    assert message.startswith("--config-text: plugins[0].parameters (line 5): plugin 'max-score-picker'")
    assert "unknown parameter 'maxNumOfEndpoint'; allowed: maxNumOfEndpoints" in message


def test_unknown_builtin_profile_lists_the_known_ones():
    assert "default" in profile_names()
    with pytest.raises(
        ConfigError,
        match=r"unknown built-in profile 'defualt'; did you mean 'default'\?; known profiles: .*default",
    ):
        load_profile("defualt", PluginHandle())
    with pytest.raises(ConfigError, match=r"unknown built-in profile '../default'"):
        load_profile("../default", PluginHandle())


def test_default_profile_routes_away_from_the_loaded_endpoint():
    config = load_profile("default", PluginHandle())
    busy = Endpoint(
        "busy", "127.0.0.2", 8000, metrics=Metrics(waiting_queue_size=8, kv_cache_usage_percent=0.9)
    )
    idle = Endpoint(
        "idle", "127.0.0.3", 8000, metrics=Metrics(waiting_queue_size=0, kv_cache_usage_percent=0.1)
    )
    request = LLMRequest("r1", "completions", "m", "m", {"prompt": "hi"}, {}, 20, prompt="hi")
    for producer in config.producers:
        producer.prepare(request, [busy, idle])
    result = config.scheduler.schedule(request, [busy, idle])
    assert result.target_endpoints == (idle,)
