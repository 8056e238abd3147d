"""From Kubernetes objects to the EPP's pool spec, endpoints, objectives and InferenceModel rules."""

import pytest

from epp.datastore.models import ModelRule, TargetModel
from epp.kube.objects import (
    POOL_V1,
    POOL_V1ALPHA2,
    PoolSpec,
    endpoints_for,
    oldest_first,
    parse_inference_model,
    parse_objective,
    parse_pool,
    parse_ports,
    parse_selector,
    pod_ready,
    pool_resource,
)
from tests.kubeapi import FakeKubeAPI

pod = FakeKubeAPI.pod
pool_obj = FakeKubeAPI.inference_pool


# ---------------------------------------------------------------- InferencePool


def test_v1_pool_gives_match_labels_and_every_target_port():
    spec = parse_pool(pool_obj("p", {"app": "vllm", "tier": "a"}, [8000, 8001]))
    assert spec == PoolSpec((("app", "vllm"), ("tier", "a")), (8000, 8001))
    assert spec.selector_string() == "app=vllm,tier=a"


def test_v1alpha2_pool_gives_its_selector_map_and_single_port():
    obj = pool_obj("p", {"app": "vllm"}, [8000], api_version="inference.networking.x-k8s.io/v1alpha2")
    assert parse_pool(obj) == PoolSpec((("app", "vllm"),), (8000,))


def test_list_items_without_apiversion_are_read_as_the_api_they_came_from():
    obj = pool_obj("p", {"app": "vllm"}, [9000], api_version="inference.networking.x-k8s.io/v1alpha2")
    del obj["apiVersion"]
    assert parse_pool(obj, POOL_V1ALPHA2.api_version).target_ports == (9000,)


@pytest.mark.parametrize("spec,needle", [
    ({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]}, "spec.selector.matchLabels"),
    ({"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}, "targetPorts": [{"number": 1}]},
     "matchExpressions"),
    ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": []}, "spec.targetPorts must list 1-8"),
    ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 0}]}, "targetPorts[0].number"),
    ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 80}, {"number": 80}]}, "duplicate"),
    ({"selector": {"matchLabels": {"a": 1}}, "targetPorts": [{"number": 80}]}, "string values"),
])
def test_invalid_v1_pools_name_the_field(spec, needle):
    obj = {"apiVersion": POOL_V1.api_version, "kind": "InferencePool", "metadata": {"name": "p", "namespace": "ns"},
           "spec": spec}
    with pytest.raises(ValueError) as exc:
        parse_pool(obj)
    assert needle in str(exc.value) and "InferencePool ns/p" in str(exc.value)


@pytest.mark.parametrize("group,version", [("inference.networking.k8s.io", "v1"),
                                           ("inference.networking.x-k8s.io", "v1alpha2")])
def test_pool_group_selects_the_api_version(group, version):
    assert pool_resource(group).version == version


def test_unknown_pool_group_is_refused_with_the_two_choices():
    with pytest.raises(ValueError, match="inference.networking.k8s.io .v1. or inference.networking.x-k8s.io"):
        pool_resource("example.com")


# ---------------------------------------------------------------- pods -> endpoints

SPEC = PoolSpec.of({"app": "vllm"}, [8000, 8001])


@pytest.mark.parametrize("p,ready", [
    (pod("a", "10.0.0.1", {}), True),
    (pod("a", "10.0.0.1", {}, ready=False), False),
    (pod("a", "", {}), False),
    (pod("a", "10.0.0.1", {}, deleting=True), False),
    ({"metadata": {"name": "a"}, "status": {"podIP": "10.0.0.1"}}, False),  # no conditions yet
])
def test_a_pod_is_a_member_only_when_ready_with_an_ip_and_not_terminating(p, ready):
    assert pod_ready(p) is ready


def test_each_target_port_of_each_ready_matching_pod_is_an_endpoint_named_by_rank():
    pods = [pod("a", "10.0.0.1", {"app": "vllm", "zone": "x"}), pod("b", "10.0.0.2", {"app": "other"}),
            pod("c", "10.0.0.3", {"app": "vllm"}, ready=False)]
    eps = endpoints_for(pods, SPEC)
    assert [(e.name, e.hostport) for e in eps] == [("a-rank-0", "10.0.0.1:8000"), ("a-rank-1", "10.0.0.1:8001")]
    assert eps[0].labels == {"app": "vllm", "zone": "x"}


