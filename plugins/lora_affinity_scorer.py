"""`lora-affinity-scorer`: prefer endpoints where the requested LoRA adapter is loaded or can be loaded."""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import CycleState

ACTIVE = 1.0  # the adapter is running on the endpoint
HAS_ROOM = 0.8  # the endpoint has a free adapter slot to load it without evicting one
WAITING = 0.6  # the adapter is queued on the endpoint (it will be loaded there when a slot frees)
NO_AFFINITY = 0.0


@register
class LoRAAffinityScorer:
    """Scores each candidate for `request.target_model` from vLLM's `vllm:lora_requests_info` gauge
    (`metrics.active_models` = running adapters, `metrics.waiting_models` = waiting adapters,
    `metrics.max_active_models` = `max_lora`):

      1.0  the adapter is active there;
      0.8  else, active + waiting adapters < max_lora (room to load it without swapping one out);
      0.6  else, the adapter is waiting there;
      0.0  otherwise.

    Base-model requests. vLLM lists only adapters in that gauge, never the base model, and engines without
    LoRA (or without the metric: SGLang, Triton, TensorRT-LLM) report nothing, which reads as max_lora = 0.
    The reference EPP applies the table regardless, so in a pool where no endpoint reports LoRA information
    every candidate scores 0: ranking is unaffected, but the request loses this scorer's whole weight. Here,
    when no candidate reports LoRA information (max_lora = 0 and no adapter running or waiting on any of
    them), the scorer has no signal and every candidate scores 1.0, as the other scorers do when they cannot
    tell candidates apart (e.g. `queue-scorer` with equal queues). Ranking is the same as the reference's;
    totals, and so `weighted-random-picker`'s odds, get the same uniform offset every scorer's "all equal"
    case gives.

    When it is wrong: where some candidates report LoRA information, a base-model request cannot be told from
    a request for an adapter that is loaded nowhere yet, so the table applies and it leans towards endpoints
    with a free adapter slot (0.8) — the reference's behaviour, mild for a homogeneous pool (which an
    InferencePool should be). The gauge is also stale between scrapes.
    """

    type: ClassVar[str] = "lora-affinity-scorer"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def score(
        self, state: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        model = request.target_model
        out: dict[Endpoint, float] = {}
        any_lora_info = False
        for ep in endpoints:
            m = ep.metrics
            active = m.active_models
            waiting = m.waiting_models
            if m.max_active_models > 0 or active or waiting:
                any_lora_info = True
            if model in active:
                out[ep] = ACTIVE
            elif len(active) + len(waiting) < m.max_active_models:
                out[ep] = HAS_ROOM
            elif model in waiting:
                out[ep] = WAITING
            else:
                out[ep] = NO_AFFINITY
        if not any_lora_info:
            return dict.fromkeys(endpoints, ACTIVE)
        return out
