"""One HTTP/2 connection from Envoy serving the ext_proc bidi stream, as an asyncio Protocol.

How it reads: `data_received` parses every complete frame in the bytes at hand, in place (a memoryview, no
frame objects); a partial frame waits in a buffer that is only parsed again once the whole frame is there.
DATA payloads are cut into gRPC length-prefixed messages (several per frame, or one across many frames:
then the message is gathered in the stream's buffer, which is copied once, when it is complete). Each
message is parsed with `ProcessingRequest.FromString` and handed to the stream's ExtProcSession; its
replies are framed (5-byte gRPC prefix, DATA frames no larger than the peer's SETTINGS_MAX_FRAME_SIZE)
into a list of bytes. Everything one event produces goes out in one `transport.write` at its end.

HTTP/2 where it matters for Envoy as the client:
- Flow control both ways. Receiving: large windows (SETTINGS_INITIAL_WINDOW_SIZE and a connection
  WINDOW_UPDATE at start) handed back with WINDOW_UPDATE once half is used; a peer overrunning them is a
  FLOW_CONTROL_ERROR. Sending: the peer's connection and stream windows are respected; what does not fit
  waits on the stream (`pending`) until a WINDOW_UPDATE or a SETTINGS change opens them, and the closing
  trailers wait behind it. When the socket's write buffer fills, reading pauses (back-pressure).
- Streams end with trailers (grpc-status, grpc-message). The call ends OK when the client ends its side;
  errors (unknown method: 12, message too large: 8, a session exception or an unparsable message: 13,
  grpc-timeout passed: 4) end that stream only, followed by RST_STREAM when the client still sends. Frames
  for streams that are already closed are ignored: Envoy resets a stream right after its end-of-stream,
  which can cross our trailers, and that must never cost the connection.
- The session of a stream is closed exactly once, whichever comes first: the end of the call, a reset
  from either side, the deadline, the connection's loss.
- Connection errors (malformed framing, HPACK errors, flow-control violations) send GOAWAY and close.
- Graceful shutdown: GOAWAY with the largest stream id and a PING; at the PING's ACK every stream the peer
  opened before seeing the GOAWAY has arrived, so a second GOAWAY names the real last stream; open streams
  finish, then the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hpack import Decoder

from epp.extproc import protocol as p
from epp.extproc.h2 import frames as f

log = logging.getLogger("epp.extproc.h2")

PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
SHUTDOWN_PING = b"epp-bye!"
MAX_STREAM_ID = 2**31 - 1

_parse_request = p.ProcessingRequest.FromString
_frame_header = f.FRAME_HEADER.unpack_from
_grpc_prefix = f.GRPC_PREFIX.unpack_from
_pack_prefix = f.GRPC_PREFIX.pack
_frame = f.frame


class Session(Protocol):
    """What the transport drives: ExtProcSession's two methods."""

    def handle(self, msg: p.ProcessingRequest) -> list[p.Reply]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class H2Config:
    max_concurrent_streams: int = 1000
    stream_window: int = 4 << 20  # SETTINGS_INITIAL_WINDOW_SIZE we announce
    connection_window: int = 16 << 20
    max_frame_size: int = 1 << 20  # SETTINGS_MAX_FRAME_SIZE we announce: fewer, larger DATA frames
    max_header_list_size: int = 64 << 10
    max_message_bytes: int = 8 << 20  # as grpcio's grpc.max_receive_message_length for this server
    goaway_ping_timeout_s: float = 1.0


DEFAULT_CONFIG = H2Config()