def test_active_ports_annotation_limits_the_ports_and_keeps_the_rank_numbers():
    p = pod("a", "10.0.0.1", {"app": "vllm"}, annotations={"inference.networking.k8s.io/active-ports": "8001"})
    assert [(e.name, e.port) for e in endpoints_for([p], SPEC)] == [("a-rank-1", 8001)]


@pytest.mark.parametrize("text,expected", [
    ("app=vllm", {"app": "vllm"}),
    ("app==vllm, tier=a", {"app": "vllm", "tier": "a"}),
])
def test_endpoint_selector_flag(text, expected):
    assert parse_selector(text) == expected


@pytest.mark.parametrize("text", ["app", "app!=x", "", " , "])
def test_endpoint_selector_flag_refuses_what_a_pool_selector_cannot_say(text):
    with pytest.raises(ValueError, match="--endpoint-selector"):
        parse_selector(text)


@pytest.mark.parametrize("text,expected", [("8000", (8000,)), ("8000, 8001", (8000, 8001))])
def test_endpoint_target_ports_flag(text, expected):
    assert parse_ports(text) == expected


@pytest.mark.parametrize("text", ["", "x", "8000,8000", "70000", ",".join(str(8000 + i) for i in range(9))])
def test_endpoint_target_ports_flag_refuses_bad_lists(text):
    with pytest.raises(ValueError, match="--endpoint-target-ports"):
        parse_ports(text)


# ---------------------------------------------------------------- objectives and InferenceModels


def objective(name, priority=None, pool="p", group=None):
    spec = {"poolRef": {"name": pool, **({"group": group} if group else {})}}
    if priority is not None:
        spec["priority"] = priority
    return {"kind": "InferenceObjective", "metadata": {"name": name, "namespace": "ns"}, "spec": spec}


@pytest.mark.parametrize("obj,expected", [
    (objective("batch", -1), ("batch", -1)),
    (objective("default"), ("default", 0)),
    (objective("x", 5, group="inference.networking.k8s.io"), ("x", 5)),
    (objective("x", 5, pool="other"), None),
    (objective("x", 5, group="inference.networking.x-k8s.io"), None),  # the pool is a v1 pool
])
def test_objectives_of_the_pool_give_their_priority(obj, expected):
    assert parse_objective(obj, "p", "inference.networking.k8s.io") == expected


def test_an_objective_with_a_non_integer_priority_is_refused():
    with pytest.raises(ValueError, match="spec.priority must be an integer"):
        parse_objective(objective("x", "high"), "p", "inference.networking.k8s.io")


def model(name, model_name, criticality=None, targets=(), pool="p", created="2026-01-01T00:00:00Z"):
    spec = {"modelName": model_name, "poolRef": {"name": pool, "group": "inference.networking.x-k8s.io"}}
    if criticality:
        spec["criticality"] = criticality
    if targets:
        spec["targetModels"] = [dict(t) for t in targets]
    return {"kind": "InferenceModel", "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": spec}


@pytest.mark.parametrize("criticality,priority", [("Critical", 1), ("Standard", 0), (None, 0), ("Sheddable", -1)])
def test_inference_model_criticality_maps_to_a_priority(criticality, priority):
    assert parse_inference_model(model("m", "llama", criticality), "p").priority == priority


def test_inference_model_target_models_keep_their_weights():
    rule = parse_inference_model(model("m", "llama", targets=[{"name": "a", "weight": 90}, {"name": "b"}]), "p")
    assert rule == ModelRule("llama", 0, (TargetModel("a", 90), TargetModel("b", 1)), source="ns/m")


def test_inference_models_of_other_pools_are_ignored():
    assert parse_inference_model(model("m", "llama", pool="other"), "p") is None


@pytest.mark.parametrize("spec_change,needle", [
    ({"modelName": ""}, "modelName is required"),
    ({"criticality": "Urgent"}, "Critical, Standard, Sheddable"),
    ({"targetModels": [{"weight": 1}]}, "targetModels[0].name"),
    ({"targetModels": [{"name": "a", "weight": -1}]}, "targetModels[0].weight"),
])
def test_invalid_inference_models_name_the_field(spec_change, needle):
    obj = model("m", "llama")
    obj["spec"].update(spec_change)
    with pytest.raises(ValueError) as exc:
        parse_inference_model(obj, "p")
    assert needle in str(exc.value)


def test_oldest_inference_model_comes_first():
    newer, older = model("b", "x", created="2026-02-01T00:00:00Z"), model("a", "x", created="2026-01-01T00:00:00Z")
    assert [o["metadata"]["name"] for o in oldest_first([newer, older])] == ["a", "b"]
