"""ext_proc load generator: one `epp` process alone, driven over its ext_proc port the way Envoy drives it
(no Envoy): the EPP's own latency, CPU per request and most requests per second, per transport, side by side.

    python -m bench.extproc_load [--transports fast,grpcio] [--profiles default,precise] [--endpoints 64]
                                 [--rates 200,500,1000,1500] [--duration 10] [--max-duration 10]
                                 [--concurrency 32] [--prompt-tokens 8192] [--finish reset|half-close]

Setup: --endpoints stub backends (hack/stub_backend.py, one process) that the epp scrapes every 50 ms, as in
production; for each profile (epp/profiles/<name>.yaml) and transport, one `epp --transport <t>` at a time,
pinned to CPU 0 (--epp-cpu; its scrape worker process with it), while this process (the client) and the
backends run on CPU 1 (--client-cpu). Rates above one the epp cannot hold are skipped (--keep-going).

The client is one HTTP/2 connection (cleartext, prior knowledge) with many concurrent streams, as Envoy's
ext_proc client keeps one gRPC connection per worker. It replays what Envoy 1.40 sends with the gateway's
config (manifests/envoy/envoy.yaml: request headers SEND, request body FULL_DUPLEX_STREAMED, response headers
SEND, response body NONE), recorded from a real Envoy in front of a recording ext_proc server with the
overhead benchmark's bodies (bench/overhead.make_bodies, ~29.8 KB) sent by an HTTP/1.1 client:
- connection: SETTINGS {HEADER_TABLE_SIZE 4096, ENABLE_PUSH 0, ENABLE_CONNECT_PROTOCOL 0,
  MAX_CONCURRENT_STREAMS 1024, INITIAL_WINDOW_SIZE 16 MiB} and a connection WINDOW_UPDATE to 24 MiB;
- per request, one stream: HEADERS (POST the Process method; :authority, te, content-type,
  x-envoy-internal, x-forwarded-for; no grpc-timeout), then one gRPC message per run of DATA frames cut at
  16 KiB: request_headers (the HTTP request's 11 headers, metadata_context present and empty, protocol_config
  {request_body_mode: FULL_DUPLEX_STREAMED}), request_body with the whole body (end_of_stream false), an
  empty request_body with end_of_stream true (both with an empty metadata_context; no attributes anywhere);
- after the EPP's replies to those (the routing headers reply, then the echoed body ending in
  end_of_stream): response_headers (the upstream's 200 and 7 headers, metadata_context envoy.lb
  {x-gateway-destination-endpoint: the destination});
- once the response_headers reply is in, Envoy neither half-closes nor waits for trailers: with response
  body mode NONE it resets the stream (RST_STREAM, code 2) when the HTTP response ends. --finish reset (the
  default) does that right after the response_headers reply; --finish half-close instead ends the client's
  side (empty DATA, END_STREAM) and waits for the trailers, checking grpc-status 0.
Frames are pre-encoded before the run (HEADERS as one fixed HPACK block of literals that are never indexed;
the gRPC-framed messages cut into DATA payloads); per request the client only writes bytes (9-byte frame
headers with the stream id, and a fixed-width x-request-id) and parses the replies. It keeps HTTP/2's rules
as a client: it acks the server's SETTINGS and PINGs, respects its MAX_CONCURRENT_STREAMS (requests wait)
and its connection and stream send windows (a connection's starts at 64 KiB; the stream windows are
what the server announces), and hands back receive windows with WINDOW_UPDATE as reply data is consumed.

Measured, per profile and transport:
- open loop at each --rates (req/s, --duration s each): the routing decision's latency (from the moment a
  request is handed to the connection to the arrival of the reply to its last request_body message, i.e.
  the routing headers plus the echoed body), p50/p90/p99; the whole stream's (to the response_headers reply,
  or to the trailers with --finish half-close); achieved rate; errors; the client's send lag behind the
  schedule;
- closed loop ("max"): --concurrency streams back to back for --max-duration s: requests per second;
- the epp's CPU per request: its main process's utime+stime (/proc/<pid>/stat) over the run / completed
  requests ("net": less what it burns idle, measured for --idle s before the load); its scrape worker
  process (a child, pinned with it) separately, and with it ("tree"); the client's own CPU per request
  (getrusage), so that the reader can see the client was not the bottleneck; the backends' CPU.
Errors (each counted by reason): a reset or a non-zero grpc-status from the epp, an immediate_response, a
reply out of order, a body echo of the wrong length, a stream unfinished --timeout s after the run. Sanity:
each decision's destination (x-gateway-destination-endpoint in the headers reply) is checked against the
pool: "in pool" counts the requests routed to one of the pool's endpoints.

Prints a side-by-side table (transports as column groups) and writes bench/out/extproc_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hpack

from bench.overhead import make_bodies, pct
from bench.overhead import process_cpu_seconds as cpu_seconds
from bench.runner import run as run_benchmark
from epp.extproc import protocol as p
from epp.extproc.h2 import frames as f
from hack.extproc_messages import Mode, body_msg, headers_msg, response_headers_msg
from hack.localstack import Processes

OUT = Path(__file__).parent / "out"
PROFILES = Path(__file__).parent.parent / "epp" / "profiles"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
ENVOY_FRAME = 16_384  # Envoy cuts each gRPC message into DATA frames of at most 16 KiB
STREAM_WINDOW = 16 << 20  # what Envoy announces as SETTINGS_INITIAL_WINDOW_SIZE
CONNECTION_WINDOW = 24 << 20  # and raises its connection window to
ENABLE_CONNECT_PROTOCOL = 0x8  # RFC 8441
CLIENT_SETTINGS = {f.HEADER_TABLE_SIZE: 4096, f.ENABLE_PUSH: 0, ENABLE_CONNECT_PROTOCOL: 0,
                   f.MAX_CONCURRENT_STREAMS: 1024, f.INITIAL_WINDOW_SIZE: STREAM_WINDOW}
RESET_CODE = f.INTERNAL_ERROR  # Envoy's RST_STREAM code when it drops the ext_proc stream at the response's end

# The gRPC call's headers as Envoy sends them (its envoy_grpc client).
CALL_HEADERS = [(":method", "POST"), (":path", PATH), (":authority", "epp"), (":scheme", "http"),
                ("te", "trailers"), ("content-type", "application/grpc"), ("x-envoy-internal", "true"),
                ("x-forwarded-for", "192.0.2.2")]
# The HTTP request as Envoy forwards it: recorded when bench/overhead.py's client was aiohttp's (an SDK-like
# header set; its lean client now sends fewer headers, which only shortens the message).
HTTP_HEADERS = {":authority": "127.0.0.1:8081", ":path": "/v1/chat/completions", ":method": "POST",
                ":scheme": "http", "content-type": "application/json", "accept": "*/*",
                "accept-encoding": "gzip, deflate", "user-agent": "Python/3.11 aiohttp/3.14.5",
                "content-length": "0", "x-forwarded-proto": "http", "x-request-id": "0" * 36}
# The upstream's answer, as Envoy passes it to the EPP (recorded from the aiohttp stub; today's sends no server/date).
UPSTREAM_HEADERS = {"x-served-by": "", "content-length": "605", "date": "Mon, 23 Nov 2026 16:10:03 GMT",
                    "server": "Python/3.11 aiohttp/3.14.5", "x-envoy-upstream-service-time": "1"}
REQUEST_ID_PLACEHOLDER = "\x7f" * 36  # fixed width: the message's length does not change per request

TIMER_RESOLUTION = 1e-3  # the event loop's timers (libuv's and epoll's are in whole milliseconds)
SENT, RESPONDED, CLOSING = range(3)  # a stream's states: request sent; response_headers sent; half-closed


# ------------------------------------------------------------------------------------ Envoy's messages


def grpc_frame(msg: bytes) -> bytes:
    return f.GRPC_PREFIX.pack(0, len(msg)) + msg


def cut(data: bytes, size: int = ENVOY_FRAME) -> list[bytes]:
    """DATA payloads of at most `size` bytes (at least one, for an empty message)."""
    return [data[off : off + size] for off in range(0, len(data), size)] or [b""]


def envoy_request_messages(body: bytes, request_id: str, body_chunk: int = 0) -> list[p.ProcessingRequest]:
    """What Envoy sends for one request before it has the routing answer: request_headers, the body as
    request_body messages (whole, or cut at `body_chunk` bytes), then an empty request_body that ends it."""
    first = headers_msg({**HTTP_HEADERS, "content-length": str(len(body)), "x-request-id": request_id},
                        response_mode=Mode.NONE)  # protocol_config: request FULL_DUPLEX_STREAMED, response NONE
    parts = [body] if body_chunk <= 0 else [body[i : i + body_chunk] for i in range(0, len(body), body_chunk)]
    msgs = [first, *(body_msg(part, False) for part in parts if part), body_msg(b"", True)]
    for m in msgs:
        m.metadata_context.SetInParent()  # Envoy sends it empty (forwarding namespaces with nothing in them)
    return msgs


def envoy_response_headers(destination: str) -> p.ProcessingRequest:
    """The upstream's 200 as Envoy reports it, with the endpoint it sent the request to."""
    msg = response_headers_msg(200, "application/json; charset=utf-8")
    for key, value in {**UPSTREAM_HEADERS, "x-served-by": destination}.items():
        h = msg.response_headers.headers.headers.add()
        h.key, h.raw_value = key, value.encode()
    msg.metadata_context.filter_metadata[p.DESTINATION_NAMESPACE].fields[p.DESTINATION_HEADER].string_value = (
        destination)
    return msg


