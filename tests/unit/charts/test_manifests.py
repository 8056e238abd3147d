"""manifests/, the Dockerfile and hack/install-tools.sh: every manifest is accepted by the schema of its
kind; the plain Envoy's configuration is one Envoy loads, wired to the chart's EPP Service; the Dockerfile
builds slim, non-root images of the package's commands; the tool install is a quick no-op when done."""

from __future__ import annotations

import copy
import re
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from hack.localstack import envoy_binary
from tests.unit.charts.schemas import (
    ROOT,
    builtin_errors,
    builtin_errors_via_library,
    crd_versions,
    custom_resource_errors,
    describe,
    gvk,
    load_yaml_docs,
    object_errors,
    third_party_errors,
    third_party_validator_available,
)

MANIFESTS = sorted(p for p in (ROOT / "manifests").rglob("*.yaml") if "crds" not in p.parts)
ENVOY_MANIFEST = ROOT / "manifests" / "envoy" / "envoy.yaml"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_is_accepted_by_its_schema(path, tools):
    objs = load_yaml_docs(path.read_text())
    assert objs, f"{path} holds no object"
    third_party = [o for o in objs if gvk(o)[0].endswith(("gateway.networking.k8s.io", "istio.io", "gke.io"))]
    if third_party and third_party_validator_available():
        pytest.fail(f"cannot validate {path.name}: {third_party_validator_available()}")
    errors = object_errors(objs)
    assert {describe(objs[i]): e for i, e in errors.items() if e} == {}


def test_every_crd_has_an_example():
    examples = {gvk(o) for p in MANIFESTS for o in load_yaml_docs(p.read_text())}
    assert set(crd_versions()) <= examples


