"""LLMRequest: the OpenAI request as the scheduler sees it, parsed once per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The OpenAI APIs we understand, chosen by the suffix of the request path.
COMPLETIONS = "completions"
CHAT_COMPLETIONS = "chat/completions"
EMBEDDINGS = "embeddings"
RESPONSES = "responses"
CONVERSATIONS = "conversations"


@dataclass(slots=True)
class LLMRequest:
    """One inference request.

    `model` is what the client sent; `target_model` is what the model server will be asked for (after
    `x-gateway-model-name-rewrite`). `prompt` is set for completions (a list prompt joined with a space),
    `messages` for chat completions, `input` for embeddings and responses. `body` is the decoded JSON
    object; plugins must treat it as read-only.
    """

    request_id: str
    api: str
    model: str
    target_model: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    size_bytes: int
    prompt: str | None = None
    messages: list[Any] | None = None
    input: Any = None
    instructions: Any = None
    tools: Any = None
    cache_salt: str | None = None
    stream: bool = False
    objective: str | None = None
    priority: int = 0
    fairness_id: str = "default-flow"
    # Computed lazily by whoever needs it first (e.g. the prefix plugins) and shared for the request.
    scratch: dict[str, Any] = field(default_factory=dict)


def header_only_request(request_id: str, headers: Mapping[str, str]) -> LLMRequest:
    """A request without a body (e.g. GET /v1/models)."""
    return LLMRequest(
        request_id=request_id,
        api="",
        model="",
        target_model="",
        body={},
        headers=headers,
        size_bytes=0,
    )
