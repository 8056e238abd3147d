"""The HTTP API (aiohttp): vLLM's OpenAI-compatible routes plus /health, /metrics and admin routes.

Routes:
- POST /v1/completions, /v1/chat/completions: streaming (SSE, `data: {...}` then `data: [DONE]`) and not;
  `stream_options.include_usage` adds a last chunk with `choices: []` and `usage` (with
  `prompt_tokens_details.cached_tokens`); `continuous_usage_stats` puts usage on every chunk.
- GET /v1/models: the served model names and the loaded LoRA adapters.
- GET /health (200 once serving), GET /metrics (Prometheus text, vLLM names).
- POST /reset_prefix_cache (vLLM's; emits AllBlocksCleared), POST /tokenize, POST /detokenize,
  POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter (vLLM's runtime LoRA routes).

Every response, errors and streams included, carries `x-inference-pod` and `x-inference-port` (and
`x-inference-namespace` when POD_NAMESPACE is set), as llm-d's simulator does. Errors are OpenAI-shaped
JSON: 400 for a bad body or an unknown model, 404 for an unknown path, 405 for a wrong method, 502 when the
decode sidecar's prefiller fails.

Disaggregated prefill/decode (pd.py): `kv_transfer_params` in a generation request makes it a prefill leg
(`do_remote_decode`) or a decode leg (`do_remote_prefill`); with the sidecar on, a request carrying
`x-prefiller-host-port` is first prefilled on that pod.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .detokenize import IncrementalDetokenizer
from .engine import Engine, RequestHandle
from .lora import LoRAConfigError, LoRARegistry
from .metrics import ServerMetrics
from .openai_protocol import (
    APIError,
    ChoiceResult,
    ModelContext,
    ParsedRequest,
    chat_chunk,
    chat_prompt_text,
    chat_response,
    completion_chunk,
    completion_prompts,
    completion_response,
    error_body,
    parse_request,
    resolve_model,
    usage,
    usage_chunk,
)
from .pd import (
    PREFILLER_HEADER,
    KVTransferParams,
    PrefillClient,
    PrefillResult,
    check_leg,
    forwarded_headers,
    log_decode_leg,
    log_prefill_leg,
    parse_kv_transfer_params,
    prefill_response_params,
)
from .request import EngineRequest, SamplingParams
from .scheduler import RequestRejected
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATE_KEY: web.AppKey[ServerState] = web.AppKey("epp_model_server_state")


@dataclass
class ServerState:
    served_model_names: list[str]
    model_path: str
    max_model_len: int
    tokenizer: Tokenizer
    engine: Engine
    metrics: ServerMetrics
    loras: LoRARegistry
    default_max_tokens: int
    chat_template: str | None = None
    pod_name: str = ""
    port: int = 0
    namespace: str | None = None
    clock: Any = time.monotonic
    created: int = field(default_factory=lambda: int(time.time()))
    # Disaggregated prefill/decode (pd.py): the pod's llm-d role (informational), the decode sidecar's client
    # (None: the sidecar is off), and what a prefill leg's kv_transfer_params name as this engine.
    role: str = "both"
    sidecar: PrefillClient | None = None
    engine_id: str = ""
    advertised_host: str = ""
    accepts_remote_kv: bool = True
    warned_no_sidecar: bool = False

    def model_context(self) -> ModelContext:
        return ModelContext(
            served_model_names=self.served_model_names,
            lookup_lora=self.loras.get,
            tokenizer=self.tokenizer,
            default_max_tokens=self.default_max_tokens,
            chat_template=self.chat_template,
        )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return _json(error_body(status, message, param), status)


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as exc:
        return _json(exc.body(), exc.status)
    except web.HTTPNotFound:
        return _error(404, f"no route for {request.path}; see the server's README for the API")
    except web.HTTPMethodNotAllowed as exc:
        return _error(405, f"{request.method} is not allowed on {request.path} (allowed: "
                           f"{', '.join(sorted(exc.allowed_methods))})")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal server error; see the server log")


async def _add_pod_headers(request: web.Request, response: web.StreamResponse) -> None:
    state = request.app[STATE_KEY]
    response.headers["x-inference-pod"] = state.pod_name
    response.headers["x-inference-port"] = str(state.port)
    if state.namespace:
        response.headers["x-inference-namespace"] = state.namespace


# ---- generation ----------------------------------------------------------------------------------------


@dataclass
class _Choice:
    index: int
    handle: RequestHandle
    detok: IncrementalDetokenizer
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.handle.request.num_prompt_tokens

    @property
    def cached_tokens(self) -> int:
        return self.handle.request.num_cached_tokens or 0


def _request_id(given: str | None, prefix: str) -> str:
    suffix = uuid.uuid4().hex
    return f"{prefix}-{given}-{suffix[:8]}" if given else f"{prefix}-{suffix}"


def _submit(state: ServerState, parsed: ParsedRequest, rid: str,
            transfer: KVTransferParams | None = None) -> list[_Choice]:
    choices = []
    prefill_leg = transfer is not None and transfer.do_remote_decode
    try:
        for i, prompt in enumerate(parsed.prompts):
            params = SamplingParams(
                max_tokens=1 if prefill_leg else parsed.max_tokens, min_tokens=0 if prefill_leg else parsed.min_tokens,
                ignore_eos=parsed.ignore_eos, stop_token_ids=parsed.stop_token_ids, seed=parsed.seed,
            )
            req = EngineRequest(
                request_id=f"{rid}-{i}", prompt_token_ids=prompt, params=params, arrival_time=state.clock(),
                lora=parsed.lora, cache_salt=parsed.cache_salt,
                remote_decode=prefill_leg, remote_prefill=transfer is not None and transfer.do_remote_prefill,
            )
            handle = state.engine.submit(req)
            choices.append(_Choice(i, handle, IncrementalDetokenizer(state.tokenizer, parsed.stop)))
    except (RequestRejected, ValueError) as exc:
        for c in choices:
            state.engine.abort(c.handle.request)
        raise APIError(400, str(exc), "prompt") from exc
    return choices


async def _events(state: ServerState, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, str, bool]]:
    """(choice, text delta, finished) as outputs arrive, merging the choices' streams."""

    async def one(choice: _Choice) -> AsyncIterator[tuple[_Choice, str, bool]]:
        async for out in choice.handle.outputs():
            if choice.finish_reason is not None:
                continue
            choice.completion_tokens += len(out.new_token_ids)
            delta = choice.detok.add(out.new_token_ids)
            if out.finished:
                delta += choice.detok.flush()
            finished = out.finished
            if choice.detok.stopped_on is not None:
                choice.finish_reason, choice.stop_reason = "stop", choice.detok.stopped_on
                if not out.finished:
                    state.engine.abort(choice.handle.request)
                finished = True
            elif out.finished:
                choice.finish_reason = out.finish_reason
                req = choice.handle.request
                if out.finish_reason == "stop" and req.output_token_ids:
                    last = req.output_token_ids[-1]
                    choice.stop_reason = last if last in req.params.stop_token_ids else None
            yield choice, delta, finished

    if len(choices) == 1:
        async for item in one(choices[0]):
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(choice: _Choice) -> None:
        try:
            async for item in one(choice):
                queue.put_nowait(item)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    return usage(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices),
                 sum(c.cached_tokens for c in choices))


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await _body(request)
    parsed = parse_request(kind, body, state.model_context())
    transfer = parse_kv_transfer_params(body.get("kv_transfer_params"))
    given = request.headers.get("x-request-id")
    prefiller = request.headers.get(PREFILLER_HEADER)
    prefill: PrefillResult | None = None
    if transfer is not None and transfer.leg is None:
        transfer = None
    if prefiller is not None and transfer is None:
        if state.sidecar is None:
            if not state.warned_no_sidecar:
                state.warned_no_sidecar = True
                log.warning("ignoring %s (%s): the decode sidecar is off (--role %s); serving such requests "
                            "locally. Start with --pd-sidecar to prefill them there.", PREFILLER_HEADER, prefiller,
                            state.role)
        else:
            check_leg(parsed, KVTransferParams(do_remote_prefill=True), accepts_remote_kv=state.accepts_remote_kv)
            given = given or uuid.uuid4().hex
            prefill = await state.sidecar.prefill(prefiller.strip(), request.path_qs, body,
                                                  forwarded_headers(request.headers, given))
            transfer = prefill.params
    if transfer is not None:
        check_leg(parsed, transfer, accepts_remote_kv=state.accepts_remote_kv)
    rid = _request_id(given, "cmpl" if kind == "completion" else "chatcmpl")
    created = int(time.time())
    started = state.clock()
    choices = _submit(state, parsed, rid, transfer)
    try:
        if parsed.stream:
            return await _stream(request, state, parsed, choices, rid, created)
        async for _ in _events(state, choices):
            pass
        use = _usage(choices)
        results = [ChoiceResult(c.index, c.detok.text, c.finish_reason, c.stop_reason) for c in choices]
        if kind == "completion":
            data = completion_response(rid, parsed.model, results, use, created)
        else:
            data = chat_response(rid, parsed.model, results[0], use, created)
        if transfer is not None:
            data["kv_transfer_params"] = _response_transfer_params(state, transfer, choices[0])
        return _json(data)
    finally:
        for c in choices:
            if not c.handle.request.finished:
                state.engine.abort(c.handle.request)
        if transfer is not None:
            _leg_done(state, transfer, choices[0], given or rid, prefiller, prefill, state.clock() - started)


