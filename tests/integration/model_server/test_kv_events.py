"""KV events of a real server: the live ZMQ stream and the replay socket, decoded with plain msgpack."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pickle
import subprocess
import sys

import aiohttp
import msgpack
import orjson
import pytest
import zmq
import zmq.asyncio

from .conftest import kv_events_config

pytestmark = pytest.mark.integration

BS = 16
STORED_FIELDS = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                 "extra_keys"]
REMOVED_FIELDS = ["block_hashes", "medium"]


# ---- the expected stream, from vLLM's definitions --------------------------------------------------------

def sha256(obj) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def chain(tokens: list[int], lora: str | None = None, salt: str | None = None) -> list[int]:
    """vLLM's block hashes (sha256, PYTHONHASHSEED "0") of the full blocks, as published: last 8 bytes."""
    parent = sha256("0")
    out = []
    for i in range(len(tokens) // BS):
        extra = tuple(k for k in (lora, salt if i == 0 else None) if k) or None
        parent = sha256((parent, tuple(tokens[i * BS:(i + 1) * BS]), extra))
        out.append(int.from_bytes(parent[-8:], "big"))
    return out


def stored(tokens, hashes, lora_id=None, lora_name=None, extra_keys=None) -> dict:
    event = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
             "token_ids": tokens[:len(hashes) * BS], "block_size": BS, "lora_id": lora_id, "medium": "GPU"}
    if lora_name is not None:
        event["lora_name"] = lora_name
    if extra_keys is not None:
        event["extra_keys"] = extra_keys
    return event


def removed(h: int) -> dict:
    return {"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"}


def as_format(event: dict, fmt: str):
    """The expected wire shape: the map as is, or the tagged array with trailing absent fields dropped."""
    if fmt == "map":
        return event
    names = {"BlockStored": STORED_FIELDS, "BlockRemoved": REMOVED_FIELDS, "AllBlocksCleared": []}[event["type"]]
    values = [event.get(n) for n in names]
    while values and names[len(values) - 1] not in event:
        values.pop()
    return [event["type"], *values]


# ---- helpers -----------------------------------------------------------------------------------------------

async def complete(http, server, prompt, model=None, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 1, **extra}
    if model:
        body["model"] = model
    async with http.post(server.url + "/v1/completions", data=orjson.dumps(body)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def subscribe(http, server, ctx) -> zmq.asyncio.Socket:
    """A SUB socket known to be receiving: POST /reset_prefix_cache (an AllBlocksCleared batch on an empty
    cache, changing nothing else) until one arrives, then drain."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(server.kv_endpoint)
    for _ in range(100):
        async with http.post(server.url + "/reset_prefix_cache") as r:
            assert r.status == 200
        if await sub.poll(100):
            while await sub.poll(200):
                await sub.recv_multipart()
            return sub
    raise AssertionError("no KV events arrived on " + server.kv_endpoint)


async def receive(sub, count) -> list[list[bytes]]:
    return [await asyncio.wait_for(sub.recv_multipart(), 10) for _ in range(count)]


PROMPTS = {name: [1000 * k + i for i in range(40)] for k, name in enumerate("ABCD", start=1)}  # 2 full blocks + 8
E = [9000 + i for i in range(20)]  # 1 full block + 4


@pytest.mark.parametrize("fmt", ["map", "array"])
async def test_event_stream_is_exactly_the_stores_and_evictions_that_happened(model_servers, fmt):
    server = model_servers("--num-gpu-blocks", "6", "--block-size", str(BS), "--lora-modules", "sql=/sql",
                           "--kv-events-config", kv_events_config(topic="kv@pod@m"), "--kv-events-format", fmt)
    ctx = zmq.asyncio.Context()
    try:
        async with aiohttp.ClientSession() as http:
            assert server.kv_endpoint.startswith(f"tcp://{server.host}:")  # tcp://*:P binds on --host
            assert server.replay_endpoint.startswith(f"tcp://{server.host}:")
            sub = await subscribe(http, server, ctx)
            A, B, C, D = (PROMPTS[k] for k in "ABCD")
            hA, hB, hC, hD = (chain(p) for p in (A, B, C, D))
            hE = chain(E, lora="sql", salt="tenant")
            # 6 blocks, each request holds 3 (2 full + 1 partial); freed blocks join the LRU queue tail-first.
            await complete(http, server, A)  # takes blocks 0-2
            await complete(http, server, B)  # takes the never-used blocks 3-5
            await complete(http, server, C)  # takes A's partial block, then evicts A1, then A0
            repeat = await complete(http, server, B)  # hits B0, B1: no store, no eviction, no batch
            await complete(http, server, D)  # takes C's partial block, evicts C1, C0
            await complete(http, server, E, model="sql", cache_salt="tenant")  # evicts B1 (B0 is next in line)
            expected = [
                [stored(A, hA)],
                [stored(B, hB)],
                [removed(hA[1]), removed(hA[0]), stored(C, hC)],
                [removed(hC[1]), removed(hC[0]), stored(D, hD)],
                [removed(hB[1]), stored(E, hE, lora_id=1, lora_name="sql", extra_keys=[["tenant"]])],
            ]
            frames = await receive(sub, len(expected))
            assert not await sub.poll(300), "no other batch was published"
            assert repeat["usage"]["prompt_tokens_details"]["cached_tokens"] == 32

            assert [f[0] for f in frames] == [b"kv@pod@m"] * len(expected)
            seqs = [int.from_bytes(f[1], "big") for f in frames]
            assert seqs == list(range(seqs[0], seqs[0] + len(expected)))
            batches = [msgpack.unpackb(f[2]) for f in frames]
            assert all(isinstance(b, list) and len(b) == 3 and isinstance(b[0], float) and b[2] == 0
                       for b in batches)
            assert [b[1] for b in batches] == [[as_format(e, fmt) for e in batch] for batch in expected]

            # A subscriber that missed batches gets them from the replay socket, then the -1 end marker.
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(server.replay_endpoint)
            await dealer.send_multipart([b"", seqs[2].to_bytes(8, "big")])
            replies = [await asyncio.wait_for(dealer.recv_multipart(), 10) for _ in range(4)]
            dealer.close(0)
            assert replies[-1] == [b"", b"kv@pod@m", (-1).to_bytes(8, "big", signed=True), b""]
            assert [r[1:] for r in replies[:-1]] == [list(f) for f in frames[2:]]
            sub.close(0)
    finally:
        ctx.term()


async def test_no_events_without_prefix_caching(model_servers):
    server = model_servers("--no-enable-prefix-caching", "--kv-events-config", kv_events_config())
    ctx = zmq.asyncio.Context()
    try:
        async with aiohttp.ClientSession() as http:
            sub = await subscribe(http, server, ctx)
            first = await complete(http, server, PROMPTS["A"])
            second = await complete(http, server, PROMPTS["A"])
            assert not await sub.poll(300)
            sub.close(0)
        assert [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, second)] == [0, 0]
    finally:
        ctx.term()


def test_kv_events_config_with_a_bad_key_stops_the_server_with_a_message():
    bad = json.dumps({"enable_kv_cache_events": True, "endpoint": "tcp://*:*", "topik": "x"})
    out = subprocess.run([sys.executable, "-m", "epp_model_server", "--host", "127.0.0.1", "--port", "0",
                          "--kv-events-config", bad], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown key(s) ['topik']" in out.stderr
