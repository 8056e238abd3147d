"""bench/null_extproc.py, the overhead benchmark's floor, behind real Envoy: it must do what an endpoint
picker does on the wire (route every request to a pool endpoint, round-robin, and pass the body through
unchanged) with the benchmark's own client, or the floor it measures would not be comparable."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from bench.httpclient import Client
from bench.overhead import make_bodies, null_extproc


@pytest.fixture(scope="module")
def stack(module_procs):
    _, pool = module_procs.backends(3)
    server = null_extproc(module_procs, pool, name="null-extproc", cpus=None)
    envoy = module_procs.envoy(server.ports["grpc"], response_body_mode="NONE")
    return pool, f"http://127.0.0.1:{envoy.ports['listen']}/v1/chat/completions"


async def post(url: str, body: bytes) -> tuple[bytes, dict]:
    """One POST on its own connection, through the benchmark client's request head: (response head, JSON)."""
    client = Client(url)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(client.request_head(len(body)) + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    answer = json.loads(await reader.readexactly(length))
    writer.close()
    return head, answer


async def test_requests_go_round_robin_over_the_pool_with_their_bodies_intact(stack) -> None:
    pool, url = stack
    bodies = make_bodies(6, 8192)
    answers = [await post(url, body) for body in bodies]
    assert all(head.startswith(b"HTTP/1.1 200") for head, _ in answers)
    served = [answer["served_by"] for _, answer in answers]
    assert sorted(served) == sorted(pool * 2)  # each endpoint in turn
    for body, (_, answer) in zip(bodies, answers, strict=True):
        assert answer["body_len"] == len(body)
        assert answer["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_the_benchmark_client_completes_every_request(stack) -> None:
    _, url = stack
    client = Client(url)
    bodies = make_bodies(8, 8192)
    await asyncio.gather(*(client.one(body) for body in bodies))
    await client.close()
    assert client.errors == 0
    assert len(client.latencies) == len(bodies)
