"""Spec: `label-selector-filter` (alias `by-label-selector`) keeps endpoints whose labels match a Kubernetes
label selector (`matchLabels`, `matchExpressions` with In, NotIn, Exists, DoesNotExist)."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Filter
from epp.scheduling.types import CycleState
from plugins.label_selector_filter import LabelSelectorFilter

TYPE = "label-selector-filter"

POOL = {
    "decode-gpu": {"llm-d.ai/role": "decode", "hw": "h100"},
    "prefill-gpu": {"llm-d.ai/role": "prefill", "hw": "h100"},
    "both-cpu": {"llm-d.ai/role": "both", "hw": "cpu"},
    "unlabelled": {},
}


@pytest.mark.parametrize("type_name", [TYPE, "by-label-selector"])
def test_is_registered_under_its_type_name_and_deprecated_alias(type_name):
    registry.load_builtin_plugins()
    assert registry.lookup(type_name) is LabelSelectorFilter


def test_is_a_filter(make_plugin):
    assert isinstance(make_plugin(TYPE, {"matchLabels": {"a": "b"}}), Filter)


@pytest.mark.parametrize(
    ("selector", "kept"),
    [
        ({"matchLabels": {"llm-d.ai/role": "decode"}}, ["decode-gpu"]),
        ({"matchLabels": {"llm-d.ai/role": "decode", "hw": "cpu"}}, []),  # every pair must hold
        ({"matchLabels": {"hw": "h100"}}, ["decode-gpu", "prefill-gpu"]),
        (
            {"matchExpressions": [{"key": "llm-d.ai/role", "operator": "In", "values": ["decode", "both"]}]},
            ["decode-gpu", "both-cpu"],
        ),
        (
            # NotIn also keeps endpoints without the label, as in Kubernetes
            {"matchExpressions": [{"key": "llm-d.ai/role", "operator": "NotIn", "values": ["prefill"]}]},
            ["decode-gpu", "both-cpu", "unlabelled"],
        ),
        (
            {"matchExpressions": [{"key": "hw", "operator": "Exists"}]},
            ["decode-gpu", "prefill-gpu", "both-cpu"],
        ),
        ({"matchExpressions": [{"key": "hw", "operator": "DoesNotExist"}]}, ["unlabelled"]),
        ({"matchExpressions": [{"key": "hw", "operator": "DoesNotExist", "values": []}]}, ["unlabelled"]),
        (
            {
                "matchLabels": {"hw": "h100"},
                "matchExpressions": [{"key": "llm-d.ai/role", "operator": "NotIn", "values": ["prefill"]}],
            },
            ["decode-gpu"],
        ),
        (
            {
                "matchExpressions": [
                    {"key": "llm-d.ai/role", "operator": "Exists"},
                    {"key": "hw", "operator": "In", "values": ["cpu"]},
                ]
            },
            ["both-cpu"],
        ),
        ({}, ["decode-gpu", "prefill-gpu", "both-cpu", "unlabelled"]),  # empty selector: everything
    ],
)
def test_keeps_the_endpoints_whose_labels_match(make_plugin, endpoint, request_for, selector, kept):
    endpoints = [endpoint(name, labels=labels) for name, labels in POOL.items()]
    out = make_plugin(TYPE, selector).filter(CycleState(), request_for(), endpoints)
    assert [ep.name for ep in out] == kept


def test_the_deprecated_alias_filters_the_same_way(make_plugin, endpoint, request_for):
    endpoints = [endpoint(name, labels=labels) for name, labels in POOL.items()]
    selector = {"matchLabels": {"hw": "cpu"}}
    old = make_plugin("by-label-selector", selector).filter(CycleState(), request_for(), endpoints)
    assert [ep.name for ep in old] == ["both-cpu"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"matchExpressions": [{"key": "hw", "operator": "Matches", "values": ["x"]}]},
            "'Matches' is not allowed",
        ),
        ({"matchExpressions": [{"key": "hw", "operator": "in", "values": ["x"]}]}, "allowed: 'In', 'NotIn'"),
        ({"matchExpressions": [{"key": "hw"}]}, "needs an `operator`"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "non-empty `key`"),
        ({"matchExpressions": [{"key": "hw", "operator": "In"}]}, "non-empty `values`"),
        ({"matchExpressions": [{"key": "hw", "operator": "NotIn", "values": []}]}, "non-empty `values`"),
        (
            {"matchExpressions": [{"key": "hw", "operator": "Exists", "values": ["x"]}]},
            "must not set `values`",
        ),
        (
            {"matchExpressions": [{"key": "hw", "operator": "Exists", "value": "x"}]},
            "unknown parameter 'value'",
        ),
        ({"matchExpressions": {"key": "hw"}}, "expected a list"),
        ({"matchLabels": ["hw"]}, "expected a mapping"),
        ({"matchLabels": {"hw": 3}}, "expected a string"),
        ({"matchLabels": {"": "x"}}, "empty label name"),
        ({"labels": {"hw": "cpu"}}, "unknown parameter 'labels'"),
    ],
)
def test_bad_selectors_are_config_errors_saying_what_is_wrong(make_plugin, params, message):
    with pytest.raises(registry.ConfigError, match=message) as err:
        make_plugin(TYPE, params)
    assert "label-selector-filter" in str(err.value)
    if "matchExpressions" in params:
        assert "matchExpressions" in str(err.value)
