"""Disaggregated prefill/decode (P/D): both legs of llm-d's flow, and its decode sidecar, in one program.

llm-d splits a request between two pods. The EPP picks a decode pod as the destination and names a prefill
pod in the header `x-prefiller-host-port: ip:port`. A sidecar beside the decode vLLM (llm-d's `pd-sidecar`,
NIXL v2 connector) then:

1. sends the request to the prefiller with `max_tokens` (and `max_completion_tokens`) 1, `stream: false`,
   no `stream_options`, and `kv_transfer_params = {do_remote_decode: true, do_remote_prefill: false,
   remote_engine_id: null, remote_block_ids: null, remote_host: null, remote_port: null}`, retrying answers
   502/503/504 up to `--prefill-max-retries` times;
2. sends the original request to the local decode engine with the `kv_transfer_params` the prefiller
   returned (vLLM's NIXL connector returns `do_remote_prefill: true, do_remote_decode: false,
   remote_block_ids, remote_engine_id, remote_host, remote_port, tp_size`).

Here the same server plays all three parts:

- Prefill leg (any role): a request whose `kv_transfer_params.do_remote_decode` is true runs its prefill
  only: it generates one token whatever its `max_tokens`, must not stream, and its response carries
  `kv_transfer_params` in the NIXL connector's shape: this server's engine id, its address and HTTP port,
  and the ids of the blocks holding the prompt. Its blocks are cached as usual (KV events, prefix-cache
  counters), so a later prefill of the same prefix hits. (vLLM keeps the blocks pinned until the decoder
  has read them; here they are freed at once and stay cached.)
- Decode leg (sim engine): a request whose `kv_transfer_params.do_remote_prefill` is true does not compute
  the prompt tokens its prefiller sent. The scheduler looks up the local prefix cache, allocates the
  prompt's blocks, and the request waits `--kv-transfer-latency + tokens x --kv-transfer-time-per-token`
  (tokens = prompt tokens beyond the local hit) while the engine steps other requests; then the prompt's
  blocks are registered (BlockStored on this pod) and only the last prompt token is computed, which yields
  the first output token. Decoding then runs as usual. See scheduler.py for the accounting: the prefix-
  cache counters count the local hit only, `usage.prompt_tokens_details.cached_tokens` counts every prompt
  token not computed here (the local hit plus the received ones, as vLLM reports it), TTFT includes the
  transfer, and `epp_model_server_kv_transfer_tokens_total` counts the tokens received.
- Sidecar (`--pd-sidecar`, on by default for `--role decode`): a request with `x-prefiller-host-port` and no
  `kv_transfer_params` of its own is first validated here, then prefilled there (step 1, through a pooled
  aiohttp client), then served here as the decode leg (step 2). A prefiller that still fails after the
  retries, or answers without usable `kv_transfer_params`, gives the client a 502 naming it: llm-d's
  sidecar does not fall back to a local prefill, and neither does this one. A 4xx from the prefiller is
  passed on with its status. Without the header, requests are served locally as always.

One INFO line per leg goes to the log (logger `epp_model_server.pd`), e.g.
`pd leg=prefill request_id=... prompt_tokens=8000 cached_tokens=0 blocks=500 ms=512.3` on the prefill pod and
`pd leg=decode request_id=... prefiller=10.0.0.5:8000 prefill_call_ms=530.1 attempts=1 prompt_tokens=8000
local_cached_tokens=0 kv_transfer_tokens=8000 kv_transfer_ms=40.0 completion_tokens=16 ms=...` on the decode
pod. The sidecar passes the client's `x-request-id` (or one it makes up) to the prefiller, so both lines
carry the same `request_id`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .metrics import ServerMetrics
from .openai_protocol import APIError, ParsedRequest

log = logging.getLogger(__name__)

PREFILLER_HEADER = "x-prefiller-host-port"
# llm-d's routing headers (pkg/common/routing/common.go): never forwarded to the prefiller, so a prefiller
# that is itself a sidecar cannot loop.
ROUTING_HEADERS = frozenset({PREFILLER_HEADER, "x-encoder-hosts-ports", "x-data-parallel-host-port",
                             "x-kv-cache-source-host-port"})
# Hop-by-hop and body-framing headers, which aiohttp sets itself for the new request.
_NOT_FORWARDED = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                            "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection",
                            "accept-encoding", "content-encoding", "content-type", "expect"}) | ROUTING_HEADERS
RETRY_STATUSES = frozenset({502, 503, 504})
# What the sidecar sends the prefiller as kv_transfer_params (llm-d's connector_nixlv2.go).
PREFILL_REQUEST_PARAMS: dict[str, Any] = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None,
    "remote_host": None, "remote_port": None,
}


# ---- kv_transfer_params ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KVTransferParams:
    """A request's `kv_transfer_params` (vLLM's NIXL connector fields; other keys are ignored)."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_block_ids: tuple[int, ...] | None = None
    remote_engine_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None

    @property
    def leg(self) -> str | None:
        """"prefill" for a prefill leg (do_remote_decode), "decode" for a decode leg, None for neither."""
        if self.do_remote_decode:
            return "prefill"
        if self.do_remote_prefill:
            return "decode"
        return None


