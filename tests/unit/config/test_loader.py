"""Turning a config into wired plugin instances: creation, auto-added dependencies, profiles, the profile
handler, default pickers, parser, saturation detector, data layer, hooks, producer order and bind.

The plugins are the fakes of `fakes.py`; the defaults the loader adds are their `test-config-*` stand-ins
(FAKE_DEFAULTS), so these tests do not depend on the real plugins."""

from __future__ import annotations

import dataclasses

import pytest

from epp.config import ConfigError, EppConfig, implemented_points, load_config, load_config_file
from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle
from epp.scheduling.scheduler import SchedulerProfile

from . import fakes
from .fakes import FAKE_DEFAULTS
from .helpers import HEADER, HEADER_LINES, load, load_error


def profile(config: EppConfig, name: str = "default") -> SchedulerProfile:
    return config.scheduler.profiles[name]


def names(plugins) -> list[str]:
    return [p.name for p in plugins]


def weights(p: SchedulerProfile) -> list[tuple[str, float]]:
    return [(ws.scorer.name, ws.weight) for ws in p.scorers]


# --------------------------------------------------------------------------------------------------------
# Plugin instances


def test_plugin_name_defaults_to_type_and_instances_are_registered_on_the_handle():
    handle = PluginHandle()
    config = load(
        """
        plugins:
        - type: test-config-scorer
          parameters: {scale: 2.5}
        - name: picky
          type: test-config-picker
        """,
        handle,
    )
    scorer = config.plugins["test-config-scorer"]
    assert isinstance(scorer, fakes.FakeScorer)
    assert scorer.params == fakes.ScorerParams(scale=2.5)
    assert isinstance(config.plugins["picky"], fakes.FakePicker)
    assert handle.plugins == config.plugins
    assert all(handle.plugins[n] is p for n, p in config.plugins.items())


def test_duplicate_plugin_names_are_refused_naming_both_entries():
    message = load_error(
        """
        plugins:
        - type: test-config-scorer
        - name: test-config-scorer
          type: test-config-filter
        """
    )
    assert (
        f"plugins[1] (line {HEADER_LINES + 3}): plugin name 'test-config-scorer' is already used by"
        in message
    )
    assert "type 'test-config-scorer', plugins[0]" in message
    assert "unique `name`" in message


def test_unknown_plugin_type_is_refused_listing_the_known_types():
    message = load_error(
        """
        plugins:
        - type: test-config-scorrer
        """
    )
    assert f"plugins[0].type (line {HEADER_LINES + 2}): unknown plugin type 'test-config-scorrer'" in message
    assert "did you mean 'test-config-scorer'?" in message
    assert "known types: " in message and "test-config-filter" in message


def test_unknown_parameter_is_refused_naming_plugin_parameter_and_allowed_keys():
    message = load_error(
        """
        plugins:
        - name: s1
          type: test-config-scorer
          parameters:
            scael: 2
        """
    )
    assert f"plugins[0].parameters (line {HEADER_LINES + 4})" in message
    assert "plugin 's1' (type 'test-config-scorer')" in message
    assert "unknown parameter 'scael'; allowed: scale" in message


def test_wrongly_typed_parameter_is_refused():
    message = load_error(
        """
        plugins:
        - type: test-config-scorer
          parameters: {scale: high}
        """
    )
    assert (
        "plugins[0].parameters" in message and "parameter 'scale': expected a number, got 'high'" in message
    )


def test_a_value_refused_by_the_plugin_constructor_becomes_a_config_error_with_location():
    message = load_error(
        """
        plugins:
        - type: test-config-refusing
          parameters: {limit: 11}
        """
    )
    assert "plugins[0].parameters" in message
    assert "plugin 'test-config-refusing' (type 'test-config-refusing'): limit 11 is above 10" in message


# --------------------------------------------------------------------------------------------------------
# Auto-added dependencies (`requires`)


def test_required_plugin_is_added_with_the_parameters_it_accepts():
    config = load(
        """
        plugins:
        - type: test-config-prefix-scorer
          parameters: {blockSize: 64, lruCapacity: 7, boost: 0.5}
        """
    )
    producer = config.plugins["test-config-prefix-producer"]
    assert isinstance(producer, fakes.FakePrefixProducer)
    # `boost` belongs to the scorer only: the producer gets the keys its Params accept.
    assert producer.params == fakes.ProducerParams(block_size=64, lru_capacity=7)
    assert list(config.plugins)[:2] == ["test-config-prefix-scorer", "test-config-prefix-producer"]
    assert config.producers == [producer]
    assert producer in config.pre_request


