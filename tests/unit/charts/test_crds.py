"""The CRDs in manifests/crds/ accept what the reference API accepts and refuse what it refuses: required
fields, enums, ranges, list limits, defaults and CEL rules, checked the way an API server applies them
(defaulting, then the OpenAPI schema with unknown fields refused, then CEL)."""

from __future__ import annotations

import copy

import celpy
import pytest

from tests.unit.charts.schemas import (
    CRD_DIR,
    apply_defaults,
    builtin_errors,
    cel_rules,
    crd_versions,
    custom_resource_errors,
    load_yaml_docs,
    structural_problems,
)

POOL_V1 = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "pool"},
    "spec": {
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "pool-epp", "port": {"number": 9002}},
    },
}
POOL_V1ALPHA2 = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
    "kind": "InferencePool",
    "metadata": {"name": "pool"},
    "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000, "extensionRef": {"name": "pool-epp"}},
}
MODEL = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
    "kind": "InferenceModel",
    "metadata": {"name": "chat"},
    "spec": {"modelName": "chat", "poolRef": {"name": "pool"}},
}
OBJECTIVE = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
    "kind": "InferenceObjective",
    "metadata": {"name": "batch"},
    "spec": {"priority": -1, "poolRef": {"name": "pool"}},
}


def with_(base: dict, path: str, value) -> dict:
    """A copy of `base` with the dotted `path` set to `value` (or removed when value is DELETE)."""
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return obj


DELETE = object()


def test_every_crd_file_is_a_valid_and_structural_custom_resource_definition():
    files = sorted(CRD_DIR.glob("*.yaml"))
    assert len(files) == 4
    for path in files:
        (crd,) = load_yaml_docs(path.read_text())
        assert builtin_errors(crd) == [], path.name
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}", path.name
        assert path.name == f"{spec['group']}_{spec['names']['plural']}.yaml"
        assert [v["name"] for v in spec["versions"] if v["storage"]], f"{path.name}: no storage version"
        for version in spec["versions"]:
            assert structural_problems(version["schema"]["openAPIV3Schema"]) == [], (
                path.name,
                version["name"],
            )
            assert version["subresources"] == {"status": {}}


def test_the_protected_group_carries_the_api_approval_annotation():
    # The API server refuses CRDs in *.k8s.io groups without it; x-k8s.io groups are unprotected.
    for key, v in crd_versions().items():
        annotations = v.crd["metadata"].get("annotations", {})
        if v.group.endswith(".k8s.io"):
            assert annotations.get("api-approved.kubernetes.io", "").startswith("https://"), key


def test_the_apis_served_are_the_four_of_the_issue():
    assert set(crd_versions()) == {
        ("inference.networking.k8s.io", "v1", "InferencePool"),
        ("inference.networking.x-k8s.io", "v1alpha2", "InferencePool"),
        ("inference.networking.x-k8s.io", "v1alpha2", "InferenceModel"),
        ("inference.networking.x-k8s.io", "v1alpha2", "InferenceObjective"),
    }


def test_every_cel_rule_compiles():
    rules = [(key, path, rule) for key, v in crd_versions().items() for path, rule, _ in cel_rules(v.schema)]
    assert len(rules) == 4  # unique ports, port required for Services, weights all-or-none, immutable name
    env = celpy.Environment()
    for _key, _path, rule in rules:
        env.compile(rule)  # raises on a syntax error


@pytest.mark.parametrize(
    "obj", [POOL_V1, POOL_V1ALPHA2, MODEL, OBJECTIVE], ids=lambda o: f"{o['apiVersion']}-{o['kind']}"
)
def test_a_minimal_resource_is_accepted(obj):
    assert custom_resource_errors(obj) == []


def test_v1_pool_defaults_are_the_references():
    schema = crd_versions()[("inference.networking.k8s.io", "v1", "InferencePool")].schema
    spec = apply_defaults(copy.deepcopy(POOL_V1), schema)["spec"]
    assert spec["appProtocol"] == "http"
    assert spec["endpointPickerRef"] == {
        "name": "pool-epp",
        "port": {"number": 9002},
        "group": "",
        "kind": "Service",
        "failureMode": "FailClose",
    }


