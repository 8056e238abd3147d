"""A small HTTP/2 + gRPC client written for the tests (independent of the server's code paths): it encodes
the frames a client sends and decodes what the server answers into per-stream views. Plus a fake transport
to drive `H2Connection` directly, recording sessions, and a raw client over a real socket."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import hpack

from epp.extproc import protocol as p
from epp.extproc.h2.connection import DEFAULT_CONFIG, H2Config, H2Connection

PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes([n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags]) + struct.pack(">L", sid) + payload


def grpc_messages(*msgs: p.ProcessingRequest | bytes) -> bytes:
    out = b""
    for m in msgs:
        b = m if isinstance(m, bytes) else m.SerializeToString()
        out += b"\x00" + struct.pack(">L", len(b)) + b
    return out


def request_body(body: bytes, end_of_stream: bool = False) -> p.ProcessingRequest:
    return p.ProcessingRequest(request_body=p.pb.HttpBody(body=body, end_of_stream=end_of_stream))


class Client:
    """Encodes client frames (its own HPACK encoder, with indexing: exercises the server's decoder)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    @staticmethod
    def preface(settings: dict[int, int] | None = None) -> bytes:
        return PREFACE + Client.settings(settings or {})

    @staticmethod
    def settings(values: dict[int, int]) -> bytes:
        return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in values.items()))

    def header_block(self, path: str = PATH, extra: tuple[tuple[str, str], ...] = (), method: str = "POST",
                     content_type: str = "application/grpc") -> bytes:
        headers = [(":method", method), (":scheme", "http"), (":path", path), (":authority", "epp"),
                   ("te", "trailers"), ("content-type", content_type), *extra]
        return self.encoder.encode(headers)

    def headers(self, sid: int, end_stream: bool = False, **kw) -> bytes:
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, self.header_block(**kw))

    @staticmethod
    def data(sid: int, payload: bytes, end_stream: bool = False, pad: int | None = None) -> bytes:
        if pad is None:
            return frame(DATA, END_STREAM if end_stream else 0, sid, payload)
        return frame(DATA, PADDED | (END_STREAM if end_stream else 0), sid, bytes([pad]) + payload + b"\0" * pad)

    @staticmethod
    def rst(sid: int, code: int = 8) -> bytes:
        return frame(RST_STREAM, 0, sid, struct.pack(">L", code))

    @staticmethod
    def window_update(sid: int, inc: int) -> bytes:
        return frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", inc))

    @staticmethod
    def ping(payload: bytes = b"12345678", ack: bool = False) -> bytes:
        return frame(PING, ACK if ack else 0, 0, payload)

    @staticmethod
    def goaway(last: int = 0, code: int = 0) -> bytes:
        return frame(GOAWAY, 0, 0, struct.pack(">LL", last, code))


@dataclass
class StreamView:
    headers: dict[str, str] | None = None
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] | None = None
    ended: bool = False  # END_STREAM seen
    reset: int | None = None  # RST_STREAM code

    @property
    def final(self) -> dict[str, str]:
        """The trailers, or the headers of a Trailers-Only response."""
        block = self.trailers if self.trailers is not None else self.headers
        return block or {}

    @property
    def status(self) -> int | None:
        value = self.final.get("grpc-status")
        return None if value is None else int(value)

    def messages(self) -> list[p.ProcessingResponse]:
        out, pos, data = [], 0, bytes(self.data)
        while pos + 5 <= len(data):
            n = struct.unpack_from(">L", data, pos + 1)[0]
            assert data[pos] == 0, "the server never compresses"
            assert pos + 5 + n <= len(data), "a message cut short"
            out.append(p.ProcessingResponse.FromString(data[pos + 5 : pos + 5 + n]))
            pos += 5 + n
        assert pos == len(data), "trailing bytes that are not a whole gRPC message"
        return out