# The validators above must be able to say no: one broken object per validator.
def test_the_validators_refuse_broken_objects():
    (deployment,) = [o for o in load_yaml_docs(ENVOY_MANIFEST.read_text()) if o["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [19001]
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    assert builtin_errors(deployment) == builtin_errors_via_library(deployment) == []
    assert builtin_errors(broken) and builtin_errors_via_library(broken)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy" in e for e in builtin_errors(typo))

    pool = load_yaml_docs((ROOT / "manifests" / "examples" / "inferencepool.yaml").read_text())[0]
    pool["spec"]["targetPorts"] = [{"number": 8000}] * 2
    assert custom_resource_errors(pool) == ["spec.targetPorts: port number must be unique"]


def test_the_third_party_validator_refuses_broken_objects(tools):
    if third_party_validator_available():
        pytest.fail(third_party_validator_available())
    route = load_yaml_docs((ROOT / "manifests" / "gateway-api" / "httproute.yaml").read_text())[1]
    assert route["kind"] == "HTTPRoute"
    bad = copy.deepcopy(route)
    bad["spec"]["rules"][0]["timeouts"]["request"] = "5 minutes"
    ok, refused = third_party_errors([route, bad])
    assert ok == []
    assert refused and "timeouts/request" in refused[0]


# ------------------------------------------------------------------------------------------ Envoy


def envoy_config_text() -> str:
    (cm,) = [o for o in load_yaml_docs(ENVOY_MANIFEST.read_text()) if o["kind"] == "ConfigMap"]
    return cm["data"]["envoy.yaml"]


def test_the_envoy_config_is_one_envoy_loads(tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(envoy_config_text())
    proc = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_the_envoy_config_follows_the_endpoint_picker_protocol():
    cfg = yaml.safe_load(envoy_config_text())
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    upstream = clusters["original_destination_cluster"]
    assert upstream["type"] == "ORIGINAL_DST"
    assert upstream["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": "x-gateway-destination-endpoint",
    }
    (listener,) = [li for li in cfg["static_resources"]["listeners"] if li["name"] == "inference"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")[
        "typed_config"
    ]
    mode = ext_proc["processing_mode"]
    # The EPP routes on the streamed request body; the response body is not sent, since the default
    # profile's plugins read none (checked below) and each streamed chunk would be an ext_proc round trip.
    assert mode["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert mode["response_body_mode"] == "NONE"
    from epp.config import load_profile
    from epp.datastore.pool import Pool
    from epp.scheduling.registry import PluginHandle, load_builtin_plugins

    load_builtin_plugins()
    assert load_profile("default", PluginHandle(Pool())).response_body_readers == []
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "ext_proc"
    assert (
        "http2_protocol_options"
        in clusters["ext_proc"]["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]["explicit_http_config"]
    )
    assert clusters["ext_proc"]["transport_socket"]["name"] == "envoy.transport_sockets.tls"


def test_the_envoy_manifest_points_at_the_charts_epp_service(helm):
    cfg = yaml.safe_load(envoy_config_text())
    ext_proc = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "ext_proc")
    address = ext_proc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    r = helm.template(
        "inferencepool", "inferencePool.modelServers.matchLabels.app=sim-model-server", release="sim-pool"
    )
    svc = r.one("Service")
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc")
    assert (address["address"], address["port_value"]) == (svc["metadata"]["name"], grpc_port)
    service = next(o for o in load_yaml_docs(ENVOY_MANIFEST.read_text()) if o["kind"] == "Service")
    assert service["metadata"]["name"] == "envoy" and service["spec"]["ports"][0]["port"] == 8081


# ------------------------------------------------------------------------------------- Dockerfile


def copied_sources(stage: str) -> set[str]:
    """The build-context paths a stage's COPY lines take (all arguments but the destination)."""
    return {
        src
        for line in dockerfile_stages()[stage]
        if line.startswith("COPY ") and "--from" not in line
        for src in line.split()[1:-1]
    }


def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current is not None:
            stages[current].append(line)
    return stages


def test_the_dockerfile_builds_both_commands_as_targets_epp_last():
    stages = dockerfile_stages()
    assert list(stages) == ["build", "runtime", "model-server", "epp"]  # `docker build .` = the last = epp
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["epp"]' in stages["epp"] and "epp" in scripts
    assert 'ENTRYPOINT ["epp-model-server"]' in stages["model-server"] and "epp-model-server" in scripts
    assert any(line.startswith("EXPOSE 9002 9003 9090") for line in stages["epp"])
    assert any(line.startswith("EXPOSE 8000 5557 5558") for line in stages["model-server"])


def test_the_dockerfile_copies_every_package_the_project_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = copied_sources("build")
    for where in project["tool"]["setuptools"]["packages"]["find"]["where"]:
        for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
            for pkg in Path(ROOT / where).glob(pattern.rstrip("*")):
                if (pkg / "__init__.py").exists():
                    top = pkg.relative_to(ROOT).parts[0]
                    assert top in copied, f"{top} is not copied into the build stage"
    assert {"pyproject.toml", "README.md"} <= copied  # the build needs both


def test_the_final_images_are_slim_and_unprivileged():
    stages = dockerfile_stages()
    runtime = " ".join(stages["runtime"])
    assert "USER 65532:65532" in stages["runtime"]
    assert "COPY --from=build /opt/venv /opt/venv" in stages["runtime"]
    assert "pip uninstall -y pip setuptools wheel" in runtime  # no installer left in the image
    for stage in ("runtime", "model-server", "epp"):
        text = " ".join(stages[stage])
        assert not re.search(r"apt-get|apk add|gcc|build-essential|COPY (?!--from)", text), stage
    assert "pip uninstall -y pip setuptools wheel" in " ".join(stages["build"])


def test_the_build_context_leaves_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".tools", "tests"} <= ignored
    assert not copied_sources("build") & ignored


# ---------------------------------------------------------------------------------- install-tools


def test_install_tools_is_a_quick_no_op_once_done(helm):
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "hack" / "install-tools.sh")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 2.0
    bindir = Path(proc.stdout.strip())
    assert bindir == ROOT / ".tools" / "bin"
    for tool, args, expected in (
        ("helm", ["version", "--short"], "v4."),
        ("kubectl", ["version", "--client"], "Client Version: v1.35"),
    ):
        out = subprocess.run([str(bindir / tool), *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and expected in out.stdout, (tool, out.stdout, out.stderr)