def _flag(params: Mapping[str, Any], key: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"kv_transfer_params.{key} must be true or false, got {value!r}",
                       "kv_transfer_params")
    return value


def parse_kv_transfer_params(value: Any) -> KVTransferParams | None:
    """Validates a request's `kv_transfer_params` (None when absent). A decode leg needs the fields a prefill
    leg returns; a 400 names the field and the expected form."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise APIError(400, f"kv_transfer_params must be a JSON object, got {type(value).__name__}",
                       "kv_transfer_params")
    remote_decode, remote_prefill = _flag(value, "do_remote_decode"), _flag(value, "do_remote_prefill")
    if remote_decode and remote_prefill:
        raise APIError(400, "kv_transfer_params: do_remote_decode (prefill leg) and do_remote_prefill (decode "
                            "leg) cannot both be true", "kv_transfer_params")
    if not remote_prefill:
        return KVTransferParams(do_remote_decode=remote_decode)
    hint = "; send the kv_transfer_params a prefill leg returned"
    blocks = value.get("remote_block_ids")
    if (not isinstance(blocks, list) or not blocks
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks)):
        raise APIError(400, f"kv_transfer_params.remote_block_ids must be a non-empty list of block ids, got "
                            f"{_short(blocks)}{hint}", "kv_transfer_params")
    engine_id, host, port = value.get("remote_engine_id"), value.get("remote_host"), value.get("remote_port")
    if not isinstance(engine_id, str) or not engine_id:
        raise APIError(400, f"kv_transfer_params.remote_engine_id must be a non-empty string, got "
                            f"{_short(engine_id)}{hint}", "kv_transfer_params")
    if not isinstance(host, str) or not host:
        raise APIError(400, f"kv_transfer_params.remote_host must be a non-empty string, got {_short(host)}{hint}",
                       "kv_transfer_params")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise APIError(400, f"kv_transfer_params.remote_port must be a port number, got {_short(port)}{hint}",
                       "kv_transfer_params")
    return KVTransferParams(do_remote_prefill=True, remote_block_ids=tuple(blocks), remote_engine_id=engine_id,
                            remote_host=host, remote_port=port)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_leg(parsed: ParsedRequest, params: KVTransferParams, *, accepts_remote_kv: bool) -> None:
    """Refuses leg requests this server cannot serve truthfully (400 saying what to change)."""
    if len(parsed.prompts) != 1:
        raise APIError(400, f"kv_transfer_params applies to one prompt; this request has {len(parsed.prompts)}",
                       "prompt")
    if params.do_remote_decode and parsed.stream:
        raise APIError(400, "a prefill leg (kv_transfer_params.do_remote_decode) answers one JSON object with "
                            "kv_transfer_params; send it with stream false", "stream")
    if params.do_remote_prefill and not accepts_remote_kv:
        raise APIError(400, "this server runs --engine torch, whose K/V are real tensors that no prefiller "
                            "sends; serve decode legs (kv_transfer_params.do_remote_prefill) with --engine sim",
                       "kv_transfer_params")


def prefill_response_params(block_ids: list[int], *, engine_id: str, host: str, port: int) -> dict[str, Any]:
    """The `kv_transfer_params` of a prefill leg's response (the fields vLLM's NIXL connector returns)."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": block_ids,
            "remote_engine_id": engine_id, "remote_host": host, "remote_port": port, "tp_size": 1}


def new_engine_id() -> str:
    return str(uuid.uuid4())


# ---- the sidecar ----------------------------------------------------------------------------------------


def parse_hostport(value: str) -> tuple[str, int]:
    """`ip:port`, `host:port` or `[v6]:port` from x-prefiller-host-port; 400 naming the header otherwise."""
    text = value.strip()
    form = f"{PREFILLER_HEADER} must be one host:port (e.g. 10.0.0.5:8000), got {value!r}"
    if text.startswith("["):
        end = text.find("]")
        host, rest = (text[1:end], text[end + 1:]) if end > 0 else ("", "")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536 or "," in text:
        raise APIError(400, form, PREFILLER_HEADER)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(c.isalnum() or c in "-." for c in host):
            raise APIError(400, form, PREFILLER_HEADER) from None
    return host, int(port_text)


