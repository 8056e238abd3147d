"""charts/inferencepool: every profile and every provider renders objects that a cluster accepts (built-in
kinds against the Kubernetes schemas, InferencePools/Objectives/Models against our CRDs, Gateway API /
Istio / GKE objects against their schemas); the EPP's arguments are flags `epp` parses; the profiles the
chart ships are epp/profiles/ byte for byte; RBAC is the least the EPP needs."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from epp.cli import build_parser
from tests.unit.charts.schemas import ROOT, describe, object_errors, third_party_validator_available

PROFILES = sorted(p.stem for p in (ROOT / "epp" / "profiles").glob("*.yaml"))
CHART_PROFILES = ROOT / "charts" / "inferencepool" / "files" / "profiles"
PROVIDERS = ["none", "istio", "gke", "envoy-gateway", "kgateway"]
POD_LABELS = "inferencePool.modelServers.matchLabels.app=sim-model-server"
NS = "llm"


def render(helm, *sets, **kw):
    r = helm.template("inferencepool", POD_LABELS, *sets, **kw)
    assert not r.error, r.error
    return r


def epp_container(r) -> dict:
    (container,) = r.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "epp"
    return container


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def assert_all_valid(r) -> None:
    if third_party_validator_available() is not None and any(
        o["apiVersion"].split("/")[0]
        in ("gateway.networking.k8s.io", "networking.istio.io", "networking.gke.io")
        for o in r.objects
    ):
        pytest.fail(f"cannot validate third-party objects: {third_party_validator_available()}")
    errors = object_errors(r.objects)
    bad = {describe(r.objects[i]): e for i, e in errors.items() if e}
    assert bad == {}


# ---------------------------------------------------------------------------------------- profiles


def test_the_chart_ships_every_profile_of_epp_byte_for_byte():
    fix = "cp epp/profiles/*.yaml charts/inferencepool/files/profiles/"
    shipped = sorted(p.name for p in CHART_PROFILES.glob("*.yaml"))
    assert shipped == sorted(f"{p}.yaml" for p in PROFILES), f"profiles differ from epp/profiles/: {fix}"
    for name in shipped:
        assert (CHART_PROFILES / name).read_bytes() == (ROOT / "epp" / "profiles" / name).read_bytes(), (
            f"charts/inferencepool/files/profiles/{name} differs from epp/profiles/{name}: {fix}"
        )


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_renders_valid_objects_and_is_the_file_the_epp_loads(helm, profile):
    r = render(helm, f"inferenceExtension.profile={profile}")
    assert_all_valid(r)
    args = epp_container(r)["args"]
    assert flag(args, "--config-file") == f"/config/{profile}.yaml"
    data = r.one("ConfigMap")["data"]
    assert data[f"{profile}.yaml"] == (ROOT / "epp" / "profiles" / f"{profile}.yaml").read_text()
    assert set(data) == {f"{p}.yaml" for p in PROFILES}  # every profile is there to switch to
    mounts = {m["name"]: m["mountPath"] for m in epp_container(r)["volumeMounts"]}
    volumes = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    config_volume = next(
        n
        for n, v in volumes.items()
        if v.get("configMap", {}).get("name") == r.one("ConfigMap")["metadata"]["name"]
    )
    assert mounts[config_volume] == "/config"


def test_a_custom_configuration_can_be_added_and_selected(helm):
    custom = (
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
        "plugins:\n- type: queue-scorer\n"
    )
    r = render(
        helm,
        "inferenceExtension.pluginsConfigFile=mine.yaml",
        set_json=("inferenceExtension.pluginsCustomConfig=" + json.dumps({"mine.yaml": custom}),),
    )
    assert r.one("ConfigMap")["data"]["mine.yaml"] == custom
    assert flag(epp_container(r)["args"], "--config-file") == "/config/mine.yaml"
    assert_all_valid(r)


def test_a_changed_configuration_rolls_the_pods(helm):
    def checksum(*sets, set_json=()):
        return render(helm, *sets, set_json=set_json).one("Deployment")["spec"]["template"]["metadata"][
            "annotations"
        ]["checksum/config"]

    assert checksum() != checksum(set_json=('inferenceExtension.pluginsCustomConfig={"x.yaml": "a: 1"}',))


@pytest.mark.parametrize(
    "sets,message",
    [
        (("inferenceExtension.profile=nope",), "choose inferenceExtension.profile from default.yaml"),
        (("inferenceExtension.pluginsConfigFile=missing.yaml",), '"missing.yaml" is not in the chart'),
    ],
    ids=["unknown profile", "unknown config file"],
)
def test_an_unknown_configuration_is_refused_listing_the_choices(helm, sets, message):
    r = helm.template("inferencepool", POD_LABELS, *sets)
    assert message in r.error
    assert all(f"{p}.yaml" in r.error for p in PROFILES)


def test_the_pool_selector_is_required(helm):
    r = helm.template("inferencepool")
    assert "inferencePool.modelServers.matchLabels is required" in r.error


@pytest.mark.parametrize(
    "sets,field",
    [
        (("provider.name=nginx",), "'/provider/name'"),
        (("inferenceExtension.failureMode=Open",), "'/inferenceExtension/failureMode'"),
        (("inferencePool.apiVersion=inference.networking.k8s.io/v2",), "'/inferencePool/apiVersion'"),
        (("inferenceExtension.replicas=0",), "'/inferenceExtension/replicas'"),
    ],
    ids=["provider", "failure mode", "pool api version", "replicas"],
)
def test_values_outside_their_enums_and_ranges_are_refused(helm, sets, field):
    r = helm.template("inferencepool", POD_LABELS, *sets)
    assert r.error and field in r.error


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_chart_lints_cleanly(helm, provider):
    proc = helm.run(
        "lint",
        "--strict",
        str(ROOT / "charts" / "inferencepool"),
        "--set",
        POD_LABELS,
        "--set",
        f"provider.name={provider}",
        "--set",
        "inferenceExtension.replicas=2",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_packaged_chart_carries_the_profiles(helm, tmp_path):
    # The profiles are copies under files/, not symlinks, so `helm package` keeps them.
    proc = helm.run("package", str(ROOT / "charts" / "inferencepool"), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (package,) = tmp_path.glob("inferencepool-*.tgz")
    proc = helm.run(
        "template", "sim-pool", str(package), "--set", POD_LABELS, "--show-only", "templates/configmap.yaml"
    )
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)["data"]
    assert data == {f"{p}.yaml": (ROOT / "epp" / "profiles" / f"{p}.yaml").read_text() for p in PROFILES}


# ---------------------------------------------------------------------------------- the EPP itself


def test_the_epp_arguments_are_flags_epp_parses(helm):
    r = render(helm)
    args = epp_container(r)["args"]
    parsed = build_parser().parse_args(args)
    assert (parsed.pool_name, parsed.pool_namespace) == ("sim-pool", NS)
    assert (parsed.grpc_port, parsed.grpc_health_port, parsed.metrics_port) == (9002, 9003, 9090)
    assert parsed.secure_serving is True
    assert parsed.config_file == "/config/default.yaml"
    assert parsed.log_format == "json"
    assert "--ha-enable-leader-election" not in args


def test_plaintext_serving_and_extra_flags_reach_the_epp(helm):
    r = render(
        helm,
        "inferenceExtension.secureServing=false",
        "inferenceExtension.flags.disable-endpoint-subset-filter=true",
        "inferenceExtension.flags.log-level=debug",
        "inferenceExtension.flags.refresh-metrics-interval=100ms",
    )
    parsed = build_parser().parse_args(epp_container(r)["args"])
    assert parsed.secure_serving is False
    assert parsed.disable_endpoint_subset_filter is True
    assert parsed.log_level == "debug"
    assert parsed.refresh_metrics_interval == pytest.approx(0.1)


def test_leader_election_comes_with_more_than_one_replica(helm):
    single, ha = render(helm), render(helm, "inferenceExtension.replicas=3")
    assert ha.one("Deployment")["spec"]["replicas"] == 3
    assert "--ha-enable-leader-election" in epp_container(ha)["args"]
    assert "--ha-enable-leader-election" not in epp_container(single)["args"]
    assert ha.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert_all_valid(ha)


def test_several_replicas_can_run_active_active(helm):
    r = render(
        helm,
        "inferenceExtension.replicas=3",
        "inferenceExtension.leaderElection=false",
        "inferenceExtension.profile=prefix-hash",
    )
    assert "--ha-enable-leader-election" not in epp_container(r)["args"]
    assert [role["metadata"]["name"] for role in r.of_kind("Role")] == ["sim-pool-epp"]
    assert "3 active replicas (no leader election)" in r.notes


def test_the_leader_election_flag_is_an_epp_flag(helm):
    # The Kubernetes mode of `epp` takes the reference EPP's flag name.
    parsed = build_parser().parse_args(epp_container(render(helm, "inferenceExtension.replicas=2"))["args"])
    assert parsed.ha_enable_leader_election is True


def test_probes_use_grpc_health_on_the_health_port(helm):
    c = epp_container(render(helm))
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc": 9002,
        "grpc-health": 9003,
        "metrics": 9090,
    }


def test_the_epp_runs_unprivileged_on_a_read_only_root(helm):
    r = render(helm)
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = epp_container(r)["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_the_pool_points_at_the_epp_service_and_selects_the_model_servers(helm):
    r = render(helm)
    pool, svc, deploy = r.one("InferencePool"), r.one("Service"), r.one("Deployment")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["name"] == "sim-pool"
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == svc["metadata"]["name"] == "sim-pool-epp"
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc")
    assert ref["port"]["number"] == grpc_port["port"] == 9002
    assert ref["failureMode"] == "FailOpen"  # the reference chart's default
    assert pool["spec"]["selector"] == {"matchLabels": {"app": "sim-model-server"}}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_data_parallel_ports_and_h2c(helm):
    r = render(
        helm,
        "inferencePool.modelServerProtocol=grpc",
        set_json=('inferencePool.targetPorts=[{"number":8000},{"number":8001}]',),
    )
    pool = r.one("InferencePool")
    assert pool["spec"]["targetPorts"] == [{"number": 8000}, {"number": 8001}]
    assert pool["spec"]["appProtocol"] == "kubernetes.io/h2c"
    assert_all_valid(r)


# ----------------------------------------------------------------------------------------------- RBAC


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    return {
        (g, res, verb)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }


READ = ("get", "list", "watch")


def test_rbac_is_namespaced_and_read_only_on_what_the_epp_watches(helm):
    r = render(helm)
    assert not r.of_kind("ClusterRole") and not r.of_kind("ClusterRoleBinding")
    (role,) = r.of_kind("Role")
    expected = (
        {("", "pods", v) for v in READ}
        | {("inference.networking.k8s.io", "inferencepools", v) for v in READ}
        | {
            ("inference.networking.x-k8s.io", res, v)
            for res in ("inferenceobjectives", "inferencemodels")
            for v in READ
        }
    )
    assert rules_of(role) == expected
    (binding,) = r.of_kind("RoleBinding")
    sa = r.one("ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert r.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa


def test_leases_are_granted_only_with_leader_election(helm):
    ha = render(helm, "inferenceExtension.replicas=3")
    roles = {role["metadata"]["name"]: rules_of(role) for role in ha.of_kind("Role")}
    assert set(roles) == {"sim-pool-epp", "sim-pool-epp-leader-election"}
    # What epp/kube/leader.py calls: read, create, replace.
    assert roles["sim-pool-epp-leader-election"] == {
        ("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")
    }
    bound = {b["roleRef"]["name"] for b in ha.of_kind("RoleBinding")}
    assert bound == set(roles)
    assert not any(res == "leases" for _, res, _ in rules_of(render(helm).one("Role")))


# ------------------------------------------------------------------------------------------ providers

EXTRA_KINDS = {
    "none": set(),
    "istio": {"DestinationRule"},
    "gke": {"HealthCheckPolicy", "GCPBackendPolicy"},
    "envoy-gateway": {"Gateway", "HTTPRoute"},
    "kgateway": {"Gateway", "HTTPRoute"},
}
BASE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service", "InferencePool"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_provider_renders_its_extra_resources_and_all_validate(helm, provider):
    r = render(helm, f"provider.name={provider}")
    assert {o["kind"] for o in r.objects} == BASE_KINDS | EXTRA_KINDS[provider]
    assert_all_valid(r)


def test_istio_reaches_the_self_signed_epp_over_tls_without_verification(helm):
    dr = render(helm, "provider.name=istio").one("DestinationRule")
    assert dr["spec"]["host"] == f"sim-pool-epp.{NS}.svc.cluster.local"
    assert dr["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
    plain = render(helm, "provider.name=istio", "inferenceExtension.secureServing=false").one(
        "DestinationRule"
    )
    assert plain["spec"]["trafficPolicy"]["tls"] == {"mode": "DISABLE"}


def test_gke_policies_target_the_pool(helm):
    r = render(helm, "provider.name=gke")
    for kind in ("HealthCheckPolicy", "GCPBackendPolicy"):
        assert r.one(kind)["spec"]["targetRef"] == {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": "sim-pool",
        }
    assert r.one("HealthCheckPolicy")["spec"]["default"]["config"]["httpHealthCheck"] == {
        "requestPath": "/health",
        "port": 8000,
    }


@pytest.mark.parametrize("provider,gateway_class", [("envoy-gateway", "eg"), ("kgateway", "kgateway")])
def test_gateway_providers_route_everything_to_the_pool(helm, provider, gateway_class):
    r = render(helm, f"provider.name={provider}")
    gw, route = r.one("Gateway"), r.one("HTTPRoute")
    assert gw["spec"]["gatewayClassName"] == gateway_class
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw["metadata"]["name"]}
    ]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "sim-pool"}
    ]
    assert rule["timeouts"] == {"request": "300s"}


def test_an_existing_gateway_can_be_used_instead(helm):
    r = render(
        helm,
        "provider.name=envoy-gateway",
        "inferenceGateway.create=false",
        "experimentalHttpRoute.inferenceGatewayName=shared",
    )
    assert not r.of_kind("Gateway")
    assert r.one("HTTPRoute")["spec"]["parentRefs"][0]["name"] == "shared"


def test_a_route_on_istio_is_opt_in(helm):
    assert not render(helm, "provider.name=istio").of_kind("HTTPRoute")
    r = render(
        helm, "provider.name=istio", "experimentalHttpRoute.enabled=true", "inferenceGateway.create=true"
    )
    assert r.one("Gateway")["spec"]["gatewayClassName"] == "istio"
    assert_all_valid(r)


def test_a_gateway_without_a_class_is_refused(helm):
    r = helm.template("inferencepool", POD_LABELS, "inferenceGateway.create=true")
    assert "set inferenceGateway.gatewayClassName" in r.error


# ------------------------------------------------------------------ pre-GA API, objectives and models


def test_the_pre_ga_pool_api(helm):
    r = render(
        helm, "inferencePool.apiVersion=inference.networking.x-k8s.io/v1alpha2", "provider.name=kgateway"
    )
    pool = r.one("InferencePool")
    assert pool["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
    assert pool["spec"] == {
        "selector": {"app": "sim-model-server"},
        "targetPortNumber": 8000,
        "extensionRef": {"name": "sim-pool-epp", "portNumber": 9002, "failureMode": "FailOpen"},
    }
    assert ("inference.networking.x-k8s.io", "inferencepools", "watch") in rules_of(r.one("Role"))
    assert (
        r.one("HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]["group"] == "inference.networking.x-k8s.io"
    )
    args = epp_container(r)["args"]
    assert flag(args, "--pool-group") == "inference.networking.x-k8s.io"
    assert_all_valid(r)


def test_the_pre_ga_pool_group_is_an_epp_flag(helm):
    r = render(helm, "inferencePool.apiVersion=inference.networking.x-k8s.io/v1alpha2")
    assert build_parser().parse_args(epp_container(r)["args"]).pool_group == "inference.networking.x-k8s.io"


def test_the_pre_ga_pool_has_a_single_port(helm):
    r = helm.template(
        "inferencepool",
        POD_LABELS,
        "inferencePool.apiVersion=inference.networking.x-k8s.io/v1alpha2",
        set_json=('inferencePool.targetPorts=[{"number":8000},{"number":8001}]',),
    )
    assert "single targetPortNumber" in r.error


def test_objectives_and_models_belong_to_the_pool(helm):
    r = render(
        helm,
        set_json=(
            "inferenceObjectives="
            + json.dumps(
                [
                    {"name": "batch", "priority": -1},
                    {"name": "interactive", "priority": 10},
                    {"name": "plain"},
                ]
            ),
            "inferenceModels="
            + json.dumps(
                [
                    {"name": "offline", "modelName": "offline-batch", "criticality": "Sheddable"},
                    {
                        "name": "chat",
                        "modelName": "chat",
                        "targetModels": [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}],
                    },
                ]
            ),
        ),
    )
    objectives = {o["metadata"]["name"]: o["spec"] for o in r.of_kind("InferenceObjective")}
    assert objectives["batch"]["priority"] == -1 and objectives["interactive"]["priority"] == 10
    assert "priority" not in objectives["plain"]
    models = {m["metadata"]["name"]: m["spec"] for m in r.of_kind("InferenceModel")}
    assert models["offline"]["criticality"] == "Sheddable"
    assert models["chat"]["targetModels"] == [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}]
    for spec in [*objectives.values(), *models.values()]:
        assert spec["poolRef"] == {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": "sim-pool",
        }
    assert_all_valid(r)


# ------------------------------------------------------------------------------------------------ NOTES


@pytest.mark.parametrize("provider", ["none", "kgateway"])
def test_the_notes_say_how_to_send_a_first_request(helm, provider):
    notes = render(helm, f"provider.name={provider}").notes
    assert "sim-pool-epp" in notes and "rollout status" in notes
    curl = next(line for line in notes.splitlines() if line.strip().startswith("curl"))
    assert "/v1/completions" in curl
    assert "kubectl" in notes
    if provider == "none":
        assert "manifests/envoy/envoy.yaml" in notes
        assert any("port-forward service/envoy" in line for line in notes.splitlines())
    else:
        assert "get gateway inference-gateway" in notes


def test_the_notes_first_request_is_a_valid_shell_command(helm):
    notes = render(helm).notes
    lines = notes.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl"))
    command = lines[start].rstrip("\\") + " " + lines[start + 1].strip()
    tokens = shlex.split(command)
    body = json.loads(tokens[tokens.index("-d") + 1])
    assert set(body) >= {"model", "prompt"}