def _response_transfer_params(state: ServerState, transfer: KVTransferParams,
                              choice: _Choice) -> dict[str, Any] | None:
    """A prefill leg answers with what a decoder needs to fetch its KV; a decode leg with null (as vLLM)."""
    if not transfer.do_remote_decode:
        return None
    return prefill_response_params(list(choice.handle.request.transfer_block_ids or []),
                                   engine_id=state.engine_id, host=state.advertised_host, port=state.port)


def _leg_done(state: ServerState, transfer: KVTransferParams, choice: _Choice, request_id: str,
              prefiller: str | None, prefill: PrefillResult | None, seconds: float) -> None:
    """Counts the leg and logs its line (pd.py)."""
    req = choice.handle.request
    leg = transfer.leg
    if leg is None:
        return
    state.metrics.on_pd_leg(leg)
    reason = choice.finish_reason or req.finish_reason or "abort"
    if leg == "prefill":
        log_prefill_leg(request_id, prompt_tokens=req.num_prompt_tokens, cached_tokens=req.num_cached_tokens or 0,
                        blocks=len(req.transfer_block_ids or []), seconds=seconds, finish_reason=reason)
    else:
        log_decode_leg(request_id, prefiller=prefiller.strip() if prefill and prefiller else None, prefill=prefill,
                       prompt_tokens=req.num_prompt_tokens, local_cached_tokens=req.num_local_cached_tokens,
                       transfer_tokens=req.num_transferred_tokens,
                       transfer_s=state.engine.transfer_seconds(req.num_transferred_tokens),
                       completion_tokens=choice.completion_tokens, seconds=seconds, finish_reason=reason)


