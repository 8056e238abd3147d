"""Disaggregated prefill/decode (P/D): pods by role, a profile handler that runs a decode and a prefill profile,
and the deciders that say when a request is worth splitting.

Modules:
  roles.py                   the `llm-d.ai/role` label and which of its values each filter keeps
  decode_filter.py           `decode-filter`: pods that can decode (unlabeled pods count as decode)
  prefill_filter.py          `prefill-filter`: pods that can prefill (unlabeled pods do not)
  disagg_profile_handler.py  `disagg-profile-handler`: decode profile first, then the prefill profile when the
                             prefill decider approves; sets `x-prefiller-host-port` for the decode side
  prefix_pd_decider.py       `prefix-based-pd-decider`: approve when the chosen decode pod's uncached prompt
                             tokens reach `nonCachedTokens`
  always_disagg_decider.py   `always-disagg-pd-decider`: approve every request

The contract between the handler and a decider is `PDDecider` below; the handler finds its decider by plugin
name (`deciders.prefill`) when the config is bound.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.types import CycleState

# The request header that tells the decode side (llm-d's routing sidecar, or epp-model-server in sidecar mode)
# which pod runs the prefill leg: `ip:port`.
PREFILLER_HEADER = "x-prefiller-host-port"


@runtime_checkable
class PDDecider(Protocol):
    """Decides, once the decode profile has chosen `endpoint`, whether the request's prefill runs on a
    separate prefill pod. Must be cheap and must not block (it runs on the scheduling path)."""

    name: str

    def disaggregate(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> bool: ...