@dataclass(frozen=True)
class Template:
    """One body's request, pre-encoded: the request_headers DATA payload around its x-request-id, and the
    request_body messages' DATA payloads."""

    head: tuple[bytes, bytes]
    body: tuple[bytes, ...]
    body_len: int


def make_template(body: bytes, body_chunk: int = 0) -> Template:
    head, *rest = (grpc_frame(m.SerializeToString())
                   for m in envoy_request_messages(body, REQUEST_ID_PLACEHOLDER, body_chunk))
    before, sep, after = head.partition(REQUEST_ID_PLACEHOLDER.encode())
    if not sep or REQUEST_ID_PLACEHOLDER.encode() in after or len(head) > ENVOY_FRAME:
        raise ValueError("the request_headers message must hold the request id placeholder once and fit one "
                         "DATA frame; check HTTP_HEADERS")
    return Template((before, after), tuple(chunk for m in rest for chunk in cut(m)), len(body))


def classify(msg: bytes | memoryview) -> tuple[str, object]:
    """A reply's kind and what the client checks in it: the destination (request_headers), (end_of_stream,
    echoed bytes) (request_body), the HTTP status (immediate_response)."""
    r = p.ProcessingResponse.FromString(msg)
    kind = r.WhichOneof("response") or "empty"
    if kind == "request_headers":
        for h in r.request_headers.response.header_mutation.set_headers:
            if h.header.key == p.DESTINATION_HEADER:
                return kind, h.header.raw_value.decode() or h.header.value
        return kind, None
    if kind == "request_body":
        sr = r.request_body.response.body_mutation.streamed_response
        return kind, (sr.end_of_stream, len(sr.body))
    if kind == "immediate_response":
        return kind, r.immediate_response.status.code
    return kind, None


# ------------------------------------------------------------------------------------ the client


class ProtocolError(Exception):
    """The server broke HTTP/2 or gRPC framing: the connection is useless."""