def prefill_request_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request the sidecar sends to the prefiller: the client's, made a one-token, non-streaming prefill
    leg. `min_tokens` is dropped (a value above 1 would make the one-token request invalid)."""
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out.pop("min_tokens", None)
    out["kv_transfer_params"] = dict(PREFILL_REQUEST_PARAMS)
    return out


def forwarded_headers(headers: Mapping[str, str], request_id: str) -> dict[str, str]:
    """The client's end-to-end headers minus llm-d's routing headers, with `x-request-id` set."""
    out = {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED and k.lower() != "x-request-id"}
    out["x-request-id"] = request_id
    out["content-type"] = "application/json"
    return out


@dataclass(frozen=True, slots=True)
class PrefillResult:
    prefiller: str
    params: KVTransferParams
    attempts: int
    seconds: float


class PrefillClient:
    """The sidecar's HTTP client to prefillers: one pooled aiohttp session, retries, OpenAI-style errors."""

    def __init__(self, *, max_retries: int = 3, backoff_s: float = 0.05, timeout_s: float = 300.0,
                 metrics: ServerMetrics | None = None, pool_size: int = 1024) -> None:
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=min(5.0, self.timeout_s)),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def prefill(self, prefiller: str, path: str, body: Mapping[str, Any],
                      headers: Mapping[str, str]) -> PrefillResult:
        """Runs the prefill leg of `body` on `prefiller` (host:port); returns the kv_transfer_params it sent.

        Raises APIError: the prefiller's own 4xx, or 502 naming the prefiller when it cannot be reached,
        keeps answering 502/503/504 after the retries, times out, fails otherwise, or answers without
        usable kv_transfer_params."""
        host, port = parse_hostport(prefiller)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"
        data = orjson.dumps(prefill_request_body(body))
        session = self._client()
        start = time.monotonic()
        attempts = 0
        last = ""
        ok = False
        try:
            while attempts <= self.max_retries:
                if attempts:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempts - 1))
                attempts += 1
                try:
                    async with session.post(url, data=data, headers=headers) as r:
                        status, raw = r.status, await r.read()
                except aiohttp.ClientConnectionError as exc:  # refused, reset, connect timeout: retry
                    last = f"cannot be reached ({_describe(exc)})"
                    continue
                except TimeoutError:
                    raise APIError(502, f"prefiller {prefiller} did not answer the prefill leg within "
                                        f"{self.timeout_s:g} s (--prefill-timeout)") from None
                if status in RETRY_STATUSES:
                    last = f"answered {status}: {_error_message(raw)}"
                    continue
                result = PrefillResult(prefiller, _transfer_params(prefiller, status, raw), attempts,
                                       time.monotonic() - start)
                ok = True
                return result
            raise APIError(502, f"prefiller {prefiller} failed the prefill leg after {attempts} attempt(s) "
                                f"(--prefill-max-retries {self.max_retries}): it {last}")
        finally:
            if self.metrics is not None:
                self.metrics.on_prefill_call(ok, max(0, attempts - 1))


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        data = orjson.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("message")
        if isinstance(message, str):
            return message[:300]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        pass
    return raw[:200].decode(errors="replace") or "(empty body)"


def _transfer_params(prefiller: str, status: int, raw: bytes) -> KVTransferParams:
    if 400 <= status < 500:
        raise APIError(status, f"prefiller {prefiller} refused the prefill leg: {_error_message(raw)}")
    if status != 200:
        raise APIError(502, f"prefiller {prefiller} answered {status} to the prefill leg: {_error_message(raw)}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(502, f"prefiller {prefiller} answered the prefill leg with a body that is not JSON: "
                            f"{raw[:120]!r}") from None
    value = data.get("kv_transfer_params") if isinstance(data, dict) else None
    why = "no kv_transfer_params"
    if value is not None:
        try:
            params = parse_kv_transfer_params(value)
        except APIError as exc:
            why = exc.message
        else:
            if params is not None and params.do_remote_prefill:
                return params
            why = "kv_transfer_params without do_remote_prefill: true"
    raise APIError(502, f"prefiller {prefiller} answered the prefill leg with {why}; is it a model server "
                        "with a KV connector (vLLM --kv-transfer-config, or epp-model-server)?")


# ---- logging --------------------------------------------------------------------------------------------


def log_prefill_leg(request_id: str, *, prompt_tokens: int, cached_tokens: int, blocks: int, seconds: float,
                    finish_reason: str | None) -> None:
    log.info("pd leg=prefill request_id=%s prompt_tokens=%d cached_tokens=%d blocks=%d finish=%s ms=%.1f",
             request_id, prompt_tokens, cached_tokens, blocks, finish_reason, seconds * 1e3)


def log_decode_leg(request_id: str, *, prefiller: str | None, prefill: PrefillResult | None, prompt_tokens: int,
                   local_cached_tokens: int | None, transfer_tokens: int, transfer_s: float, completion_tokens: int,
                   seconds: float, finish_reason: str | None) -> None:
    log.info("pd leg=decode request_id=%s prefiller=%s prefill_call_ms=%s attempts=%s prompt_tokens=%d "
             "local_cached_tokens=%s kv_transfer_tokens=%d kv_transfer_ms=%.1f completion_tokens=%d finish=%s "
             "ms=%.1f", request_id, prefiller or "-", f"{prefill.seconds * 1e3:.1f}" if prefill else "-",
             prefill.attempts if prefill else "-", prompt_tokens,
             "-" if local_cached_tokens is None else local_cached_tokens, transfer_tokens, transfer_s * 1e3,
             completion_tokens, finish_reason, seconds * 1e3)
