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


# --------------------------------------------------------------------------------------------------------
# OpenAI request parsing

import uuid  # noqa: E402

import orjson  # noqa: E402

from epp.errors import RequestError  # noqa: E402

# Request headers the gateway API reserves (read by the EPP, never forwarded as given).
REQUEST_ID = "x-request-id"
OBJECTIVE = "x-gateway-inference-objective"
FAIRNESS_ID = "x-gateway-inference-fairness-id"
MODEL_REWRITE = "x-gateway-model-name-rewrite"

_API_SUFFIXES = (
    ("/chat/completions", CHAT_COMPLETIONS),
    ("/completions", COMPLETIONS),
    ("/embeddings", EMBEDDINGS),
    ("/responses", RESPONSES),
    ("/conversations", CONVERSATIONS),
)


def request_path(headers: Mapping[str, str]) -> str:
    """The request path without query: `:path`, else `x-original-path` / `x-forwarded-path`."""
    path = headers.get(":path") or headers.get("x-original-path") or headers.get("x-forwarded-path") or ""
    q = path.find("?")
    return path if q < 0 else path[:q]


def api_of_path(path: str) -> str:
    """The OpenAI API a path names, by suffix; "" for a path we do not know (routed by model only)."""
    path = path.rstrip("/")
    for suffix, api in _API_SUFFIXES:
        if path.endswith(suffix):
            return api
    return ""


def request_id_of(headers: Mapping[str, str]) -> str:
    return headers.get(REQUEST_ID) or str(uuid.uuid4())


def _prompt_text(prompt: Any) -> str:
    """A completions `prompt`: a string, a list of strings (joined with a space), or token ids (a list of
    ints, or a list of such lists), rendered as their decimal ids so that equal prompts hash equally."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return " ".join(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return " ".join(map(str, prompt))
        if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            return " ".join(" ".join(map(str, p)) for p in prompt)
    raise RequestError(400, "`prompt` must be a non-empty string, a list of strings or a list of token ids")


def _check_messages(messages: Any) -> list[Any]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` must be a non-empty list of chat messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"`messages[{i}]` must be an object with a string `role`")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(400, f"`messages[{i}].content` must be a string or a list of content parts")
    return messages


def parse_openai_request(body: bytes, headers: Mapping[str, str], request_id: str) -> LLMRequest:
    """Parse an OpenAI API request body. Raises RequestError(400) with a message that says what is wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model not found in request body: set `model` to the model to serve")
    api = api_of_path(request_path(headers))
    salt = data.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise RequestError(400, "`cache_salt` must be a string")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "`stream` must be true or false")
    req = LLMRequest(
        request_id=request_id,
        api=api,
        model=model,
        target_model=headers.get(MODEL_REWRITE) or model,
        body=data,
        headers=headers,
        size_bytes=len(body),
        cache_salt=salt,
        stream=stream,
        objective=headers.get(OBJECTIVE) or None,
        fairness_id=headers.get(FAIRNESS_ID) or "default-flow",
    )
    if api == COMPLETIONS:
        if "prompt" not in data:
            raise RequestError(400, "`prompt` is required for /v1/completions")
        req.prompt = _prompt_text(data["prompt"])
        if not req.prompt:
            raise RequestError(400, "`prompt` must not be empty")
    elif api == CHAT_COMPLETIONS:
        req.messages = _check_messages(data.get("messages"))
    elif api in (EMBEDDINGS, RESPONSES):
        inp = data.get("input")
        if inp is None or inp == "" or inp == []:
            raise RequestError(400, f"`input` is required and must not be empty for /v1/{api}")
        req.input = inp
        req.instructions = data.get("instructions")
        req.tools = data.get("tools")
    elif api == CONVERSATIONS:
        items = data.get("items")
        if not isinstance(items, list) or not items:
            raise RequestError(400, "`items` must be a non-empty list for /v1/conversations")
        req.input = items
    return req