class Received:
    """Decodes what the server sent, frame by frame, checking the framing as it goes."""

    def __init__(self, max_frame: int = 16_384) -> None:
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.max_frame = max_frame
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.streams: dict[int, StreamView] = {}
        self.settings: list[dict[int, int]] = []
        self.settings_acks = 0
        self.pings: list[tuple[bytes, bool]] = []
        self.goaways: list[tuple[int, int, bytes]] = []
        self.window_updates: list[tuple[int, int]] = []
        self.data_bytes: dict[int, int] = {}  # flow-controlled bytes the server sent, per stream

    def stream(self, sid: int) -> StreamView:
        return self.streams.setdefault(sid, StreamView())

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                break
            kind, flags, sid = self.buf[3], self.buf[4], struct.unpack_from(">L", self.buf, 5)[0] & 0x7FFFFFFF
            payload = self.buf[9 : 9 + n]
            self.buf = self.buf[9 + n :]
            self.frames.append((kind, flags, sid, payload))
            self._frame(kind, flags, sid, payload)

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind in (DATA, HEADERS):
            assert sid % 2 == 1 and len(payload) <= self.max_frame
            s = self.stream(sid)
            assert not s.ended, f"frame after END_STREAM on stream {sid}"
            assert s.reset is None, f"frame after RST_STREAM on stream {sid}"
            if kind == DATA:
                assert s.headers is not None, "DATA before response headers"
                s.data += payload
                self.data_bytes[sid] = self.data_bytes.get(sid, 0) + len(payload)
            else:
                assert flags & END_HEADERS, "the server's header blocks fit one frame"
                block = dict((k.decode(), v.decode()) for k, v in self.decoder.decode(payload, raw=True))
                if s.headers is None:
                    s.headers = block
                else:
                    assert flags & END_STREAM, "a second header block must be the trailers"
                    s.trailers = block
            if flags & END_STREAM:
                s.ended = True
        elif kind == RST_STREAM:
            self.stream(sid).reset = struct.unpack(">L", payload)[0]
        elif kind == SETTINGS:
            if flags & ACK:
                self.settings_acks += 1
            else:
                self.settings.append({k: v for k, v in struct.iter_unpack(">HL", payload)})
        elif kind == PING:
            self.pings.append((payload, bool(flags & ACK)))
        elif kind == GOAWAY:
            last, code = struct.unpack_from(">LL", payload)
            self.goaways.append((last, code, payload[8:]))
        elif kind == WINDOW_UPDATE:
            self.window_updates.append((sid, struct.unpack(">L", payload)[0]))

    def window_granted(self, sid: int) -> int:
        return sum(inc for s, inc in self.window_updates if s == sid)


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data
        self.writes += 1

    def take(self) -> bytes:
        out = bytes(self.written)
        self.written.clear()
        return out

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default=None):
        return default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def echo(msg: p.ProcessingRequest) -> list[p.Reply]:
    """The test sessions' default answer: a headers message gets a serialized-message reply, a body is
    echoed as streamed body replies (bytes, as the real session's hot path)."""
    kind = msg.WhichOneof("request")
    if kind == "request_headers":
        return [p.continue_request_headers()]
    if kind == "request_body":
        return list(p.streamed_chunks(msg.request_body.body, msg.request_body.end_of_stream, response=False))
    return []


class RecordingSession:
    def __init__(self, handler: Callable[[p.ProcessingRequest], list[p.Reply]]) -> None:
        self.handler = handler
        self.messages: list[p.ProcessingRequest] = []
        self.closes = 0

    def handle(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        assert self.closes == 0, "handle() after close()"
        self.messages.append(msg)
        return self.handler(msg)

    def close(self) -> None:
        self.closes += 1


class Sessions:
    """The session factory: remembers every session it made."""

    def __init__(self, handler: Callable[[p.ProcessingRequest], list[p.Reply]] = echo) -> None:
        self.handler = handler
        self.made: list[RecordingSession] = []

    def __call__(self) -> RecordingSession:
        s = RecordingSession(self.handler)
        self.made.append(s)
        return s

    def assert_each_closed_once(self) -> None:
        assert [s.closes for s in self.made] == [1] * len(self.made)

    def open_count(self) -> int:
        return sum(1 for s in self.made if s.closes == 0)


class Harness:
    """An H2Connection on a fake transport, with a client codec; must be made inside a running loop."""

    def __init__(self, sessions: Sessions | None = None, config: H2Config = DEFAULT_CONFIG,
                 client_settings: dict[int, int] | None = None, handshake: bool = True) -> None:
        self.sessions = sessions or Sessions()
        self.conn = H2Connection(self.sessions, config)
        self.transport = FakeTransport()
        self.client = Client()
        self.rx = Received(max_frame=(client_settings or {}).get(5, 16_384))  # SETTINGS_MAX_FRAME_SIZE
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.pump()
        if handshake:
            self.send(Client.preface(client_settings))

    def send(self, *chunks: bytes) -> Received:
        for c in chunks:
            self.conn.data_received(c)
        self.pump()
        return self.rx

    def pump(self) -> None:
        self.rx.feed(self.transport.take())

    def call(self, sid: int, *msgs: p.ProcessingRequest, end_stream: bool = True) -> StreamView:
        self.send(self.client.headers(sid), Client.data(sid, grpc_messages(*msgs), end_stream=end_stream))
        return self.rx.stream(sid)

    def lose(self) -> None:
        self.conn.connection_lost(None)


class RawClient:
    """The client codec over a real socket (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.client = Client()
        self.rx = Received()
        self.eof = False

    @classmethod
    async def connect(cls, port: int, ssl=None, settings: dict[int, int] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl,
                                                       server_hostname="epp" if ssl else None)
        c = cls(reader, writer)
        await c.send(Client.preface(settings))
        return c

    async def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.writer.write(chunk)
        await self.writer.drain()

    async def until(self, cond: Callable[[Received], bool], timeout: float = 5.0) -> Received:
        async def loop() -> None:
            while not cond(self.rx):
                data = await self.reader.read(1 << 16)
                if not data:
                    self.eof = True
                    if not cond(self.rx):
                        raise ConnectionError("the server closed the connection first")
                    return
                self.rx.feed(data)
        await asyncio.wait_for(loop(), timeout)
        return self.rx

    async def read_to_eof(self, timeout: float = 5.0) -> Received:
        async def loop() -> None:
            while data := await self.reader.read(1 << 16):
                self.rx.feed(data)
            self.eof = True
        await asyncio.wait_for(loop(), timeout)
        return self.rx

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
