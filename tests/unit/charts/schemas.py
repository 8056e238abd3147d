"""Validation of Kubernetes objects for the chart and manifest tests, as an API server would do it:

- built-in kinds against the Kubernetes OpenAPI schemas of `kubernetes-validate` (strict: unknown fields
  are errors, as with `kubectl apply --validate=strict`);
- our custom resources against the CRDs in manifests/crds/: structural defaulting, the OpenAPI v3 schema
  (unknown fields are errors), then the CEL rules (`x-kubernetes-validations`) with cel-python;
- third-party resources the charts render (Gateway API, Istio, GKE) against the schemas of the
  @kubernetes-models npm packages that hack/install-tools.sh puts under .tools/node.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import celpy
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = ROOT / "manifests" / "crds"
TOOLS = ROOT / ".tools"
# The oldest Kubernetes the manifests are checked against (gRPC probes, CRD CEL rules are GA there).
K8S_VERSION = "1.31"

THIRD_PARTY_GROUPS = {"gateway.networking.k8s.io", "networking.istio.io", "networking.gke.io"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def gvk(obj: dict) -> tuple[str, str, str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    return group, version, obj["kind"]


# ------------------------------------------------------------------------------------------ our CRDs


@dataclass(frozen=True)
class CRDVersion:
    crd: dict
    group: str
    version: str
    kind: str
    schema: dict  # openAPIV3Schema


@cache
def crd_versions() -> dict[tuple[str, str, str], CRDVersion]:
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load_yaml_docs(path.read_text()):
            spec = crd["spec"]
            for v in spec["versions"]:
                key = (spec["group"], v["name"], spec["names"]["kind"])
                out[key] = CRDVersion(
                    crd, spec["group"], v["name"], spec["names"]["kind"], v["schema"]["openAPIV3Schema"]
                )
    return out


def structural_problems(schema: dict, path: str = "") -> list[str]:
    """The rules of a structural schema that the API server enforces on a CRD, as far as we use them: every
    node has a type; object nodes use properties or additionalProperties, not both; list-type map keys are
    required properties of the items; defaults validate against their node."""
    problems = []
    if (
        "type" not in schema
        and not schema.get("x-kubernetes-int-or-string")
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{path or '<root>'}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: both properties and additionalProperties")
    if schema.get("x-kubernetes-list-type") == "map":
        item = schema.get("items", {})
        for key in schema.get("x-kubernetes-list-map-keys", []):
            if key not in item.get("required", []):
                problems.append(f"{path}: list-map key {key} is not required in the items")
    if "default" in schema:
        errors = list(jsonschema.Draft7Validator(to_json_schema(schema)).iter_errors(schema["default"]))
        problems += [f"{path}: default does not validate: {e.message}" for e in errors]
    for name, sub in schema.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        problems += structural_problems(schema["items"], f"{path}[]")
    return problems


def to_json_schema(schema: dict) -> dict:
    """An OpenAPI v3 CRD schema as a JSON schema that rejects unknown fields (strict field validation)."""
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("description", "nullable"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def apply_defaults(value, schema: dict):
    """Structural defaulting, as the API server does it before validation: a missing property with a
    default gets it (recursively, inside present objects and list items)."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for name in value:
                value[name] = apply_defaults(value[name], schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(v, schema["items"]) for v in value]
    return value


@cache
def _cel_program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_rules(schema: dict, path: str = ""):
    """Every (path, rule, message) of a schema, for tests that look at the rules themselves."""
    for v in schema.get("x-kubernetes-validations", []):
        yield path, v["rule"], v.get("message", v["rule"])
    for name, sub in schema.get("properties", {}).items():
        yield from cel_rules(sub, f"{path}.{name}")
    if "items" in schema:
        yield from cel_rules(schema["items"], f"{path}[]")


