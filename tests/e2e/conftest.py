"""The kind end-to-end tests run against the cluster that hack/kind-e2e.sh builds: the CRDs, the
model-server chart (3 epp-model-server pods), the inferencepool chart (3 EPP replicas, leader election) and
the plain Envoy of manifests/envoy/. The script passes the cluster to pytest in E2E_* variables.

Without Docker or kind (as on the development machines), or without that cluster, every test here is
skipped, saying which is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def why_not_runnable() -> str | None:
    if shutil.which("docker") is None:
        return (
            "Docker is not installed: the kind end-to-end tests need Docker and kind (run hack/kind-e2e.sh)"
        )
    if shutil.which("kind") is None:
        return "kind is not installed: the kind end-to-end tests need Docker and kind (run hack/kind-e2e.sh)"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "the Docker daemon is not reachable (`docker info` fails): start it, then run hack/kind-e2e.sh"
    if not os.environ.get("E2E_KUBECONTEXT"):
        return (
            "no E2E_KUBECONTEXT: run the end-to-end tests through hack/kind-e2e.sh, which creates the kind "
            "cluster, installs the charts and sets E2E_*"
        )
    return None


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if Path(str(item.fspath)).is_relative_to(Path(__file__).parent)]
    if not mine:
        return
    reason = why_not_runnable()
    for item in mine:
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Cluster:
    """kubectl against the e2e namespace, and the names hack/kind-e2e.sh installed."""

    context: str
    namespace: str
    kubectl_bin: str
    pool: str
    epp: str
    model_server: str
    model: str
    sheddable_model: str
    sheddable_objective: str

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(
            [self.kubectl_bin, "--context", self.context, "-n", self.namespace, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def pods(self, selector: str) -> list[dict]:
        return json.loads(self.kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]

    def ready_pods(self, selector: str) -> list[str]:
        return sorted(
            p["metadata"]["name"]
            for p in self.pods(selector)
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        )

    def wait_until(self, what: str, check, timeout: float = 120, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:g}s waiting until {what} (last: {last!r})")


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    env = os.environ
    return Cluster(
        context=env["E2E_KUBECONTEXT"],
        namespace=env.get("E2E_NS", "epp-e2e"),
        kubectl_bin=env.get("KUBECTL", shutil.which("kubectl") or str(ROOT / ".tools" / "bin" / "kubectl")),
        pool=env.get("E2E_POOL", "sim-pool"),
        epp=env.get("E2E_EPP", "sim-pool-epp"),
        model_server=env.get("E2E_MODEL_SERVER", "sim-model-server"),
        model=env.get("E2E_MODEL", "meta-llama/Llama-3.1-8B-Instruct"),
        sheddable_model=env.get("E2E_SHEDDABLE_MODEL", "offline-batch"),
        sheddable_objective=env.get("E2E_SHEDDABLE_OBJECTIVE", "batch"),
    )


@pytest.fixture(scope="session")
def envoy_url(cluster: Cluster):
    """http://127.0.0.1:<port> forwarded to the Envoy Service's 8081 for the whole session."""
    proc = subprocess.Popen(
        [
            cluster.kubectl_bin,
            "--context",
            cluster.context,
            "-n",
            cluster.namespace,
            "port-forward",
            "--address",
            "127.0.0.1",
            "service/envoy",
            ":8081",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"kubectl port-forward exited with {proc.returncode}")
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "kubectl port-forward did not report its local port"
        # Keep reading its output ("Handling connection for ...") so that a full pipe never blocks it.
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
