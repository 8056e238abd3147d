"""The ZMQ subscriber on real sockets (loopback): per-pod and central modes, replays, pool changes, stop.

The publishers here are the test's own: an XPUB socket (so the test knows when a subscriber is listening)
sending hand-built msgpack frames, and a ROUTER answering replay requests as vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import pytest
import zmq
import zmq.asyncio

from epp.datastore.endpoint import Endpoint
from plugins.prefix.precise.events import Topic
from plugins.prefix.precise.subscriber import END_SEQ, KVEventSubscriber, SubscriberConfig, endpoint_rank

from .helpers import seq_bytes

HOSTS = ["127.0.0.193", "127.0.0.194"]


def payload(n: int) -> bytes:
    return msgpack.packb([0.0, [{"type": "AllBlocksCleared", "n": n}], 0])


class Publisher:
    """One pod's publisher: XPUB (bound on `host`, or connected to a central subscriber) + ROUTER replay."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes, *, bind: str | None = None,
                 connect: str | None = None, replay_bind: str | None = None) -> None:
        self.topic = topic
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if bind:
            self.pub.bind(bind)
            self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.pub.connect(connect)
        self.history: dict[int, bytes] = {}
        self.replay_requests: list[int] = []
        self.router = None
        self._task = None
        if replay_bind:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(replay_bind)
            self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._task = asyncio.get_running_loop().create_task(self._serve())

    async def subscribed(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.pub.recv(), timeout)

    def send(self, seq: int, live: bool = True, topic: bytes | None = None) -> None:
        self.history[seq] = payload(seq)
        if live:
            self.pub.send_multipart([topic or self.topic, seq_bytes(seq), self.history[seq]])

    async def _serve(self) -> None:
        while True:
            identity, *frames = await self.router.recv_multipart()
            start = int.from_bytes(frames[-1], "big")
            self.replay_requests.append(start)
            for seq in sorted(s for s in self.history if s >= start):
                await self.router.send_multipart([identity, b"", self.topic, seq_bytes(seq), self.history[seq]])
            await self.router.send_multipart([identity, b"", self.topic, END_SEQ, b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.router.close(0)
        self.pub.close(0)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[str, Topic, int]] = []
        self.cleared: list[str] = []

    def apply(self, pod: str, topic: Topic, data: bytes) -> None:
        self.batches.append((pod, topic, msgpack.unpackb(data)[1][0]["n"]))

    def clear(self, pod: str) -> None:
        self.cleared.append(pod)

    def seqs(self, pod: str) -> list[int]:
        return [n for p, _, n in self.batches if p == pod]


async def eventually(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.term()


async def bind_same_port(ctx, hosts):
    """Publishers on every host with one shared port (as pods share port numbers), picked free."""
    for _ in range(20):
        first = Publisher(ctx, b"", bind=f"tcp://{hosts[0]}:0")
        port = int(first.endpoint.rsplit(":", 1)[1])
        pubs = [first]
        try:
            for host in hosts[1:]:
                pubs.append(Publisher(ctx, b"", bind=f"tcp://{host}:{port}"))
            return port, pubs
        except zmq.ZMQError:
            for p in pubs:
                await p.close()
    raise RuntimeError("no free common port")


async def test_per_pod_mode_subscribes_to_every_endpoint_and_names_events_by_the_endpoint(ctx):
    port, pubs = await bind_same_port(ctx, HOSTS)
    for pub, host in zip(pubs, HOSTS, strict=True):
        pub.topic = f"kv@{host}:9999@m".encode()  # the topic's pod is wrong on purpose: identity wins
    rec = Recorder()
    sub = KVEventSubscriber(SubscriberConfig(socket_port=port), rec.apply, rec.clear)
    eps = [Endpoint(f"pod-{i}", host, 8000) for i, host in enumerate(HOSTS)]
    sub.set_endpoints(eps, [])  # before start: nothing opens yet
    assert sub.subscribed() == []
    await sub.start()
    try:
        assert sub.subscribed() == ["127.0.0.193:8000", "127.0.0.194:8000"]
        for pub in pubs:
            assert await pub.subscribed() == b"\x01kv@"  # the default topic filter
        for seq in range(3):
            pubs[0].send(seq)
            pubs[1].send(seq)
        await eventually(lambda: len(rec.batches) == 6)
        assert rec.seqs("127.0.0.193:8000") == [0, 1, 2] and rec.seqs("127.0.0.194:8000") == [0, 1, 2]
        assert rec.batches[0][1] == Topic("127.0.0.193:9999", "m")
        pubs[0].send(3, topic=b"other-topic")  # filtered out by the publisher-side subscription
        pubs[0].send(4)
        await eventually(lambda: 4 in rec.seqs("127.0.0.193:8000"))
        assert 3 not in rec.seqs("127.0.0.193:8000") and sub.stats.gaps["127.0.0.193:8000"] == 1

        sub.set_endpoints([], [eps[1]])  # the pod left the pool: its socket closes
        assert sub.subscribed() == ["127.0.0.193:8000"]
        pubs[1].send(3)
        pubs[0].send(5)
        await eventually(lambda: 5 in rec.seqs("127.0.0.193:8000"))
        assert rec.seqs("127.0.0.194:8000") == [0, 1, 2]
    finally:
        await sub.stop()
        for pub in pubs:
            await pub.close()
    assert sub.subscribed() == [] and not sub.started


async def test_a_gap_is_replayed_from_the_pods_replay_socket(ctx):
    host = "127.0.0.195"
    pub = Publisher(ctx, f"kv@{host}:8000@m".encode(), bind=f"tcp://{host}:0", replay_bind=f"tcp://{host}:0")
    port = int(pub.endpoint.rsplit(":", 1)[1])
    replay_port = int(pub.replay_endpoint.rsplit(":", 1)[1])
    for seq in range(3):
        pub.send(seq, live=False)  # published before the EPP came: only the replay buffer has them
    rec = Recorder()
    sub = KVEventSubscriber(SubscriberConfig(socket_port=port, replay_port=replay_port), rec.apply, rec.clear)
    await sub.start()
    pod = f"{host}:8000"
    try:
        sub.set_endpoints([Endpoint("p", host, 8000)], [])
        await pub.subscribed()
        await eventually(lambda: rec.seqs(pod) == [0, 1, 2])  # first contact: the whole history
        pub.send(3)
        pub.send(4, live=False)  # lost on the way
        pub.send(5, live=False)
        pub.send(6)
        await eventually(lambda: rec.seqs(pod) == [0, 1, 2, 3, 4, 5, 6])
        assert pub.replay_requests == [0, 4]
        assert sub.stats.gaps[pod] == 1 and sub.stats.missed[pod] == 0 and sub.stats.replays["ok"] == 2
        assert all(topic == Topic(pod, "m") for _, topic, _ in rec.batches)  # replay frames carry the topic
    finally:
        await sub.stop()
        await pub.close()


async def test_a_replay_socket_that_does_not_answer_times_out(ctx):
    host = "127.0.0.196"
    pub = Publisher(ctx, b"kv@x@m", bind=f"tcp://{host}:0")
    port = int(pub.endpoint.rsplit(":", 1)[1])
    rec = Recorder()
    config = SubscriberConfig(socket_port=port, replay_port=port + 1 if port < 65535 else port - 1,
                              replay_idle_timeout_s=0.2)
    sub = KVEventSubscriber(config, rec.apply, rec.clear)
    await sub.start()
    pod = f"{host}:8000"
    try:
        sub.set_endpoints([Endpoint("p", host, 8000)], [])
        await pub.subscribed()
        await eventually(lambda: sub.stats.replays["failed"] == 1)
        pub.send(0)
        pub.send(1)
        await eventually(lambda: rec.seqs(pod) == [0, 1])
    finally:
        await sub.stop()
        await pub.close()


async def test_central_mode_binds_and_reads_the_pod_from_the_topic(ctx):
    rec = Recorder()
    sub = KVEventSubscriber(SubscriberConfig(central_endpoint="tcp://127.0.0.197:*", topic_filter=""),
                            rec.apply, rec.clear)
    known = Endpoint("a", "10.1.0.1", 8000)
    old_form = Endpoint("b", "10.1.0.2", 8000)
    sub.set_endpoints([known, old_form], [])
    await sub.start()
    pubs = []
    try:
        assert sub.bound_endpoint.startswith("tcp://127.0.0.197:")
        for topic in (b"kv@10.1.0.1:8000@m", b"kv@10.1.0.2@m", b"kv@10.9.9.9:8000@m", b"no-pod-here"):
            pub = Publisher(ctx, topic, connect=sub.bound_endpoint)
            pubs.append(pub)
            assert await pub.subscribed() == b"\x01"  # an empty filter takes every topic
        for seq in range(2):
            for pub in pubs:
                pub.send(seq)
        await eventually(lambda: len(rec.batches) == 4 and sub.stats.unknown_pod == 4)
        assert rec.seqs("10.1.0.1:8000") == [0, 1]
        assert rec.seqs("10.1.0.2:8000") == [0, 1]  # `kv@<ip>@<model>`: the only endpoint with that ip
        sub.set_endpoints([], [known])
        pubs[0].send(2)
        pubs[1].send(2)
        await eventually(lambda: rec.seqs("10.1.0.2:8000") == [0, 1, 2])
        await eventually(lambda: sub.stats.unknown_pod == 5)
    finally:
        await sub.stop()
        for pub in pubs:
            await pub.close()


async def test_bad_messages_are_counted_and_skipped(ctx):
    host = "127.0.0.198"
    pub = Publisher(ctx, b"kv@x@m", bind=f"tcp://{host}:0")
    port = int(pub.endpoint.rsplit(":", 1)[1])
    rec = Recorder()
    sub = KVEventSubscriber(SubscriberConfig(socket_port=port), rec.apply, rec.clear)
    await sub.start()
    try:
        sub.set_endpoints([Endpoint("p", host, 8000)], [])
        await pub.subscribed()
        pub.pub.send_multipart([b"kv@x@m", payload(0)])  # two frames
        pub.pub.send_multipart([b"kv@x@m", b"\x00\x01", payload(0)])  # a short sequence
        pub.pub.send_multipart([b"kv@\xff@m", seq_bytes(0), payload(0)])  # a topic that is not UTF-8
        pub.send(0)
        await eventually(lambda: rec.seqs(f"{host}:8000") == [0])
        assert sub.stats.bad_messages == {"frame_count": 1, "sequence": 1, "topic": 1}
    finally:
        await sub.stop()
        await pub.close()


async def test_binding_an_address_in_use_is_an_error_that_names_the_setting(ctx):
    first = KVEventSubscriber(SubscriberConfig(central_endpoint="tcp://127.0.0.199:*"), Recorder().apply,
                              Recorder().clear)
    await first.start()
    try:
        second = KVEventSubscriber(SubscriberConfig(central_endpoint=first.bound_endpoint), Recorder().apply,
                                   Recorder().clear)
        with pytest.raises(OSError, match=r"zmqEndpoint"):
            await second.start()
    finally:
        await first.stop()


@pytest.mark.parametrize(("name", "rank"), [("10.0.0.1:8000", 0), ("vllm-0-rank-0", 0), ("vllm-0-rank-3", 3)])
def test_the_rank_of_an_endpoint_offsets_its_ports(name, rank):
    assert endpoint_rank(Endpoint(name, "10.0.0.1", 8000)) == rank
