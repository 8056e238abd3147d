"""`openai-parser`: reads OpenAI API request bodies and the token usage of their responses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import orjson

from epp.request import LLMRequest, parse_openai_request
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import ResponseInfo

# A non-streamed response body is kept (for its `usage`) only up to this size.
MAX_BUFFERED_RESPONSE = 4 << 20


@register
class OpenAIParser:
    """Parses completions, chat completions, embeddings, responses and conversations requests (the API is
    chosen by the path suffix) and reads `usage` (prompt, completion and cached tokens) from JSON responses
    and from the SSE events of streamed ones (vLLM sends usage in the last event only when the request sets
    `stream_options.include_usage`). A non-streamed response larger than 4 MiB is not parsed for usage."""

    type: ClassVar[str] = "openai-parser"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str) -> LLMRequest:
        return parse_openai_request(body, headers, request_id)

    def parse_response_chunk(self, response: ResponseInfo, chunk: bytes, streaming: bool) -> None:
        """Feed one response body chunk; `response.end_of_stream` says whether it is the last."""
        if streaming:
            self._sse_chunk(response, chunk)
            return
        buf = response.parser_state
        if buf is False:  # already over the limit
            return
        if buf is None:
            buf = response.parser_state = bytearray()
        if len(buf) + len(chunk) > MAX_BUFFERED_RESPONSE:
            response.parser_state = False
            return
        buf += chunk
        if response.end_of_stream and b'"usage"' in buf:
            read_usage(response, bytes(buf))

    @staticmethod
    def _sse_chunk(response: ResponseInfo, chunk: bytes) -> None:
        # Only events that mention usage are decoded; an unfinished line is kept for the next chunk.
        pending = response.parser_state
        data = pending + chunk if pending else chunk
        cut = data.rfind(b"\n")
        if response.end_of_stream:
            complete, tail = data, b""
        else:
            complete, tail = data[: cut + 1], data[cut + 1 :]
        if b'"usage"' in complete:
            for line in complete.split(b"\n"):
                if line.startswith(b"data:") and b'"usage"' in line:
                    read_usage(response, line[5:].strip())
        response.parser_state = tail


def read_usage(response: ResponseInfo, payload: bytes) -> None:
    """Copy `usage` of a JSON response object into `response` (missing or malformed usage is ignored)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if isinstance(prompt, int):
        response.prompt_tokens = prompt
    if isinstance(completion, int):
        response.completion_tokens = completion
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        response.cached_tokens = details["cached_tokens"]
