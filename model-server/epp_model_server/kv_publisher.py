"""KV-event publication over ZMQ, as vLLM's `ZmqEventPublisher` does it.

- `--kv-events-config` is vLLM's `KVEventsConfig` JSON (`enable_kv_cache_events`, `publisher`, `endpoint`,
  `replay_endpoint`, `buffer_steps`, `hwm`, `max_queue_size`, `topic`).
- Bind or connect, by vLLM's rule: an endpoint containing `*` or `::`, or an `ipc://` / `inproc://` one,
  binds; any other connects. Our addition (contracts.md): `tcp://*:P` binds on the `--host` address when
  `--host` names one address (on 0.0.0.0 / :: it binds all interfaces, as vLLM). A port `*` binds an
  ephemeral port; the bound endpoint is reported at startup.
- A PUB socket sends each batch as three frames `[topic, seq as 8-byte big-endian, msgpack EventBatch]`;
  seq counts batches from 0 in this process.
- The last `buffer_steps` batches are kept for replay. A ROUTER socket on `replay_endpoint` answers a
  request whose last frame is an 8-byte big-endian start sequence with every buffered batch from that
  sequence on, each as `[identity, b"", topic, seq, payload]`, then the end marker
  `[identity, b"", topic, (-1) as signed 8-byte big-endian, b""]` (vLLM >= 0.26 framing; the empty
  delimiter frame is echoed only when the request had one, so REQ and DEALER clients both work).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

import zmq
import zmq.asyncio

from .events import FORMATS, KVEvent, encode_batch

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_ALL_INTERFACES = ("", "0.0.0.0", "::", "*", "[::]")


class KVEventsConfigError(ValueError):
    """A bad --kv-events-config; the message names the key and what is allowed."""


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, text: str | None) -> KVEventsConfig:
        """Parses vLLM's JSON; `publisher` defaults to "zmq" when events are enabled (as vLLM)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise KVEventsConfigError(f"--kv-events-config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise KVEventsConfigError("--kv-events-config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise KVEventsConfigError(
                f"--kv-events-config: unknown key(s) {unknown}; allowed: {', '.join(known)}"
            )
        types: dict[str, Any] = {
            "enable_kv_cache_events": bool, "publisher": str, "endpoint": str, "replay_endpoint": (str, type(None)),
            "buffer_steps": int, "hwm": int, "max_queue_size": int, "topic": str,
        }
        for key, value in data.items():
            expected = types[key]
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise KVEventsConfigError(f"--kv-events-config: {key!r} has the wrong type ({value!r})")
        if "publisher" not in data:
            data["publisher"] = "zmq" if data.get("enable_kv_cache_events") else "null"
        if data["publisher"] not in ("zmq", "null"):
            raise KVEventsConfigError(
                f"--kv-events-config: publisher {data['publisher']!r} is not supported; use \"zmq\" or \"null\""
            )
        if data.get("buffer_steps", 1) < 1:
            raise KVEventsConfigError("--kv-events-config: buffer_steps must be at least 1")
        return cls(**data)

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


def resolve_endpoint(endpoint: str, host: str) -> tuple[str, bool]:
    """(endpoint to use, bind?) for a configured endpoint and the server's --host."""
    bind = "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
    prefix = "tcp://*:"
    if bind and endpoint.startswith(prefix) and host not in _ALL_INTERFACES:
        address = f"[{host}]" if ":" in host else host
        endpoint = f"tcp://{address}:{endpoint[len(prefix):]}"
    return endpoint, bind


def _open(sock: zmq.Socket, endpoint: str, host: str) -> str:
    target, bind = resolve_endpoint(endpoint, host)
    if target.startswith("tcp://[") or (":" in host and host not in _ALL_INTERFACES) or "::" in target:
        sock.setsockopt(zmq.IPV6, 1)
    if bind:
        try:
            sock.bind(target)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind KV-event socket on {target}: {exc}; is another server using it?") from exc
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.connect(target)
    return target


class ZmqEventPublisher:
    """Publishes engine-step event batches; must be used from the event loop thread."""

    def __init__(
        self,
        config: KVEventsConfig,
        *,
        host: str = "0.0.0.0",
        fmt: str = "map",
        data_parallel_rank: int = 0,
    ) -> None:
        if fmt not in FORMATS:
            raise KVEventsConfigError(f"unknown KV event format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.config = config
        self.fmt = fmt
        self._dp_rank = data_parallel_rank
        self._topic = config.topic.encode("utf-8")
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context.shadow(self._ctx)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task | None = None
        self.dropped = 0
        try:
            self.endpoint = _open(self._pub, config.endpoint, host)
            self.replay_endpoint: str | None = None
            if config.replay_endpoint:
                self._router = self._actx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self.replay_endpoint = _open(self._router, config.replay_endpoint, host)
        except Exception:
            self.close()
            raise

    @property
    def next_seq(self) -> int:
        return self._seq

    def start(self) -> None:
        """Starts answering replay requests (needs a running event loop)."""
        if self._router is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(), name="kv-replay")

    def publish(self, events: list[KVEvent]) -> None:
        if not events:
            return
        payload = encode_batch(time.time(), events, self.fmt, self._dp_rank)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def replay_from(self, start: int) -> list[tuple[int, bytes]]:
        return [(seq, payload) for seq, payload in self._buffer if seq >= start]

    async def _serve_replay(self) -> None:
        assert self._router is not None
        while True:
            try:
                frames = await self._router.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                log.warning("KV replay socket error: %s", exc)
                return
            if len(frames) < 2 or len(frames[-1]) != 8:
                log.warning("ignoring malformed KV replay request with %d frames", len(frames))
                continue
            envelope = [frames[0], b""] if len(frames) >= 3 and frames[1] == b"" else [frames[0]]
            start = int.from_bytes(frames[-1], "big")
            for seq, payload in self.replay_from(start):
                await self._router.send_multipart([*envelope, self._topic, seq.to_bytes(8, "big"), payload])
            await self._router.send_multipart([*envelope, self._topic, END_SEQ, b""])

    async def aclose(self) -> None:
        """Stops the replay task, then closes the sockets."""
        task, self._replay_task = self._replay_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.close()

    def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            self._replay_task = None
        if self._router is not None:
            self._router.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.term()
