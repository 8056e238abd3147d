"""`by-label-filter` / `by-label` (llm-d, deprecated): keep endpoints whose value of one label is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState


@dataclass(frozen=True, slots=True)
class ByLabelParams:
    label: str = ""  # the label name, e.g. llm-d.ai/role
    valid_values: list[str] = field(default_factory=list)  # values that keep an endpoint
    allows_no_label: bool = False  # keep endpoints that do not carry the label at all

    def validate(self) -> None:
        if not self.label:
            raise ValueError("`label` must name the label to filter on (e.g. llm-d.ai/role)")
        if not self.valid_values and not self.allows_no_label:
            raise ValueError(
                "either `validValues` must list at least one value or `allowsNoLabel` must be true; "
                "otherwise every endpoint would be dropped"
            )


@register
class ByLabelFilter:
    """Keeps the endpoints whose label `label` (in `endpoint.labels`) has one of `validValues`, plus, when
    `allowsNoLabel` is true, the endpoints without that label. Deprecated in llm-d in favour of
    `label-selector-filter` (`matchExpressions: [{key, operator: In, values}]`), kept so old configs run.

    Only as right as the labels; when nothing matches, the profile fails (503).
    """

    type: ClassVar[str] = "by-label-filter"
    aliases: ClassVar[tuple[str, ...]] = ("by-label",)
    Params = ByLabelParams

    def __init__(self, name: str, params: ByLabelParams, handle: PluginHandle) -> None:
        self.name = name
        self.label = params.label
        self.valid_values = frozenset(params.valid_values)
        self.allows_no_label = params.allows_no_label

    def filter(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        label = self.label
        valid = self.valid_values
        allows_no_label = self.allows_no_label
        out: list[Endpoint] = []
        for ep in endpoints:
            value = ep.labels.get(label)
            if (value is None and allows_no_label) or (value is not None and value in valid):
                out.append(ep)
        return out
