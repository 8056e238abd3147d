"""The shape of an EndpointPickerConfig: strict keys, types, apiVersion/kind, feature gates, YAML errors.

Every refusal names the source, the key path (with its line) and what is allowed."""

from __future__ import annotations

import pytest

from .helpers import HEADER_LINES, SOURCE, load, load_error


@pytest.mark.parametrize("api_version", ["inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1"])
def test_both_api_versions_load(api_version):
    config = load(
        f"""
        apiVersion: {api_version}
        kind: EndpointPickerConfig
        plugins:
        - type: test-config-scorer
        """,
        header=False,
    )
    assert config.source == SOURCE
    assert "test-config-scorer" in config.plugins


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the config is empty"),
        ("# only a comment\n", "the config is empty"),
        ("- a\n- b\n", "must be a mapping"),
        (
            "kind: EndpointPickerConfig\n",
            "apiVersion is missing; allowed: inference.networking.x-k8s.io/v1alpha1, llm-d.ai/v1alpha1",
        ),
        ("apiVersion: llm-d.ai/v1alpha1\n", "kind is missing; allowed: EndpointPickerConfig"),
    ],
)
def test_documents_that_are_not_a_config_are_refused(text, expected):
    assert expected in load_error(text, header=False)


def test_unsupported_api_version_names_the_value_and_the_allowed_ones():
    message = load_error(
        """
        apiVersion: config.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        """,
        header=False,
    )
    assert "apiVersion (line 1)" in message
    assert "'config.x-k8s.io/v1alpha1'" in message
    assert "inference.networking.x-k8s.io/v1alpha1, llm-d.ai/v1alpha1" in message


def test_wrong_kind_is_refused():
    message = load_error(
        """
        apiVersion: llm-d.ai/v1alpha1
        kind: InferencePool
        """,
        header=False,
    )
    assert "kind (line 2): unsupported kind 'InferencePool'; allowed: EndpointPickerConfig" in message


def test_yaml_syntax_error_reports_line_and_column():
    message = load_error(
        """
        plugins:
        - type: [queue-scorer
        """
    )
    assert message.startswith(f"{SOURCE}: invalid YAML at line {HEADER_LINES + 3}"), message


def test_duplicate_yaml_key_is_refused_with_both_lines():
    message = load_error(
        """
        plugins: []
        plugins: []
        """
    )
    assert "duplicate key 'plugins'" in message
    assert f"first written on line {HEADER_LINES + 1}" in message
    assert f"line {HEADER_LINES + 2}" in message


def test_more_than_one_yaml_document_is_refused():
    assert "expected a single document" in load_error("plugins: []\n---\nplugins: []\n")


