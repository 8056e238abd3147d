"""The P/D legs and the decode sidecar over HTTP: in-process servers on loopback, a scripted fake prefiller
for the sidecar's retry and error paths, and two real servers for the whole flow."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from epp_model_server.config import ServerConfig, parse_args
from epp_model_server.pd import PREFILL_REQUEST_PARAMS
from epp_model_server.server import ConfigurationError, ModelServer

BS = 16
PROMPT = [1000 + i for i in range(100)]  # 6 full blocks + 4 tokens
DECODE_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [4, 5, 6, 7, 8, 9, 10],
                 "remote_engine_id": "engine-x", "remote_host": "10.0.0.9", "remote_port": 8000, "tp_size": 1}


# ---- harness --------------------------------------------------------------------------------------------


@pytest.fixture
async def servers():
    """A factory of in-process model servers on 127.0.0.1 (sim engine, 50x faster clock)."""
    started: list[ModelServer] = []

    async def start(**overrides) -> ModelServer:
        kw = {"host": "127.0.0.1", "port": 0, "time_scale": 50.0, "num_gpu_blocks": 512, "block_size": BS,
              "prefill_retry_backoff_ms": 1.0, **overrides}
        server = ModelServer(ServerConfig(**kw))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict


@dataclass
class FakePrefiller:
    """Answers each call with the next scripted (status, body, delay); the last one repeats."""

    script: list[tuple[int, object, float]]
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(Seen(request.path, headers, await request.json()))
        status, body, delay = self.script[min(len(self.seen) - 1, len(self.script) - 1)]
        if delay:
            await asyncio.sleep(delay)
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        return web.Response(status=status, body=raw, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]


def ok_prefill(params=DECODE_PARAMS) -> tuple[int, dict, float]:
    return 200, {"id": "cmpl-p", "object": "text_completion", "choices": [{"index": 0, "text": "x",
                 "finish_reason": "length"}], "kv_transfer_params": params}, 0.0


def error(status: int, message: str = "busy") -> tuple[int, dict, float]:
    return status, {"error": {"message": message, "type": "X", "param": None, "code": status}}, 0.0


@pytest.fixture
async def fake():
    made: list[FakePrefiller] = []

    async def start(*script) -> FakePrefiller:
        f = FakePrefiller(list(script))
        await f.start()
        made.append(f)
        return f

    yield start
    for f in made:
        await f.runner.cleanup()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def url(server: ModelServer, path: str = "/v1/completions") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def post(http, server, body, headers=None, path="/v1/completions") -> tuple[int, dict]:
    async with http.post(url(server, path), data=orjson.dumps(body), headers=headers or {}) as r:
        return r.status, await r.json(content_type=None)


def counters(server: ModelServer) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(server.metrics.render()):
        for s in fam.samples:
            key = s.name + ("{" + s.labels["outcome"] + "}" if "outcome" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the prefill leg ------------------------------------------------------------------------------------


async def test_a_prefill_leg_answers_one_token_and_the_kv_transfer_params_of_its_blocks(servers, http):
    server = await servers(role="prefill")
    body = {"prompt": PROMPT, "max_tokens": 50, "kv_transfer_params": PREFILL_REQUEST_PARAMS}
    status, data = await post(http, server, body)
    assert status == 200, data
    assert data["usage"]["completion_tokens"] == 1 and data["choices"][0]["finish_reason"] == "length"
    params = data["kv_transfer_params"]
    assert params == {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": params["remote_block_ids"],
                      "remote_engine_id": server.state.engine_id, "remote_host": "127.0.0.1",
                      "remote_port": server.port, "tp_size": 1}
    assert len(params["remote_block_ids"]) == 7 and len(set(params["remote_block_ids"])) == 7  # ceil(100/16)
    assert re.fullmatch(r"[0-9a-f-]{36}", params["remote_engine_id"])
    c = counters(server)
    assert c["epp_model_server_pd_prefill_legs_total"] == 1 and c["epp_model_server_pd_decode_legs_total"] == 0
    assert (c["vllm:prompt_tokens_total"], c["vllm:generation_tokens_total"]) == (100, 1)


async def test_a_second_prefill_of_the_same_prompt_hits_the_prefix_cache(servers, http):
    server = await servers(role="prefill")
    body = {"prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": PREFILL_REQUEST_PARAMS}
    first, second = (await post(http, server, body))[1], (await post(http, server, body))[1]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert second["kv_transfer_params"]["remote_block_ids"][:6] == first["kv_transfer_params"]["remote_block_ids"][:6]
    c = counters(server)
    assert (c["vllm:prefix_cache_queries_total"], c["vllm:prefix_cache_hits_total"]) == (200, 96)


async def test_plain_requests_have_no_kv_transfer_params_in_their_response(servers, http):
    server = await servers()
    for params in (None, {"do_remote_decode": False, "do_remote_prefill": False}):
        body = {"prompt": PROMPT, "max_tokens": 2}
        if params is not None:
            body["kv_transfer_params"] = params
        status, data = await post(http, server, body)
        assert status == 200 and "kv_transfer_params" not in data and data["usage"]["completion_tokens"] == 2
    assert counters(server)["epp_model_server_pd_prefill_legs_total"] == 0


# ---- the decode leg -------------------------------------------------------------------------------------


async def test_a_decode_leg_receives_the_prompt_and_decodes_with_null_kv_transfer_params(servers, http):
    server = await servers(role="decode", pd_sidecar=False)
    status, data = await post(http, server, {"prompt": PROMPT, "max_tokens": 5, "kv_transfer_params": DECODE_PARAMS})
    assert status == 200, data
    assert data["kv_transfer_params"] is None
    assert data["usage"] == {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                             "prompt_tokens_details": {"cached_tokens": 99}}
    c = counters(server)
    assert c["epp_model_server_pd_decode_legs_total"] == 1
    assert c["epp_model_server_kv_transfer_tokens_total"] == 100
    assert (c["vllm:prefix_cache_queries_total"], c["vllm:prefix_cache_hits_total"]) == (100, 0)
    assert (c["vllm:prompt_tokens_total"], c["vllm:generation_tokens_total"]) == (100, 5)


async def test_a_decode_leg_gives_the_same_text_as_serving_the_request_whole(servers, http):
    whole, decode = await servers(), await servers(role="decode", pd_sidecar=False)
    body = {"prompt": PROMPT, "max_tokens": 8, "seed": 7}
    expected = (await post(http, whole, body))[1]["choices"][0]["text"]
    got = (await post(http, decode, {**body, "kv_transfer_params": DECODE_PARAMS}))[1]["choices"][0]["text"]
    assert got == expected


@pytest.mark.parametrize(("params", "message"), [
    ("yes", "kv_transfer_params must be a JSON object"),
    ({"do_remote_decode": "true"}, "kv_transfer_params.do_remote_decode must be true or false"),
    ({"do_remote_decode": True, "do_remote_prefill": True}, "cannot both be true"),
    ({**DECODE_PARAMS, "remote_block_ids": None}, "kv_transfer_params.remote_block_ids must be a non-empty list"),
    ({**DECODE_PARAMS, "remote_block_ids": [1, "2"]}, "kv_transfer_params.remote_block_ids must be a non-empty list"),
    ({**DECODE_PARAMS, "remote_engine_id": ""}, "kv_transfer_params.remote_engine_id must be a non-empty string"),
    ({**DECODE_PARAMS, "remote_host": None}, "kv_transfer_params.remote_host must be a non-empty string"),
    ({**DECODE_PARAMS, "remote_port": 70000}, "kv_transfer_params.remote_port must be a port number"),
])
async def test_malformed_kv_transfer_params_get_a_400_naming_the_field(servers, http, params, message):
    server = await servers()
    status, data = await post(http, server, {"prompt": PROMPT, "kv_transfer_params": params})
    assert status == 400 and message in data["error"]["message"], data
    assert data["error"]["param"] == "kv_transfer_params"


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"kv_transfer_params": PREFILL_REQUEST_PARAMS, "stream": True}, "stream", "send it with stream false"),
    ({"kv_transfer_params": DECODE_PARAMS, "prompt": [PROMPT, PROMPT]}, "prompt", "applies to one prompt"),
])
async def test_leg_requests_the_server_cannot_serve_get_a_400_saying_what_to_change(servers, http, extra, param,
                                                                                      message):
    server = await servers()
    status, data = await post(http, server, {"prompt": PROMPT, **extra})
    assert status == 400 and data["error"]["param"] == param and message in data["error"]["message"], data


# ---- the sidecar ----------------------------------------------------------------------------------------


async def test_the_sidecar_prefills_there_then_decodes_here(servers, fake, http, caplog):
    prefiller = await fake(ok_prefill())
    decode = await servers(role="decode", time_scale=1.0)  # real time: the log shows a 0.5 ms transfer
    body = {"prompt": PROMPT, "max_tokens": 6, "min_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.5}
    headers = {"x-prefiller-host-port": prefiller.hostport, "X-Request-Id": "req-42", "authorization": "Bearer t",
               "Content-Type": "application/json; charset=utf-8", "Connection": "keep-alive"}
    with caplog.at_level(logging.INFO, logger="epp_model_server.pd"):
        async with http.post(url(decode), data=orjson.dumps(body), headers=headers) as r:
            assert r.status == 200
            text = await r.text()
    chunks = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and text.rstrip().endswith("data: [DONE]")
    # What the prefiller got: the same request, made a one-token non-streaming prefill leg.
    (seen,) = prefiller.seen
    assert seen.path == "/v1/completions"
    assert seen.body == {"prompt": PROMPT, "max_tokens": 1, "stream": False, "temperature": 0.5,
                         "kv_transfer_params": PREFILL_REQUEST_PARAMS}
    assert "x-prefiller-host-port" not in seen.headers
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-request-id"] == "req-42" and seen.headers["authorization"] == "Bearer t"
    c = counters(decode)
    assert c["epp_model_server_pd_decode_legs_total"] == 1 and c["epp_model_server_kv_transfer_tokens_total"] == 100
    assert c["epp_model_server_pd_prefill_calls_total{ok}"] == 1 and c["epp_model_server_pd_prefill_retries_total"] == 0
    (line,) = [r.getMessage() for r in caplog.records if "pd leg=decode" in r.getMessage()]
    assert f"request_id=req-42 prefiller={prefiller.hostport} " in line
    assert "attempts=1 prompt_tokens=100 local_cached_tokens=0 kv_transfer_tokens=100 kv_transfer_ms=0.5" in line


async def test_the_sidecar_names_the_same_request_id_to_the_prefiller_when_the_client_gave_none(servers, fake, http,
                                                                                               caplog):
    prefiller = await fake(ok_prefill())
    decode = await servers(role="decode")
    with caplog.at_level(logging.INFO, logger="epp_model_server.pd"):
        status, data = await post(http, decode, {"prompt": PROMPT, "max_tokens": 2},
                                  {"x-prefiller-host-port": prefiller.hostport})
    assert status == 200
    rid = prefiller.seen[0].headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and data["id"].startswith(f"cmpl-{rid}-")
    assert any(f"pd leg=decode request_id={rid} " in r.getMessage() for r in caplog.records)


async def test_the_sidecar_forwards_chat_requests_to_the_same_path(servers, fake, http):
    prefiller = await fake(ok_prefill())
    decode = await servers(role="decode")
    body = {"messages": [{"role": "user", "content": "hello " * 60}], "max_completion_tokens": 4}
    status, data = await post(http, decode, body, {"x-prefiller-host-port": prefiller.hostport},
                              path="/v1/chat/completions")
    assert status == 200 and data["usage"]["completion_tokens"] == 4
    (seen,) = prefiller.seen
    assert seen.path == "/v1/chat/completions"
    assert (seen.body["max_tokens"], seen.body["max_completion_tokens"]) == (1, 1)


async def test_the_sidecar_retries_502_503_504_and_succeeds(servers, fake, http):
    prefiller = await fake(error(503), error(502), error(504), ok_prefill())
    decode = await servers(role="decode", prefill_max_retries=3)
    status, data = await post(http, decode, {"prompt": PROMPT, "max_tokens": 2},
                              {"x-prefiller-host-port": prefiller.hostport})
    assert status == 200, data
    assert len(prefiller.seen) == 4
    c = counters(decode)
    assert c["epp_model_server_pd_prefill_retries_total"] == 3 and c["epp_model_server_pd_prefill_calls_total{ok}"] == 1


@pytest.mark.parametrize(("script", "retries", "calls", "status", "message"), [
    ([error(503)], 3, 4, 502, "failed the prefill leg after 4 attempt(s) (--prefill-max-retries 3): it answered "
                              "503: busy"),
    ([error(504)], 0, 1, 502, "after 1 attempt(s) (--prefill-max-retries 0): it answered 504"),
    ([error(500, "boom")], 3, 1, 502, "answered 500 to the prefill leg: boom"),
    ([error(400, "bad prompt")], 3, 1, 400, "refused the prefill leg: bad prompt"),
    ([ok_prefill(None)], 3, 1, 502, "answered the prefill leg with no kv_transfer_params"),
    ([ok_prefill({"do_remote_decode": True})], 3, 1, 502, "kv_transfer_params without do_remote_prefill: true"),
    ([ok_prefill({**DECODE_PARAMS, "remote_block_ids": []})], 3, 1, 502,
     "kv_transfer_params.remote_block_ids must be a non-empty list"),
    ([(200, b"<html>", 0.0)], 3, 1, 502, "a body that is not JSON"),
])
async def test_a_failing_prefiller_gives_an_error_naming_it_and_no_local_fallback(
        servers, fake, http, script, retries, calls, status, message):
    prefiller = await fake(*script)
    decode = await servers(role="decode", prefill_max_retries=retries)
    got, data = await post(http, decode, {"prompt": PROMPT, "max_tokens": 2},
                           {"x-prefiller-host-port": prefiller.hostport})
    assert got == status, data
    assert f"prefiller {prefiller.hostport} " in data["error"]["message"] and message in data["error"]["message"], data
    assert data["error"]["code"] == status
    assert len(prefiller.seen) == calls
    c = counters(decode)
    assert c["epp_model_server_pd_prefill_calls_total{error}"] == 1
    # Nothing ran here: no decode leg, no prompt tokens.
    assert c["epp_model_server_pd_decode_legs_total"] == 0 and c["vllm:prompt_tokens_total"] == 0


async def test_an_unreachable_prefiller_is_retried_then_named_in_a_502(servers, http):
    decode = await servers(role="decode", prefill_max_retries=2)
    dead = f"127.0.0.1:{closed_port()}"
    status, data = await post(http, decode, {"prompt": PROMPT}, {"x-prefiller-host-port": dead})
    assert status == 502 and data["error"]["type"] == "BadGatewayError"
    assert data["error"]["message"].startswith(f"prefiller {dead} failed the prefill leg after 3 attempt(s)")
    assert "cannot be reached" in data["error"]["message"]
    assert counters(decode)["epp_model_server_pd_prefill_retries_total"] == 2


async def test_a_prefiller_slower_than_the_timeout_gives_a_502_without_retrying(servers, fake, http):
    prefiller = await fake((200, ok_prefill()[1], 0.6))
    decode = await servers(role="decode", prefill_timeout_s=0.2)
    status, data = await post(http, decode, {"prompt": PROMPT}, {"x-prefiller-host-port": prefiller.hostport})
    assert status == 502 and "did not answer the prefill leg within 0.2 s (--prefill-timeout)" in data["error"]["message"]
    assert len(prefiller.seen) == 1


@pytest.mark.parametrize("value", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:8000,10.0.0.2:8000", "bad host:80", ":80"])
async def test_a_malformed_prefiller_header_gets_a_400_naming_it(servers, http, value):
    decode = await servers(role="decode")
    status, data = await post(http, decode, {"prompt": PROMPT}, {"x-prefiller-host-port": value})
    assert status == 400 and data["error"]["param"] == "x-prefiller-host-port"
    assert "x-prefiller-host-port must be one host:port" in data["error"]["message"]


async def test_a_request_invalid_here_is_refused_before_calling_the_prefiller(servers, fake, http):
    prefiller = await fake(ok_prefill())
    decode = await servers(role="decode")
    status, data = await post(http, decode, {"prompt": PROMPT, "model": "nope"},
                              {"x-prefiller-host-port": prefiller.hostport})
    assert status == 400 and data["error"]["param"] == "model"
    assert prefiller.seen == []


@pytest.mark.parametrize(("overrides", "headers"), [
    ({"role": "decode"}, {}),  # no header: served locally
    ({"role": "both"}, {"x-prefiller-host-port": None}),  # sidecar off by default outside role decode
    ({"role": "decode", "pd_sidecar": False}, {"x-prefiller-host-port": None}),
])
async def test_without_the_header_or_the_sidecar_requests_are_served_locally(servers, fake, http, overrides, headers):
    prefiller = await fake(ok_prefill())
    server = await servers(**overrides)
    headers = {k: prefiller.hostport for k in headers}
    status, data = await post(http, server, {"prompt": PROMPT, "max_tokens": 3}, headers)
    assert status == 200 and data["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert prefiller.seen == []
    c = counters(server)
    assert c["epp_model_server_pd_decode_legs_total"] == 0 and c["epp_model_server_kv_transfer_tokens_total"] == 0


async def test_a_leg_request_is_served_here_even_with_the_header(servers, fake, http):
    """A prefill leg reaching a sidecar (e.g. a prefiller that is itself a decode pod) is never forwarded."""
    prefiller = await fake(ok_prefill())
    server = await servers(role="decode")
    status, data = await post(http, server, {"prompt": PROMPT, "kv_transfer_params": PREFILL_REQUEST_PARAMS},
                              {"x-prefiller-host-port": prefiller.hostport})
    assert status == 200 and data["kv_transfer_params"]["do_remote_prefill"] is True
    assert prefiller.seen == []


async def test_two_real_servers_play_both_legs(servers, http, caplog):
    prefill = await servers(role="prefill")
    decode = await servers(role="decode")
    headers = {"x-prefiller-host-port": f"127.0.0.1:{prefill.port}", "x-request-id": "r1"}
    with caplog.at_level(logging.INFO, logger="epp_model_server.pd"):
        status, data = await post(http, decode, {"prompt": PROMPT, "max_tokens": 4}, headers)
        assert status == 200, data
        status, again = await post(http, decode, {"prompt": PROMPT, "max_tokens": 4}, {**headers, "x-request-id": "r2"})
        assert status == 200
    assert again["choices"][0]["text"] == data["choices"][0]["text"]
    p, d = counters(prefill), counters(decode)
    assert p["epp_model_server_pd_prefill_legs_total"] == 2 and p["epp_model_server_pd_decode_legs_total"] == 0
    assert (p["vllm:prefix_cache_queries_total"], p["vllm:prefix_cache_hits_total"]) == (200, 96)
    assert p["vllm:generation_tokens_total"] == 2
    assert d["epp_model_server_pd_decode_legs_total"] == 2 and d["epp_model_server_pd_prefill_legs_total"] == 0
    # The second decode leg found the 6 full blocks the first one received: only 4 tokens moved.
    assert d["epp_model_server_kv_transfer_tokens_total"] == 100 + 4
    assert (d["vllm:prefix_cache_queries_total"], d["vllm:prefix_cache_hits_total"]) == (200, 96)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("pd leg=prefill request_id=r1 " in m for m in lines) == 1
    assert sum("pd leg=decode request_id=r1 " in m for m in lines) == 1


# ---- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "role", "sidecar"), [
    ([], "both", False),
    (["--role", "decode"], "decode", True),
    (["--role", "decode", "--no-pd-sidecar"], "decode", False),
    (["--role", "prefill"], "prefill", False),
    (["--pd-sidecar"], "both", True),
    (["--role", "prefill-decode"], "prefill-decode", False),
])
def test_role_and_sidecar_flags(argv, role, sidecar):
    cfg = parse_args(argv)
    assert (cfg.role, cfg.sidecar_enabled) == (role, sidecar)


@pytest.mark.parametrize(("argv", "expected"), [
    ([], (0.005, 0.0, 3, 50.0, 300.0)),
    (["--kv-transfer-time-per-token", "0.02", "--kv-transfer-latency", "1.5", "--prefill-max-retries", "0",
      "--prefill-retry-backoff-ms", "5", "--prefill-timeout", "30"], (0.02, 1.5, 0, 5.0, 30.0)),
    (["--kv-cache-transfer-time-per-token", "0.01", "--kv-cache-transfer-latency", "2"], (0.01, 2.0, 3, 50.0, 300.0)),
])
def test_transfer_and_retry_flags(argv, expected):
    cfg = parse_args(argv)
    assert (cfg.kv_transfer_ms_per_token, cfg.kv_transfer_latency_ms, cfg.prefill_max_retries,
            cfg.prefill_retry_backoff_ms, cfg.prefill_timeout_s) == expected


@pytest.mark.parametrize("argv", [["--prefill-max-retries", "-1"], ["--kv-transfer-time-per-token", "-0.1"],
                                  ["--role", "encode"]])
def test_bad_pd_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_the_sidecar_needs_the_sim_engine():
    with pytest.raises(ConfigurationError, match="--pd-sidecar.*needs --engine sim"):
        ModelServer(ServerConfig(engine="torch", role="decode"))


async def test_the_role_is_reported_in_models_and_the_ready_line(servers, http):
    server = await servers(role="decode")
    async with http.get(url(server, "/v1/models")) as r:
        data = await r.json()
    assert (data["role"], data["pd_sidecar"]) == ("decode", True)
    assert " role=decode pd-sidecar=on" in server.describe()
