"""InferenceObjectives without Kubernetes: a YAML file of InferenceObjective manifests (the CRD's own schema)
maps the `x-gateway-inference-objective` header to a priority. Negative priorities are sheddable."""

from __future__ import annotations

from pathlib import Path

import yaml

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha2", "inference.networking.k8s.io/v1alpha2")


def load_objectives(path: str) -> dict[str, int]:
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--objectives-file {path}: {exc}") from None
    out: dict[str, int] = {}
    for i, doc in enumerate(d for d in docs if d is not None):
        where = f"--objectives-file {path}: document {i}"
        if not isinstance(doc, dict) or doc.get("kind") != "InferenceObjective":
            raise ValueError(f"{where}: expected kind: InferenceObjective")
        if doc.get("apiVersion") not in API_VERSIONS:
            raise ValueError(f"{where}: apiVersion must be one of {', '.join(API_VERSIONS)}")
        name = (doc.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: metadata.name is required")
        priority = (doc.get("spec") or {}).get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"{where}: spec.priority must be an integer")
        out[name] = priority
    return out
