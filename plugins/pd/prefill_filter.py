"""`prefill-filter` (llm-d): keep the pods that can run the prefill leg."""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import CycleState
from plugins.pd.roles import PREFILL_ROLES, filter_by_role


@register
class PrefillFilter:
    """Keeps the endpoints whose `llm-d.ai/role` label is prefill, encode-prefill, prefill-decode, both or
    encode-prefill-decode. Unlike `decode-filter` it drops unlabeled pods: a pod becomes a prefill target only
    when it says so, so a pool without role labels never disaggregates. Takes no parameters.

    Only as right as the labels. When it leaves nothing, the prefill profile fails and the
    disagg-profile-handler serves the request aggregated on the decode pod.
    """

    type: ClassVar[str] = "prefill-filter"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def filter(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return filter_by_role(endpoints, PREFILL_ROLES, keep_unlabeled=False)
