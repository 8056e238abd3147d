"""Pure functions from Kubernetes objects (plain JSON dicts, as the API serves them) to what the EPP uses:
the pool's selector and ports, its endpoints, objectives' priorities and InferenceModels' rules.

Nothing here talks to the API server; the watchers (`epp.kube.watchers`) feed these functions and apply the
result to the Pool and the ModelPolicy on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from epp.datastore.endpoint import Endpoint
from epp.datastore.models import CRITICALITY_PRIORITY, ModelRule, TargetModel

V1_GROUP = "inference.networking.k8s.io"  # InferencePool v1 (GA)
X_GROUP = "inference.networking.x-k8s.io"  # experimental: v1alpha2 pool, InferenceModel, InferenceObjective
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
MAX_TARGET_PORTS = 8


@dataclass(frozen=True, slots=True)
class ApiResource:
    """One collection of the Kubernetes API: group ("" for the core group), version, plural, kind."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}/{self.version}" if self.group else f"{self.plural}/{self.version}"

    def collection_path(self, namespace: str) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{prefix}/namespaces/{namespace}/{self.plural}"


PODS = ApiResource("", "v1", "pods", "Pod")
LEASES = ApiResource("coordination.k8s.io", "v1", "leases", "Lease")
POOL_V1 = ApiResource(V1_GROUP, "v1", "inferencepools", "InferencePool")
POOL_V1ALPHA2 = ApiResource(X_GROUP, "v1alpha2", "inferencepools", "InferencePool")
OBJECTIVES = ApiResource(X_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective")
MODELS = ApiResource(X_GROUP, "v1alpha2", "inferencemodels", "InferenceModel")
POOL_GROUPS = {V1_GROUP: POOL_V1, X_GROUP: POOL_V1ALPHA2}


def pool_resource(group: str) -> ApiResource:
    """The InferencePool API of `--pool-group`: v1 for inference.networking.k8s.io, v1alpha2 for the x- group."""
    try:
        return POOL_GROUPS[group]
    except KeyError:
        raise ValueError(f"--pool-group {group!r} is not an InferencePool API group; use {V1_GROUP} (v1) or "
                         f"{X_GROUP} (v1alpha2)") from None


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What the EPP needs of an InferencePool: which pods (label selector) and which ports of each."""

    selector: tuple[tuple[str, str], ...]  # sorted (key, value) pairs: matchLabels
    target_ports: tuple[int, ...]

    @classmethod
    def of(cls, selector: Mapping[str, str], target_ports: Iterable[int]) -> PoolSpec:
        return cls(tuple(sorted(selector.items())), tuple(target_ports))

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.selector)

    def selector_string(self) -> str:
        """The selector as the API's `labelSelector` query parameter: `k=v,k2=v2`."""
        return ",".join(f"{k}={v}" for k, v in self.selector)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def name_of(obj: Mapping[str, Any]) -> str:
    return _meta(obj).get("name", "")


def describe(obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    return f"{obj.get('kind', 'object')} {meta.get('namespace', '')}/{meta.get('name', '')}"


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{where} must be a port number 1-65535, got {value!r}")
    return value


def _labels(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{where} must be a non-empty map of label to value")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{where} must map label names to string values")
    return dict(value)


def parse_pool(obj: Mapping[str, Any], api_version: str | None = None) -> PoolSpec:
    """An InferencePool (v1 or v1alpha2) as a PoolSpec. Raises ValueError naming the field that is wrong.

    v1: `spec.selector.matchLabels` and `spec.targetPorts[].number` (1-8 ports, each one endpoint per pod);
    v1alpha2: `spec.selector` (a map) and `spec.targetPortNumber`. The version is `api_version` (the API the
    object was read from), else the object's own apiVersion."""
    spec = obj.get("spec") or {}
    where = describe(obj)
    if str(api_version or obj.get("apiVersion", "")).endswith("/v1alpha2"):
        selector = _labels(spec.get("selector"), f"{where}: spec.selector")
        return PoolSpec.of(selector, [_port(spec.get("targetPortNumber"), f"{where}: spec.targetPortNumber")])
    sel = spec.get("selector") or {}
    if not isinstance(sel, Mapping):
        raise ValueError(f"{where}: spec.selector must be a LabelSelector with matchLabels")
    if sel.get("matchExpressions"):
        raise ValueError(f"{where}: spec.selector.matchExpressions is not part of the InferencePool API; "
                         f"use matchLabels")
    selector = _labels(sel.get("matchLabels"), f"{where}: spec.selector.matchLabels")
    ports = spec.get("targetPorts")
    if not isinstance(ports, list) or not 1 <= len(ports) <= MAX_TARGET_PORTS:
        raise ValueError(f"{where}: spec.targetPorts must list 1-{MAX_TARGET_PORTS} ports")
    numbers = [_port((p or {}).get("number") if isinstance(p, Mapping) else None,
                     f"{where}: spec.targetPorts[{i}].number") for i, p in enumerate(ports)]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{where}: spec.targetPorts has duplicate port numbers {numbers}")
    return PoolSpec.of(selector, numbers)


def parse_selector(text: str) -> dict[str, str]:
    """`--endpoint-selector`: `key=value,key2=value2` (equality only, as an InferencePool's matchLabels)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().lstrip("=")
        if not sep or not key or "!" in key:
            raise ValueError(f"--endpoint-selector: {part!r} must be key=value (equality selectors only, "
                             f"e.g. app=vllm-llama3)")
        out[key] = value
    if not out:
        raise ValueError("--endpoint-selector is empty: give key=value pairs, e.g. app=vllm-llama3")
    return out


def parse_ports(text: str) -> tuple[int, ...]:
    """`--endpoint-target-ports`: 1-8 port numbers separated by commas."""
    try:
        ports = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--endpoint-target-ports {text!r} must be port numbers separated by commas, "
                         f"e.g. 8000,8001") from None
    if not 1 <= len(ports) <= MAX_TARGET_PORTS or len(set(ports)) != len(ports):
        raise ValueError(f"--endpoint-target-ports must list 1-{MAX_TARGET_PORTS} distinct ports, got {text!r}")
    for p in ports:
        _port(p, "--endpoint-target-ports")
    return ports


def selector_matches(labels: Mapping[str, str], selector: Iterable[tuple[str, str]]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Ready condition True, an IP, and not being deleted (the reference's rule for a pool member)."""
    if _meta(pod).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


def active_ranks(pod: Mapping[str, Any], ports: tuple[int, ...]) -> list[int]:
    """The indexes of `ports` the pod serves: all of them, or those its active-ports annotation lists."""
    annotation = (_meta(pod).get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION)
    if not annotation:
        return list(range(len(ports)))
    active = set()
    for p in annotation.split(","):
        p = p.strip()
        if p.isdigit():
            active.add(int(p))
    return [i for i, port in enumerate(ports) if port in active]


def endpoints_for(pods: Iterable[Mapping[str, Any]], spec: PoolSpec) -> list[Endpoint]:
    """One endpoint per target port of every ready pod the selector matches, named `<pod>-rank-<i>` where i is
    the port's index in the pool's targetPorts. Labels are the pod's labels."""
    out: list[Endpoint] = []
    for pod in pods:
        meta = _meta(pod)
        labels = meta.get("labels") or {}
        if not selector_matches(labels, spec.selector) or not pod_ready(pod):
            continue
        ip = pod["status"]["podIP"]
        for i in active_ranks(pod, spec.target_ports):
            out.append(Endpoint(name=f"{meta['name']}-rank-{i}", address=ip, port=spec.target_ports[i],
                                labels=dict(labels)))
    return out


def _pool_ref(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    return ref if isinstance(ref, Mapping) else {}


def parse_objective(obj: Mapping[str, Any], pool_name: str, pool_group: str) -> tuple[str, int] | None:
    """An InferenceObjective as (name, priority), or None when its poolRef names another pool. As the
    reference, the poolRef's name and group (default inference.networking.k8s.io) must both match."""
    ref = _pool_ref(obj)
    if ref.get("name") != pool_name or (ref.get("group") or V1_GROUP) != pool_group:
        return None
    priority = (obj.get("spec") or {}).get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"{describe(obj)}: spec.priority must be an integer, got {priority!r}")
    return name_of(obj), priority


def parse_inference_model(obj: Mapping[str, Any], pool_name: str) -> ModelRule | None:
    """An InferenceModel as a ModelRule, or None when its poolRef names another pool. The poolRef is matched by
    name only: the CRD defaults its group to the x- group, which would never match a v1 pool."""
    if _pool_ref(obj).get("name") != pool_name:
        return None
    spec = obj.get("spec") or {}
    where = describe(obj)
    model = spec.get("modelName")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: spec.modelName is required")
    criticality = spec.get("criticality") or "Standard"
    if criticality not in CRITICALITY_PRIORITY:
        raise ValueError(f"{where}: spec.criticality {criticality!r} must be one of "
                         f"{', '.join(CRITICALITY_PRIORITY)}")
    targets = []
    for i, t in enumerate(spec.get("targetModels") or ()):
        name = t.get("name") if isinstance(t, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: spec.targetModels[{i}].name is required")
        weight = t.get("weight", 1)
        if weight is None:
            weight = 1
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
            raise ValueError(f"{where}: spec.targetModels[{i}].weight must be an integer 0-1000000")
        targets.append(TargetModel(name, weight))
    meta = _meta(obj)
    return ModelRule(model, CRITICALITY_PRIORITY[criticality], tuple(targets),
                     source=f"{meta.get('namespace', '')}/{meta.get('name', '')}")


def oldest_first(objs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Objects by creationTimestamp (RFC 3339 strings sort in time order), then name."""
    return sorted(objs, key=lambda o: (_meta(o).get("creationTimestamp") or "", name_of(o)))
