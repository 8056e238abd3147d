"""`always-disagg-pd-decider` (llm-d): disaggregate every request."""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import CycleState


@register
class AlwaysDisaggPDDecider:
    """Approves disaggregated serving for every request, whatever its prompt and the decode pod's cache. For
    pools where every prompt is long and uncached, and for tests and benchmarks of the P/D path. Wrong for
    short or cached prompts, whose prefill is cheaper on the decode pod than a KV transfer."""

    type: ClassVar[str] = "always-disagg-pd-decider"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def disaggregate(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> bool:
        return True
