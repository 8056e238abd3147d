"""KV-event subscriptions over ZMQ (zmq.asyncio, on the EPP's one event loop; no threads).

Two delivery modes (reference notes 2.5):

  per-pod (discoverPods)  one SUB socket per pool endpoint, connected to its publisher at
                          `tcp://<pod-ip>:<socketPort + rank>`; the endpoint subscribed is the identity of
                          every event it delivers (whatever the topic says). Endpoints that join the pool
                          are subscribed, endpoints that leave are unsubscribed and their blocks cleared.
  central (zmqEndpoint)   one SUB socket *bound* at `zmqEndpoint`; model servers connect their publishers
                          to it, and the pod is read from the topic `kv@<pod-ip>:<port>@<model>`, mapped to
                          the pool endpoint with that `ip:port` (or that ip, when the topic names no port
                          and one endpoint has it). Events from pods not in the pool are counted and
                          dropped.

The owner follows the pool through `set_endpoints` and clears the blocks of endpoints that leave; the
subscriber itself clears a pod (through `clear`) only when its publisher restarts.

A message is `[topic, seq (8 bytes big-endian), payload]`. Every pod's stream is tracked by sequence:

  seq == last + 1   applied
  seq >  last + 1   a gap: the missed batches are asked of the pod's replay socket
                    (`tcp://<pod-ip>:<replaySocketPort + rank>`, a DEALER sending `[b"", start]`), applied,
                    then the live batches that arrived meanwhile (held back, so an old store cannot
                    resurrect a block removed since)
  seq <= last live  the publisher restarted (the sequence went back): the pod's blocks are cleared and its
                    history replayed from 0 (a seq above the last live one but already replayed is a
                    duplicate, skipped)
  first contact     with replay on, the pod's buffered history is asked for at once (from seq 0), so an EPP
                    started after its model servers knows their caches

Without a replay port, gaps and restarts are still detected and counted, and a restart still clears.
A replay that fails (no answer within the idle timeout) puts that pod's replays on a cooldown; the held
batches are then applied as they are, and the loss counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from epp.datastore.endpoint import Endpoint
from plugins.prefix.precise.events import DecodeError, Topic, parse_topic

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_RANK = re.compile(r"-rank-(\d+)$")

# apply(pod, topic, payload): decode one batch payload and apply it to the index for `pod`.
ApplyBatch = Callable[[str, Topic, bytes], None]
ClearPod = Callable[[str], None]


@dataclass(frozen=True)
class SubscriberConfig:
    topic_filter: str = "kv@"
    socket_port: int = 5557
    replay_port: int | None = None  # None: no replays
    central_endpoint: str | None = None  # bind one SUB here instead of subscribing per pod
    replay_idle_timeout_s: float = 2.0  # a replay answer must keep coming at least this often
    replay_total_timeout_s: float = 120.0
    replay_cooldown_s: float = 30.0  # no replay for a pod this long after one failed
    max_held: int = 100_000  # live batches held back per pod while its replay runs
    rcvhwm: int = 100_000


@dataclass
class SubscriberStats:
    messages: int = 0
    bad_messages: Counter = field(default_factory=Counter)  # reason -> count
    unknown_pod: int = 0
    gaps: Counter = field(default_factory=Counter)  # pod -> sequence gaps seen
    missed: Counter = field(default_factory=Counter)  # pod -> batches lost (neither live nor replayed)
    restarts: Counter = field(default_factory=Counter)  # pod -> publisher restarts seen
    replays: Counter = field(default_factory=Counter)  # outcome (ok, failed, cooldown) -> count


def endpoint_rank(endpoint: Endpoint) -> int:
    """The data-parallel rank of an endpoint: the `-rank-<i>` suffix of its name, else 0."""
    m = _RANK.search(endpoint.name)
    return int(m.group(1)) if m else 0


def tcp_endpoint(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


class PodStream:
    """The sequence state of one pod's event stream (see the module docstring)."""

    def __init__(self, sub: KVEventSubscriber, pod: str, replay_endpoint: str | None) -> None:
        self.sub = sub
        self.pod = pod
        self.replay_endpoint = replay_endpoint
        self.last: int | None = None  # the last seq applied (live or replayed)
        self.last_live: int | None = None  # the last seq received live (a lower one means a restart)
        self.held: list[tuple[Topic, int, bytes]] = []
        self.replay_task: asyncio.Task | None = None
        self.cooldown_until = 0.0
        self.closed = False
        self.topic: Topic | None = None  # the last live topic (for replay frames without one)

    # -- live messages -----------------------------------------------------------------------------------

    def on_live(self, topic: Topic, seq: int, payload: bytes) -> None:
        self.topic = topic
        if self.last_live is not None and seq <= self.last_live:
            self._restarted(seq)
        self.last_live = seq
        if self.replay_task is not None:
            if len(self.held) >= self.sub.config.max_held:
                self.held.pop(0)
                self.sub.stats.missed[self.pod] += 1
            self.held.append((topic, seq, payload))
            return
        self._sequence(topic, seq, payload, may_replay=True)

    def _restarted(self, seq: int) -> None:
        """The live sequence went back: a new publisher process. Everything known of the pod is void."""
        self.sub.stats.restarts[self.pod] += 1
        log.info("KV-event publisher of %s restarted (seq %d after %d); clearing its blocks", self.pod, seq,
                 self.last_live)
        if self.replay_task is not None:
            self.replay_task.cancel()
            self.replay_task = None
        self.held.clear()
        self.sub.clear(self.pod)
        self.last = None

    def _sequence(self, topic: Topic, seq: int, payload: bytes, *, may_replay: bool) -> None:
        stats = self.sub.stats
        last = self.last
        if last is None:
            if may_replay and self._can_replay():
                self.held.append((topic, seq, payload))
                self.start_replay(0)
                return
        elif seq <= last:
            return  # a replay brought it already
        elif seq > last + 1:
            stats.gaps[self.pod] += 1
            if may_replay and self._can_replay():
                self.held.append((topic, seq, payload))
                self.start_replay(last + 1)
                return
            stats.missed[self.pod] += seq - last - 1
        self.sub.apply(self.pod, topic, payload)
        self.last = seq

    # -- replays -----------------------------------------------------------------------------------------

    def _can_replay(self) -> bool:
        if self.replay_endpoint is None or self.closed:
            return False
        if self.sub.loop_time() < self.cooldown_until:
            self.sub.stats.replays["cooldown"] += 1
            return False
        return True

    def start_replay(self, start: int) -> None:
        """Ask the pod's replay socket for every batch from `start` on (live batches are held meanwhile)."""
        if self.replay_task is None and self.replay_endpoint is not None and not self.closed:
            self.replay_task = asyncio.get_running_loop().create_task(
                self._replay(start), name=f"kv-replay {self.pod}"
            )

    async def _replay(self, start: int) -> None:
        try:
            batches = await self.sub.fetch_replay(self.replay_endpoint, start)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a socket error: treat as a failed replay
            log.warning("KV-event replay from %s failed: %s", self.replay_endpoint, exc)
            batches = None
        finally:
            if self.replay_task is asyncio.current_task():
                self.replay_task = None
        if self.closed:
            return
        stats = self.sub.stats
        if batches is None:
            stats.replays["failed"] += 1
            self.cooldown_until = self.sub.loop_time() + self.sub.config.replay_cooldown_s
            log.warning("no KV-event replay from %s (pod %s) within %.1fs; replays for it pause for %.0fs",
                        self.replay_endpoint, self.pod, self.sub.config.replay_idle_timeout_s,
                        self.sub.config.replay_cooldown_s)
        else:
            stats.replays["ok"] += 1
            expected = start
            for topic, seq, payload in batches:
                if self.last is not None and seq <= self.last:
                    continue
                if topic.pod is None and topic.model is None and self.topic is not None:
                    topic = self.topic  # an older vLLM's replay frames carry no topic
                if seq > expected:
                    stats.missed[self.pod] += seq - expected
                self.sub.apply(self.pod, topic, payload)
                self.last = seq
                expected = seq + 1
            if self.last is None and start == 0:
                self.last = -1  # the publisher has sent nothing yet: its next batch is seq 0
        held, self.held = self.held, []
        for topic, seq, payload in held:
            self._sequence(topic, seq, payload, may_replay=False)

    def close(self) -> None:
        self.closed = True
        self.held.clear()
        if self.replay_task is not None:
            self.replay_task.cancel()
            self.replay_task = None


