"""`session-affinity-scorer` (llm-d): keep a client's session on the pod that served it, with a stateless token."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Literal

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState, ResponseInfo

SESSION_HEADER = "x-session-token"
# Tokens longer than this are not decoded (an endpoint name is at most a few hundred bytes).
MAX_TOKEN_CHARS = 1024


@lru_cache(maxsize=4096)
def encode_token(endpoint_name: str) -> str:
    """The session token naming an endpoint: standard base64 of its name (UTF-8)."""
    return base64.b64encode(endpoint_name.encode()).decode("ascii")


def decode_token(token: str) -> str | None:
    """The endpoint name a token carries, or None when it is not a token (bad base64, not UTF-8, empty, or
    longer than MAX_TOKEN_CHARS). Accepts the URL-safe alphabet and missing padding too."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    token = token.replace("-", "+").replace("_", "/")
    try:
        name = base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return name or None


@dataclass(frozen=True)
class SessionAffinityParams:
    """strategy  only `encoded_endpoint_header` (llm-d's default, stateless); llm-d's stateful `session_id`
              strategy is not implemented"""

    strategy: Literal["encoded_endpoint_header"] = "encoded_endpoint_header"


@register
class SessionAffinityScorer:
    """Scores 1.0 the endpoint named by the request header `x-session-token`, 0 every other one; and on every
    response sets `x-session-token` to the token of the endpoint that served it, so a client that echoes the
    header keeps its session (and the KV cache of its conversation) on one pod.

    The token is base64 of the endpoint's name (`<pod>-rank-<i>` under Kubernetes, `ip:port` for a static pool):
    stateless, so every EPP replica understands it, and it survives EPP restarts. It is not signed or encrypted:
    a client can read which pod served it and can name any pod; that only changes this scorer's preference,
    never which endpoints are eligible. A token that does not decode, or names no candidate (the pod left, or
    the filters dropped it), scores 0 everywhere, without an error.

    When it is wrong: it is a preference, not a pin; with a weight below the load scorers' sum, a busy session
    pod loses the request (and the response then names the new pod). A pod renamed (e.g. recreated by a
    Deployment) loses its sessions.
    """

    type: ClassVar[str] = "session-affinity-scorer"
    Params = SessionAffinityParams

    def __init__(self, name: str, params: SessionAffinityParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self._pool = handle.pool

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        token = request.headers.get(SESSION_HEADER)
        session = decode_token(token) if token else None
        return {ep: 1.0 if ep.name == session else 0.0 for ep in endpoints}

    def response_headers(self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint) -> None:
        """Name the endpoint that served the response: the routed one, or, when Envoy fell back to another
        (`served_endpoint` differs), that one if it is in the pool; no header when it cannot be named."""
        served = response.served_endpoint
        if served and served != endpoint.hostport:
            endpoint = next((ep for ep in self._pool.endpoints if ep.hostport == served), None)
            if endpoint is None:
                return
        response.set_headers[SESSION_HEADER] = encode_token(endpoint.name)