def test_pre_ga_defaults_are_the_references():
    versions = crd_versions()
    pool = apply_defaults(
        copy.deepcopy(POOL_V1ALPHA2),
        versions[("inference.networking.x-k8s.io", "v1alpha2", "InferencePool")].schema,
    )
    assert pool["spec"]["extensionRef"] == {
        "name": "pool-epp",
        "group": "",
        "kind": "Service",
        "failureMode": "FailClose",
    }
    model = apply_defaults(
        copy.deepcopy(MODEL), versions[("inference.networking.x-k8s.io", "v1alpha2", "InferenceModel")].schema
    )
    assert model["spec"]["poolRef"] == {
        "name": "pool",
        "group": "inference.networking.x-k8s.io",
        "kind": "InferencePool",
    }
    objective = apply_defaults(
        copy.deepcopy(OBJECTIVE),
        versions[("inference.networking.x-k8s.io", "v1alpha2", "InferenceObjective")].schema,
    )
    # Objectives point at the GA pool by default.
    assert objective["spec"]["poolRef"]["group"] == "inference.networking.k8s.io"


ports = [{"number": 8000 + i} for i in range(9)]

ACCEPTED = [
    ("v1: 8 target ports (data-parallel ranks)", with_(POOL_V1, "spec.targetPorts", ports[:8])),
    (
        "v1: 64 selector labels",
        with_(POOL_V1, "spec.selector.matchLabels", {f"k{i}": "v" for i in range(64)}),
    ),
    ("v1: empty label value", with_(POOL_V1, "spec.selector.matchLabels", {"app": ""})),
    ("v1: h2c to the model servers", with_(POOL_V1, "spec.appProtocol", "kubernetes.io/h2c")),
    ("v1: FailOpen", with_(POOL_V1, "spec.endpointPickerRef.failureMode", "FailOpen")),
    (
        "v1: a non-Service picker needs no port",
        with_(
            with_(POOL_V1, "spec.endpointPickerRef.kind", "Backend"), "spec.endpointPickerRef.port", DELETE
        ),
    ),
    ("v1alpha2: FailOpen", with_(POOL_V1ALPHA2, "spec.extensionRef.failureMode", "FailOpen")),
    ("v1alpha2: picker port", with_(POOL_V1ALPHA2, "spec.extensionRef.portNumber", 9002)),
    ("model: Sheddable", with_(MODEL, "spec.criticality", "Sheddable")),
    (
        "model: weighted targets",
        with_(MODEL, "spec.targetModels", [{"name": "a", "weight": 1}, {"name": "b", "weight": 1000000}]),
    ),
    ("model: unweighted targets", with_(MODEL, "spec.targetModels", [{"name": "a"}, {"name": "b"}])),
    ("model: 10 targets", with_(MODEL, "spec.targetModels", [{"name": f"m{i}"} for i in range(10)])),
    ("model: 256-character name", with_(MODEL, "spec.modelName", "m" * 256)),
    ("objective: no priority", with_(OBJECTIVE, "spec.priority", DELETE)),
    ("objective: high priority", with_(OBJECTIVE, "spec.priority", 1000)),
]