class Stats:
    """One measurement: per completed request the decision and stream latencies; errors by reason."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last_done = self.start
        self.started = 0
        self.decision: list[float] = []
        self.stream: list[float] = []
        self.lag: list[float] = []
        self.errors: Counter[str] = Counter()
        self.in_pool = 0
        self.elsewhere = 0
        self.chosen: Counter[str] = Counter()

    @property
    def completed(self) -> int:
        return len(self.stream)

    def summary(self) -> dict:
        ms = 1e3
        elapsed = max(1e-9, self.last_done - self.start)
        return {"sent": self.started, "completed": self.completed, "errors": sum(self.errors.values()),
                "error_reasons": dict(self.errors), "achieved_rps": self.completed / elapsed,
                "decision_p50_ms": pct(self.decision, 0.5) * ms, "decision_p90_ms": pct(self.decision, 0.9) * ms,
                "decision_p99_ms": pct(self.decision, 0.99) * ms,
                "decision_mean_ms": sum(self.decision) / len(self.decision) * ms if self.decision else float("nan"),
                "stream_p50_ms": pct(self.stream, 0.5) * ms, "stream_p90_ms": pct(self.stream, 0.9) * ms,
                "stream_p99_ms": pct(self.stream, 0.99) * ms,
                "send_lag_p50_ms": pct(self.lag, 0.5) * ms, "send_lag_p99_ms": pct(self.lag, 0.99) * ms,
                "in_pool": self.in_pool, "not_in_pool": self.elsewhere, "distinct_endpoints": len(self.chosen)}


class Stream:
    __slots__ = ("id", "tpl", "t0", "t_decision", "state", "send_window", "pending", "rbuf", "recv_unacked",
                 "dest", "echoed", "done")

    def __init__(self, stream_id: int, tpl: Template, t0: float, send_window: int) -> None:
        self.id = stream_id
        self.tpl = tpl
        self.t0 = t0
        self.t_decision = 0.0
        self.state = SENT
        self.send_window = send_window
        self.pending: deque[tuple[bytes, int]] = deque()  # DATA (payload, flags) waiting for send windows
        self.rbuf = b""  # a partial gRPC reply
        self.recv_unacked = 0
        self.dest: str | None = None
        self.echoed = 0
        self.done = False


class ExtProcClient(asyncio.Protocol):
    """Envoy's side of the ext_proc connection, as cheap as it can be in Python: see the module docstring.
    `submit()` starts a request; `flush()` writes what the calls before produced. Results go to `stats`."""

    def __init__(self, templates: Sequence[Template], pool: Sequence[str], finish: str = "reset") -> None:
        if finish not in ("reset", "half-close"):
            raise ValueError(f"finish must be 'reset' or 'half-close', not {finish!r}")
        self.templates = list(templates)
        self.pool = frozenset(pool)
        self.finish = finish
        self.tag = os.getpid() & 0xFFFFFFFF
        self.block = f.encode_headers(CALL_HEADERS)
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.buf = b""
        self.decoder = hpack.Decoder()
        self.decoded: dict[bytes, dict[str, str]] = {}  # header blocks that leave the HPACK table as it is
        self.continuation: tuple[int, int, bytearray] | None = None
        self.replies: dict[bytes, tuple[str, object]] = {}  # small reply messages, classified
        self.responses: dict[str, list[bytes]] = {}  # destination -> response_headers DATA payloads
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}
        self.waiting: deque[float] = deque()  # requests over the server's MAX_CONCURRENT_STREAMS (their t0)
        self.next_id = 1
        self.seq = 0
        self.send_window = f.DEFAULT_WINDOW
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.max_streams = 2**31
        self.recv_unacked = 0
        self.window_stalls = 0  # DATA payloads that had to wait for the server's windows
        self.server_settings: dict[int, int] = {}  # the latest value of each
        self.goaway: tuple[int, int] | None = None
        self.fatal: str | None = None
        self.stats = Stats()
        self.on_done: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self._idle: asyncio.Future[None] | None = None

    # -------------------------------------------------------------- connection

    @classmethod
    async def connect(cls, host: str, port: int, templates: Sequence[Template], pool: Sequence[str],
                      finish: str = "reset", timeout: float = 10.0) -> ExtProcClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(templates, pool, finish), host, port)
        await asyncio.wait_for(client.ready, timeout)  # the server's SETTINGS
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(f.PREFACE + f.settings(CLIENT_SETTINGS)
                             + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fatal is None:
            self.fatal = f"connection lost ({exc})" if exc else "connection closed by the server"
        for st in list(self.streams.values()):
            self._fail(st, "connection lost", reset=False)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.fatal))
        self._check_idle()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.write(f.goaway(0, f.NO_ERROR))
            self.transport.close()

    def new_stats(self) -> Stats:
        self.stats = Stats()
        return self.stats

    # -------------------------------------------------------------- sending

    def submit(self, now: float, scheduled: float | None = None) -> None:
        """Start one request now (the next body in turn); `scheduled`: when the open loop meant to."""
        stats = self.stats
        stats.started += 1
        if scheduled is not None:
            stats.lag.append(now - scheduled)
        if self.fatal is not None or self.goaway is not None:
            stats.errors["connection unusable"] += 1
            return
        if len(self.streams) >= self.max_streams:
            self.waiting.append(now)
            return
        self._open(now)

    def _open(self, t0: float) -> None:
        tpl = self.templates[self.seq % len(self.templates)]
        request_id = b"%08x-%027d" % (self.tag, self.seq)
        self.seq += 1
        sid = self.next_id
        self.next_id += 2
        st = self.streams[sid] = Stream(sid, tpl, t0, self.peer_initial_window)
        self.out.append(f.headers_frame(sid, self.block, False))
        self._data(st, tpl.head[0] + request_id + tpl.head[1])
        for chunk in tpl.body:
            self._data(st, chunk)

    def _data(self, st: Stream, payload: bytes, flags: int = 0) -> None:
        n = len(payload)
        if not st.pending and n <= self.send_window and n <= st.send_window:
            self.send_window -= n
            st.send_window -= n
            self.out.append(f.frame(n, f.DATA, flags, st.id))
            self.out.append(payload)
            return
        st.pending.append((payload, flags))
        self.blocked[st.id] = st
        self.window_stalls += 1
        self._drain(st)

    def _drain(self, st: Stream) -> None:
        """Send as much of the stream's pending DATA as the windows allow (a payload may be split)."""
        pending = st.pending
        while pending:
            payload, flags = pending[0]
            n = len(payload)
            allow = min(self.send_window, st.send_window)
            if n <= allow:
                pending.popleft()
            elif allow > 0:
                pending[0] = (payload[allow:], flags)
                payload, flags, n = payload[:allow], 0, allow
            else:
                return
            self.send_window -= n
            st.send_window -= n
            self.out.append(f.frame(n, f.DATA, flags, st.id))
            self.out.append(payload)
        self.blocked.pop(st.id, None)

    def _drain_all(self) -> None:
        for st in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._drain(st)

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    # -------------------------------------------------------------- receiving

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.buf:
            data = self.buf + data
        view = memoryview(data)  # payloads are views: no copies of the echoed bodies but the ones needed
        pos, end = 0, len(data)
        try:
            while end - pos >= 9:
                hi, lo, kind, flags, sid = f.FRAME_HEADER.unpack_from(data, pos)
                n = (hi << 8) | lo
                if end - pos - 9 < n:
                    break
                payload = view[pos + 9 : pos + 9 + n]
                pos += 9 + n
                sid &= 0x7FFFFFFF
                if self.continuation is not None and kind != f.CONTINUATION:
                    raise ProtocolError("a header block interrupted before its END_HEADERS")
                if kind == f.DATA:
                    self._on_data(sid, flags, payload, now)
                elif kind == f.HEADERS:
                    self._on_headers(sid, flags, payload, now)
                elif kind == f.CONTINUATION:
                    self._on_continuation(sid, flags, payload, now)
                elif kind == f.WINDOW_UPDATE:
                    self._on_window_update(sid, payload)
                elif kind == f.SETTINGS:
                    if not flags & f.ACK:
                        self._on_settings(payload)
                elif kind == f.PING:
                    if not flags & f.ACK:
                        self.out.append(f.ping(bytes(payload), True))
                elif kind == f.RST_STREAM:
                    st = self.streams.get(sid)
                    if st is not None:
                        self._fail(st, f"stream reset by the server (code {f.u32(payload)})", reset=False)
                elif kind == f.GOAWAY:
                    self._on_goaway(payload)
                elif kind == f.PUSH_PROMISE:
                    raise ProtocolError("PUSH_PROMISE although the client disabled push")
        except ProtocolError as exc:
            self._protocol_error(str(exc))
            return
        self.buf = data[pos:]
        self.flush()

    def _on_data(self, sid: int, flags: int, payload: memoryview, now: float) -> None:
        n = len(payload)
        self.recv_unacked += n
        if self.recv_unacked >= CONNECTION_WINDOW // 2:
            self.out.append(f.window_update(0, self.recv_unacked))
            self.recv_unacked = 0
        st = self.streams.get(sid)
        if st is None:
            return  # a stream this client already ended; its bytes still counted for the connection
        st.recv_unacked += n
        if st.recv_unacked >= STREAM_WINDOW // 2:
            self.out.append(f.window_update(sid, st.recv_unacked))
            st.recv_unacked = 0
        if flags & f.PADDED:
            if not payload or payload[0] >= n:
                raise ProtocolError("DATA padding longer than the frame")
            payload = payload[1 : n - payload[0]]
        data = st.rbuf + payload if st.rbuf else payload
        pos, end = 0, len(data)
        while end - pos >= 5:
            compressed, m = f.GRPC_PREFIX.unpack_from(data, pos)
            if end - pos - 5 < m:
                break
            if compressed:
                self._fail(st, "compressed reply (the client accepts identity only)")
                return
            msg = data[pos + 5 : pos + 5 + m]
            pos += 5 + m
            self._on_message(st, msg, now)
            if st.done:
                return
        st.rbuf = bytes(data[pos:]) if pos < end else b""
        if flags & f.END_STREAM:
            self._fail(st, "the server ended the call without trailers", reset=False)

    def _on_headers(self, sid: int, flags: int, payload: memoryview, now: float) -> None:
        pos, end = 0, len(payload)
        if flags & f.PADDED:
            pos, end = 1, end - payload[0]
        if flags & f.PRIORITY_FLAG:
            pos += 5
        if pos > end:
            raise ProtocolError("HEADERS padding or priority longer than the frame")
        block = bytes(payload[pos:end])
        if not flags & f.END_HEADERS:
            self.continuation = (sid, flags, bytearray(block))
            return
        self._on_block(sid, flags, block, now)

    def _on_continuation(self, sid: int, flags: int, payload: memoryview, now: float) -> None:
        if self.continuation is None or self.continuation[0] != sid:
            raise ProtocolError("CONTINUATION without its HEADERS")
        _, first_flags, block = self.continuation
        block += payload
        if flags & f.END_HEADERS:
            self.continuation = None
            self._on_block(sid, first_flags, bytes(block), now)

    def _decode(self, block: bytes) -> dict[str, str]:
        """HPACK-decode a header block (every block, to keep the table in step with the server's encoder);
        a block that leaves the table unchanged decodes the same until the table changes, so it is cached."""
        hit = self.decoded.get(block)
        if hit is not None:
            return hit
        table = self.decoder.header_table
        before = (table.maxsize, tuple(table.dynamic_entries))
        try:
            headers = {k.decode(): v.decode() for k, v in self.decoder.decode(block, raw=True)}
        except hpack.HPACKError as exc:
            raise ProtocolError(f"undecodable header block: {exc}") from exc
        if (table.maxsize, tuple(table.dynamic_entries)) == before:
            if len(self.decoded) < 1024:
                self.decoded[block] = headers
        else:
            self.decoded.clear()
        return headers

    def _on_block(self, sid: int, flags: int, block: bytes, now: float) -> None:
        headers = self._decode(block)
        st = self.streams.get(sid)
        if st is None:
            return
        if not flags & f.END_STREAM:
            if headers.get(":status") != "200":
                self._fail(st, f"HTTP status {headers.get(':status')} from the server")
            return
        status = headers.get("grpc-status")
        if status == "0" and st.state == CLOSING:
            self._complete(st, now)
            return
        message = headers.get("grpc-message", "")
        self._fail(st, f"call ended early: grpc-status {status} {message}".rstrip())

    def _on_message(self, st: Stream, msg: memoryview, now: float) -> None:
        small = bytes(msg) if len(msg) <= 4096 else None  # a view compares to bytes slowly: a copy
        info = self.replies.get(small) if small is not None else None
        if info is None:
            try:
                info = classify(msg)
            except Exception as exc:  # noqa: BLE001 - any undecodable reply is this stream's error
                self._fail(st, f"unparsable reply ({type(exc).__name__})")
                return
            if small is not None and len(self.replies) < 8192:
                self.replies[small] = info
        kind, value = info
        if kind == "request_body":
            eos, n = value  # type: ignore[misc]
            st.echoed += n
            if eos:
                self._decided(st, now)
        elif kind == "request_headers":
            if st.state != SENT or st.dest is not None:
                self._fail(st, "a second request_headers reply")
            elif value is None:
                self._fail(st, f"request_headers reply without {p.DESTINATION_HEADER}")
            else:
                st.dest = value  # type: ignore[assignment]
        elif kind == "response_headers":
            self._responded(st, now)
        elif kind == "immediate_response":
            self._fail(st, f"immediate_response {value}")
        else:
            self._fail(st, f"unexpected reply: {kind}")

    def _decided(self, st: Stream, now: float) -> None:
        """The reply to the last request_body message is in: the routing decision is complete."""
        if st.state != SENT:
            self._fail(st, "a second end of the request body")
            return
        if st.dest is None:
            self._fail(st, "the body's end answered before the routing headers")
            return
        if st.echoed != st.tpl.body_len:
            self._fail(st, f"body echoed with {st.echoed} bytes, sent {st.tpl.body_len}")
            return
        st.t_decision = now
        primary = st.dest = st.dest.split(",", 1)[0]  # the first of a fallback list is where Envoy sends it
        payloads = self.responses.get(primary)
        if payloads is None:
            payloads = self.responses[primary] = cut(grpc_frame(envoy_response_headers(primary).SerializeToString()))
        st.state = RESPONDED
        for chunk in payloads:
            self._data(st, chunk)

    def _responded(self, st: Stream, now: float) -> None:
        if st.state != RESPONDED:
            self._fail(st, "response_headers reply before the response headers were sent")
        elif self.finish == "reset":
            self.out.append(f.rst_stream(st.id, RESET_CODE))
            self._complete(st, now)
        else:
            st.state = CLOSING
            self._data(st, b"", f.END_STREAM)

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE must be 4 bytes")
        inc = f.u32(payload) & 0x7FFFFFFF
        if sid == 0:
            self.send_window += inc
            self._drain_all()
            return
        st = self.streams.get(sid)
        if st is not None:
            st.send_window += inc
            if st.pending:
                self._drain(st)

    def _on_settings(self, payload: memoryview) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS length not a multiple of 6")
        for key, value in f.parse_settings(payload):
            self.server_settings[key] = value
            if key == f.MAX_CONCURRENT_STREAMS:
                self.max_streams = value
            elif key == f.INITIAL_WINDOW_SIZE:
                delta, self.peer_initial_window = value - self.peer_initial_window, value
                for st in self.streams.values():
                    st.send_window += delta
        self.out.append(f.SETTINGS_ACK)
        self._drain_all()
        self._start_waiting()
        if not self.ready.done():
            self.ready.set_result(None)

    def _on_goaway(self, payload: memoryview) -> None:
        last, code = f.u32(payload) & 0x7FFFFFFF, f.u32(payload, 4)
        self.goaway = (last, code)
        for st in [s for s in self.streams.values() if s.id > last]:
            self._fail(st, f"GOAWAY (code {code}) before the stream was processed", reset=False)
        for _ in range(len(self.waiting)):
            self.waiting.popleft()
            self.stats.errors["connection unusable"] += 1
        self._check_idle()

    def _protocol_error(self, reason: str) -> None:
        self.fatal = f"protocol error: {reason}"
        self.out.clear()
        for st in list(self.streams.values()):
            self._fail(st, self.fatal, reset=False)
        if self.transport is not None:
            self.transport.write(f.goaway(self.next_id, f.PROTOCOL_ERROR, reason.encode()[:200]))
            self.transport.close()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.fatal))

    # -------------------------------------------------------------- a stream's end

    def _complete(self, st: Stream, now: float) -> None:
        self._forget(st)
        stats = self.stats
        stats.decision.append(st.t_decision - st.t0)
        stats.stream.append(now - st.t0)
        stats.last_done = now
        stats.chosen[st.dest] += 1  # type: ignore[index]
        if st.dest in self.pool:
            stats.in_pool += 1
        else:
            stats.elsewhere += 1
        self._after()

    def _fail(self, st: Stream, reason: str, reset: bool = True) -> None:
        """End a stream as an error; `reset`: tell the server (RST_STREAM CANCEL), unless it ended it."""
        self._forget(st)
        self.stats.errors[reason] += 1
        if reset:
            self.out.append(f.rst_stream(st.id, f.CANCEL))
        self._after()

    def _forget(self, st: Stream) -> None:
        st.done = True
        del self.streams[st.id]
        if st.pending:
            self.blocked.pop(st.id, None)

    def _after(self) -> None:
        self._start_waiting()
        if self.on_done is not None:
            self.on_done()
        self._check_idle()

    def _start_waiting(self) -> None:
        while self.waiting and len(self.streams) < self.max_streams and self.fatal is None and self.goaway is None:
            self._open(self.waiting.popleft())

    def _check_idle(self) -> None:
        if self._idle is not None and not self._idle.done() and not self.streams and not self.waiting:
            self._idle.set_result(None)

    async def wait_idle(self, timeout: float) -> None:
        """Until every started request has ended; what is left after `timeout` s fails as timed out."""
        self.flush()
        if not self.streams and not self.waiting:
            return
        self._idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        except TimeoutError:
            for _ in range(len(self.waiting)):
                self.waiting.popleft()
                self.stats.errors[f"not started within {timeout:g}s"] += 1
            for st in list(self.streams.values()):
                self._fail(st, f"unfinished after {timeout:g}s")
            self.flush()
        finally:
            self._idle = None


