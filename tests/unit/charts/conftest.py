"""Fixtures of the chart and manifest tests: helm (installed by hack/install-tools.sh when missing; the tests
that need it skip, saying why, only when that script cannot run) and cached `helm template` renders."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.charts.schemas import ROOT, load_yaml_docs

INSTALL_TOOLS = ROOT / "hack" / "install-tools.sh"
CHARTS = ROOT / "charts"


@dataclass(frozen=True)
class Render:
    """One `helm template` run: its objects, or helm's error."""

    objects: list[dict]
    notes: str
    error: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
        )
        return found[0]


class Helm:
    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self._cache: dict[tuple, Render] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "HELM_CACHE_HOME": str(ROOT / ".tools" / "helm-cache"),
                "HELM_CONFIG_HOME": str(ROOT / ".tools" / "helm-config"),
                "HELM_DATA_HOME": str(ROOT / ".tools" / "helm-data"),
            },
        )

    def template(
        self,
        chart: str,
        *sets: str,
        release: str = "sim-pool",
        namespace: str = "llm",
        set_json: tuple[str, ...] = (),
    ) -> Render:
        """Renders charts/<chart> with --set (and --set-json) values, as `helm install --dry-run=client`
        (which, unlike `helm template`, also renders NOTES.txt); cached per arguments."""
        key = (chart, release, namespace, sets, set_json)
        if key not in self._cache:
            args = [
                "install",
                release,
                str(CHARTS / chart),
                "--namespace",
                namespace,
                "--dry-run=client",
                "--output",
                "json",
            ]
            for s in sets:
                args += ["--set", s]
            for s in set_json:
                args += ["--set-json", s]
            proc = self.run(*args)
            if proc.returncode != 0:
                self._cache[key] = Render([], "", proc.stderr)
            else:
                release_info = json.loads(proc.stdout)
                self._cache[key] = Render(
                    load_yaml_docs(release_info["manifest"]), release_info["info"]["notes"], ""
                )
        return self._cache[key]


def _install_tools() -> tuple[Path | None, str]:
    helm = ROOT / ".tools" / "bin" / "helm"
    try:
        proc = subprocess.run(["bash", str(INSTALL_TOOLS)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"hack/install-tools.sh could not run: {exc}"
    if proc.returncode != 0 or not helm.exists():
        return None, f"hack/install-tools.sh failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    return helm, ""


@pytest.fixture(scope="session")
def tools() -> Path:
    """.tools/bin with helm and kubectl, and the third-party schemas under .tools/node, installed by
    hack/install-tools.sh if needed; the test is skipped, saying why, only when that script cannot run."""
    binary, why = _install_tools()
    if binary is None:
        pytest.skip(f"helm is not available: {why}")
    return binary.parent


@pytest.fixture(scope="session")
def helm(tools: Path) -> Helm:
    return Helm(tools / "helm")
