"""The ZMQ publisher: config parsing, the bind/connect rule, live frames and the replay socket."""

import asyncio
import json
import random

import msgpack
import pytest
import zmq
import zmq.asyncio

from epp_model_server.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_event
from epp_model_server.kv_publisher import (
    END_SEQ,
    KVEventsConfig,
    KVEventsConfigError,
    ZmqEventPublisher,
    resolve_endpoint,
)


@pytest.mark.parametrize(
    ("endpoint", "host", "expected"),
    [
        ("tcp://*:5557", "0.0.0.0", ("tcp://*:5557", True)),
        ("tcp://*:5557", "127.0.0.7", ("tcp://127.0.0.7:5557", True)),  # contracts.md: bind on --host
        ("tcp://*:*", "127.0.0.7", ("tcp://127.0.0.7:*", True)),
        ("tcp://*:5557", "::1", ("tcp://[::1]:5557", True)),
        ("tcp://[::]:5557", "127.0.0.7", ("tcp://[::]:5557", True)),
        ("ipc:///tmp/kv.sock", "127.0.0.7", ("ipc:///tmp/kv.sock", True)),
        ("inproc://kv", "0.0.0.0", ("inproc://kv", True)),
        ("tcp://epp.svc:5557", "127.0.0.7", ("tcp://epp.svc:5557", False)),  # central subscriber: connect
        ("tcp://10.0.0.3:5557", "0.0.0.0", ("tcp://10.0.0.3:5557", False)),
    ],
)
def test_endpoints_bind_or_connect_by_vllms_rule_with_star_bound_to_the_host(endpoint, host, expected):
    assert resolve_endpoint(endpoint, host) == expected


def test_config_is_vllms_json_with_publisher_defaulting_to_zmq_when_enabled():
    cfg = KVEventsConfig.from_json(json.dumps({"enable_kv_cache_events": True, "endpoint": "tcp://*:6000",
                                               "replay_endpoint": "tcp://*:6001", "topic": "kv@x"}))
    assert (cfg.publisher, cfg.endpoint, cfg.replay_endpoint, cfg.topic, cfg.buffer_steps) == (
        "zmq", "tcp://*:6000", "tcp://*:6001", "kv@x", 10000)
    assert cfg.active
    assert not KVEventsConfig.from_json(None).active
    assert not KVEventsConfig.from_json('{"enable_kv_cache_events": false}').active


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{bad", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"enable_kv_cache_events": true, "endpont": "x"}', "unknown key"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "not supported"),
        ('{"buffer_steps": "10"}', "wrong type"),
        ('{"buffer_steps": 0}', "at least 1"),
    ],
)
def test_bad_kv_events_config_names_the_problem(text, match):
    with pytest.raises(KVEventsConfigError, match=match):
        KVEventsConfig.from_json(text)


def _host() -> str:
    return f"127.0.0.{random.randint(100, 199)}"


STORED = BlockStored([11, 12], None, list(range(32)), 16, None, "GPU")
REMOVED = BlockRemoved([12], "GPU")


