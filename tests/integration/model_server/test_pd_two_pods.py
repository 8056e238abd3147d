"""Disaggregated prefill/decode between two real server processes: a prefill pod on 127.0.0.2 and a decode pod
(role decode, so the sidecar is on) on 127.0.0.3. A request sent straight to the decode pod with
x-prefiller-host-port is prefilled on the prefill pod and decoded on the decode pod; each pod's metrics, KV
events and log show its own leg."""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import orjson
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from .conftest import kv_events_config

pytestmark = pytest.mark.integration

BS = 16
PROMPT = [2000 + i for i in range(2050)]  # 128 full blocks + 2 tokens


async def metrics(http, server) -> dict[str, float]:
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def replayed_events(server, ctx) -> list:
    """Every KV event the server published so far, from its replay socket."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(server.replay_endpoint)
    await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    events = []
    while True:
        frames = await asyncio.wait_for(dealer.recv_multipart(), 10)
        if frames[3] == b"":
            break
        events += msgpack.unpackb(frames[3])[1]
    dealer.close(0)
    return events


async def test_a_request_to_the_decode_pod_is_prefilled_on_the_prefill_pod(model_servers):
    prefill = model_servers("--role", "prefill", "--log-level", "info", "--kv-events-config",
                            kv_events_config("kv@127.0.0.2"), host="127.0.0.2")
    decode = model_servers("--role", "decode", "--log-level", "info", "--kv-events-config",
                           kv_events_config("kv@127.0.0.3"), host="127.0.0.3")
    headers = {"x-prefiller-host-port": f"{prefill.host}:{prefill.port}", "content-type": "application/json"}
    body = {"prompt": PROMPT, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    ctx = zmq.asyncio.Context()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(decode.url + "/v1/completions", data=orjson.dumps(body),
                                 headers={**headers, "x-request-id": "pd-first"}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-inference-port"] == str(decode.port)
                text = await r.text()
            usage = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")][-1]["usage"]
            assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] == 2050

            p, d = await metrics(http, prefill), await metrics(http, decode)
            # The prefill leg on the prefill pod: the whole prompt computed, one token generated.
            assert p["epp_model_server_pd_prefill_legs_total"] == 1 and p["epp_model_server_pd_decode_legs_total"] == 0
            assert (p["vllm:prompt_tokens_total"], p["vllm:generation_tokens_total"]) == (2050, 1)
            assert (p["vllm:prefix_cache_queries_total"], p["vllm:prefix_cache_hits_total"]) == (2050, 0)
            # The decode leg on the decode pod: the prompt received, not computed; eight tokens generated.
            assert d["epp_model_server_pd_decode_legs_total"] == 1 and d["epp_model_server_pd_prefill_legs_total"] == 0
            assert d["epp_model_server_kv_transfer_tokens_total"] == 2050
            assert (d["vllm:prompt_tokens_total"], d["vllm:generation_tokens_total"]) == (2050, 8)
            assert (d["vllm:prefix_cache_queries_total"], d["vllm:prefix_cache_hits_total"]) == (2050, 0)
            assert d["epp_model_server_pd_prefill_calls_total"] == 1
            # The decode pod's TTFT is the ~10 ms transfer plus one step, not the ~139 ms prefill of 2050 tokens.
            assert d["vllm:time_to_first_token_seconds_sum"] < p["vllm:time_to_first_token_seconds_sum"] / 2

            # Both pods published the prompt's 128 full blocks: computed on one, received on the other.
            def stored(events):
                return [h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]]
            p_events, d_events = await replayed_events(prefill, ctx), await replayed_events(decode, ctx)
            assert len(stored(p_events)) == 128 and stored(d_events) == stored(p_events)

            # The same prompt again: the prefill leg hits the prefill pod's prefix cache.
            status, again = await post(http, decode, {**body, "stream": False, "stream_options": None},
                                       {**headers, "x-request-id": "pd-second"})
            assert status == 200
            p2, d2 = await metrics(http, prefill), await metrics(http, decode)
            assert p2["vllm:prefix_cache_hits_total"] == 2048
            assert p2["epp_model_server_pd_prefill_legs_total"] == 2 and d2["epp_model_server_pd_decode_legs_total"] == 2
            # The decode pod had the 128 blocks from the first transfer: only the last 2 tokens moved.
            assert d2["epp_model_server_kv_transfer_tokens_total"] == 2050 + 2
            assert d2["vllm:prefix_cache_hits_total"] == 2048
    finally:
        ctx.term()

    prefill.stop()
    decode.stop()
    p_log, d_log = prefill.proc.stdout.read(), decode.proc.stdout.read()
    for rid in ("pd-first", "pd-second"):
        assert f"pd leg=prefill request_id={rid} prompt_tokens=2050 " in p_log, p_log
        assert f"pd leg=decode request_id={rid} prefiller={prefill.host}:{prefill.port} " in d_log, d_log
    assert "pd leg=decode" not in p_log and "pd leg=prefill" not in d_log
    assert "kv_transfer_tokens=2050 kv_transfer_ms=10.2" in d_log


async def post(http, server, body, headers) -> tuple[int, dict]:
    body = {k: v for k, v in body.items() if v is not None}
    async with http.post(server.url + "/v1/completions", data=orjson.dumps(body), headers=headers) as r:
        return r.status, await r.json()
