"""hack/stub_backend.py, the stand-in model server: its HTTP/1.1 behaviour as clients see it (raw sockets), run
as the subprocess the integration tests and benchmarks start."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

STUB = Path(__file__).resolve().parents[2] / "hack" / "stub_backend.py"
HOSTS = ["127.0.0.231", "127.0.0.232"]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_stub(hostports: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(STUB), "--listen", ",".join(hostports)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line == b"ready\n", (line, proc.stderr.read() if proc.poll() is not None else b"")
    return proc


@pytest.fixture(scope="module")
def stub():
    hostports = [f"{h}:{free_port(h)}" for h in HOSTS]
    proc = start_stub(hostports)
    yield hostports
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stderr.read() == b""  # no tracebacks or warnings while the tests ran


class Conn:
    """A raw client connection that reads whole answers (Content-Length, chunked, or until close)."""

    def __init__(self, hostport: str) -> None:
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        self.buf += data
        return bool(data)

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            assert self._fill(), f"connection closed before {sep!r}; got {self.buf[:200]!r}"
        out, self.buf = self.buf.split(sep, 1)
        return out

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._fill(), "connection closed in a body"
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, dict[str, str]]:
        lines = self.read_until(b"\r\n\r\n").decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        assert lines[0].startswith("HTTP/1.1 ")
        return status, {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.read_head()
        if "content-length" in headers:
            return status, headers, self.read_exactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            return status, headers, b"".join(self.chunks())
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body

    def chunks(self):
        while True:
            size = int(self.read_until(b"\r\n"), 16)
            if size == 0:
                assert self.read_until(b"\r\n") == b""
                return
            yield self.read_exactly(size)
            assert self.read_exactly(2) == b"\r\n"

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def post(path: str, body: bytes, **headers: str) -> bytes:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: pod\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: pod\r\n{extra}\r\n".encode()


def test_a_completion_answers_who_served_it_and_what_it_received(stub):
    c = Conn(stub[0])
    body = json.dumps({"model": "llama", "prompt": "hi"}).encode()
    c.send(post("/v1/completions?x=1", body, X_Custom="Value"))
    status, headers, out = c.read_response()
    assert status == 200 and headers["x-served-by"] == stub[0]
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(out) == {
        "served_by": stub[0], "model": "llama", "path": "/v1/completions", "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "headers": {"host": "pod", "content-length": str(len(body)), "x-custom": "Value"},
        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}


def test_keep_alive_serves_two_requests_on_one_connection(stub):
    c = Conn(stub[0])
    for i in range(2):
        c.send(post("/v1/chat/completions", json.dumps({"model": f"m{i}"}).encode()))
        status, _, out = c.read_response()
        assert status == 200 and json.loads(out)["model"] == f"m{i}"
    c.send(get("/health"))
    assert c.read_response()[::2] == (200, b"ok")


def test_a_request_split_byte_by_byte_is_answered(stub):
    c = Conn(stub[1])
    body = json.dumps({"model": "split"}).encode()
    for byte in post("/v1/completions", body, X_Split="yes"):
        c.send(bytes([byte]))
        time.sleep(0.0005)
    status, headers, out = c.read_response()
    out = json.loads(out)
    assert status == 200 and headers["x-served-by"] == stub[1]
    assert (out["model"], out["body_len"], out["headers"]["x-split"]) == ("split", len(body), "yes")


def test_pipelined_requests_are_answered_in_order_even_behind_a_delay(stub):
    c = Conn(stub[0])
    c.send(post("/v1/completions", b'{"model":"first"}', X_Delay_Ms="150") + get("/health")
           + post("/v1/completions", b"echo me", X_Echo="1") + post("/v1/completions", b'{"model":"last"}')
           + get("/nowhere"))
    answers = [c.read_response() for _ in range(5)]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 404]
    assert json.loads(answers[0][2])["model"] == "first"
    assert answers[1][2] == b"ok"
    assert answers[2][2] == b"echo me" and answers[2][1]["content-type"] == "application/octet-stream"
    assert json.loads(answers[3][2])["model"] == "last"


def test_a_chunked_request_body_is_read_whole(stub):
    c = Conn(stub[0])
    parts = [b'{"model":', b'"chunky"', b', "pad": "' + b"x" * 5000 + b'"}']
    body = b"".join(parts)
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nx-trailer: t\r\n\r\n"
    c.send(b"POST /v1/completions HTTP/1.1\r\nHost: pod\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(chunked), 7):  # chunk framing split across reads, too
        c.send(chunked[i:i + 7])
    status, _, out = c.read_response()
    out = json.loads(out)
    assert status == 200 and out["model"] == "chunky"
    assert (out["body_len"], out["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def test_a_1_mib_body_is_echoed_byte_for_byte(stub):
    c = Conn(stub[1])
    body = bytes(range(256)) * 4096
    c.send(post("/v1/completions", body, X_Echo="1"))
    status, headers, out = c.read_response()
    assert status == 200 and headers["x-served-by"] == stub[1] and out == body


def test_streaming_sends_the_events_in_order_as_they_are_made(stub):
    c = Conn(stub[0])
    c.send(post("/v1/completions", json.dumps({"model": "s", "stream": True}).encode(),
                X_Events="3", X_Event_Delay_Ms="120"))
    status, headers = c.read_head()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked" and headers["x-served-by"] == stub[0]
    arrivals, events = [], []
    for chunk in c.chunks():
        arrivals.append(time.monotonic())
        events.append(chunk)
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    assert events[-1] == b"data: [DONE]\n\n"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert [p["choices"][0]["text"] for p in payloads[:3]] == ["token0 ", "token1 ", "token2 "]
    assert all(p["model"] == "s" for p in payloads)
    assert payloads[3]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                                    "prompt_tokens_details": {"cached_tokens": 3}}
    assert arrivals[2] - arrivals[0] > 0.2  # two gaps of 120 ms: events were not held back to the end
    c.send(get("/health"))  # the connection is still usable after the stream
    assert c.read_response()[2] == b"ok"


def test_streaming_defaults_to_five_events(stub):
    c = Conn(stub[0])
    c.send(post("/v1/chat/completions", b'{"stream": true}'))
    _, _, body = c.read_response()
    assert body.count(b"data: ") == 7 and b'"text":"token4 "' in body and b"token5" not in body


def test_a_delay_holds_one_answer_without_blocking_other_connections(stub):
    slow, fast = Conn(stub[0]), Conn(stub[0])
    t0 = time.monotonic()
    slow.send(post("/v1/completions", b"{}", X_Delay_Ms="300"))
    fast.send(get("/health"))
    assert fast.read_response()[0] == 200
    fast_done = time.monotonic() - t0
    assert slow.read_response()[0] == 200
    assert fast_done < 0.25 and time.monotonic() - t0 >= 0.3


def test_models_health_and_metrics(stub):
    c = Conn(stub[1])
    c.send(get("/v1/models"))
    status, headers, body = c.read_response()
    assert status == 200 and headers["x-served-by"] == stub[1]
    assert json.loads(body) == {"object": "list", "data": [{"id": "m", "object": "model"}], "served_by": stub[1]}
    c.send(get("/metrics"))
    status, headers, body = c.read_response()
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"
    assert b'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",engine="0"} 1.0\n' in body


def metric(body: bytes, name: str) -> str:
    (line,) = [ln for ln in body.decode().splitlines() if ln.startswith(f"vllm:{name}{{")]
    return line.rsplit(" ", 1)[1]


def test_admin_metrics_changes_what_that_port_reports(stub):
    a, b = Conn(stub[0]), Conn(stub[1])
    a.send(get("/metrics"))
    before = a.read_response()[2]
    a.send(post("/admin/metrics", json.dumps({"waiting": 7, "running": 2, "kv": 0.25}).encode()))
    status, _, state = a.read_response()
    assert status == 200 and json.loads(state)["waiting"] == 7
    a.send(get("/metrics"))
    after = a.read_response()[2]
    assert [metric(before, n) for n in ("num_requests_waiting", "num_requests_running")] != ["7", "2"]
    assert [metric(after, n) for n in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc")] \
        == ["7", "2", "0.25"]
    b.send(get("/metrics"))
    assert metric(b.read_response()[2], "num_requests_waiting") == "0"  # the other port is unchanged


def test_admin_stats_counts_completions_served(stub):
    c = Conn(stub[1])
    c.send(get("/admin/stats"))
    served = json.loads(c.read_response()[2])["served"]
    for _ in range(3):
        c.send(post("/v1/completions", b"{}"))
        c.read_response()
    c.send(get("/admin/stats"))
    assert json.loads(c.read_response()[2])["served"] == served + 3


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /nowhere HTTP/1.1\r\nHost: pod\r\n\r\n", 404),
    (b"GET /metrics%2Fx HTTP/1.1\r\nHost: pod\r\n\r\n", 404),
    (b"POST /admin/nothing HTTP/1.1\r\nHost: pod\r\nContent-Length: 2\r\n\r\n{}", 404),
    (b"PUT /v1/completions HTTP/1.1\r\nHost: pod\r\nContent-Length: 2\r\n\r\n{}", 405),
    (b"HEAD /metrics HTTP/1.1\r\nHost: pod\r\n\r\n", 405),
    (b"POST /admin/metrics HTTP/1.1\r\nHost: pod\r\nContent-Length: 3\r\n\r\nbad", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: pod\r\nx-delay-ms: soon\r\nContent-Length: 2\r\n\r\n{}", 400),
], ids=["unknown GET", "encoded path", "unknown admin", "PUT", "HEAD", "admin not JSON", "bad delay"])
def test_error_answers_keep_the_connection(stub, request_bytes, status):
    c = Conn(stub[0])
    c.send(request_bytes)
    assert c.read_response()[0] == status
    c.send(get("/health"))
    assert c.read_response()[2] == b"ok"


@pytest.mark.parametrize("request_bytes,status", [
    (b"NONSENSE\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % ((64 << 20) + 1), 413),
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % ((64 << 20) + 1), 413),
], ids=["request line", "version", "header line", "content-length", "chunk size", "too large",
        "too large chunked"])
def test_malformed_or_oversized_requests_are_answered_then_closed(stub, request_bytes, status):
    c = Conn(stub[1])
    c.send(request_bytes)
    got, headers, _ = c.read_response()
    assert (got, headers.get("connection")) == (status, "close")
    assert c.closed_by_peer()


def test_connection_close_and_http_1_0_end_the_connection(stub):
    c = Conn(stub[0])
    c.send(get("/health", "Connection: close\r\n"))
    status, headers, body = c.read_response()
    assert (status, headers["connection"], body) == (200, "close", b"ok")
    assert c.closed_by_peer()
    c = Conn(stub[0])
    c.send(b"POST /v1/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
    assert c.read_response()[0] == 200 and c.closed_by_peer()
    c = Conn(stub[0])  # HTTP/1.0 that asks for keep-alive keeps it
    for _ in range(2):
        c.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = c.read_response()
        assert (status, headers["connection"], body) == (200, "keep-alive", b"ok")


def test_expect_100_continue_is_answered_before_the_body_is_sent(stub):
    c = Conn(stub[1])
    c.send(b"POST /v1/completions HTTP/1.1\r\nHost: pod\r\nContent-Length: 16\r\nExpect: 100-continue\r\n\r\n")
    assert c.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue"
    c.send(b'{"model":"wait"}')
    status, _, body = c.read_response()
    assert status == 200 and json.loads(body)["model"] == "wait"


def test_many_connections_at_once_are_each_answered(stub):
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            c = Conn(stub[i % 2])
            for j in range(20):
                c.send(get("/metrics") if j % 2 else post("/v1/completions", b'{"model":"%d"}' % i))
                status, headers, _ = c.read_response()
                assert status == 200 and headers["x-served-by"] == stub[i % 2]
            c.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []


def test_sigint_stops_the_process_cleanly():
    hostport = f"{HOSTS[0]}:{free_port(HOSTS[0])}"
    proc = start_stub([hostport])
    c = Conn(hostport)  # an open idle connection does not hold the exit
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert c.closed_by_peer()