async def _subscribe_and_sync(pub: ZmqEventPublisher, ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    """A SUB socket that is known to receive: publish marker batches until one arrives."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    for _ in range(100):
        pub.publish([AllBlocksCleared()])
        if await sub.poll(50):
            while await sub.poll(50):
                await sub.recv_multipart()
            return sub
    raise AssertionError("subscriber never received the publisher's batches")


@pytest.mark.parametrize("fmt", ["map", "array"])
async def test_live_batches_are_three_frames_topic_seq_and_msgpack_payload(fmt):
    cfg = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint="tcp://*:*", topic="kv@pod@m")
    pub = ZmqEventPublisher(cfg, host=_host(), fmt=fmt)
    ctx = zmq.asyncio.Context()
    try:
        sub = await _subscribe_and_sync(pub, ctx)
        first_seq = pub.next_seq
        pub.publish([STORED])
        pub.publish([REMOVED, AllBlocksCleared()])
        pub.publish([])  # empty batches are not sent
        frames = [await asyncio.wait_for(sub.recv_multipart(), 5) for _ in range(2)]
        assert [f[0] for f in frames] == [b"kv@pod@m"] * 2
        assert [int.from_bytes(f[1], "big") for f in frames] == [first_seq, first_seq + 1]
        batches = [msgpack.unpackb(f[2]) for f in frames]
        assert [[decode_event(e) for e in b[1]] for b in batches] == [[STORED], [REMOVED, AllBlocksCleared()]]
        assert all(isinstance(b[0], float) and b[2] == 0 for b in batches)
        raw_first = batches[0][1][0]
        assert isinstance(raw_first, dict if fmt == "map" else list)
        assert not await sub.poll(100)
        sub.close(0)
    finally:
        await pub.aclose()
        ctx.term()


async def _replay(endpoint: str, ctx: zmq.asyncio.Context, start: int, client_type: int) -> list[list[bytes]]:
    """Sends a replay request; returns the reply messages (without the delimiter frame) up to the end marker
    (a REQ socket accepts one reply per request, so only the first message)."""
    client = ctx.socket(client_type)
    try:
        client.connect(endpoint)
        request = start.to_bytes(8, "big")
        await client.send_multipart([b"", request] if client_type == zmq.DEALER else [request])
        replies = []
        while True:
            frames = await asyncio.wait_for(client.recv_multipart(), 5)
            if client_type == zmq.DEALER:
                assert frames[0] == b"", "the reply keeps the request's empty delimiter frame"
                frames = frames[1:]
            replies.append(frames)
            if client_type == zmq.REQ or frames[1] == END_SEQ:
                return replies
    finally:
        client.close(0)


@pytest.mark.parametrize("client_type", [zmq.DEALER, zmq.REQ], ids=["dealer", "req"])
async def test_replay_returns_buffered_batches_from_the_start_seq_then_the_end_marker(client_type):
    cfg = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint="tcp://*:*",
                         replay_endpoint="tcp://*:*", topic="kv@t", buffer_steps=3)
    pub = ZmqEventPublisher(cfg, host=_host())
    pub.start()
    ctx = zmq.asyncio.Context()
    try:
        for i in range(5):  # seq 0..4; only the last 3 stay buffered
            pub.publish([BlockRemoved([i], "GPU")])
        replies = await _replay(pub.replay_endpoint, ctx, 1, client_type)
    finally:
        await pub.aclose()
        ctx.term()
    if client_type == zmq.REQ:
        assert [int.from_bytes(f[1], "big") for f in replies] == [2]
        return
    *batches, end = replies
    assert end == [b"kv@t", (-1).to_bytes(8, "big", signed=True), b""]
    assert [f[0] for f in batches] == [b"kv@t"] * 3
    assert [int.from_bytes(f[1], "big") for f in batches] == [2, 3, 4]
    assert [msgpack.unpackb(f[2])[1][0]["block_hashes"] for f in batches] == [[2], [3], [4]]


async def test_replay_from_beyond_the_last_batch_is_just_the_end_marker():
    cfg = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint="tcp://*:*",
                         replay_endpoint="tcp://*:*", topic="kv@t")
    pub = ZmqEventPublisher(cfg, host=_host())
    pub.start()
    ctx = zmq.asyncio.Context()
    try:
        pub.publish([REMOVED])
        replies = await _replay(pub.replay_endpoint, ctx, 1, zmq.DEALER)
    finally:
        await pub.aclose()
        ctx.term()
    assert replies == [[b"kv@t", END_SEQ, b""]]


def test_binding_an_address_in_use_is_a_clear_error():
    host = _host()
    first = ZmqEventPublisher(KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                             endpoint="tcp://*:*"), host=host)
    try:
        taken = first.endpoint.rsplit(":", 1)[1]
        with pytest.raises(OSError, match="cannot bind KV-event socket"):
            ZmqEventPublisher(KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                             endpoint=f"tcp://*:{taken}"), host=host)
    finally:
        first.close()