@pytest.mark.parametrize(
    ("text", "location", "key", "allowed"),
    [
        (
            "schedulingProfile: []\n",
            f"schedulingProfile (line {HEADER_LINES + 1})",
            "'schedulingProfile'",
            "allowed: apiVersion, kind, plugins, schedulingProfiles, featureGates, saturationDetector, "
            "dataLayer, parser, flowControl; did you mean 'schedulingProfiles'?",
        ),
        (
            "plugins:\n- type: test-config-scorer\n  paramters: {}\n",
            f"plugins[0].paramters (line {HEADER_LINES + 3})",
            "'paramters'",
            "allowed: name, type, parameters; did you mean 'parameters'?",
        ),
        (
            "schedulingProfiles:\n- name: a\n  plugin: []\n",
            "schedulingProfiles[0].plugin",
            "'plugin'",
            "allowed: name, plugins; did you mean 'plugins'?",
        ),
        (
            "schedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: x\n    wieght: 2\n",
            f"schedulingProfiles[0].plugins[0].wieght (line {HEADER_LINES + 5})",
            "'wieght'",
            "allowed: pluginRef, weight; did you mean 'weight'?",
        ),
        (
            "parser: {pluginRef: p, type: x}\n",
            "parser.type",
            "'type'",
            "allowed: pluginRef",
        ),
        (
            "dataLayer: {sources: [], data: 1}\n",
            "dataLayer.data",
            "'data'",
            "allowed: sources",
        ),
        (
            "dataLayer:\n  sources:\n  - pluginRef: s\n    extractor: []\n",
            "dataLayer.sources[0].extractor",
            "'extractor'",
            "allowed: pluginRef, extractors; did you mean 'extractors'?",
        ),
    ],
)
def test_unknown_keys_are_refused_naming_the_key_and_the_allowed_ones(text, location, key, allowed):
    message = load_error(text)
    assert f"{SOURCE}: {location}" in message
    assert f"unknown key {key}" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plugins: {type: x}\n", "plugins (line 3): plugins must be a list; got a mapping"),
        ("plugins:\n- queue-scorer\n", "plugins[0] (line 4): a plugin entry must be a mapping"),
        ("plugins:\n- name: x\n", "plugins[0] (line 4): a plugin entry needs `type`"),
        ("plugins:\n- type: ''\n", "plugins[0].type (line 4): type must be a non-empty string"),
        (
            "plugins:\n- type: test-config-scorer\n  parameters: [1]\n",
            "plugins[0].parameters (line 5): parameters must be a mapping; got a list",
        ),
        (
            "schedulingProfiles:\n- plugins: []\n",
            "schedulingProfiles[0] (line 4): a scheduling profile needs `name`",
        ),
        (
            "schedulingProfiles:\n- name: a\n  plugins:\n  - weight: 1\n",
            "schedulingProfiles[0].plugins[0] (line 6): a profile plugin entry needs `pluginRef`",
        ),
        ("saturationDetector: {}\n", "saturationDetector (line 3): saturationDetector needs `pluginRef`"),
        ("dataLayer: {}\n", "dataLayer (line 3): dataLayer needs `sources`"),
        (
            "dataLayer:\n  sources:\n  - pluginRef: s\n",
            "dataLayer.sources[0] (line 5): data source 's' needs at least one entry under `extractors`",
        ),
        ("featureGates: dataLayer\n", "featureGates (line 3): featureGates must be a list"),
    ],
)
def test_malformed_entries_are_refused_with_their_location(text, expected):
    assert f"{SOURCE}: {expected}" in load_error(text)


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        ("'2'", "weight must be a number >= 0; got '2' (str)"),
        ("true", "weight must be a number >= 0; got True (bool)"),
        ("-1", "weight must be a number >= 0; got -1"),
        (".nan", "weight must be a number >= 0; got nan"),
    ],
)
def test_weight_must_be_a_non_negative_number(weight, expected):
    message = load_error(
        f"""
        plugins:
        - type: test-config-scorer
        schedulingProfiles:
        - name: default
          plugins:
          - pluginRef: test-config-scorer
            weight: {weight}
        """
    )
    assert f"schedulingProfiles[0].plugins[0].weight (line {HEADER_LINES + 7}): {expected}" in message


@pytest.mark.parametrize(
    ("gates", "expected"),
    [
        ([], frozenset()),
        (["dataLayer"], frozenset({"dataLayer"})),
        (["enableLegacyMetrics", "dataLayer"], frozenset({"enableLegacyMetrics", "dataLayer"})),
    ],
)
def test_accepted_feature_gates_are_kept(gates, expected):
    config = load(f"featureGates: {gates}\n")
    assert config.feature_gates == expected


def test_unknown_feature_gate_is_refused_listing_the_known_gates():
    message = load_error("featureGates: [dataLayer, flowControll]\n")
    assert "featureGates[1]" in message
    assert "unknown feature gate 'flowControll'" in message
    assert "known gates: dataLayer, enableLegacyMetrics, flowControl" in message
    assert "did you mean 'flowControl'?" in message


def test_flow_control_gate_is_refused_as_not_supported_yet():
    message = load_error("featureGates: [flowControl]\n")
    assert f"featureGates[0] (line {HEADER_LINES + 1}): flow control is not supported yet" in message
    assert "remove the `flowControl` feature gate" in message


def test_flow_control_section_is_refused_as_not_supported_yet():
    message = load_error("flowControl:\n  maxBytes: 1Gi\n")
    assert f"flowControl (line {HEADER_LINES + 1}): flow control is not supported yet" in message
