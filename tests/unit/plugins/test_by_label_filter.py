"""Spec: `by-label-filter` / `by-label` keeps endpoints whose `label` has one of `validValues`, and those
without the label when `allowsNoLabel`."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Filter
from epp.scheduling.types import CycleState
from plugins.by_label_filter import ByLabelFilter

POOL = {
    "decode": {"llm-d.ai/role": "decode"},
    "prefill": {"llm-d.ai/role": "prefill"},
    "both": {"llm-d.ai/role": "both"},
    "empty-value": {"llm-d.ai/role": ""},
    "unlabelled": {"other": "decode"},
}


@pytest.mark.parametrize("type_name", ["by-label-filter", "by-label"])
def test_is_registered_under_both_type_names(type_name):
    registry.load_builtin_plugins()
    assert registry.lookup(type_name) is ByLabelFilter


def test_is_a_filter(make_plugin):
    assert isinstance(make_plugin("by-label", {"label": "llm-d.ai/role", "validValues": ["decode"]}), Filter)


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        ({"validValues": ["decode"]}, ["decode"]),
        ({"validValues": ["decode", "both"]}, ["decode", "both"]),
        ({"validValues": ["decode", "both"], "allowsNoLabel": True}, ["decode", "both", "unlabelled"]),
        ({"allowsNoLabel": True}, ["unlabelled"]),
        ({"validValues": ["decode"], "allowsNoLabel": False}, ["decode"]),
        ({"validValues": [""]}, ["empty-value"]),  # an empty value is a value; a missing label is not
        ({"validValues": ["encode"]}, []),
    ],
)
@pytest.mark.parametrize("type_name", ["by-label-filter", "by-label"])
def test_keeps_endpoints_with_a_valid_value(make_plugin, endpoint, request_for, type_name, params, kept):
    endpoints = [endpoint(name, labels=labels) for name, labels in POOL.items()]
    plugin = make_plugin(type_name, {"label": "llm-d.ai/role", **params})
    assert [ep.name for ep in plugin.filter(CycleState(), request_for(), endpoints)] == kept


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"validValues": ["decode"]}, "`label` must name the label"),
        ({"label": "", "validValues": ["decode"]}, "`label` must name the label"),
        ({"label": "role"}, "either `validValues`"),
        ({"label": "role", "validValues": [], "allowsNoLabel": False}, "either `validValues`"),
        ({"label": "role", "validValues": "decode"}, "'validValues': expected a list"),
        (
            {"label": "role", "validValues": ["decode"], "allowsNoLabel": "yes"},
            "'allowsNoLabel': expected true or false",
        ),
        ({"label": "role", "values": ["decode"]}, "unknown parameter 'values'"),
    ],
)
def test_bad_parameters_are_config_errors_saying_what_is_wrong(make_plugin, params, message):
    with pytest.raises(registry.ConfigError, match=message):
        make_plugin("by-label", params)