class ConnectionError_(Exception):
    """A connection error (RFC 9113 §5.4.1): GOAWAY with `code`, then close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Stream:
    __slots__ = ("id", "session", "buf", "need", "recv_window", "send_window", "pending", "headers_sent",
                 "remote_closed", "finished", "trailers", "rst_after", "timer")

    def __init__(self, stream_id: int, recv_window: int, send_window: int) -> None:
        self.id = stream_id
        self.session: Session | None = None
        self.buf: bytearray | None = None  # a partial gRPC message
        self.need = 0  # bytes `buf` must reach before it is parsed again
        self.recv_window = recv_window
        self.send_window = send_window
        self.pending: deque[bytes | memoryview] = deque()  # DATA payload waiting for the peer's windows
        self.headers_sent = False
        self.remote_closed = False
        self.finished = False  # the status is decided: no more messages are handled
        self.trailers: bytes | None = None  # the closing HEADERS frame, sent once `pending` is empty
        self.rst_after: int | None = None  # RST_STREAM code to send after the trailers
        self.timer: asyncio.TimerHandle | None = None


class H2Connection(asyncio.Protocol):
    """See the module's docstring. `on_made`/`on_lost` let the server track its open connections."""

    def __init__(self, new_session: Callable[[], Session], config: H2Config = DEFAULT_CONFIG,
                 on_made: Callable[[H2Connection], None] | None = None,
                 on_lost: Callable[[H2Connection], None] | None = None) -> None:
        self._new_session = new_session
        self._config = config
        self._on_made = on_made
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self._blocked: dict[int, Stream] = {}  # streams with pending DATA, in order
        self._out: list[bytes | memoryview] = []
        self._buf = bytearray()
        self._need = 0
        self._preface = False
        self._got_settings = False
        self._decoder = Decoder()
        self._decoder.max_header_list_size = config.max_header_list_size
        self._header_cache: dict[bytes, tuple[int, list]] = {}
        self._table_epoch = 0
        self._continuation: tuple[int, bool, bytearray] | None = None
        self._last_stream_id = 0
        self._recv_window = f.DEFAULT_WINDOW
        self._send_window = f.DEFAULT_WINDOW
        self._peer_initial_window = f.DEFAULT_WINDOW
        self._peer_max_frame = f.DEFAULT_MAX_FRAME
        self._stream_half = config.stream_window // 2
        self._conn_window = max(config.connection_window, f.DEFAULT_WINDOW)
        self._conn_half = self._conn_window // 2
        self._shutting_down = False
        self._final_goaway_sent = False
        self._peer_goaway = False
        self._goaway_timer: asyncio.TimerHandle | None = None
        self.closed = False

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() not in (None, "h2"):
            log.debug("closing a TLS connection that negotiated %s, not h2", ssl_object.selected_alpn_protocol())
            self.closed = True
            transport.close()
            return
        if self._on_made is not None:
            self._on_made(self)
        c = self._config
        self._out.append(f.settings({f.MAX_CONCURRENT_STREAMS: c.max_concurrent_streams,
                                     f.INITIAL_WINDOW_SIZE: c.stream_window, f.MAX_FRAME_SIZE: c.max_frame_size,
                                     f.MAX_HEADER_LIST_SIZE: c.max_header_list_size}))
        if self._conn_window > f.DEFAULT_WINDOW:
            self._out.append(f.window_update(0, self._conn_window - f.DEFAULT_WINDOW))
            self._recv_window = self._conn_window
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = buf  # type: ignore[assignment]
            self._buf = bytearray()
        try:
            pos = self._parse(data)
            if not self.closed:
                if pos < len(data):
                    self._buf = bytearray(memoryview(data)[pos:])
                if self._recv_window < self._conn_half:
                    inc = self._conn_window - self._recv_window
                    self._recv_window += inc
                    self._out.append(f.window_update(0, inc))
        except ConnectionError_ as exc:
            self._connection_error(exc.code, str(exc))
        except Exception:
            log.exception("ext_proc HTTP/2 connection: internal error; closing the connection")
            self._connection_error(f.INTERNAL_ERROR, "internal error")
        self._flush()

    def eof_received(self) -> bool:
        return False  # the peer is gone: close; connection_lost releases the streams

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._release_all()
        if self._goaway_timer is not None:
            self._goaway_timer.cancel()
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        """The socket's write buffer is full (the peer reads slower than we answer): stop reading too."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Start a graceful close (see the module's docstring)."""
        if self.closed or self._shutting_down:
            return
        self._shutting_down = True
        self._out.append(f.goaway(MAX_STREAM_ID, f.NO_ERROR))
        self._out.append(f.ping(SHUTDOWN_PING, ack=False))
        self._flush()
        self._goaway_timer = self._loop.call_later(self._config.goaway_ping_timeout_s, self._final_goaway)

    def abort(self) -> None:
        """End now: every open stream is cancelled (RST_STREAM CANCEL) and the connection closed."""
        if self.closed:
            return
        if not self._final_goaway_sent:
            self._final_goaway_sent = True
            self._out.append(f.goaway(self._last_stream_id, f.NO_ERROR))
        for st in list(self.streams.values()):
            self._out.append(f.rst_stream(st.id, f.CANCEL))
            self._remove(st)
        self._close_transport()

    def _final_goaway(self) -> None:
        if self.closed or self._final_goaway_sent:
            return
        if self._goaway_timer is not None:
            self._goaway_timer.cancel()
            self._goaway_timer = None
        self._final_goaway_sent = True
        self._out.append(f.goaway(self._last_stream_id, f.NO_ERROR))
        if not self.streams:
            self._close_transport()
        else:
            self._flush()

    def _close_transport(self) -> None:
        self._flush()
        self.closed = True
        if self._goaway_timer is not None:
            self._goaway_timer.cancel()
            self._goaway_timer = None
        if self.transport is not None:
            self.transport.close()

    def _connection_error(self, code: int, reason: str) -> None:
        if self.closed:
            return
        log.debug("ext_proc HTTP/2 connection error %d: %s", code, reason)
        self._out.append(f.goaway(self._last_stream_id, code, reason.encode()[:200]))
        self._release_all()
        self._close_transport()

    def _release_all(self) -> None:
        for st in list(self.streams.values()):
            self._remove(st)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(out))

    # ------------------------------------------------------------------ frames in

    def _parse(self, data: bytes | bytearray) -> int:
        """Handle every complete frame in `data`; returns how many bytes were used."""
        pos = 0
        n = len(data)
        if not self._preface:
            have = min(n, len(f.PREFACE))
            if data[:have] != f.PREFACE[:have]:
                raise ConnectionError_(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            if have < len(f.PREFACE):
                self._need = len(f.PREFACE)
                return 0
            self._preface = True
            pos = len(f.PREFACE)
        mv = memoryview(data)
        max_frame = self._config.max_frame_size
        while not self.closed:
            if n - pos < 9:
                self._need = 9
                break
            hi, lo, kind, flags, sid = _frame_header(data, pos)
            length = (hi << 8) | lo
            if length > max_frame:
                raise ConnectionError_(f.FRAME_SIZE_ERROR, f"frame of {length} bytes (limit {max_frame})")
            end = pos + 9 + length
            if end > n:
                self._need = 9 + length
                break
            payload = mv[pos + 9 : end]
            pos = end
            sid &= MAX_STREAM_ID
            if self._continuation is not None and kind != f.CONTINUATION:
                raise ConnectionError_(f.PROTOCOL_ERROR, "a header block was interrupted")
            if not self._got_settings:
                if kind != f.SETTINGS or flags & f.ACK:
                    raise ConnectionError_(f.PROTOCOL_ERROR, "the client preface must end with SETTINGS")
                self._got_settings = True
            if kind == f.DATA:
                self._on_data(sid, flags, payload)
            elif kind == f.HEADERS:
                self._on_headers(sid, flags, payload)
            elif kind == f.CONTINUATION:
                self._on_continuation(sid, flags, payload)
            elif kind == f.WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif kind == f.RST_STREAM:
                self._on_rst_stream(sid, payload)
            elif kind == f.SETTINGS:
                self._on_settings(sid, flags, payload)
            elif kind == f.PING:
                self._on_ping(sid, flags, payload)
            elif kind == f.GOAWAY:
                self._on_goaway(sid, payload)
            elif kind == f.PUSH_PROMISE:
                raise ConnectionError_(f.PROTOCOL_ERROR, "a client cannot push")
            elif kind == f.PRIORITY and sid == 0:
                raise ConnectionError_(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
            # PRIORITY otherwise, and unknown frame types: ignored (RFC 9113 §5.3.2, §4.1)
        else:
            return pos
        if pos == n:
            self._need = 0
        return pos

    def _on_data(self, sid: int, flags: int, payload: memoryview) -> None:
        length = len(payload)
        self._recv_window -= length
        if self._recv_window < 0:
            raise ConnectionError_(f.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        if sid == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "DATA on stream 0")
        st = self.streams.get(sid)
        if st is None:
            if sid > self._last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a closed stream: ignored; its bytes return with the connection's window
        if flags & f.PADDED:
            pad = payload[0] if length else 256
            if pad >= length:
                raise ConnectionError_(f.PROTOCOL_ERROR, "DATA padding longer than the frame")
            payload = payload[1 : length - pad]
        st.recv_window -= length
        if st.recv_window < 0:
            self._reset(st, f.FLOW_CONTROL_ERROR)
            return
        if st.remote_closed:
            self._reset(st, f.STREAM_CLOSED)
            return
        if payload and not st.finished:
            self._messages(st, payload)
        if flags & f.END_STREAM:
            self._end_remote(st)
        elif st.recv_window < self._stream_half and not st.finished:
            inc = self._config.stream_window - st.recv_window
            st.recv_window += inc
            self._out.append(f.window_update(sid, inc))

    def _messages(self, st: Stream, view: memoryview) -> None:
        """Handle every complete gRPC message of the stream's data so far."""
        buf = st.buf
        if buf is not None:
            buf += view
            if len(buf) < st.need:
                return
            st.buf = None
            view = memoryview(buf)
        n = len(view)
        pos = 0
        need = 5
        limit = self._config.max_message_bytes
        while n - pos >= 5:
            compressed, size = _grpc_prefix(view, pos)
            if size > limit:
                self._fail(st, f.GRPC_RESOURCE_EXHAUSTED,
                           f"received message larger than max ({size} vs. {limit})")
                return
            end = pos + 5 + size
            if end > n:
                need = 5 + size
                break
            if compressed:
                self._fail(st, f.GRPC_INTERNAL, "compressed message received but no grpc-encoding was negotiated")
                return
            try:
                msg = _parse_request(view[pos + 5 : end])
            except Exception:
                self._fail(st, f.GRPC_INTERNAL, "could not parse a ProcessingRequest")
                return
            pos = end
            session = st.session
            if session is None:
                return
            try:
                replies = session.handle(msg)
            except Exception as exc:
                log.exception("ext_proc session failed on stream %d", st.id)
                self._fail(st, f.GRPC_INTERNAL, f"unexpected {type(exc).__name__}: {exc}")
                return
            if replies:
                self._send_replies(st, replies)
        if pos < n:
            st.buf = bytearray(view[pos:])
            st.need = need

    def _on_headers(self, sid: int, flags: int, payload: memoryview) -> None:
        if sid == 0 or not sid & 1:
            raise ConnectionError_(f.PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        start, end = 0, len(payload)
        if flags & f.PADDED:
            if not end:
                raise ConnectionError_(f.PROTOCOL_ERROR, "HEADERS padding without its length")
            end -= payload[0]
            start = 1
        if flags & f.PRIORITY_FLAG:
            start += 5
        if end < start:
            raise ConnectionError_(f.PROTOCOL_ERROR, "HEADERS shorter than its padding and priority")
        block = bytearray(payload[start:end])
        if flags & f.END_HEADERS:
            self._on_header_block(sid, bool(flags & f.END_STREAM), block)
        else:
            self._continuation = (sid, bool(flags & f.END_STREAM), block)

    def _on_continuation(self, sid: int, flags: int, payload: memoryview) -> None:
        cont = self._continuation
        if cont is None or cont[0] != sid:
            raise ConnectionError_(f.PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        block = cont[2]
        block += payload
        if len(block) > self._config.max_header_list_size:
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, "header block too large")
        if flags & f.END_HEADERS:
            self._continuation = None
            self._on_header_block(sid, cont[1], block)

    def _decode(self, block: bytes):
        """HPACK-decode a header block, remembering the result of blocks that leave the dynamic table as it
        was: Envoy sends the same bytes for every ext_proc stream (indexed fields, and `:path` as a literal
        that is not indexed), and decoding them again in pure Python would cost more than the rest of the
        stream's framing. A cached result is valid while the table is unchanged (`_table_epoch`)."""
        hit = self._header_cache.get(block)
        if hit is not None and hit[0] == self._table_epoch:
            return hit[1]
        table = self._decoder.header_table
        entries = table.dynamic_entries
        before = (len(entries), entries[0] if entries else None, table.maxsize)
        headers = self._decoder.decode(block, raw=True)
        after = (len(entries), entries[0] if entries else None, table.maxsize)
        if after[0] != before[0] or after[1] is not before[1] or after[2] != before[2]:
            self._table_epoch += 1  # an insertion always makes a new newest entry
        else:
            if len(self._header_cache) >= 64:
                self._header_cache.clear()
            self._header_cache[block] = (self._table_epoch, headers)
        return headers

    def _on_header_block(self, sid: int, end_stream: bool, block: bytearray) -> None:
        try:  # always decoded, even for a stream we refuse: the HPACK table must stay in step
            headers = self._decode(bytes(block))
        except Exception as exc:
            raise ConnectionError_(f.COMPRESSION_ERROR, f"HPACK: {exc}") from None
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client: only valid as its end
            if end_stream:
                self._end_remote(st)
            else:
                self._reset(st, f.PROTOCOL_ERROR)
            return
        if sid <= self._last_stream_id:
            return  # a stream already closed (e.g. trailers crossing our reset)
        self._last_stream_id = sid
        if self._final_goaway_sent or self._peer_goaway or len(self.streams) >= self._config.max_concurrent_streams:
            self._out.append(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        st = Stream(sid, self._config.stream_window, self._peer_initial_window)
        st.remote_closed = end_stream
        self.streams[sid] = st
        self._open(st, headers)

    def _open(self, st: Stream, headers) -> None:
        path = method = ctype = timeout = encoding = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                ctype = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
        if method != b"POST" or ctype is None or not ctype.startswith(b"application/grpc"):
            self._http_error(st, b"415" if method == b"POST" else b"405")
            return
        if path != PATH:
            self._fail(st, f.GRPC_UNIMPLEMENTED, f"method {(path or b'').decode('latin-1')} not found")
            return
        if encoding is not None and encoding != b"identity":
            self._fail(st, f.GRPC_UNIMPLEMENTED, f"grpc-encoding {encoding.decode('latin-1')} is not supported")
            return
        seconds = None
        if timeout is not None:
            seconds = f.parse_grpc_timeout(timeout)
            if seconds is None:
                self._fail(st, f.GRPC_INTERNAL, f"malformed grpc-timeout {timeout.decode('latin-1')!r}")
                return
        try:
            st.session = self._new_session()
        except Exception as exc:
            log.exception("could not start an ext_proc session")
            self._fail(st, f.GRPC_INTERNAL, f"unexpected {type(exc).__name__}: {exc}")
            return
        if seconds is not None:
            st.timer = self._loop.call_later(seconds, self._deadline, st)
        if st.remote_closed:
            self._finish(st, f.GRPC_OK)

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        inc = f.u32(payload) & MAX_STREAM_ID
        if sid == 0:
            if inc == 0:
                raise ConnectionError_(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > f.MAX_WINDOW:
                raise ConnectionError_(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
        else:
            st = self.streams.get(sid)
            if st is None:
                return  # closed (or never opened): nothing to send on it
            if inc == 0:
                self._reset(st, f.PROTOCOL_ERROR)
                return
            st.send_window += inc
            if st.send_window > f.MAX_WINDOW:
                self._reset(st, f.FLOW_CONTROL_ERROR)
                return
        if self._blocked:
            self._drain_blocked()

    def _on_rst_stream(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        if sid == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        st = self.streams.get(sid)
        if st is not None:
            self._remove(st)
        elif sid > self._last_stream_id:
            raise ConnectionError_(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")

    def _on_settings(self, sid: int, flags: int, payload: memoryview) -> None:
        if sid != 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if len(payload):
                raise ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        grew = False
        for key, value in f.parse_settings(payload):
            if key == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ConnectionError_(f.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                grew = grew or delta > 0
            elif key == f.MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_LIMIT:
                    raise ConnectionError_(f.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self._peer_max_frame = value
            elif key == f.ENABLE_PUSH and value > 1:
                raise ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH above 1")
        self._out.append(f.SETTINGS_ACK)
        if grew and self._blocked:
            self._drain_blocked()

    def _on_ping(self, sid: int, flags: int, payload: memoryview) -> None:
        if sid != 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "PING must be 8 bytes")
        if not flags & f.ACK:
            self._out.append(f.ping(bytes(payload), ack=True))
        elif payload == SHUTDOWN_PING and self._shutting_down:
            self._final_goaway()

    def _on_goaway(self, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        self._peer_goaway = True  # no new streams come; the open ones finish, then we close
        if not self.streams:
            self._close_transport()

    # ------------------------------------------------------------------ stream ends

    def _end_remote(self, st: Stream) -> None:
        """The client ended its side: the call ends OK (or INTERNAL when a message was cut short)."""
        st.remote_closed = True
        st.rst_after = None
        if st.finished:
            return
        if st.buf is not None:
            self._fail(st, f.GRPC_INTERNAL, "the request stream ended inside a message")
        else:
            self._finish(st, f.GRPC_OK)

    def _finish(self, st: Stream, status: int, message: str = "", rst: int = f.NO_ERROR) -> None:
        """Decide the call's status: close the session, send the trailers (after pending DATA). When the
        client may still be sending, RST_STREAM (`rst`; NO_ERROR: "stop, the answer is complete") follows."""
        st.finished = True
        self._close_session(st)
        block = f.trailers(status, message, with_response_headers=not st.headers_sent)
        st.headers_sent = True
        st.trailers = f.headers_frame(st.id, block, end_stream=True)
        st.rst_after = None if st.remote_closed else rst
        if not st.pending:
            self._send_trailers(st)

    def _fail(self, st: Stream, status: int, message: str, rst: int = f.NO_ERROR) -> None:
        """End one stream with an error status; what it had not yet sent is dropped."""
        st.pending.clear()
        self._blocked.pop(st.id, None)
        self._finish(st, status, message, rst)

    def _http_error(self, st: Stream, status: bytes) -> None:
        st.finished = True
        block = f.encode_headers([(":status", status.decode())])
        st.headers_sent = True
        st.trailers = f.headers_frame(st.id, block, end_stream=True)
        st.rst_after = None if st.remote_closed else f.NO_ERROR
        self._send_trailers(st)

    def _send_trailers(self, st: Stream) -> None:
        self._out.append(st.trailers)  # type: ignore[arg-type]
        if st.rst_after is not None:
            self._out.append(f.rst_stream(st.id, st.rst_after))
        self._remove(st)

    def _deadline(self, st: Stream) -> None:
        st.timer = None
        if self.streams.get(st.id) is not st or st.finished:
            return
        self._fail(st, f.GRPC_DEADLINE_EXCEEDED, "Deadline Exceeded", rst=f.CANCEL)
        self._flush()

    def _reset(self, st: Stream, code: int) -> None:
        """A stream error: RST_STREAM and forget the stream."""
        self._out.append(f.rst_stream(st.id, code))
        self._remove(st)

    def _remove(self, st: Stream) -> None:
        self.streams.pop(st.id, None)
        self._blocked.pop(st.id, None)
        st.pending.clear()
        st.finished = True
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        self._close_session(st)
        if not self.streams and (self._final_goaway_sent or self._peer_goaway) and not self.closed:
            self._close_transport()

    @staticmethod
    def _close_session(st: Stream) -> None:
        session = st.session
        if session is not None:
            st.session = None
            try:
                session.close()
            except Exception:
                log.exception("closing the ext_proc session of stream %d failed", st.id)

    # ------------------------------------------------------------------ frames out

    def _send_replies(self, st: Stream, replies: list[p.Reply]) -> None:
        parts = []
        for r in replies:
            b = r if type(r) is bytes else r.SerializeToString()
            parts.append(_pack_prefix(0, len(b)))
            parts.append(b)
        data = b"".join(parts)
        if not st.headers_sent:
            st.headers_sent = True
            self._out.append(_RESPONSE_HEADERS_FRAME_HEAD + st.id.to_bytes(4, "big") + f.RESPONSE_HEADERS)
        if st.pending:
            st.pending.append(data)
            return
        n = len(data)
        if n <= self._send_window and n <= st.send_window:  # the common case: the windows are large
            max_frame = self._peer_max_frame
            out = self._out
            if n <= max_frame:
                out.append(_frame(n, f.DATA, 0, st.id))
                out.append(data)
            else:
                view = memoryview(data)
                for off in range(0, n, max_frame):
                    k = min(max_frame, n - off)
                    out.append(_frame(k, f.DATA, 0, st.id))
                    out.append(view[off : off + k])
            self._send_window -= n
            st.send_window -= n
            return
        st.pending.append(data)
        self._drain(st)
        if st.pending:
            self._blocked[st.id] = st

    def _drain(self, st: Stream) -> None:
        """Send as much of the stream's pending DATA as the windows allow; then its trailers if due."""
        out = self._out
        max_frame = self._peer_max_frame
        pending = st.pending
        while pending:
            allow = min(self._send_window, st.send_window)
            if allow <= 0:
                return
            data = pending.popleft()
            n = len(data)
            view = memoryview(data) if n > allow or n > max_frame else data
            pos = 0
            while pos < n and allow > 0:
                k = min(n - pos, allow, max_frame)
                out.append(_frame(k, f.DATA, 0, st.id))
                out.append(view[pos : pos + k] if k < n else view)
                pos += k
                allow -= k
            self._send_window -= pos
            st.send_window -= pos
            if pos < n:
                pending.appendleft(view[pos:])
                return
        if st.trailers is not None:
            self._send_trailers(st)

    def _drain_blocked(self) -> None:
        for st in list(self._blocked.values()):
            if self._send_window <= 0:
                break
            self._drain(st)
            if not st.pending:
                self._blocked.pop(st.id, None)


_RESPONSE_HEADERS_FRAME_HEAD = f.FRAME_HEADER.pack(len(f.RESPONSE_HEADERS) >> 8, len(f.RESPONSE_HEADERS) & 0xFF,
                                                   f.HEADERS, f.END_HEADERS, 0)[:5]
