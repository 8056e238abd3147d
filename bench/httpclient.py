"""A lean HTTP/1.1 load client for the benchmarks: kept-alive connections on `asyncio.Protocol`, the request
head built once per body length, responses framed by Content-Length, chunked encoding or the connection's
end. It exists because the load generator shares the benchmark's 2 cores with Envoy and the epp under test:
aiohttp's client spent ~0.2 of a core at 200 req/s of 30 KB bodies, CPU that the processes being measured
then waited for. This one does the same exchange with a few Python calls per request.

Only what the benchmarks send: POST of a complete body, one request at a time per connection (no
pipelining); a connection is reused when the answer allows it (HTTP/1.1 without `Connection: close`).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024


class HttpError(ConnectionError):
    """The server's answer was not a valid HTTP/1.1 response, or the connection ended inside it."""


class _Conn(asyncio.Protocol):
    """One connection; `request()` writes a request and returns its answer's status once the whole body is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self._waiter: asyncio.Future[int] | None = None
        self._buf = bytearray()
        self._status = 0
        self._need = -1  # body bytes still to come (Content-Length); -1 while reading the head
        self._chunked = False
        self._until_close = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._until_close and self._need == -2:
                waiter.set_result(self._status)
            else:
                waiter.set_exception(exc or HttpError("the connection closed before the answer was complete"))
        self._waiter = None

    def request(self, head: bytes, body: bytes) -> asyncio.Future[int]:
        assert self.transport is not None and self._waiter is None
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self._buf.clear()
        self._need = -1
        self._chunked = self._until_close = False
        self.transport.writelines((head, body))
        return waiter

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.closed = True  # bytes nobody asked for: the connection's state is unknown
            if self.transport is not None:
                self.transport.abort()
            return
        buf = self._buf
        buf += data
        try:
            if self._need == -1 and not self._head(buf):
                return
            if self._chunked:
                done = self._chunks(buf)
            elif self._until_close:
                done = False
            else:
                done = len(buf) >= self._need
                if len(buf) > self._need:
                    raise HttpError("more bytes than Content-Length announced")
        except HttpError as exc:
            self._waiter = None
            self.closed = True
            waiter.set_exception(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if done:
            self._waiter = None
            waiter.set_result(self._status)

    def _head(self, buf: bytearray) -> bool:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                raise HttpError("response head larger than 64 KiB")
            return False
        lines = bytes(buf[:end]).split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self._status = int(status_line[1])
        length = None
        self.keep_alive = status_line[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpError(f"header line without a colon: {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit():
                    raise HttpError(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                self._chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                token = value.lower()
                if token == b"close":
                    self.keep_alive = False
                elif token == b"keep-alive":
                    self.keep_alive = True
        del buf[: end + 4]
        if self._chunked:
            self._need = 0
        elif length is not None:
            self._need = length
        elif self._status in (204, 304) or 100 <= self._status < 200:
            self._need = 0
        else:
            self._until_close = True
            self.keep_alive = False
            self._need = -2
        return True

    def _chunks(self, buf: bytearray) -> bool:
        """Consume complete chunks from the front of `buf`; True at the last chunk and its trailers."""
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                return False
            size_field = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise HttpError(f"bad chunk size {size_field[:20]!r}") from None
            if size == 0:  # the last chunk: "0\r\n", trailer lines, then an empty line
                if buf[line_end + 2 : line_end + 4] == b"\r\n":
                    end = line_end + 4
                else:
                    found = buf.find(b"\r\n\r\n", line_end + 2)
                    if found < 0:
                        return False
                    end = found + 4
                del buf[:end]
                if buf:
                    raise HttpError("bytes after the last chunk")
                return True
            if len(buf) < line_end + 2 + size + 2:
                return False
            if buf[line_end + 2 + size : line_end + 4 + size] != b"\r\n":
                raise HttpError("chunk not followed by CRLF")
            del buf[: line_end + 4 + size]

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Client:
    """POSTs to one URL over a pool of kept-alive connections (a new one when none is idle); records each
    successful request's latency, from the call to the last byte of the answer (opening a connection
    included, as a browser or SDK would pay it), and counts failures (a status other than 200 or a broken
    exchange)."""

    def __init__(self, url: str, content_type: str = "application/json") -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the benchmark client speaks plain http:// only, not {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._head_prefix = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                             f"Content-Type: {content_type}\r\nContent-Length: ").encode("latin-1")
        self._heads: dict[int, bytes] = {}
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self.latencies: list[float] = []
        self.errors = 0

    def request_head(self, length: int) -> bytes:
        """The request line and headers this client sends before a body of `length` bytes."""
        head = self._heads.get(length)
        if head is None:
            head = self._heads[length] = self._head_prefix + b"%d\r\n\r\n" % length
        return head

    async def _open(self) -> _Conn:
        _, conn = await asyncio.get_running_loop().create_connection(_Conn, self.host, self.port)
        self._all.add(conn)
        return conn

    async def one(self, body: bytes) -> None:
        t0 = time.perf_counter()
        idle = self._idle
        conn = None
        while idle:
            conn = idle.pop()
            if not conn.closed:
                break
            conn = None
        try:
            if conn is None:
                conn = await self._open()
            status = await conn.request(self.request_head(len(body)), body)
        except (OSError, HttpError):
            self.errors += 1
            if conn is not None:
                conn.close()
                self._all.discard(conn)
            return
        if conn.keep_alive and not conn.closed:
            idle.append(conn)
        else:
            conn.close()
            self._all.discard(conn)
        if status != 200:
            self.errors += 1
            return
        self.latencies.append(time.perf_counter() - t0)

    def reset(self) -> None:
        self.latencies, self.errors = [], 0

    async def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()