class KVEventSubscriber:
    """Keeps one event stream per pool endpoint and hands decoded batches to `apply` (see the module
    docstring). `set_endpoints` may be called before `start()`; sockets open only once started."""

    def __init__(self, config: SubscriberConfig, apply: ApplyBatch, clear: ClearPod) -> None:
        self.config = config
        self._apply = apply
        self._clear = clear
        self.stats = SubscriberStats()
        self._ctx: zmq.asyncio.Context | None = None
        self._endpoints: dict[str, Endpoint] = {}  # pod (ip:port) -> endpoint
        self._by_address: dict[str, list[str]] = {}  # ip -> pods
        self._streams: dict[str, PodStream] = {}
        self._sockets: dict[str, zmq.asyncio.Socket] = {}  # per-pod SUB sockets
        self._readers: dict[str, asyncio.Task] = {}
        self._central: zmq.asyncio.Socket | None = None
        self._central_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bound_endpoint: str | None = None  # the central socket's address once bound
        self._topics: dict[bytes, Topic] = {}

    @property
    def central(self) -> bool:
        return bool(self.config.central_endpoint)

    @property
    def started(self) -> bool:
        return self._ctx is not None

    def loop_time(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def apply(self, pod: str, topic: Topic, payload: bytes) -> None:
        self._apply(pod, topic, payload)

    def clear(self, pod: str) -> None:
        self._clear(pod)

    def subscribed(self) -> list[str]:
        """Pods with an open per-pod subscription (or known to the central socket)."""
        return sorted(self._streams)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._ctx is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        if self.central:
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
            endpoint = self.config.central_endpoint
            if "[" in endpoint or "::" in endpoint:
                sock.setsockopt(zmq.IPV6, 1)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                sock.close(0)
                self._ctx.term()
                self._ctx = None
                raise OSError(
                    f"cannot bind the KV-event subscriber on {endpoint}: {exc}; is another process using it? "
                    "(kvEventsConfig.zmqEndpoint)"
                ) from exc
            sock.setsockopt(zmq.SUBSCRIBE, self.config.topic_filter.encode("utf-8"))
            self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._central = sock
            self._central_task = self._loop.create_task(self._read_central(sock), name="kv-events central")
            log.info("KV-event subscriber bound on %s (topic filter %r)", self.bound_endpoint,
                     self.config.topic_filter)
        for pod in list(self._endpoints):
            self._open(pod)

    async def stop(self) -> None:
        """Cancel every task and close every socket."""
        tasks = [t for t in (self._central_task, *self._readers.values()) if t is not None]
        for stream in self._streams.values():
            if stream.replay_task is not None:
                tasks.append(stream.replay_task)
            stream.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sock in self._sockets.values():
            sock.close(linger=0)
        if self._central is not None:
            self._central.close(linger=0)
        self._sockets.clear()
        self._readers.clear()
        self._streams.clear()
        self._central = None
        self._central_task = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- the pool ----------------------------------------------------------------------------------------

    def set_endpoints(self, added: Iterable[Endpoint], removed: Iterable[Endpoint]) -> None:
        """Follow the pool: subscribe to endpoints that joined, unsubscribe from those that left (their
        blocks are the owner's to clear)."""
        for ep in removed:
            pod = ep.hostport
            if self._endpoints.get(pod) is not ep:
                continue
            del self._endpoints[pod]
            pods = self._by_address.get(ep.address, [])
            if pod in pods:
                pods.remove(pod)
            if not pods:
                self._by_address.pop(ep.address, None)
            self._close(pod)
        for ep in added:
            pod = ep.hostport
            self._endpoints[pod] = ep
            pods = self._by_address.setdefault(ep.address, [])
            if pod not in pods:
                pods.append(pod)
            if self.started:
                self._close(pod)
                self._open(pod)

    def pod_of_topic(self, topic: Topic) -> str | None:
        """The pool endpoint (`ip:port`) a central-mode topic names: the endpoint with that `ip:port`, or
        with that ip when the topic names no port and one endpoint has it; None otherwise."""
        name = topic.pod
        if not name:
            return None
        if name in self._endpoints:
            return name
        host, sep, port = name.rpartition(":")
        if sep and port.isdigit():  # `ip:port` spelled differently (e.g. an IPv6 address without brackets)
            for pod in self._by_address.get(host.strip("[]"), ()):
                if self._endpoints[pod].port == int(port):
                    return pod
        pods = self._by_address.get(name.strip("[]"), ())
        return pods[0] if len(pods) == 1 else None

    def _open(self, pod: str) -> None:
        ep = self._endpoints[pod]
        rank = endpoint_rank(ep)
        replay = None
        if self.config.replay_port:
            replay = tcp_endpoint(ep.address, self.config.replay_port + rank)
        stream = self._streams[pod] = PodStream(self, pod, replay)
        if not self.central:
            assert self._ctx is not None and self._loop is not None
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            if ":" in ep.address:
                sock.setsockopt(zmq.IPV6, 1)
            sock.setsockopt(zmq.SUBSCRIBE, self.config.topic_filter.encode("utf-8"))
            sock.connect(tcp_endpoint(ep.address, self.config.socket_port + rank))
            self._sockets[pod] = sock
            self._readers[pod] = self._loop.create_task(self._read_pod(stream, sock), name=f"kv-events {pod}")
        if replay is not None:
            stream.start_replay(0)

    def _close(self, pod: str) -> None:
        stream = self._streams.pop(pod, None)
        if stream is not None:
            stream.close()
        task = self._readers.pop(pod, None)
        if task is not None:
            task.cancel()
        sock = self._sockets.pop(pod, None)
        if sock is not None:
            sock.close(linger=0)

    # -- reading -----------------------------------------------------------------------------------------

    def _topic(self, raw: bytes) -> Topic:
        topic = self._topics.get(raw)
        if topic is None:
            topic = parse_topic(raw)
            if len(self._topics) < 4096:
                self._topics[raw] = topic
        return topic

    def _frames(self, frames: list[bytes]) -> tuple[Topic, int, bytes] | None:
        self.stats.messages += 1
        if len(frames) != 3:
            self.stats.bad_messages["frame_count"] += 1
            return None
        raw_topic, raw_seq, payload = frames
        if len(raw_seq) != 8:
            self.stats.bad_messages["sequence"] += 1
            return None
        try:
            topic = self._topic(raw_topic)
        except DecodeError:
            self.stats.bad_messages["topic"] += 1
            return None
        return topic, int.from_bytes(raw_seq, "big"), payload

    async def _read_pod(self, stream: PodStream, sock: zmq.asyncio.Socket) -> None:
        recv = sock.recv_multipart
        while True:
            try:
                frames = await recv()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM or sock.closed:
                    return
                log.warning("KV-event socket of %s: %s", stream.pod, exc)
                await asyncio.sleep(0.1)
                continue
            msg = self._frames(frames)
            if msg is not None:
                self._deliver(stream, msg)

    async def _read_central(self, sock: zmq.asyncio.Socket) -> None:
        recv = sock.recv_multipart
        while True:
            try:
                frames = await recv()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM or sock.closed:
                    return
                log.warning("central KV-event socket: %s", exc)
                await asyncio.sleep(0.1)
                continue
            msg = self._frames(frames)
            if msg is None:
                continue
            pod = self.pod_of_topic(msg[0])
            stream = self._streams.get(pod) if pod is not None else None
            if stream is None:
                self.stats.unknown_pod += 1
                continue
            self._deliver(stream, msg)

    def _deliver(self, stream: PodStream, msg: tuple[Topic, int, bytes]) -> None:
        try:
            stream.on_live(*msg)
        except Exception:  # never let one bad batch stop the subscription
            log.exception("applying a KV-event batch of %s failed", stream.pod)
            self.stats.bad_messages["apply"] += 1

    async def fetch_replay(self, endpoint: str | None, start: int) -> list[tuple[Topic, int, bytes]] | None:
        """Every batch the replay socket at `endpoint` holds from `start` on, or None when it does not
        answer in time. Accepts vLLM >= 0.26 frames `[b"", topic, seq, payload]` and older
        `[b"", seq, payload]`; the end is the seq -1."""
        if endpoint is None or self._ctx is None:
            return None
        loop = asyncio.get_running_loop()
        cfg = self.config
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if "[" in endpoint:
            sock.setsockopt(zmq.IPV6, 1)
        out: list[tuple[Topic, int, bytes]] = []
        deadline = loop.time() + cfg.replay_total_timeout_s
        empty = Topic(None, None)
        try:
            sock.connect(endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                wait = min(cfg.replay_idle_timeout_s, deadline - loop.time())
                if wait <= 0 or not await sock.poll(int(wait * 1000), zmq.POLLIN):
                    return None
                frames = await sock.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) == 3:
                    raw_topic, raw_seq, payload = frames
                elif len(frames) == 2:
                    raw_topic, (raw_seq, payload) = b"", frames
                else:
                    self.stats.bad_messages["replay_frame_count"] += 1
                    continue
                if raw_seq == END_SEQ:
                    return out
                if len(raw_seq) != 8:
                    self.stats.bad_messages["sequence"] += 1
                    continue
                try:
                    topic = self._topic(raw_topic) if raw_topic else empty
                except DecodeError:
                    self.stats.bad_messages["topic"] += 1
                    continue
                out.append((topic, int.from_bytes(raw_seq, "big"), payload))
        finally:
            sock.close(linger=0)