def test_required_plugin_is_not_added_when_an_instance_of_its_type_is_declared():
    config = load(
        """
        plugins:
        - type: test-config-prefix-scorer
          parameters: {blockSize: 64}
        - name: my-producer
          type: test-config-prefix-producer
          parameters: {blockSize: 32}
        """
    )
    assert "test-config-prefix-producer" not in config.plugins
    assert config.plugins["my-producer"].params.block_size == 32
    assert names(config.producers) == ["my-producer"]


def test_two_plugins_requiring_the_same_type_share_one_auto_added_instance():
    config = load(
        """
        plugins:
        - name: a
          type: test-config-prefix-scorer
          parameters: {blockSize: 8}
        - name: b
          type: test-config-prefix-scorer
          parameters: {blockSize: 99}
        """
    )
    producers = [p for p in config.plugins.values() if isinstance(p, fakes.FakePrefixProducer)]
    assert len(producers) == 1
    assert producers[0].params.block_size == 8  # from the first plugin that requires it


def test_requirements_are_followed_transitively():
    config = load("plugins:\n- type: test-config-chain-start\n")
    assert list(config.plugins)[:3] == [
        "test-config-chain-start",
        "test-config-chain-middle",
        "test-config-chain-end",
    ]


def test_requirements_of_plugins_added_by_default_are_added_too():
    config = load_config(
        HEADER,
        "--config-text",
        PluginHandle(),
        defaults=dataclasses.replace(FAKE_DEFAULTS, parser="test-config-needy-parser"),
        builtin_plugins=False,
    )
    assert isinstance(config.parser, fakes.FakeNeedyParser)
    assert list(config.plugins)[-1] == "test-config-chain-end"


def test_requiring_an_unregistered_type_is_refused():
    message = load_error("plugins:\n- type: test-config-needs-unknown\n")
    assert "plugins[0]" in message
    assert "requires plugin type 'test-config-never-registered', which is not registered" in message


def test_auto_added_plugin_whose_name_is_taken_is_refused():
    message = load_error(
        """
        plugins:
        - type: test-config-prefix-scorer
        - name: test-config-prefix-producer
          type: test-config-filter
        """
    )
    assert "auto-added 'test-config-prefix-producer', required by 'test-config-prefix-scorer'" in message
    assert "the name 'test-config-prefix-producer' it would get is used by" in message
    assert "type 'test-config-filter', plugins[1]" in message


# --------------------------------------------------------------------------------------------------------
# Scheduling profiles


def test_without_profiles_one_default_profile_takes_every_filter_scorer_and_picker():
    config = load(
        """
        plugins:
        - type: test-config-scorer
        - type: test-config-filter
        - type: test-config-detector
        - type: test-config-other-picker
        - type: test-config-filter-scorer
        - type: test-config-hooks
        """
    )
    assert list(config.scheduler.profiles) == ["default"]
    p = profile(config)
    # A declared detector is also a Filter, so it filters too (as in the reference EPP).
    assert names(p.filters) == ["test-config-filter", "test-config-detector", "test-config-filter-scorer"]
    assert weights(p) == [("test-config-scorer", 1.0), ("test-config-filter-scorer", 1.0)]
    assert p.picker is config.plugins["test-config-other-picker"]


def test_an_empty_profile_list_is_the_same_as_none():
    config = load("plugins:\n- type: test-config-scorer\nschedulingProfiles: []\n")
    assert list(config.scheduler.profiles) == ["default"]
    assert weights(profile(config)) == [("test-config-scorer", 1.0)]


def test_without_profiles_several_pickers_are_refused():
    message = load_error(
        """
        plugins:
        - type: test-config-picker
        - type: test-config-other-picker
        """
    )
    assert "schedulingProfiles: no schedulingProfiles are written" in message
    assert "several pickers are defined (test-config-picker, test-config-other-picker)" in message


