"""OpenAI request parsing and response shaping for /v1/completions and /v1/chat/completions (pure).

Requests become a `ParsedRequest`: the prompt(s) as token ids (completions: the prompt text encoded with
the tokenizer's special tokens, as vLLM does; chat: the messages rendered by the chat template, then
encoded without special tokens), and the stop conditions. Errors raise `APIError` with the HTTP status
and an OpenAI-style message; the HTTP layer renders them as `{"error": {...}}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .chat import ChatTemplateError, render_chat
from .lora import LoRAAdapter
from .tokenizer import Tokenizer

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed", 409: "ConflictError",
                413: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError", 502: "BadGatewayError",
                503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}

class APIError(Exception):
    """A request error: HTTP status, message, and the offending parameter.

    Unknown body fields are ignored, as vLLM does; sampling fields (temperature, top_p, ...) are accepted
    and have no effect because decoding is greedy / deterministic in both engines.
    """

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": param,
                      "code": status}}


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What request parsing needs to know about the server."""

    served_model_names: Sequence[str]
    lookup_lora: Callable[[str], LoRAAdapter | None]
    tokenizer: Tokenizer
    default_max_tokens: int
    chat_template: str | None = None


@dataclass(slots=True)
class ParsedRequest:
    kind: str  # "completion" | "chat"
    model: str
    lora: LoRAAdapter | None
    prompts: list[list[int]]
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    cache_salt: str | None = None
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False


def _get(body: Mapping[str, Any], key: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise APIError(400, f"'{key}' must be of type {names}, got {type(value).__name__}", key)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def resolve_model(body: Mapping[str, Any], ctx: ModelContext) -> tuple[str, LoRAAdapter | None]:
    model = _get(body, "model", str)
    if model is None:
        return ctx.served_model_names[0], None
    if model in ctx.served_model_names:
        return model, None
    adapter = ctx.lookup_lora(model)
    if adapter is not None:
        return model, adapter
    raise APIError(400, f"The model `{model}` does not exist. Served models: "
                        f"{', '.join(ctx.served_model_names)} (see GET /v1/models).", "model")


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value)


def completion_prompts(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each prompt of a completions request (str, [str], [int] or [[int]])."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt, add_special_tokens=True)]
    if _is_token_list(prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [tokenizer.encode(p, add_special_tokens=True) for p in prompt]
        if all(_is_token_list(p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                        "token-id lists (non-empty)", "prompt")


def chat_prompt_text(body: Mapping[str, Any], ctx: ModelContext) -> str:
    """The prompt text the chat template renders for a chat request's messages."""
    kwargs = _get(body, "chat_template_kwargs", dict, {})
    template = _get(body, "chat_template", str) or ctx.chat_template or ctx.tokenizer.chat_template
    tok = ctx.tokenizer
    try:
        return render_chat(
            body.get("messages"),
            template,
            add_generation_prompt=_get(body, "add_generation_prompt", bool, True),
            continue_final_message=_get(body, "continue_final_message", bool, False),
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            tools=body.get("tools"),
            template_kwargs=kwargs,
        )
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), "messages") from exc


def parse_request(kind: str, body: Any, ctx: ModelContext) -> ParsedRequest:
    """Validates a completions (`kind="completion"`) or chat (`kind="chat"`) request body."""
    if not isinstance(body, Mapping):
        raise APIError(400, "the request body must be a JSON object")
    model, lora = resolve_model(body, ctx)
    if kind == "completion":
        if "prompt" not in body:
            raise APIError(400, "'prompt' is required", "prompt")
        if _get(body, "echo", bool, False):
            raise APIError(400, "'echo' is not supported by this server", "echo")
        prompts = completion_prompts(body["prompt"], ctx.tokenizer)
        max_tokens = _get(body, "max_tokens", int)
    else:
        if "messages" not in body:
            raise APIError(400, "'messages' is required", "messages")
        prompts = [ctx.tokenizer.encode(chat_prompt_text(body, ctx), add_special_tokens=False)]
        max_tokens = _get(body, "max_completion_tokens", int)
        if max_tokens is None:
            max_tokens = _get(body, "max_tokens", int)
    if max_tokens is None:
        max_tokens = ctx.default_max_tokens
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"only n=1 is supported, got n={n}", "n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise APIError(400, "logprobs are not supported by this server", "logprobs")
    min_tokens = _get(body, "min_tokens", int, 0)
    if not 0 <= min_tokens <= max_tokens:
        raise APIError(400, f"min_tokens must be between 0 and max_tokens ({max_tokens}), got {min_tokens}",
                       "min_tokens")
    stop = _get(body, "stop", (str, list), [])
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of non-empty strings", "stop")
    stop_token_ids = _get(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise APIError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    cache_salt = _get(body, "cache_salt", str)
    if cache_salt is not None and not cache_salt:
        raise APIError(400, "'cache_salt' must be a non-empty string", "cache_salt")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise APIError(400, "'stream_options' can only be set when 'stream' is true", "stream_options")
    options = options or {}
    return ParsedRequest(
        kind=kind,
        model=model,
        lora=lora,
        prompts=prompts,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=_get(body, "ignore_eos", bool, False),
        seed=_get(body, "seed", int),
        stop=list(stop),
        stop_token_ids=frozenset(stop_token_ids),
        cache_salt=cache_salt,
        stream=stream,
        include_usage=_get(options, "include_usage", bool, False),
        continuous_usage=_get(options, "continuous_usage_stats", bool, False),
    )


# ---- responses ---------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str
    finish_reason: str | None
    stop_reason: str | int | None = None


def completion_response(rid: str, model: str, choices: list[ChoiceResult], use: dict[str, Any],
                        created: int | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                     "stop_reason": c.stop_reason} for c in choices],
        "usage": use,
    }


def chat_response(rid: str, model: str, choice: ChoiceResult, use: dict[str, Any],
                  created: int | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [{"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                     "logprobs": None, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}],
        "usage": use,
    }


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
                     stop_reason: str | int | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                     "stop_reason": stop_reason}],
    }


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish_reason: str | None, stop_reason: str | int | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
                     "stop_reason": stop_reason}],
    }


def usage_chunk(kind: str, rid: str, model: str, created: int, use: dict[str, Any]) -> dict[str, Any]:
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
