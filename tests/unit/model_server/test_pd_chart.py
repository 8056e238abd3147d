"""charts/model-server's P/D values: `pd.role` labels the pods for the EPP's prefill/decode filters and, on the
CPU engines, reaches the server as --role; `pd.sidecar` and `pd.kvTransferTimePerTokenMs` reach it as the
flags the server's own parser accepts."""

from __future__ import annotations

import re

import pytest

from epp_model_server.config import parse_args
from tests.unit.charts.conftest import helm, tools  # noqa: F401 (pytest fixtures of the chart tests)
from tests.unit.charts.schemas import describe, object_errors

POD_ENV = {"POD_IP": "10.1.2.3", "POD_NAME": "sim-model-server-7d9f-abcde", "POD_NAMESPACE": "llm"}


def render(helm, *sets):  # noqa: F811
    return helm.template("model-server", *sets, release="pd")


def pod(r) -> dict:
    return r.one("Deployment")["spec"]["template"]


def args_of(r) -> list[str]:
    (c,) = pod(r)["spec"]["containers"]
    return [re.sub(r"\$\((\w+)\)", lambda m: POD_ENV[m.group(1)], a) for a in c["args"]]


@pytest.mark.parametrize(("sets", "label", "role", "sidecar", "per_token"), [
    ((), None, "both", False, 0.005),
    (("pd.role=prefill",), "prefill", "prefill", False, 0.005),
    (("pd.role=decode",), "decode", "decode", True, 0.005),
    (("pd.role=decode", "pd.sidecar=false"), "decode", "decode", False, 0.005),
    (("pd.role=both", "pd.sidecar=true", "pd.kvTransferTimePerTokenMs=0.02"), "both", "both", True, 0.02),
    (("podLabels.llm-d\\.ai/role=decode",), "decode", "both", False, 0.005),
])
def test_the_role_labels_the_pods_and_configures_the_cpu_server(helm, sets, label, role, sidecar,  # noqa: F811
                                                                 per_token):
    r = render(helm, *sets)
    assert not r.error, r.error
    assert pod(r)["metadata"]["labels"].get("llm-d.ai/role") == label
    cfg = parse_args(args_of(r))
    assert (cfg.role, cfg.sidecar_enabled, cfg.kv_transfer_ms_per_token) == (role, sidecar, per_token)
    assert {describe(r.objects[i]): e for i, e in object_errors(r.objects).items() if e} == {}


def test_vllm_pods_get_the_label_only(helm):  # noqa: F811
    r = render(helm, "engine=vllm", "pd.role=decode", "pd.sidecar=true")
    assert not r.error, r.error
    assert pod(r)["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    assert not {"--role", "--pd-sidecar", "--no-pd-sidecar"} & set(args_of(r))
    assert "this chart adds neither" in r.notes


@pytest.mark.parametrize(("sets", "message"), [
    (("pd.role=encode",), "/pd/role"),
    (("pd.kvTransferTimePerTokenMs=fast",), "/pd/kvTransferTimePerTokenMs"),
    (("pd.role=prefill", "podLabels.llm-d\\.ai/role=decode"), "pd.role (prefill) and podLabels[llm-d.ai/role] "
                                                              "(decode) differ"),
])
def test_bad_pd_values_are_refused_naming_the_value(helm, sets, message):  # noqa: F811
    r = render(helm, *sets)
    assert message in r.error


def test_the_notes_say_what_the_role_means(helm):  # noqa: F811
    assert "prefilled on that pod first, then decoded here" in render(helm, "pd.role=decode").notes
    assert "llm-d.ai/role" not in render(helm).notes