def test_profile_keeps_filter_order_and_weights_and_defaults_weight_to_one():
    config = load(
        """
        plugins:
        - {name: f1, type: test-config-filter}
        - {name: f2, type: test-config-filter}
        - {name: s1, type: test-config-scorer}
        - {name: s2, type: test-config-scorer}
        - {name: s3, type: test-config-scorer}
        schedulingProfiles:
        - name: main
          plugins:
          - pluginRef: f2
          - pluginRef: s1
            weight: 2.5
          - pluginRef: f1
          - pluginRef: s2
          - pluginRef: s3
            weight: 0
        """
    )
    p = profile(config, "main")
    assert names(p.filters) == ["f2", "f1"]
    assert weights(p) == [("s1", 2.5), ("s2", 1.0), ("s3", 0.0)]


def test_a_plugin_that_is_filter_and_scorer_is_used_as_both():
    config = load(
        """
        plugins:
        - type: test-config-filter-scorer
        schedulingProfiles:
        - name: p
          plugins:
          - pluginRef: test-config-filter-scorer
            weight: 3
        """
    )
    fs = config.plugins["test-config-filter-scorer"]
    assert profile(config, "p").filters == [fs]
    assert weights(profile(config, "p")) == [("test-config-filter-scorer", 3.0)]


def test_dangling_plugin_ref_is_refused_naming_the_ref_and_the_defined_plugins():
    message = load_error(
        """
        plugins:
        - type: test-config-scorer
        - type: test-config-filter
        schedulingProfiles:
        - name: p
          plugins:
          - pluginRef: test-config-filter
          - pluginRef: test-config-scorre
        """
    )
    assert f"schedulingProfiles[0].plugins[1].pluginRef (line {HEADER_LINES + 8})" in message
    assert "pluginRef 'test-config-scorre' names no defined plugin" in message
    assert "did you mean 'test-config-scorer'?" in message
    assert "defined plugins: test-config-scorer, test-config-filter" in message


@pytest.mark.parametrize(
    ("plugin_type", "implements"),
    [
        ("test-config-parser", "it implements: Parser"),
        ("test-config-inert", "it implements: no extension point"),
        ("test-config-multi-handler", "it implements: ProfileHandler"),
    ],
)
def test_profile_entry_must_be_a_filter_scorer_or_picker(plugin_type, implements):
    message = load_error(
        f"""
        plugins:
        - {{name: x, type: {plugin_type}}}
        schedulingProfiles:
        - name: p
          plugins:
          - pluginRef: x
        """
    )
    assert "schedulingProfiles[0].plugins[0].pluginRef" in message
    assert f"plugin 'x' (type '{plugin_type}') cannot be part of a scheduling profile" in message
    assert "must be a Filter, Scorer or Picker" in message and implements in message


def test_two_pickers_in_a_profile_are_refused_naming_both():
    message = load_error(
        """
        plugins:
        - type: test-config-picker
        - type: test-config-other-picker
        schedulingProfiles:
        - name: p
          plugins:
          - pluginRef: test-config-picker
          - pluginRef: test-config-other-picker
        """
    )
    assert "schedulingProfiles[0].plugins[1].pluginRef" in message
    assert (
        "profile 'p' has more than one picker ('test-config-picker' and 'test-config-other-picker')"
        in message
    )


def test_weight_on_a_plugin_that_is_not_a_scorer_is_refused():
    message = load_error(
        """
        plugins:
        - type: test-config-filter
        schedulingProfiles:
        - name: p
          plugins:
          - pluginRef: test-config-filter
            weight: 2
        """
    )
    assert f"schedulingProfiles[0].plugins[0].weight (line {HEADER_LINES + 7})" in message
    assert "`weight` is only allowed on scorers" in message and "'test-config-filter'" in message


def test_duplicate_profile_names_are_refused():
    message = load_error(
        """
        plugins:
        - type: test-config-multi-handler
        schedulingProfiles:
        - name: p
        - name: p
        """
    )
    assert "schedulingProfiles[1]" in message
    assert "duplicate scheduling profile name 'p' (also schedulingProfiles[0])" in message


def test_a_plugin_listed_twice_in_one_profile_is_refused():
    message = load_error(
        """
        plugins:
        - type: test-config-scorer
        schedulingProfiles:
        - name: p
          plugins:
          - pluginRef: test-config-scorer
          - pluginRef: test-config-scorer
        """
    )
    assert "schedulingProfiles[0].plugins[1].pluginRef" in message
    assert "plugin 'test-config-scorer' is listed twice in profile 'p'" in message


