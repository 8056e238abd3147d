"""Errors a client can cause, rendered as OpenAI-style JSON error bodies."""

from __future__ import annotations

import orjson

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError", 429: "RateLimitError",
          500: "InternalServerError", 503: "ServiceUnavailableError"}


class RequestError(Exception):
    """A request the EPP refuses. `status` is the HTTP status the client receives."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code)


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """`{"error": {"message", "type", "param", "code"}}` as the OpenAI API returns it."""
    return orjson.dumps(
        {"error": {"message": message, "type": _TYPES.get(status, "APIError"), "param": None, "code": code or status}}
    )
