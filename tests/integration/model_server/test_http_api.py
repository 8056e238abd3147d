"""The OpenAI-compatible HTTP API of a real sim server process."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_model_server.chat import render_chat
from epp_model_server.tokenizer import BuiltinTokenizer

from .conftest import start_model_server

pytestmark = pytest.mark.integration

MODEL = "base-model"


@pytest.fixture(scope="module")
def server():
    srv = start_model_server(
        "--served-model-name", MODEL, "alias", "--pod-name", "pod-a", "--time-scale", "50",
        "--lora-modules", "sql=/adapters/sql", '{"name": "chat-ad", "path": "/adapters/chat"}',
        "--max-loras", "2",
    )
    yield srv
    srv.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def unique_text(words: int) -> str:
    """A prompt no other test sends (so cache state from other tests cannot leak in)."""
    tag = uuid.uuid4().hex[:8]
    return " ".join(f"w{tag}{i % 50}" if i == 0 else f"word{i % 97}" for i in range(words))


async def post(http, server, path, body):
    async with http.post(server.url + path, data=orjson.dumps(body)) as r:
        return r.status, dict(r.headers), orjson.loads(await r.read())


async def sse(http, server, path, body) -> tuple[dict, list]:
    """Posts a streaming request; returns the headers and the decoded `data:` chunks (with the [DONE])."""
    async with http.post(server.url + path, data=orjson.dumps(body)) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        chunks = []
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: "):]
                chunks.append(payload if payload == "[DONE]" else orjson.loads(payload))
        return dict(r.headers), chunks


async def metric_values(http, server) -> dict:
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    matches = [v for (n, lbls), v in metrics.items() if n == name and labels.items() <= dict(lbls).items()]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


async def test_completion_returns_text_finish_reason_and_usage_with_cached_tokens(http, server):
    status, headers, body = await post(http, server, "/v1/completions",
                                       {"model": MODEL, "prompt": "Say something", "max_tokens": 5})
    assert status == 200
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and choice["text"]
    prompt_tokens = len(BuiltinTokenizer().encode("Say something"))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                             "total_tokens": prompt_tokens + 5, "prompt_tokens_details": {"cached_tokens": 0}}


async def test_streaming_completion_puts_usage_in_the_last_chunk_before_done(http, server):
    headers, chunks = await sse(http, server, "/v1/completions", {
        "model": MODEL, "prompt": "stream me", "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    *text_chunks, usage_chunk, _ = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert all("usage" not in c for c in text_chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert headers["x-inference-pod"] == "pod-a" and headers["x-inference-port"] == str(server.port)


async def test_streaming_and_non_streaming_give_the_same_text_for_the_same_seed(http, server):
    body = {"model": MODEL, "prompt": "determinism", "max_tokens": 6, "seed": 7}
    _, _, whole = await post(http, server, "/v1/completions", body)
    _, chunks = await sse(http, server, "/v1/completions", {**body, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    _, _, other_seed = await post(http, server, "/v1/completions", {**body, "seed": 8})
    assert other_seed["choices"][0]["text"] != whole["choices"][0]["text"]


async def test_chat_completion_renders_messages_with_the_template(http, server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello?"}]
    status, _, body = await post(http, server, "/v1/chat/completions",
                                 {"model": "alias", "messages": messages, "max_tokens": 3})
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == "alias"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(BuiltinTokenizer().encode(render_chat(messages)))


async def test_streaming_chat_sends_role_then_content_then_usage(http, server):
    _, chunks = await sse(http, server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 3


async def test_continuous_usage_stats_put_usage_on_every_chunk(http, server):
    _, chunks = await sse(http, server, "/v1/completions", {
        "prompt": "count", "max_tokens": 3, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == [1, 2, 3]


async def test_cached_tokens_and_prefix_cache_counters_match_what_was_sent(http, server):
    prompt = unique_text(300)
    n = len(BuiltinTokenizer().encode(prompt))
    before = await metric_values(http, server)
    _, _, first = await post(http, server, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    _, _, second = await post(http, server, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    after = await metric_values(http, server)
    expected_hit = (n - 1) // 16 * 16
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == expected_hit
    assert value(after, "vllm:prefix_cache_queries_total") - value(before, "vllm:prefix_cache_queries_total") == 2 * n
    assert value(after, "vllm:prefix_cache_hits_total") - value(before, "vllm:prefix_cache_hits_total") == expected_hit
    assert value(after, "vllm:prompt_tokens_total") - value(before, "vllm:prompt_tokens_total") == 2 * n


async def test_reset_prefix_cache_makes_the_next_repeat_miss(http, server):
    prompt = unique_text(100)
    await post(http, server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    async with http.post(server.url + "/reset_prefix_cache") as r:
        assert r.status == 200
    _, _, again = await post(http, server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_tokenize_returns_the_ids_the_epp_computes_with_the_builtin_tokenizer(http, server):
    messages = [{"role": "user", "content": "Which pod has my prefix?"}]
    _, _, chat = await post(http, server, "/tokenize", {"model": MODEL, "messages": messages})
    assert chat["tokens"] == BuiltinTokenizer().encode(render_chat(messages))
    _, _, plain = await post(http, server, "/tokenize", {"prompt": "plain text"})
    assert plain["tokens"] == BuiltinTokenizer().encode("plain text") and plain["count"] == len(plain["tokens"])


async def test_models_lists_served_names_and_lora_adapters(http, server):
    async with http.get(server.url + "/v1/models") as r:
        body = await r.json()
        assert r.headers["x-inference-pod"] == "pod-a"
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) == {MODEL, "alias", "sql", "chat-ad"}
    assert ids["sql"]["parent"] == MODEL and ids["sql"]["root"] == "/adapters/sql"


async def test_lora_requests_are_served_and_reported_in_lora_requests_info(http, server):
    status, _, body = await post(http, server, "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1})
    assert status == 200 and body["model"] == "sql"
    metrics = await metric_values(http, server)
    info = [dict(lbls) for (name, lbls) in metrics if name == "vllm:lora_requests_info"]
    assert info == [{"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}]


async def test_stop_strings_end_generation_with_stop_reason(http, server):
    _, _, whole = await post(http, server, "/v1/completions", {"prompt": "stop test", "max_tokens": 8, "seed": 3})
    text = whole["choices"][0]["text"]
    stop = text.split()[3]
    _, _, stopped = await post(http, server, "/v1/completions",
                               {"prompt": "stop test", "max_tokens": 8, "seed": 3, "stop": [stop]})
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("path", "body", "status", "match"),
    [
        ("/v1/completions", {"model": "unknown", "prompt": "x"}, 400, "does not exist"),
        ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
        ("/v1/chat/completions", {"messages": "nope"}, 400, "messages"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 40000}, 400, "maximum context length"),
        ("/v1/embeddings", {"input": "x"}, 404, "no route"),
    ],
)
async def test_errors_are_openai_json_with_status_and_pod_headers(http, server, path, body, status, match):
    got_status, headers, got = await post(http, server, path, body)
    assert got_status == status
    assert match in got["error"]["message"] and got["error"]["code"] == status
    assert headers["x-inference-pod"] == "pod-a" and headers["x-inference-port"] == str(server.port)


async def test_invalid_json_is_a_400(http, server):
    async with http.post(server.url + "/v1/completions", data=b"{not json") as r:
        assert r.status == 400
        assert "not valid JSON" in (await r.json())["error"]["message"]


async def test_health_is_200_and_metrics_carry_the_names_the_epp_reads(http, server):
    async with http.get(server.url + "/health") as r:
        assert r.status == 200
    await post(http, server, "/v1/completions", {"prompt": "observe me", "max_tokens": 2})
    metrics = await metric_values(http, server)
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert value(metrics, name, model_name=MODEL, engine="0") >= 0
    cache_info = [dict(lbls) for (name, lbls) in metrics if name == "vllm:cache_config_info"]
    assert cache_info[0]["block_size"] == "16" and cache_info[0]["num_gpu_blocks"] == "25000"
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:generation_tokens_total"):
        assert value(metrics, name) > 0


async def test_a_client_that_disconnects_mid_stream_has_its_request_aborted(http, server):
    before = await metric_values(http, server)
    body = {"prompt": unique_text(20), "max_tokens": 30000, "stream": True}
    async with http.post(server.url + "/v1/completions", data=orjson.dumps(body)) as r:
        await r.content.readline()  # the first chunk arrived: the request is running
    for _ in range(100):
        after = await metric_values(http, server)
        aborted = (value(after, "vllm:request_success_total", finished_reason="abort")
                   - value(before, "vllm:request_success_total", finished_reason="abort"))
        if aborted == 1 and value(after, "vllm:num_requests_running") == 0:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the abandoned request kept running")
    assert value(after, "vllm:kv_cache_usage_perc") == 0.0