def cel_errors(value, schema: dict, old=None, path: str = "") -> list[str]:
    """Evaluates the CEL rules of `schema` on `value`. Transition rules (those naming oldSelf) only run on an
    update, i.e. when `old` is given, as on the API server."""
    errors = []
    for v in schema.get("x-kubernetes-validations", []):
        rule = v["rule"]
        if "oldSelf" in rule and old is None:
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if old is not None:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = _cel_program(rule).evaluate(activation)
        if isinstance(result, Exception) or not bool(result):
            errors.append(f"{path or '<root>'}: {v.get('message', rule)}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                old_sub = old.get(name) if isinstance(old, dict) else None
                errors += cel_errors(value[name], sub, old_sub, f"{path}.{name}" if path else name)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += cel_errors(item, schema["items"], None, f"{path}.{i}")
    return errors


def custom_resource_errors(obj: dict, old: dict | None = None) -> list[str]:
    """What the API server would refuse in a custom resource of one of our CRDs (after defaulting)."""
    key = gvk(obj)
    if key not in crd_versions():
        return [f"no CRD in manifests/crds/ serves {obj['apiVersion']} {obj['kind']}"]
    schema = crd_versions()[key].schema
    name = obj.get("metadata", {}).get("name", "")
    errors = (
        []
        if DNS_SUBDOMAIN.match(name) and len(name) <= 253
        else [f"metadata.name {name!r} is not a DNS subdomain"]
    )
    body = apply_defaults(copy.deepcopy(obj), schema)
    validator = jsonschema.Draft7Validator(to_json_schema(schema), format_checker=jsonschema.FormatChecker())
    errors += [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(body)
    ]
    if not errors:
        old_body = apply_defaults(copy.deepcopy(old), schema) if old is not None else None
        errors += cel_errors(body, schema, old_body)
    return errors


# ----------------------------------------------------------------------------------- built-in kinds


@cache
def _builtin_validator(api_version: str, kind: str):
    """The strict schema validator of one built-in kind, built once (kubernetes-validate's own `validate`
    re-reads its 1.3 MB definitions file on every call)."""
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    version = [v for v in utils.all_versions() if utils.major_minor(v) <= K8S_VERSION][-1]
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(f"{directory}/{kind.lower()}-{group_version}.json", K8S_VERSION)
    except FileNotFoundError:
        return None
    definitions = utils.schema_contents(f"{directory}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def builtin_errors(obj: dict) -> list[str]:
    validator = _builtin_validator(obj["apiVersion"], obj["kind"])
    if validator is None:
        return [f"no Kubernetes {K8S_VERSION} schema for {obj['apiVersion']} {obj['kind']}"]
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)
    ]


def builtin_errors_via_library(obj: dict) -> list[str]:
    """The same check through kubernetes-validate's public entry point (slower; for cross-checking)."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


# ------------------------------------------------------------------------------ third-party kinds

VALIDATOR_SCRIPT = Path(__file__).with_name("validate_models.mjs")


def third_party_validator_available() -> str | None:
    """None when the @kubernetes-models validator can run, else why not."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (TOOLS / "node" / "node_modules" / "@kubernetes-models").is_dir():
        return "the @kubernetes-models schemas are not installed: run hack/install-tools.sh"
    return None


_third_party_answers: dict[str, list[str]] = {}


def third_party_errors(objs: list[dict]) -> list[list[str]]:
    """Validates Gateway API / Istio / GKE objects in one node process (objects seen before are answered
    from memory); one error list per object."""
    texts = [json.dumps(o, sort_keys=True) for o in objs]
    new = sorted({t for t in texts if t not in _third_party_answers})
    if new:
        proc = subprocess.run(
            ["node", str(VALIDATOR_SCRIPT), str(TOOLS / "node")],
            input="\n".join(new),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"validate_models.mjs failed: {proc.stderr}")
        answers = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(answers) == len(new), proc.stdout
        for text, a in zip(new, answers, strict=True):
            _third_party_answers[text] = [] if a["ok"] else [a["error"]]
    return [_third_party_answers[t] for t in texts]


# -------------------------------------------------------------------------------------- dispatcher


def object_errors(objs: list[dict]) -> dict[int, list[str]]:
    """Errors of each object (by index) under the validator its group calls for."""
    out: dict[int, list[str]] = {}
    third = []
    for i, obj in enumerate(objs):
        group = gvk(obj)[0]
        if group.startswith("inference.networking."):
            out[i] = custom_resource_errors(obj)
        elif group in THIRD_PARTY_GROUPS:
            third.append(i)
        else:
            out[i] = builtin_errors(obj)
    for i, errors in zip(third, third_party_errors([objs[i] for i in third]), strict=True):
        out[i] = errors
    return out


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
