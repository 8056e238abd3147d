"""`decode-filter` (llm-d): keep the pods that can run the decode leg."""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import CycleState
from plugins.pd.roles import DECODE_ROLES, filter_by_role


@register
class DecodeFilter:
    """Keeps the endpoints whose `llm-d.ai/role` label is decode, prefill-decode, both or encode-prefill-decode,
    and the endpoints without the label (or with an empty value): as upstream, an unlabeled pod is an ordinary
    aggregated server, which can decode. Takes no parameters; other labeling schemes use
    `label-selector-filter`.

    Only as right as the labels: a prefill-only pod left unlabeled is treated as a decode pod.
    """

    type: ClassVar[str] = "decode-filter"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def filter(self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return filter_by_role(endpoints, DECODE_ROLES, keep_unlabeled=True)
