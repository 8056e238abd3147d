"""A small stand-in model server for integration tests and the benchmarks: several ports in one process, each
answering which port served it. Run as a script: `python stub_backend.py --listen 127.0.0.2:8001,127.0.0.3:8002`
(prints `ready` once every port listens; SIGINT/SIGTERM stop it).

Every answer carries `x-served-by: <host:port>`.

- POST (any path but /admin/*): reads the body (Content-Length or chunked), counts it in `served`, and answers
  JSON `{"served_by", "model", "path", "body_len", "body_sha256", "headers", "usage"}`. Request headers:
  `x-delay-ms` delays the answer; `x-echo: 1` answers the request body itself, byte for byte
  (application/octet-stream). A JSON body with `"stream": true` is answered as SSE (text/event-stream,
  chunked, each event written as it is made): `x-events` events (default 5) `x-event-delay-ms` apart, then a
  usage event and `data: [DONE]`.
- GET /v1/models, GET /health, GET /metrics (vLLM metric names, from the port's state).
- POST /admin/metrics `{"waiting": n, "running": n, "kv": f}` merges into the port's state (what /metrics
  reports) and answers the state; GET /admin/stats answers the state (with `served`).
- An unknown GET path (or /admin/ POST path) is 404, a method other than GET/POST (HEAD too) 405, a bad
  /admin/metrics body or x-*-ms/x-events value 400; a malformed request is 400 and a body over 64 MiB 413,
  and both close the connection.
- HTTP/1.1 keep-alive (`Connection: close` honoured; HTTP/1.0 closes unless it asks for keep-alive),
  pipelined requests answered in order, `Expect: 100-continue` answered before the body is read.

The stub stands beside the process under test on the same machine, so it is written to cost little per
request: a bare HTTP/1.1 server on asyncio.Protocol (uvloop when importable), keep-alive and pipelining,
answers that need no waiting written straight from data_received (no task per request), and /metrics answers
built once per port and rebuilt only when /admin/metrics changes the state.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
from collections import deque
from collections.abc import Coroutine
from urllib.parse import unquote

try:
    import orjson
except ImportError:  # the stdlib alone does the same, more slowly
    orjson = None

MAX_BODY = 64 << 20  # the client_max_size of the aiohttp version this replaced
MAX_HEAD = 64 << 10  # request line and headers together
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Request Entity Too Large"}
JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"
SSE = "text/event-stream"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The shape of most scrapes: one whole HTTP/1.1 GET in one read, well-formed header lines, and none of the
# fields that change framing or the connection (those take the general parser).
SIMPLE_GET = re.compile(rb"GET (/[!-~]*) HTTP/1\.1\r\n(?:[!-9;-~]+:[^\r\n]*\r\n)*\r\n")
SPECIAL_FIELD = re.compile(rb"\r\n(?:connection|content-length|transfer-encoding|expect)[ \t]*:", re.IGNORECASE)


class BadRequest(Exception):
    """The request cannot be parsed; answered with `status` and the connection closes."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Port:
    """One listening host:port: its state (what /metrics reports, how many completions it served) and the
    fixed parts of its answers, encoded once."""

    def __init__(self, served_by: str) -> None:
        self.served_by = served_by
        self.state: dict = {"waiting": 0, "running": 0, "kv": 0.0, "served": 0}
        self._heads: dict[tuple[int, str], bytes] = {}
        models = {"object": "list", "data": [{"id": "m", "object": "model"}], "served_by": served_by}
        self.models = self.response(200, JSON, json.dumps(models).encode())
        self.health = self.response(200, TEXT, b"ok")
        self.not_found = self.response(404, TEXT, b"404: Not Found")
        self.metrics = b""
        self.set_state({})
        # The fixed parts of streamed events: everything but the model and the token number.
        self.sse_head = (b"HTTP/1.1 200 OK\r\nx-served-by: " + served_by.encode()
                         + b"\r\nContent-Type: " + SSE.encode() + b"\r\n")

    def head(self, status: int, content_type: str) -> bytes:
        """Status line and headers up to `Content-Length: ` (the length and the end are added per answer)."""
        key = (status, content_type)
        head = self._heads.get(key)
        if head is None:
            head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nx-served-by: {self.served_by}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: ").encode()
            self._heads[key] = head
        return head

    def response(self, status: int, content_type: str, body: bytes, extra: bytes = b"") -> bytes:
        """A whole answer; `extra` holds further header lines (each ending in CRLF)."""
        return b"%s%d\r\n%s\r\n%s" % (self.head(status, content_type), len(body), extra, body)

    def set_state(self, update: dict) -> None:
        """Merge `update` into the state and rebuild the /metrics answer."""
        self.state.update(update)
        s = self.state
        text = (
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m",engine="0"}} {s["waiting"]}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="m",engine="0"}} {s["running"]}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="m",engine="0"}} {s["kv"]}\n'
            "# TYPE vllm:cache_config_info gauge\n"
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",engine="0"} 1.0\n'
        )
        self.metrics = self.response(200, TEXT, text.encode())
        self.static = {"/metrics": self.metrics, "/health": self.health, "/v1/models": self.models}