# ------------------------------------------------------------------------------------ load shapes


async def open_loop(client: ExtProcClient, rate: float, duration: float, timeout: float = 10.0) -> Stats:
    """`rate` requests per second for `duration` s, whatever the answers; those due at a wake-up go out
    in one write (timers resolve whole milliseconds, so above ~1,000 req/s a wake-up sends two or more)."""
    stats = client.new_stats()
    n = max(1, round(rate * duration))
    start = stats.start = time.perf_counter()
    i = 0
    while i < n:
        now = time.perf_counter()
        due = min(n, int((now - start) * rate) + 1)
        while i < due:
            client.submit(now, start + i / rate)
            i += 1
        client.flush()
        if i < n:  # never less than the timer's resolution: a shorter sleep returns at once (a busy loop)
            await asyncio.sleep(max(TIMER_RESOLUTION, start + i / rate - time.perf_counter()))
    await client.wait_idle(timeout)
    return stats


async def closed_loop(client: ExtProcClient, concurrency: int, duration: float, timeout: float = 10.0) -> Stats:
    """`concurrency` streams back to back for `duration` s (a new request as each one ends)."""
    stats = client.new_stats()
    start = stats.start = time.perf_counter()
    deadline = start + duration

    def again() -> None:
        now = time.perf_counter()
        if now < deadline:
            client.submit(now)

    client.on_done = again
    try:
        for _ in range(concurrency):
            client.submit(start)
        client.flush()
        await asyncio.sleep(duration)
    finally:
        client.on_done = None
    await client.wait_idle(timeout)
    return stats