# --------------------------------------------------------------------------------------------------------
# Profile handler and pickers


def test_one_profile_without_handler_gets_the_default_handler():
    config = load("plugins:\n- type: test-config-scorer\n")
    handler = config.plugins["test-config-single-handler"]
    assert isinstance(handler, fakes.FakeSingleHandler)
    assert config.scheduler.handler is handler


def test_several_profiles_without_handler_are_refused():
    message = load_error(
        """
        schedulingProfiles:
        - name: prefill
        - name: decode
        """
    )
    assert f"schedulingProfiles (line {HEADER_LINES + 1})" in message
    assert "2 scheduling profiles (prefill, decode) need a profile handler" in message


def test_several_profiles_with_a_declared_handler_load():
    config = load(
        """
        plugins:
        - type: test-config-multi-handler
        - type: test-config-filter
        schedulingProfiles:
        - name: prefill
          plugins:
          - pluginRef: test-config-filter
        - name: decode
        """
    )
    assert list(config.scheduler.profiles) == ["prefill", "decode"]
    assert config.scheduler.handler is config.plugins["test-config-multi-handler"]
    assert "test-config-single-handler" not in config.plugins


def test_handler_with_max_profiles_refuses_more_profiles():
    message = load_error(
        """
        plugins:
        - type: test-config-single-handler
        schedulingProfiles:
        - name: a
        - name: b
        """
    )
    assert "profile handler 'test-config-single-handler'" in message
    assert "takes at most 1 profile(s), but 2 are defined (a, b)" in message


def test_more_than_one_profile_handler_is_refused():
    message = load_error(
        """
        plugins:
        - type: test-config-multi-handler
        - type: test-config-single-handler
        """
    )
    assert "plugins[1]" in message
    assert "more than one profile handler is defined ('test-config-multi-handler'" in message
    assert "'test-config-single-handler'" in message and "keep exactly one" in message


def test_profiles_without_picker_get_the_only_picker_defined():
    config = load(
        """
        plugins:
        - type: test-config-multi-handler
        - type: test-config-other-picker
        schedulingProfiles:
        - name: a
        - name: b
        """
    )
    only = config.plugins["test-config-other-picker"]
    assert profile(config, "a").picker is only and profile(config, "b").picker is only
    assert "test-config-picker" not in config.plugins


def test_profiles_without_picker_share_one_default_picker_when_none_or_several_are_defined():
    config = load(
        """
        plugins:
        - type: test-config-multi-handler
        - {name: p1, type: test-config-other-picker}
        - {name: p2, type: test-config-other-picker}
        schedulingProfiles:
        - name: a
        - name: b
          plugins:
          - pluginRef: p2
        - name: c
        """
    )
    default = config.plugins["test-config-picker"]
    assert isinstance(default, fakes.FakePicker)
    assert profile(config, "a").picker is default and profile(config, "c").picker is default
    assert profile(config, "b").picker is config.plugins["p2"]


def test_empty_config_gets_a_default_picker_and_handler():
    config = load("plugins: []\n")
    assert profile(config).filters == [] and profile(config).scorers == []
    assert profile(config).picker is config.plugins["test-config-picker"]
    assert config.scheduler.handler is config.plugins["test-config-single-handler"]


# --------------------------------------------------------------------------------------------------------
# Parser, saturation detector, data layer


def test_defaults_for_parser_detector_and_data_layer_are_added_in_reference_order():
    config = load("plugins:\n- type: test-config-scorer\n")
    assert list(config.plugins) == [
        "test-config-scorer",
        "test-config-single-handler",
        "test-config-picker",
        "test-config-source",
        "test-config-extractor",
        "test-config-parser",
        "test-config-detector",
    ]
    assert config.parser is config.plugins["test-config-parser"]
    assert config.saturation_detector is config.plugins["test-config-detector"]
    assert config.data_sources == [
        (config.plugins["test-config-source"], [config.plugins["test-config-extractor"]])
    ]
    # The auto-added detector is a Filter, but it is not put into the default profile.
    assert profile(config).filters == []