class Request:
    """One parsed request; `body` is filled in once it has all arrived."""

    __slots__ = ("method", "target", "version", "headers", "body", "keep_alive")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # lower-cased names -> values; the last of repeated names wins
        self.body = b""
        conn = headers.get("connection", "").lower()
        self.keep_alive = "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn

    @property
    def path(self) -> str:
        """The decoded path, without the query (absolute-form targets lose their scheme and authority)."""
        target = self.target
        if target[0] != "/":
            scheme_end = target.find("://")
            slash = target.find("/", scheme_end + 3) if scheme_end > 0 else -1
            target = target[slash:] if slash >= 0 else "/"
        path = target.split("?", 1)[0]
        return unquote(path) if "%" in path else path


def header_int(req: Request, name: str, default: int) -> int:
    """An integer request header (x-delay-ms, x-events, x-event-delay-ms); a bad one is the client's error."""
    value = req.headers.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"header {name} must be an integer, got {value!r}") from None


def piece(buf: bytes | bytearray, pos: int, n: int) -> bytes:
    """`n` bytes of `buf` from `pos`, copied once at most (not at all when that is the whole read)."""
    if type(buf) is bytes:
        return buf[pos:pos + n]
    return bytes(memoryview(buf)[pos:pos + n])


COMPACT = json.JSONEncoder(separators=(",", ":"))


def loads(body: bytes):
    """json.loads, through orjson when it accepts the body (same values, except that orjson reads integers past
    64 bits as floats: the caller re-reads a non-string model with json)."""
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # NaN, UTF-16, ...: the stdlib decides
    return json.loads(body)


def dumps_compact(obj: dict, plain: bool) -> bytes:
    """json.dumps(obj, separators=(",", ":")) as bytes, through orjson when that gives the same bytes: `plain`
    says every value is a str, an int or a dict of those, and the result must be ASCII without DEL (which the
    stdlib escapes and orjson does not)."""
    if orjson is not None and plain:
        try:
            out = orjson.dumps(obj)
        except TypeError:  # e.g. lone surrogates from undecodable header bytes
            out = None
        if out is not None and out.isascii() and b"\x7f" not in out:
            return out
    return COMPACT.encode(obj).encode()


# Parser states.
HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, DEAD = range(7)