# ------------------------------------------------------------------------------------ the benchmark


def descendants(pid: int) -> list[int]:
    """The process's children, grandchildren, ... (epp scrapes in a child process by default)."""
    out, todo = [], [pid]
    while todo:
        p_ = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p_}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p_}/task/{tid}/children") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out += kids
            todo += kids
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each process under `pid` (not `pid` itself)."""
    out = {}
    for child in descendants(pid):
        try:
            out[child] = cpu_seconds(child)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpus_time(cpus: set[int]) -> tuple[float, float]:
    """Seconds these CPUs were busy (anything: user, system, interrupts) and stolen by the hypervisor, since
    boot (/proc/stat)."""
    busy = steal = 0
    with open("/proc/stat") as fh:
        for line in fh:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, stolen = (int(v) for v in values[:8])
                busy += user + nice + system + irq + softirq
                steal += stolen
    return busy / CLK_TCK, steal / CLK_TCK


class Meter:
    """CPU seconds over a run: the epp's main process and its children (the scrape worker), the backends'
    (/proc/<pid>/stat), this client's (getrusage); and how busy the epp's CPUs were in all (/proc/stat), so
    that what else ran there (other processes on a shared machine, interrupts) shows."""

    def __init__(self, epp_pid: int, backends_pid: int) -> None:
        self.epp_pid, self.backends_pid = epp_pid, backends_pid
        self.epp_cpus = os.sched_getaffinity(epp_pid)
        self.t0 = time.perf_counter()
        self.c0 = (cpu_seconds(epp_pid), tree_cpu(epp_pid), cpu_seconds(backends_pid), self_cpu(),
                   cpus_time(self.epp_cpus))

    def read(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        epp0, kids0, backends0, client0, (busy0, steal0) = self.c0
        kids1 = tree_cpu(self.epp_pid)
        busy1, steal1 = cpus_time(self.epp_cpus)
        return {"elapsed_s": elapsed, "epp_cpu_s": cpu_seconds(self.epp_pid) - epp0,
                "epp_children_cpu_s": sum(c - kids0.get(pid, 0.0) for pid, c in kids1.items()),
                "backends_cpu_s": cpu_seconds(self.backends_pid) - backends0, "client_cpu_s": self_cpu() - client0,
                "epp_cpus": sorted(self.epp_cpus), "epp_cpus_busy_s": busy1 - busy0, "epp_cpus_steal_s": steal1 - steal0}


@dataclass(frozen=True)
class Idle:
    """What the epp burns with no requests (per second): its main process (applying scrapes, timers) and
    its children (the scrape worker); and, for the record, what else kept its CPUs busy meanwhile."""

    main: float
    children: float
    other: float


async def idle_cpu(epp_pid: int, backends_pid: int, seconds: float) -> Idle:
    meter = Meter(epp_pid, backends_pid)
    await asyncio.sleep(seconds)
    r = meter.read()
    t = r["elapsed_s"]
    return Idle(r["epp_cpu_s"] / t, r["epp_children_cpu_s"] / t,
                max(0.0, r["epp_cpus_busy_s"] - r["epp_cpu_s"] - r["epp_children_cpu_s"]) / t)


def measure(stats: Stats, cpu: dict, idle: Idle) -> dict:
    """The run's summary with CPU: ms per completed request and utilization (cores)."""
    out = stats.summary()
    ok = max(1, out["completed"])
    elapsed = cpu["elapsed_s"]
    out.update(cpu)
    out["epp_cpu_ms_per_req"] = cpu["epp_cpu_s"] / ok * 1e3
    out["epp_cpu_ms_per_req_net"] = max(0.0, cpu["epp_cpu_s"] - idle.main * elapsed) / ok * 1e3
    out["epp_tree_cpu_ms_per_req"] = (cpu["epp_cpu_s"] + cpu["epp_children_cpu_s"]) / ok * 1e3
    out["client_cpu_ms_per_req"] = cpu["client_cpu_s"] / ok * 1e3
    for who in ("epp", "epp_children", "client", "backends"):
        out[f"{who}_cpu_util"] = cpu[f"{who}_cpu_s"] / elapsed
    out["epp_cpus_busy"] = cpu["epp_cpus_busy_s"] / elapsed
    out["epp_cpus_other"] = max(0.0, cpu["epp_cpus_busy_s"] - cpu["epp_cpu_s"] - cpu["epp_children_cpu_s"]) / elapsed
    out["epp_cpus_steal"] = cpu["epp_cpus_steal_s"] / elapsed
    return out