async def _stream(request: web.Request, state: ServerState, parsed: ParsedRequest, choices: list[_Choice],
                  rid: str, created: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        await _write_stream(response, state, parsed, choices, rid, created)
    except ConnectionResetError:
        log.debug("client of %s went away; aborting", rid)
    return response


async def _write_stream(response: web.StreamResponse, state: ServerState, parsed: ParsedRequest,
                        choices: list[_Choice], rid: str, created: int) -> None:
    model = parsed.model
    started: set[int] = set()
    async for choice, delta, finished in _events(state, choices):
        if parsed.kind == "completion":
            chunk = completion_chunk(rid, model, created, choice.index, delta,
                                     choice.finish_reason if finished else None,
                                     choice.stop_reason if finished else None)
        else:
            if choice.index not in started:
                started.add(choice.index)
                first = chat_chunk(rid, model, created, choice.index, {"role": "assistant", "content": ""}, None)
                if parsed.continuous_usage:
                    first["usage"] = _usage(choices)
                await response.write(_sse(first))
            chunk = chat_chunk(rid, model, created, choice.index, {"content": delta} if delta else {},
                               choice.finish_reason if finished else None,
                               choice.stop_reason if finished else None)
        if parsed.continuous_usage:
            chunk["usage"] = _usage(choices)
        await response.write(_sse(chunk))
    if parsed.include_usage:
        await response.write(_sse(usage_chunk(parsed.kind, rid, model, created, _usage(choices))))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


# ---- other routes --------------------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = [
        {"id": name, "object": "model", "created": state.created, "owned_by": "vllm", "root": state.model_path,
         "parent": None, "max_model_len": state.max_model_len}
        for name in state.served_model_names
    ]
    data += [
        {"id": a.name, "object": "model", "created": state.created, "owned_by": "vllm", "root": a.path,
         "parent": a.base_model_name or state.served_model_names[0], "max_model_len": state.max_model_len}
        for a in state.loras
    ]
    # Our addition: the pod's llm-d role and whether the decode sidecar is on (clients ignore unknown keys).
    return _json({"object": "list", "data": data, "role": state.role, "pd_sidecar": state.sidecar is not None})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.Response(text=state.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    request.app[STATE_KEY].engine.reset_prefix_cache()
    return web.Response(status=200)


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: `{model?, prompt}` or `{model?, messages, ...}` -> `{count, max_model_len, tokens}`."""
    state = request.app[STATE_KEY]
    body = await _body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    ctx = state.model_context()
    resolve_model(body, ctx)
    if "messages" in body:
        tokens = state.tokenizer.encode(chat_prompt_text(body, ctx), add_special_tokens=False)
    elif isinstance(body.get("prompt"), str):
        tokens = completion_prompts(body["prompt"], state.tokenizer)[0]
    else:
        raise APIError(400, "send 'prompt' (a string) or 'messages'", "prompt")
    return _json({"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await _body(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise APIError(400, "'tokens' must be a list of integers", "tokens")
    return _json({"prompt": state.tokenizer.decode(tokens)})


async def load_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await _body(request)
    name = body.get("lora_name") if isinstance(body, dict) else None
    path = body.get("lora_path") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise APIError(400, "'lora_name' and 'lora_path' must be non-empty strings", "lora_name")
    if name in state.served_model_names:
        raise APIError(400, f"'{name}' is a served model name, not an adapter", "lora_name")
    try:
        state.loras.add(name, path)
    except LoRAConfigError as exc:
        raise APIError(400, str(exc), "lora_name") from exc
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await _body(request)
    name = body.get("lora_name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise APIError(400, "'lora_name' must be a non-empty string", "lora_name")
    busy = set(state.engine.scheduler.running_lora_names()) | set(state.engine.scheduler.waiting_lora_names())
    if name in busy:
        raise APIError(409, f"LoRA adapter '{name}' has requests in flight; retry when they are done",
                       "lora_name")
    try:
        state.loras.remove(name)
    except LoRAConfigError as exc:
        raise APIError(404, str(exc), "lora_name") from exc
    state.engine.scheduler.loras.discard(name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    app.on_response_prepare.append(_add_pod_headers)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    return app