def test_declared_default_types_are_reused_with_their_parameters():
    config = load(
        """
        plugins:
        - name: detector
          type: test-config-detector
          parameters: {queueDepthThreshold: 2}
        - {name: src, type: test-config-source}
        - {name: ex, type: test-config-extractor}
        - {name: parse, type: test-config-parser}
        schedulingProfiles:
        - name: default
        """
    )
    assert config.saturation_detector is config.plugins["detector"]
    assert config.saturation_detector.params.queue_depth_threshold == 2
    assert config.parser is config.plugins["parse"]
    assert config.data_sources == [(config.plugins["src"], [config.plugins["ex"]])]
    assert len(config.plugins) == 6  # + handler and picker; no second detector, parser, source or extractor


def test_explicit_references_are_used():
    config = load(
        """
        plugins:
        - {name: d2, type: test-config-detector}
        - {name: p2, type: test-config-parser}
        - {name: s2, type: test-config-source}
        - {name: e2, type: test-config-extractor}
        - {name: e3, type: test-config-extractor}
        schedulingProfiles:
        - name: default
        saturationDetector: {pluginRef: d2}
        parser: {pluginRef: p2}
        dataLayer:
          sources:
          - pluginRef: s2
            extractors:
            - pluginRef: e2
            - pluginRef: e3
        """
    )
    assert config.saturation_detector is config.plugins["d2"]
    assert config.parser is config.plugins["p2"]
    assert config.data_sources == [(config.plugins["s2"], [config.plugins["e2"], config.plugins["e3"]])]


def test_empty_data_layer_sources_turn_scraping_off():
    config = load("dataLayer:\n  sources: []\n")
    assert config.data_sources == []
    assert "test-config-source" not in config.plugins and "test-config-extractor" not in config.plugins


@pytest.mark.parametrize(
    ("text", "location", "what"),
    [
        ("parser: {pluginRef: s}\n", "parser.pluginRef", "is not a Parser"),
        (
            "saturationDetector: {pluginRef: s}\n",
            "saturationDetector.pluginRef",
            "is not a SaturationDetector",
        ),
        (
            "dataLayer:\n  sources:\n  - pluginRef: s\n    extractors: [{pluginRef: s}]\n",
            "dataLayer.sources[0].pluginRef",
            "is not a MetricsSource",
        ),
        (
            "dataLayer:\n  sources:\n  - pluginRef: test-config-source\n    extractors: [{pluginRef: s}]\n",
            "dataLayer.sources[0].extractors[0].pluginRef",
            "is not a MetricsExtractor",
        ),
    ],
)
def test_references_must_implement_the_matching_extension_point(text, location, what):
    message = load_error(
        "plugins:\n- {name: s, type: test-config-scorer}\n- type: test-config-source\n" + text
    )
    assert location in message
    assert f"plugin 's' (type 'test-config-scorer') {what} (it implements: Scorer)" in message


def test_dangling_parser_reference_is_refused():
    message = load_error("parser: {pluginRef: nope}\n")
    assert f"parser.pluginRef (line {HEADER_LINES + 1}): pluginRef 'nope' names no defined plugin" in message


def test_default_name_taken_by_another_type_is_refused():
    message = load_error(
        """
        plugins:
        - name: test-config-parser
          type: test-config-scorer
        """
    )
    assert "plugins[0]" in message
    assert "cannot add the default parser 'test-config-parser'" in message
    assert "rename that plugin or configure the parser explicitly" in message


# --------------------------------------------------------------------------------------------------------
# Hooks, producers, bind


def test_hooks_are_collected_from_every_instance_in_declaration_order():
    config = load(
        """
        plugins:
        - {name: h1, type: test-config-hooks}
        - {name: done, type: test-config-complete-only}
        - {name: h2, type: test-config-hooks}
        """
    )
    assert names(config.pre_request) == ["h1", "h2"]
    assert names(config.response_header_hooks) == ["h1", "h2"]
    assert names(config.response_body_hooks) == ["h1", "h2"]
    assert names(config.response_complete_hooks) == ["h1", "done", "h2"]