async def run_phase(coro, pids: tuple[int, int], idle: Idle) -> dict:
    gc.collect()
    gc.disable()  # the client makes no cycles; a collection in the middle of a run is a client stall
    try:
        meter = Meter(*pids)
        stats = await coro
        return measure(stats, meter.read(), idle)
    finally:
        gc.enable()


async def bench_epp(procs: Processes, backends_proc, pool: list[str], transport: str, profile: str,
                    templates: list[Template], args) -> list[dict]:
    """One epp (transport, profile): warm-up, idle CPU, the open-loop rates, then the closed loop."""
    epp = procs.epp(",".join(pool), "--transport", transport, "--config-file", str(PROFILES / f"{profile}.yaml"),
                    "--refresh-metrics-interval", args.refresh_metrics_interval, *args.epp_arg,
                    name=f"epp-{profile}-{transport}", cpus=args.epp_cpu)
    pids = (epp.popen.pid, backends_proc.popen.pid)
    rows = []
    client = await ExtProcClient.connect("127.0.0.1", epp.ports["grpc"], templates, pool, args.finish)
    try:
        warm = await closed_loop(client, 8, args.warmup, args.timeout)
        if warm.errors or not warm.completed:
            raise RuntimeError(f"{transport}/{profile}: warm-up failed: {dict(warm.errors)} "
                               f"({warm.completed} completed); epp log:\n{epp.output()[-3000:]}")
        await asyncio.sleep(0.5)
        idle = await idle_cpu(*pids, args.idle)
        print(f"  {profile}, {transport}: epp idle CPU {idle.main * 1e3:.1f} ms/s, its scrape worker "
              f"{idle.children * 1e3:.1f} ms/s ({len(pool)} endpoints), anything else on its CPU "
              f"{idle.other * 1e3:.0f} ms/s; server SETTINGS "
              f"{client.server_settings}", flush=True)
        shapes: list[tuple[str | float, Callable]] = [
            (rate, lambda r=rate: open_loop(client, r, args.duration, args.timeout)) for rate in args.rates]
        if args.max_duration > 0:
            shapes.append(("max", lambda: closed_loop(client, args.concurrency, args.max_duration, args.timeout)))
        saturated_at: float | None = None
        for rate, make in shapes:
            if saturated_at is not None and rate != "max" and not args.keep_going:
                rows.append({"profile": profile, "transport": transport, "rate": rate,
                             "skipped": f"saturated at {saturated_at:.0f} req/s"})
                print(f"  {profile}, {transport}, {_label(rate)}: skipped (saturated at {saturated_at:.0f} req/s)",
                      flush=True)
                continue
            r = await run_phase(make(), pids, idle)
            if rate != "max" and saturated_at is None and (r["achieved_rps"] < 0.9 * rate  # type: ignore[operator]
                                                           or r["errors"] > 0.01 * r["sent"]):
                saturated_at = rate  # type: ignore[assignment]
            rows.append({"profile": profile, "transport": transport, "rate": rate,
                         "epp_idle_cpu_ms_per_s": idle.main * 1e3, "epp_children_idle_cpu_ms_per_s": idle.children * 1e3,
                         "epp_cpus_other_when_idle": idle.other,
                         **r})
            print(f"  {profile}, {transport}, {_label(rate)}: {_cells(rows[-1])}; in pool "
                  f"{r['in_pool']}/{r['completed']} ({r['distinct_endpoints']} endpoints chosen); cores: epp "
                  f"{r['epp_cpu_util']:.2f} + worker {r['epp_children_cpu_util']:.2f} + anything else on its CPU "
                  f"{r['epp_cpus_other']:.2f} (steal {r['epp_cpus_steal']:.2f}), client "
                  f"{r['client_cpu_util']:.2f}, backends {r['backends_cpu_util']:.2f}; client lag p99 "
                  f"{r['send_lag_p99_ms']:.2f} ms" + (f"; errors {r['error_reasons']}" if r["errors"] else ""),
                  flush=True)
            if client.fatal:
                print(f"  connection failed: {client.fatal}; epp log:\n{epp.output()[-3000:]}", flush=True)
                break
            await asyncio.sleep(0.5)
    finally:
        client.close()
        epp.stop()
    return rows


