"""Data passed between the scheduler and its plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epp.datastore.endpoint import Endpoint


class CycleState(dict[str, Any]):
    """Scratch space of one scheduling cycle, shared by the plugins of that cycle (keyed by plugin name)."""


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """What one profile's picker chose: the target endpoints in preference order (first is the primary,
    the rest are fallbacks)."""

    endpoints: tuple[Endpoint, ...]


@dataclass(slots=True)
class SchedulingResult:
    """The outcome of a scheduling cycle: every profile that ran (None if it found no endpoint) and the
    name of the primary profile, whose endpoints the request is sent to."""

    profile_results: dict[str, ProfileResult | None]
    primary_profile: str
    # Extra request headers a profile handler wants set (e.g. the prefill endpoint of P/D serving).
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def primary(self) -> ProfileResult:
        result = self.profile_results.get(self.primary_profile)
        if result is None:
            raise LookupError(f"primary profile {self.primary_profile!r} has no result")
        return result

    @property
    def target_endpoints(self) -> tuple[Endpoint, ...]:
        return self.primary.endpoints


@dataclass(slots=True)
class ResponseInfo:
    """What the EPP has seen of the model server's response so far."""

    status: int = 0
    streaming: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    served_endpoint: str | None = None  # envoy.lb x-gateway-destination-endpoint-served
    first_chunk_time: float | None = None  # monotonic time of the first response body bytes
    end_of_stream: bool = False
    aborted: bool = False  # the stream ended before the response completed (client or Envoy went away)
    parser_state: Any = None  # owned by the Parser plugin between chunks
    # Headers a ResponseHeaderHook wants set on the response to the client (e.g. a session token).
    set_headers: dict[str, str] = field(default_factory=dict)


class SchedulingError(Exception):
    """No endpoint could be chosen. `status` is the HTTP status the client gets (503 or 429)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status
