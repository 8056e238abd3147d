"""`label-selector-filter` (llm-d; deprecated alias `by-label-selector`): keep endpoints whose labels match a
Kubernetes label selector."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


@dataclass(frozen=True, slots=True)
class LabelSelectorRequirement:
    """One `matchExpressions` entry, as in Kubernetes' `metav1.LabelSelectorRequirement`."""

    key: str = ""
    operator: Operator | None = None
    values: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.key:
            raise ValueError("a `matchExpressions` entry needs a non-empty `key` (the label name)")
        if self.operator is None:
            raise ValueError(
                f"the `matchExpressions` entry for key {self.key!r} needs an `operator`: "
                "one of In, NotIn, Exists, DoesNotExist"
            )
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(
                f"the `matchExpressions` entry for key {self.key!r} with operator {self.operator} needs a "
                "non-empty `values` list"
            )
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(
                f"the `matchExpressions` entry for key {self.key!r} with operator {self.operator} must not "
                f"set `values` (got {self.values})"
            )


@dataclass(frozen=True, slots=True)
class LabelSelectorParams:
    """A Kubernetes `LabelSelector`: every `matchLabels` pair and every `matchExpressions` entry must hold."""

    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = field(default_factory=list)

    def validate(self) -> None:
        for key in self.match_labels:
            if not key:
                raise ValueError("`matchLabels` has an empty label name")


# Compiled requirement: (key, operator, values as a frozenset).
_Requirement = tuple[str, str, frozenset[str]]


def compile_selector(params: LabelSelectorParams) -> tuple[_Requirement, ...]:
    """The selector as a flat tuple of requirements; `matchLabels` k: v becomes `k In (v)`."""
    reqs: list[_Requirement] = [(k, "In", frozenset((v,))) for k, v in params.match_labels.items()]
    reqs.extend((r.key, str(r.operator), frozenset(r.values)) for r in params.match_expressions)
    return tuple(reqs)


def matches(requirements: tuple[_Requirement, ...], labels: dict[str, str]) -> bool:
    """Kubernetes semantics: `In` needs the label with a listed value; `NotIn` holds when the label is absent
    or its value is not listed; `Exists` / `DoesNotExist` test presence only."""
    for key, op, values in requirements:
        value = labels.get(key)
        if op == "In":
            if value is None or value not in values:
                return False
        elif op == "NotIn":
            if value is not None and value in values:
                return False
        elif op == "Exists":
            if value is None:
                return False
        elif value is not None:  # DoesNotExist
            return False
    return True


@register
class LabelSelectorFilter:
    """Keeps the endpoints whose labels (`endpoint.labels`, the pod's labels) match a Kubernetes label
    selector: `matchLabels` (exact values) and `matchExpressions` (operators In, NotIn, Exists,
    DoesNotExist), all of which must hold. An empty selector keeps every endpoint, as in Kubernetes.

    Use it to split one pool by role, hardware or version (e.g. `llm-d.ai/role In (decode, both)`). It is
    only as right as the labels: a pod relabelled without a restart is seen once the pod watcher delivers it.
    When nothing matches, the profile fails (503) — there is no fallback to the unfiltered set.
    """

    type: ClassVar[str] = "label-selector-filter"
    aliases: ClassVar[tuple[str, ...]] = ("by-label-selector",)
    Params = LabelSelectorParams

    def __init__(self, name: str, params: LabelSelectorParams, handle: PluginHandle) -> None:
        self.name = name
        self.requirements = compile_selector(params)

    def filter(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        reqs = self.requirements
        if not reqs:
            return endpoints
        return [ep for ep in endpoints if matches(reqs, ep.labels)]