def _label(rate: str | float) -> str:
    return rate if isinstance(rate, str) else f"{rate:.0f}"


HEAD = (f"{'dec p50':>7} {'p90':>6} {'p99':>7} {'strm99':>7} {'req/s':>6} {'err':>4} {'epp/req':>7} "
        f"{'cli/req':>7}")


def _cells(r: dict) -> str:
    if "skipped" in r:
        return f"{'(skipped: ' + r['skipped'] + ')':^{len(HEAD)}}"
    return (f"{r['decision_p50_ms']:>7.2f} {r['decision_p90_ms']:>6.2f} {r['decision_p99_ms']:>7.2f} "
            f"{r['stream_p99_ms']:>7.2f} {r['achieved_rps']:>6.0f} {r['errors']:>4} "
            f"{r['epp_cpu_ms_per_req']:>7.3f} {r['client_cpu_ms_per_req']:>7.3f}")


def print_table(rows: list[dict], transports: list[str]) -> None:
    """One line per profile and rate; one column group per transport: the decision's latency p50/p90/p99 and
    the whole stream's p99 (ms), achieved req/s, errors, CPU ms per request of the epp's main process (raw)
    and of this client."""
    width = len(HEAD)
    print(f"{'profile':>8} {'rate':>5} | " + " || ".join(f"{t:^{width}}" for t in transports))
    print(f"{'':>8} {'':>5} | " + " || ".join(HEAD for _ in transports))
    keys = list(dict.fromkeys((r["profile"], r["rate"]) for r in rows))
    for profile, rate in keys:
        by_t = {r["transport"]: r for r in rows if (r["profile"], r["rate"]) == (profile, rate)}
        print(f"{profile:>8} {_label(rate):>5} | "
              + " || ".join(f"{_cells(by_t[t]) if t in by_t else '-':<{width}}" for t in transports))