class Connection(asyncio.Protocol):
    """One client connection: parses requests as bytes arrive and answers them in order. Answers that need no
    waiting are written at once; a delayed or streamed answer runs in a task, and requests that arrive
    meanwhile queue behind it."""

    def __init__(self, port: Port, connections: set[Connection]) -> None:
        self.port = port
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.scan = 0  # where to look for the end of the head next (bytes before it were searched)
        self.state = HEAD
        self.req: Request | None = None
        self.remaining = 0  # body bytes (or bytes of the current chunk) still to read
        self.pieces: list[bytes] = []
        self.body_len = 0
        self.queue: deque[Request | bytes] = deque()  # waiting behind a delayed or streamed answer
        self.task: asyncio.Task | None = None
        self.owe_continue = False  # a 100 Continue waits for the answers before it
        self.closed = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state = DEAD
        self.connections.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.state == HEAD and not self.buf and self.task is None and not self.queue:
            m = SIMPLE_GET.fullmatch(data)
            if m is not None and SPECIAL_FIELD.search(data) is None:
                answer = self.port.static.get(m.group(1).decode())
                if answer is not None:
                    self.transport.write(answer)
                    return
        elif self.state == DEAD:
            return
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data  # parse the read itself: a whole request is not copied into the buffer
        try:
            pos = self.parse(buf)
        except BadRequest as e:
            self.state = DEAD
            self.buf.clear()
            self.dispatch_error(e)
            return
        if buf is data:
            if pos < len(data):
                self.buf += memoryview(data)[pos:]
        elif pos:
            del self.buf[:pos]
        self.scan = max(0, self.scan - pos)

    # ------------------------------------------------------------------ parsing

    def parse(self, buf: bytes | bytearray) -> int:
        """Consume what `buf` (the buffer, or a read when the buffer was empty) holds; return how many bytes
        were used."""
        pos = 0
        while True:
            state = self.state
            if state == HEAD:
                while buf.startswith(b"\r\n", pos):  # stray line ends between requests
                    pos += 2
                end = buf.find(b"\r\n\r\n", max(pos, self.scan))
                if end < 0:
                    if len(buf) - pos > MAX_HEAD:
                        raise BadRequest("request head too large")
                    self.scan = max(pos, len(buf) - 3)
                    return pos
                self.start_request(bytes(buf[pos:end]))
                pos = end + 4
                self.scan = pos
            elif state == BODY:
                pos = self.take_body(buf, pos)
                if self.remaining:
                    return pos
                self.finish_request()
            elif state == CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > 1024:
                        raise BadRequest("chunk size line too long")
                    return pos
                line = bytes(buf[pos:end]).split(b";", 1)[0].strip()
                try:
                    size = int(line, 16)
                except ValueError:
                    raise BadRequest(f"bad chunk size {line[:40]!r}") from None
                if size < 0:
                    raise BadRequest("negative chunk size")
                pos = end + 2
                self.body_len += size
                if self.body_len > MAX_BODY:
                    raise BadRequest(f"request body over {MAX_BODY} bytes", 413)
                self.remaining = size
                self.state = CHUNK_DATA if size else TRAILERS
            elif state == CHUNK_DATA:
                pos = self.take_body(buf, pos)
                if self.remaining:
                    return pos
                self.state = CHUNK_END
            elif state == CHUNK_END:
                if len(buf) - pos < 2:
                    return pos
                if buf[pos:pos + 2] != b"\r\n":
                    raise BadRequest("chunk data not followed by CRLF")
                pos += 2
                self.state = CHUNK_SIZE
            elif state == TRAILERS:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_HEAD:
                        raise BadRequest("chunked trailers too large")
                    return pos
                empty = end == pos
                pos = end + 2
                if empty:
                    self.finish_request()
            else:  # DEAD: after a request that closes the connection
                return len(buf)

    def take_body(self, buf: bytes | bytearray, pos: int) -> int:
        """Keep up to `remaining` bytes of body (or of the current chunk) from `buf` at `pos`; return the
        position after them."""
        take = min(self.remaining, len(buf) - pos)
        if take:
            self.pieces.append(piece(buf, pos, take))
            self.remaining -= take
        return pos + take

    def start_request(self, head: bytes) -> None:
        lines = head.decode("utf-8", "surrogateescape").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper() or not parts[1]:
            raise BadRequest(f"malformed request line {lines[0][:80]!r}")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise BadRequest(f"unsupported HTTP version {version[:20]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name or "\t" in name:
                raise BadRequest(f"malformed header line {line[:80]!r}")
            headers[name.lower()] = value.strip()
        req = Request(method, target, version, headers)
        self.req = req
        self.pieces = []
        self.body_len = 0
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if te.lower() != "chunked" or cl is not None:
                raise BadRequest(f"unsupported Transfer-Encoding {te[:40]!r} (only chunked, without Content-Length)")
            self.state = CHUNK_SIZE
        elif cl is not None:
            if not cl.isdigit():
                raise BadRequest(f"bad Content-Length {cl[:40]!r}")
            self.remaining = int(cl)
            if self.remaining > MAX_BODY:
                raise BadRequest(f"request body of {self.remaining} bytes is over {MAX_BODY}", 413)
            self.state = BODY
        else:
            self.remaining = 0
            self.state = BODY
        if self.state != BODY or self.remaining:
            if version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue":
                if self.idle():
                    self.transport.write(CONTINUE)
                else:
                    self.owe_continue = True

    def finish_request(self) -> None:
        req = self.req
        pieces = self.pieces
        req.body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self.req = None
        self.pieces = []
        self.owe_continue = False  # the client sent the body without waiting for it
        self.state = HEAD if req.keep_alive else DEAD
        self.dispatch(req)

    # ------------------------------------------------------------------ answering

    def idle(self) -> bool:
        return self.task is None and not self.queue

    def dispatch(self, req: Request) -> None:
        if not self.idle():
            self.queue.append(req)
            return
        answer = self.answer(req)
        if isinstance(answer, bytes):
            self.write(answer, req.keep_alive)
        else:
            self.task = asyncio.get_running_loop().create_task(self.run(answer, req))

    def dispatch_error(self, e: BadRequest) -> None:
        answer = self.port.response(e.status, TEXT, str(e).encode(), b"Connection: close\r\n")
        if self.idle():
            self.write(answer, False)
        else:
            self.queue.append(answer)  # the last answer on this connection, after those before it

    async def run(self, first: Coroutine, req: Request) -> None:
        """Answer `first` (the answer to `req`), then whatever queued behind it, in order."""
        try:
            while True:
                await first
                if not req.keep_alive:
                    self.close()
                while self.queue and not self.closed:
                    item = self.queue.popleft()
                    if isinstance(item, bytes):  # a parse error's answer
                        self.write(item, False)
                        break
                    req = item
                    answer = self.answer(req)
                    if not isinstance(answer, bytes):
                        first = answer
                        break
                    self.write(answer, req.keep_alive)
                else:
                    break
                if self.closed:
                    break
        except asyncio.CancelledError:
            first.close()  # the connection went away, perhaps before the answer started
            return
        finally:
            self.task = None
        if self.owe_continue and not self.closed:
            self.owe_continue = False
            self.transport.write(CONTINUE)

    def write(self, data: bytes, keep_alive: bool) -> None:
        if self.closed:
            return
        self.transport.write(data)
        if not keep_alive:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def conn_header(self, req: Request) -> bytes:
        if not req.keep_alive:
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if req.version == "HTTP/1.0" else b""

    def answer(self, req: Request) -> bytes | Coroutine:
        """The whole answer as bytes, or a coroutine that writes it (delayed or streamed answers)."""
        port = self.port
        try:
            method = req.method
            path = req.path
            if method == "GET":
                if path == "/metrics":
                    whole = port.metrics
                elif path == "/health":
                    whole = port.health
                elif path == "/v1/models":
                    whole = port.models
                elif path == "/admin/stats":
                    return port.response(200, JSON, json.dumps(port.state).encode(), self.conn_header(req))
                else:
                    whole = port.not_found
                if req.keep_alive and req.version == "HTTP/1.1":
                    return whole
                head, _, body = whole.partition(b"\r\n\r\n")
                return head + b"\r\n" + self.conn_header(req) + b"\r\n" + body
            if method != "POST":
                return port.response(405, TEXT, b"405: Method Not Allowed",
                                     b"Allow: GET, POST\r\n" + self.conn_header(req))
            if path.startswith("/admin/"):
                if path != "/admin/metrics":
                    return port.response(404, TEXT, b"404: Not Found", self.conn_header(req))
                try:
                    update = json.loads(req.body)
                except ValueError as e:
                    raise BadRequest(f"/admin/metrics wants a JSON object: {e}") from None
                if not isinstance(update, dict):
                    raise BadRequest("/admin/metrics wants a JSON object such as {\"waiting\": 3}")
                port.set_state(update)
                return port.response(200, JSON, json.dumps(port.state).encode(), self.conn_header(req))
            return self.completion(req, path)
        except BadRequest as e:
            return port.response(e.status, TEXT, str(e).encode(), self.conn_header(req))

    def completion(self, req: Request, path: str) -> bytes | Coroutine:
        port = self.port
        port.state["served"] += 1
        delay = header_int(req, "x-delay-ms", 0)
        body = req.body
        if req.headers.get("x-echo") == "1":
            answer = port.response(200, OCTETS, body, self.conn_header(req))
            return self.later(answer, delay) if delay > 0 else answer
        try:
            data = loads(body) if body else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        model = data.get("model", "")
        if type(model) is not str and orjson is not None:
            model = json.loads(body).get("model", "")  # orjson reads integers past 64 bits as floats
        if data.get("stream"):
            if req.version != "HTTP/1.1":
                req.keep_alive = False  # the stream's end is the connection's end
            events = header_int(req, "x-events", 5)
            gap = header_int(req, "x-event-delay-ms", 0)
            return self.stream(req, model, delay, events, gap)
        out = {"served_by": port.served_by, "model": model, "path": path, "body_len": len(body),
               "body_sha256": hashlib.sha256(body).hexdigest(), "headers": req.headers,
               "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}
        answer = port.response(200, JSON, dumps_compact(out, type(model) is str), self.conn_header(req))
        return self.later(answer, delay) if delay > 0 else answer

    async def later(self, answer: bytes, delay_ms: int) -> None:
        await asyncio.sleep(delay_ms / 1000)
        if not self.closed:
            self.transport.write(answer)

    async def stream(self, req: Request, model, delay_ms: int, events: int, gap_ms: int) -> None:
        """SSE: the head at once, then each event as it is made (chunked on HTTP/1.1; close-delimited on 1.0)."""
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        chunked = req.version == "HTTP/1.1"
        if chunked:
            head = self.port.sse_head + b"Transfer-Encoding: chunked\r\n" + self.conn_header(req) + b"\r\n"
        else:
            head = self.port.sse_head + b"Connection: close\r\n\r\n"
        model_json = json.dumps(model).encode()
        before = b'data: {"id":"x","object":"text_completion","model":' + model_json + \
            b',"choices":[{"index":0,"text":"token'
        after = b' ","finish_reason":null}]}\n\n'

        def frame(event: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(event), event) if chunked else event

        out = [head]
        for i in range(events):
            if gap_ms > 0 and i:
                if self.closed:
                    return
                self.transport.write(b"".join(out))
                out.clear()
                await asyncio.sleep(gap_ms / 1000)
            out.append(frame(b"%s%d%s" % (before, i, after)))
        usage = (b'data: {"id":"x","object":"text_completion","model":' + model_json
                 + b',"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":%d,"total_tokens":%d,'
                   b'"prompt_tokens_details":{"cached_tokens":3}}}\n\n' % (events, 7 + events))
        out.append(frame(usage))
        out.append(frame(b"data: [DONE]\n\n"))
        if chunked:
            out.append(b"0\r\n\r\n")
        if not self.closed:
            self.transport.write(b"".join(out))


# ---------------------------------------------------------------------- process


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(listen: list[str]) -> None:
    loop = asyncio.get_running_loop()
    connections: set[Connection] = set()
    servers = []
    for hostport in listen:
        host, port = hostport.rsplit(":", 1)
        state = Port(hostport)
        servers.append(await loop.create_server(lambda state=state: Connection(state, connections), host,
                                                int(port), reuse_address=True, backlog=1024))
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    for conn in list(connections):
        conn.close()
    for server in servers:
        try:
            await asyncio.wait_for(server.wait_closed(), 2)
        except TimeoutError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="host:port pairs separated by commas")
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve([hp for hp in args.listen.split(",") if hp]))


if __name__ == "__main__":
    main()