def test_producers_run_after_the_producers_of_what_they_consume():
    config = load(
        """
        plugins:
        - {name: scorer-input, type: test-config-keyed-producer, parameters: {consumes: [tokens, prefix]}}
        - {name: independent, type: test-config-keyed-producer}
        - name: prefix
          type: test-config-keyed-producer
          parameters: {produces: [prefix], consumes: [tokens]}
        - {name: tokenizer, type: test-config-keyed-producer, parameters: {produces: [tokens]}}
        """
    )
    assert names(config.producers) == ["independent", "tokenizer", "prefix", "scorer-input"]


def test_a_producer_reading_its_own_key_is_not_a_cycle():
    config = load(
        """
        plugins:
        - {name: a, type: test-config-keyed-producer, parameters: {consumes: [x]}}
        - {name: b, type: test-config-keyed-producer, parameters: {produces: [x], consumes: [x]}}
        """
    )
    assert names(config.producers) == ["b", "a"]


def test_producer_cycle_is_refused_naming_the_plugins():
    message = load_error(
        """
        plugins:
        - {name: a, type: test-config-keyed-producer, parameters: {produces: [x], consumes: [y]}}
        - {name: b, type: test-config-keyed-producer, parameters: {produces: [y], consumes: [x]}}
        """
    )
    assert "data producers depend on each other in a cycle" in message
    assert "a consumes 'y' produced by b" in message and "b consumes 'x' produced by a" in message


def test_bind_runs_after_every_plugin_is_created():
    config = load(
        """
        plugins:
        - {name: binder, type: test-config-binder, parameters: {target: test-config-parser}}
        """
    )
    binder = config.plugins["binder"]
    assert binder.target is config.plugins["test-config-parser"]
    assert binder.plugins_at_bind == list(config.plugins)


def test_bind_failure_names_the_plugin_and_source():
    message = load_error(
        """
        plugins:
        - {name: binder, type: test-config-binder, parameters: {target: missing}}
        """
    )
    assert f"plugins[0] (line {HEADER_LINES + 2}): plugin 'binder' (type 'test-config-binder')" in message
    assert "no plugin named 'missing' is defined" in message


def test_implemented_points_lists_every_extension_point():
    handle = PluginHandle()
    assert implemented_points(fakes.FakePrefixProducer("p", fakes.ProducerParams(), handle)) == [
        "DataProducer",
        "PreRequest",
        "ResponseHeaderHook",
        "ResponseBodyHook",
        "ResponseCompleteHook",
    ]
    assert implemented_points(fakes.FakeDetector("d", fakes.DetectorParams(), handle)) == [
        "Filter",
        "SaturationDetector",
    ]


def test_loaded_scheduler_schedules_with_the_configured_plugins():
    config = load(
        """
        plugins:
        - type: test-config-filter
        - type: test-config-scorer
        """
    )
    endpoints = [Endpoint("a", "127.0.0.2", 8000), Endpoint("b", "127.0.0.3", 8000)]
    request = LLMRequest("r1", "completions", "m", "m", {}, {}, 0, prompt="hi")
    result = config.scheduler.schedule(request, endpoints)
    assert result.primary_profile == "default"
    assert result.target_endpoints == (endpoints[0],)  # the fake picker takes the first of equal scores


# --------------------------------------------------------------------------------------------------------
# Files


def test_load_config_file_uses_the_path_as_source(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(HEADER + "plugins:\n- type: test-config-scorer\n")
    config = load_config_file(path, PluginHandle(), defaults=FAKE_DEFAULTS, builtin_plugins=False)
    assert config.source == str(path)
    assert "test-config-scorer" in config.plugins


def test_load_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(HEADER + "plugins:\n- type: test-config-nope\n")
    with pytest.raises(ConfigError, match=rf"^{path}: plugins\[0\]\.type \(line 4\): unknown plugin type"):
        load_config_file(path, PluginHandle(), defaults=FAKE_DEFAULTS, builtin_plugins=False)


def test_missing_config_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read the config file: No such file"):
        load_config_file(path, PluginHandle(), defaults=FAKE_DEFAULTS, builtin_plugins=False)


def test_inline_config_errors_name_config_text_as_source():
    with pytest.raises(
        ConfigError, match=r"^--config-text: featureGates\[0\] \(line 3\): unknown feature gate"
    ):
        load_config(HEADER + "featureGates: [nope]\n", "--config-text", PluginHandle(), builtin_plugins=False)