async def run(args, bodies: list[bytes]) -> list[dict]:
    templates = [make_template(b, args.body_chunk) for b in bodies]
    gc.freeze()  # the templates and everything before: never scanned again
    workdir = OUT / "extproc-load-logs"
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir)
    rows: list[dict] = []
    try:
        backends_proc, pool = procs.backends(args.endpoints, name="backends")
        await asyncio.sleep(0.5)
        for profile in args.profiles:
            for transport in args.transports:
                rows += await bench_epp(procs, backends_proc, pool, transport, profile, templates, args)
    finally:
        procs.stop_all()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="fast,grpcio", help="ext_proc transports to compare (--transport)")
    ap.add_argument("--profiles", default="default,precise", help="built-in profiles (epp/profiles/<name>.yaml)")
    ap.add_argument("--endpoints", type=int, default=64, help="stub backends in the pool (scraped every 50 ms)")
    ap.add_argument("--rates", default="200,500,1000,1500", help="open-loop rates, req/s")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    ap.add_argument("--max-duration", type=float, default=10.0, help="seconds of the closed loop (0: skip)")
    ap.add_argument("--concurrency", type=int, default=32, help="streams of the closed loop")
    ap.add_argument("--prompt-tokens", type=int, default=8192, help="body size as bench/overhead.py (~4 chars/token)")
    ap.add_argument("--bodies", type=int, default=512, help="distinct bodies, sent in turn")
    ap.add_argument("--body-chunk", type=int, default=0,
                    help="cut the body into request_body messages of this many bytes (0: one message, as Envoy "
                         "sent the benchmark's bodies from an HTTP/1.1 client)")
    ap.add_argument("--finish", choices=("reset", "half-close"), default="reset",
                    help="how a stream ends after the response_headers reply: reset (RST_STREAM, as Envoy does "
                         "with response body mode NONE) or half-close (END_STREAM, then the trailers, checked)")
    ap.add_argument("--keep-going", action="store_true",
                    help="run every rate (default: the rates above one the epp could not hold, i.e. under 90%% "
                         "achieved or over 1%% errors, are skipped)")
    ap.add_argument("--epp-cpu", default="0", help="CPU list the epp is pinned to (taskset)")
    ap.add_argument("--client-cpu", default="1", help="CPUs for this client and the backends (comma-separated)")
    ap.add_argument("--refresh-metrics-interval", default="50ms", help="epp's scrape period")
    ap.add_argument("--epp-arg", action="append", default=[],
                    help="an extra epp flag (repeatable), e.g. --epp-arg=--metrics-scraper=inline")
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of idle CPU measurement before the load")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of closed-loop warm-up per epp")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a run's last requests may take")
    ap.add_argument("--out", default=str(OUT / "extproc_load.json"))
    args = ap.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    client_cpus = {int(c) for c in args.client_cpu.split(",") if c.strip()}
    os.sched_setaffinity(0, client_cpus)  # before the backends start: they inherit it
    return run_benchmark(amain(args), "extproc_load")


async def amain(args) -> int:
    bodies = make_bodies(args.bodies, args.prompt_tokens)
    load0 = os.getloadavg()
    print(f"request body ~{len(bodies[0])} bytes; {args.endpoints} endpoints; epp on CPU {args.epp_cpu}, client "
          f"and backends on CPU {args.client_cpu}; finish: {args.finish}; load average {load0[0]:.2f}", flush=True)
    OUT.mkdir(exist_ok=True)
    rows = await run(args, bodies)
    load1 = os.getloadavg()
    print(f"\nepp alone over ext_proc (no Envoy): dec = the routing decision's latency, strm99 = the whole "
          f"stream's p99 (ms); epp/req = CPU ms per request of the epp's main process (raw: its idle work "
          f"included; net of it, and with the scrape worker, in the JSON); cli/req = this client's. Load "
          f"average before/after: {load0[0]:.2f}/{load1[0]:.2f}")
    print_table(rows, args.transports)
    result = {"body_bytes": len(bodies[0]), "prompt_tokens": args.prompt_tokens, "endpoints": args.endpoints,
              "transports": args.transports, "profiles": args.profiles, "finish": args.finish,
              "body_chunk": args.body_chunk, "duration_s": args.duration, "max_duration_s": args.max_duration,
              "concurrency": args.concurrency, "epp_cpu": args.epp_cpu, "client_cpu": args.client_cpu,
              "refresh_metrics_interval": args.refresh_metrics_interval, "epp_args": args.epp_arg,
              "cpus": os.cpu_count(),
              "loadavg_before": load0, "loadavg_after": load1, "rows": rows}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
