"""Spec: `decode-filter` and `prefill-filter` keep pods by their `llm-d.ai/role` label, with llm-d's asymmetry:
an unlabeled pod is a decode pod and never a prefill pod."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import Filter
from epp.scheduling.types import CycleState
from plugins.pd.decode_filter import DecodeFilter
from plugins.pd.prefill_filter import PrefillFilter
from plugins.pd.roles import ROLE_LABEL

ABSENT = object()

# role label value -> (kept by decode-filter, kept by prefill-filter)
ROLE_TABLE = [
    (ABSENT, True, False),
    ("", True, False),  # an empty value is no role: the same as no label
    ("decode", True, False),
    ("prefill", False, True),
    ("prefill-decode", True, True),
    ("both", True, True),  # deprecated spelling of prefill-decode
    ("encode-prefill-decode", True, True),
    ("encode-prefill", False, True),
    ("encode", False, False),
    ("encode-decode", False, False),  # not in llm-d's decode set either
    ("Decode", False, False),  # label values are case-sensitive
    ("gpu-pool", False, False),
]


def labels_for(role):
    return {"app": "vllm"} if role is ABSENT else {"app": "vllm", ROLE_LABEL: role}


@pytest.mark.parametrize("type_name, cls", [("decode-filter", DecodeFilter), ("prefill-filter", PrefillFilter)])
def test_filters_are_registered_filters_without_parameters(make_plugin, type_name, cls):
    registry.load_builtin_plugins()
    assert registry.lookup(type_name) is cls
    assert isinstance(make_plugin(type_name), Filter)
    with pytest.raises(registry.ConfigError, match="takes no parameters"):
        make_plugin(type_name, {"label": "role"})


@pytest.mark.parametrize("role, decode_keeps, prefill_keeps", ROLE_TABLE,
                         ids=[repr(r) if r is not ABSENT else "no-label" for r, *_ in ROLE_TABLE])
def test_role_table(make_plugin, endpoint, request_for, role, decode_keeps, prefill_keeps):
    ep = endpoint("pod", labels=labels_for(role))
    decode = make_plugin("decode-filter").filter(CycleState(), request_for(), [ep])
    prefill = make_plugin("prefill-filter").filter(CycleState(), request_for(), [ep])
    assert (decode == [ep], prefill == [ep]) == (decode_keeps, prefill_keeps)


def test_filters_keep_candidate_order_and_split_a_mixed_pool(make_plugin, endpoint, request_for):
    pods = [endpoint(f"pod-{i}", labels=labels_for(role)) for i, (role, *_) in enumerate(ROLE_TABLE)]
    decode = make_plugin("decode-filter").filter(CycleState(), request_for(), list(reversed(pods)))
    prefill = make_plugin("prefill-filter").filter(CycleState(), request_for(), pods)
    assert decode == [p for p, (_, keep, _) in zip(reversed(pods), reversed(ROLE_TABLE), strict=True) if keep]
    assert prefill == [p for p, (_, _, keep) in zip(pods, ROLE_TABLE, strict=True) if keep]


def test_only_the_role_label_matters(make_plugin, endpoint, request_for):
    ep = endpoint("pod", labels={"role": "prefill", "llm-d.ai/roles": "prefill"})
    assert make_plugin("prefill-filter").filter(CycleState(), request_for(), [ep]) == []
    assert make_plugin("decode-filter").filter(CycleState(), request_for(), [ep]) == [ep]