@pytest.mark.parametrize("obj", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_valid_variants_are_accepted(obj):
    assert custom_resource_errors(obj) == []


# (case, object, the path or message fragment the refusal names)
REFUSED = [
    ("v1: no selector", with_(POOL_V1, "spec.selector", DELETE), "'selector' is a required property"),
    ("v1: no matchLabels", with_(POOL_V1, "spec.selector", {}), "'matchLabels' is a required property"),
    ("v1: empty matchLabels", with_(POOL_V1, "spec.selector.matchLabels", {}), "spec.selector.matchLabels:"),
    (
        "v1: 65 selector labels",
        with_(POOL_V1, "spec.selector.matchLabels", {f"k{i}": "v" for i in range(65)}),
        "spec.selector.matchLabels:",
    ),
    (
        "v1: label value not a label",
        with_(POOL_V1, "spec.selector.matchLabels", {"app": "-vllm"}),
        "spec.selector.matchLabels.app:",
    ),
    ("v1: matchExpressions", with_(POOL_V1, "spec.selector.matchExpressions", []), "Additional properties"),
    (
        "v1: no targetPorts",
        with_(POOL_V1, "spec.targetPorts", DELETE),
        "'targetPorts' is a required property",
    ),
    ("v1: zero targetPorts", with_(POOL_V1, "spec.targetPorts", []), "spec.targetPorts:"),
    ("v1: 9 targetPorts", with_(POOL_V1, "spec.targetPorts", ports), "spec.targetPorts:"),
    ("v1: port 0", with_(POOL_V1, "spec.targetPorts", [{"number": 0}]), "spec.targetPorts.0.number:"),
    ("v1: port 65536", with_(POOL_V1, "spec.targetPorts", [{"number": 65536}]), "spec.targetPorts.0.number:"),
    (
        "v1: duplicate port",
        with_(POOL_V1, "spec.targetPorts", [{"number": 8000}, {"number": 8000}]),
        "port number must be unique",
    ),
    ("v1: appProtocol grpc", with_(POOL_V1, "spec.appProtocol", "grpc"), "spec.appProtocol:"),
    (
        "v1: no endpointPickerRef",
        with_(POOL_V1, "spec.endpointPickerRef", DELETE),
        "'endpointPickerRef' is a required property",
    ),
    (
        "v1: picker without name",
        with_(POOL_V1, "spec.endpointPickerRef.name", DELETE),
        "'name' is a required property",
    ),
    (
        "v1: Service picker without port",
        with_(POOL_V1, "spec.endpointPickerRef.port", DELETE),
        "port is required when kind is 'Service'",
    ),
    (
        "v1: failureMode Open",
        with_(POOL_V1, "spec.endpointPickerRef.failureMode", "Open"),
        "spec.endpointPickerRef.failureMode:",
    ),
    ("v1: unknown spec field", with_(POOL_V1, "spec.targetPortNumber", 8000), "Additional properties"),
    ("v1: no spec", with_(POOL_V1, "spec", DELETE), "'spec' is a required property"),
    (
        "v1alpha2: no targetPortNumber",
        with_(POOL_V1ALPHA2, "spec.targetPortNumber", DELETE),
        "'targetPortNumber' is a required property",
    ),
    (
        "v1alpha2: targetPortNumber 70000",
        with_(POOL_V1ALPHA2, "spec.targetPortNumber", 70000),
        "spec.targetPortNumber:",
    ),
    (
        "v1alpha2: no extensionRef",
        with_(POOL_V1ALPHA2, "spec.extensionRef", DELETE),
        "'extensionRef' is a required property",
    ),
    (
        "v1alpha2: v1 field targetPorts",
        with_(POOL_V1ALPHA2, "spec.targetPorts", [{"number": 8000}]),
        "Additional properties",
    ),
    (
        "v1alpha2: failureMode failOpen",
        with_(POOL_V1ALPHA2, "spec.extensionRef.failureMode", "failOpen"),
        "spec.extensionRef.failureMode:",
    ),
    ("model: no modelName", with_(MODEL, "spec.modelName", DELETE), "'modelName' is a required property"),
    ("model: 257-character name", with_(MODEL, "spec.modelName", "m" * 257), "spec.modelName:"),
    ("model: criticality Low", with_(MODEL, "spec.criticality", "Low"), "spec.criticality:"),
    (
        "model: 11 targets",
        with_(MODEL, "spec.targetModels", [{"name": f"m{i}"} for i in range(11)]),
        "spec.targetModels:",
    ),
    (
        "model: weight 0",
        with_(MODEL, "spec.targetModels", [{"name": "a", "weight": 0}]),
        "spec.targetModels.0.weight:",
    ),
    (
        "model: weight above 1e6",
        with_(MODEL, "spec.targetModels", [{"name": "a", "weight": 1000001}]),
        "spec.targetModels.0.weight:",
    ),
    (
        "model: weights on some targets only",
        with_(MODEL, "spec.targetModels", [{"name": "a", "weight": 1}, {"name": "b"}]),
        "Weights should be set for all models, or none of the models.",
    ),
    ("model: no poolRef", with_(MODEL, "spec.poolRef", DELETE), "'poolRef' is a required property"),
    ("objective: priority as text", with_(OBJECTIVE, "spec.priority", "high"), "spec.priority:"),
    ("objective: no poolRef", with_(OBJECTIVE, "spec.poolRef", DELETE), "'poolRef' is a required property"),
    (
        "objective: poolRef without name",
        with_(OBJECTIVE, "spec.poolRef", {"group": "inference.networking.k8s.io"}),
        "'name' is a required property",
    ),
    ("any: name not a DNS subdomain", with_(OBJECTIVE, "metadata.name", "Batch_Jobs"), "metadata.name"),
]


@pytest.mark.parametrize("obj,expected", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_invalid_variants_are_refused_naming_the_field(obj, expected):
    errors = custom_resource_errors(obj)
    assert any(expected in e for e in errors), errors


def test_model_name_is_immutable_on_update():
    renamed = with_(MODEL, "spec.modelName", "chat-v2")
    assert custom_resource_errors(renamed, old=MODEL) == ["spec.modelName: modelName is immutable"]
    recriticised = with_(MODEL, "spec.criticality", "Critical")
    assert custom_resource_errors(recriticised, old=MODEL) == []
