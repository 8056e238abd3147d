"""The Scraper against small local model-server stand-ins (aiohttp on 127.0.0.1, port 0), and its HTTP/1.1
response parser fed byte by byte."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from epp.datalayer.scraper import HttpStatusError, ScrapeProtocolError, Scraper, _Connection
from epp.datastore.endpoint import NEVER_SCRAPED, Endpoint
from epp.datastore.pool import Pool
from plugins.core_metrics_extractor import CoreMetricsExtractor
from plugins.metrics_data_source import MetricsDataSource, MetricsDataSourceParams

from .expositions import vllm_exposition

pytestmark = pytest.mark.timeout(20)


class ModelServer:
    """An aiohttp app serving /metrics whose page, status, latency and framing tests change on the fly."""

    def __init__(self) -> None:
        self.page = vllm_exposition()
        self.status = 200
        self.delay = 0.0
        self.chunked = False
        self.requests = 0
        self.peers: set[tuple[str, int]] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._stopping = asyncio.Event()

    def set(self, **metrics) -> None:
        self.page = vllm_exposition(**metrics)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.peers.add(request.transport.get_extra_info("peername")[:2])
        if self.delay:
            try:  # a slow server, which stop() interrupts
                await asyncio.wait_for(self._stopping.wait(), self.delay)
            except TimeoutError:
                pass
        if self.status != 200:
            return web.Response(status=self.status, text="engine is restarting")
        if self.chunked:
            resp = web.StreamResponse(headers={"Content-Type": "text/plain; version=0.0.4"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            step = 7000
            for i in range(0, len(self.page), step):
                await resp.write(self.page[i : i + step])
            await resp.write_eof()
            return resp
        return web.Response(body=self.page, content_type="text/plain")

    async def start(self, ssl_context: ssl.SSLContext | None = None, keepalive_timeout: float = 75.0) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def open_connections(self) -> int:
        assert self.runner is not None and self.runner.server is not None
        return len(self.runner.server.connections)

    async def stop(self) -> None:
        self._stopping.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def endpoint(self, name: str, **labels: str) -> Endpoint:
        return Endpoint(name=name, address="127.0.0.1", port=self.port, labels=labels)


@pytest.fixture
async def servers():
    started: list[ModelServer] = []

    async def start(**kwargs) -> ModelServer:
        server = ModelServer()
        await server.start(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


class Recorder:
    def __init__(self) -> None:
        self.successes: list[tuple[str, float]] = []
        self.errors: list[tuple[str, BaseException]] = []

    def on_success(self, ep: Endpoint, seconds: float) -> None:
        self.successes.append((ep.name, seconds))

    def on_error(self, ep: Endpoint, exc: BaseException) -> None:
        self.errors.append((ep.name, exc))


def source(**params) -> MetricsDataSource:
    defaults = {"interval": 0.01, "timeout": 0.5}
    defaults.update(params)
    from epp.scheduling.registry import Duration

    kwargs = {k: (Duration(v) if k in ("interval", "timeout") else v) for k, v in defaults.items()}
    return MetricsDataSource("metrics", MetricsDataSourceParams(**kwargs))


def scraper_for(pool: Pool, rec: Recorder, src: MetricsDataSource | None = None) -> Scraper:
    return Scraper(
        pool,
        [(src or source(), [CoreMetricsExtractor("core")])],
        on_success=rec.on_success,
        on_error=rec.on_error,
    )


async def eventually(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def closed_port() -> int:
    """A loopback port nobody listens on: bound, then released."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    return port


def scrape_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape:") and not t.done()]


# ---------------------------------------------------------------------------------------------------------
# Scraping a live server


async def test_metrics_appear_in_the_endpoint_and_follow_the_server(servers):
    server = await servers()
    server.set(waiting=3, running=1, kv=0.5)
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    try:
        await eventually(lambda: ep.metrics.waiting_queue_size == 3)
        first = ep.metrics
        assert (first.running_requests_size, first.kv_cache_usage_percent, first.cache_block_size) == (
            1,
            0.5,
            16,
        )
        assert first.update_time > 0
        server.set(waiting=8, running=2, kv=0.75)
        await eventually(lambda: ep.metrics.waiting_queue_size == 8)
        assert ep.metrics is not first  # replaced, never mutated
        assert first.waiting_queue_size == 3
        assert ep.metrics.update_time > first.update_time
        assert rec.errors == []
        assert rec.successes and all(name == "pod-a" and 0 < s < 0.5 for name, s in rec.successes)
    finally:
        await scraper.stop()


async def test_one_kept_alive_connection_serves_every_scrape_of_an_endpoint(servers):
    server = await servers()
    pool, rec = Pool(), Recorder()
    pool.replace([server.endpoint("pod-a")])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    try:
        await eventually(lambda: server.requests >= 6)
    finally:
        await scraper.stop()
    assert len(server.peers) == 1
    assert rec.errors == []


async def test_chunked_bodies_are_read_whole(servers):
    server = await servers()
    server.chunked = True
    server.set(waiting=5, lora_series=[(1.0, "a", "", 2), (2.0, "b,c", "d", 4)])
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    try:
        await eventually(lambda: server.requests >= 3 and ep.metrics.waiting_queue_size == 5)
        assert ep.metrics.active_models == frozenset({"b", "c"})
        assert len(server.peers) == 1  # chunked responses keep the connection too
        assert rec.errors == []
    finally:
        await scraper.stop()


async def test_a_failing_endpoint_keeps_its_last_snapshot_reports_each_error_and_logs_once(servers, caplog):
    caplog.set_level(logging.INFO, logger="epp.datalayer.scraper")
    server = await servers()
    server.set(waiting=4)
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    try:
        await eventually(lambda: ep.metrics.waiting_queue_size == 4)
        server.status = 503
        await eventually(lambda: len(rec.errors) >= 4)
        good = ep.metrics
        await eventually(lambda: len(rec.errors) >= 6)
        assert ep.metrics is good  # the last good snapshot stays, and ages
        assert all(isinstance(exc, HttpStatusError) and exc.status == 503 for _, exc in rec.errors)
        assert "engine is restarting" in str(rec.errors[0][1])
        server.status = 200
        server.set(waiting=6)
        await eventually(lambda: ep.metrics.waiting_queue_size == 6)
    finally:
        await scraper.stop()
    records = [r for r in caplog.records if r.name == "epp.datalayer.scraper"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert "pod-a" in records[0].getMessage() and "HTTP 503" in records[0].getMessage()
    assert "works again" in records[1].getMessage()


async def test_a_page_missing_a_required_metric_is_an_error_that_keeps_the_snapshot(servers):
    server = await servers()
    server.set(waiting=2)
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    try:
        await eventually(lambda: ep.metrics.waiting_queue_size == 2)
        good = ep.metrics
        server.page = b"# an exporter that lost its gauges\nunrelated 1\n"
        await eventually(lambda: len(rec.errors) >= 2)
        assert ep.metrics is good
        assert isinstance(rec.errors[0][1], ValueError)
        assert "vllm:num_requests_waiting" in str(rec.errors[0][1])
        assert len(server.peers) == 1  # an extraction error does not drop the connection
    finally:
        await scraper.stop()


async def test_a_scrape_slower_than_the_timeout_is_an_error(servers):
    server = await servers()
    server.delay = 1.0
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = scraper_for(pool, rec, source(timeout=0.05))
    await scraper.start()
    try:
        await eventually(lambda: len(rec.errors) >= 2)
        assert all(isinstance(exc, TimeoutError) for _, exc in rec.errors)
        assert "0.05s" in str(rec.errors[0][1])
        assert ep.metrics is NEVER_SCRAPED
        server.delay = 0.0
        await eventually(lambda: ep.metrics.update_time > 0)
    finally:
        await scraper.stop()


async def test_an_endpoint_nobody_listens_on_is_an_error_and_stays_never_scraped():
    pool, rec = Pool(), Recorder()
    ep = Endpoint("gone", "127.0.0.1", await closed_port())
    pool.replace([ep])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    try:
        await eventually(lambda: len(rec.errors) >= 2)
        assert all(isinstance(exc, ConnectionError) for _, exc in rec.errors)
        assert ep.metrics is NEVER_SCRAPED
    finally:
        await scraper.stop()


async def test_a_connection_the_server_closes_between_scrapes_is_reopened_without_error(servers):
    server = await servers(keepalive_timeout=0.03)
    pool, rec = Pool(), Recorder()
    pool.replace([server.endpoint("pod-a")])
    scraper = scraper_for(pool, rec, source(interval=0.08))
    await scraper.start()
    try:
        await eventually(lambda: server.requests >= 4)
    finally:
        await scraper.stop()
    assert len(server.peers) >= 3  # the server did close idle connections
    assert rec.errors == []


# ---------------------------------------------------------------------------------------------------------
# Following the pool, stopping


async def test_added_endpoints_are_scraped_and_removed_ones_stop_at_once(servers):
    a, b = await servers(), await servers()
    a.set(waiting=1)
    b.set(waiting=2)
    pool, rec = Pool(), Recorder()
    ep_a = a.endpoint("pod-a")
    pool.replace([ep_a])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    try:
        await eventually(lambda: ep_a.metrics.waiting_queue_size == 1)
        ep_b = b.endpoint("pod-b")
        pool.replace([ep_a, ep_b])
        await eventually(lambda: ep_b.metrics.waiting_queue_size == 2)
        assert {name for name, _ in scraper.scraping()} == {"pod-a", "pod-b"}

        pool.replace([ep_a])
        await eventually(lambda: b.open_connections == 0)
        assert [name for name, _ in scraper.scraping()] == ["pod-a"]
        seen = b.requests
        before_a = a.requests
        await asyncio.sleep(0.1)
        assert b.requests == seen  # no more scrapes of the removed endpoint
        assert a.requests > before_a  # while the others go on
    finally:
        await scraper.stop()


async def test_stop_leaves_no_task_running_and_closes_every_connection(servers):
    a, b = await servers(), await servers()
    pool, rec = Pool(), Recorder()
    pool.replace([a.endpoint("pod-a"), b.endpoint("pod-b")])
    scraper = scraper_for(pool, rec)
    await scraper.start()
    await eventually(lambda: a.requests >= 2 and b.requests >= 2)
    await scraper.stop()
    assert scraper.scraping() == []
    assert scrape_tasks() == []
    assert scraper.tasks() == []
    await eventually(lambda: a.open_connections == 0 and b.open_connections == 0)
    # After stop, pool changes start nothing.
    seen = a.requests
    pool.replace([a.endpoint("pod-c")])
    await asyncio.sleep(0.05)
    assert scraper.scraping() == []
    assert scrape_tasks() == []
    assert a.requests == seen


async def test_stop_during_a_slow_scrape_returns_promptly(servers):
    server = await servers()
    server.delay = 5.0
    pool, rec = Pool(), Recorder()
    pool.replace([server.endpoint("pod-a")])
    scraper = scraper_for(pool, rec, source(timeout=10.0))
    await scraper.start()
    await eventually(lambda: server.requests >= 1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await scraper.stop()
    assert loop.time() - t0 < 0.5
    assert scrape_tasks() == []


async def test_set_interval_before_start_sets_the_scrape_rate(servers):
    server = await servers()
    pool, rec = Pool(), Recorder()
    pool.replace([server.endpoint("pod-a")])
    src = source(interval=3600)
    src.set_interval(0.01)
    scraper = scraper_for(pool, rec, src)
    await scraper.start()
    try:
        await eventually(lambda: server.requests >= 5, timeout=2.0)
    finally:
        await scraper.stop()


async def test_snapshots_are_stamped_with_the_injected_clock(servers):
    server = await servers()
    pool = Pool()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = Scraper(pool, [(source(), [CoreMetricsExtractor("core")])], clock=lambda: 4242.5)
    await scraper.start()
    try:
        await eventually(lambda: ep.metrics.update_time == 4242.5)
    finally:
        await scraper.stop()


async def test_a_stalled_event_loop_does_not_leave_the_scrapes_in_lockstep(servers):
    """A stall longer than the period (a GC pause, a CPU-throttled container) makes every loop overrun. Each
    scrapes again at once and then goes back to its own phase: set to the same instant, they would all scrape
    together from then on, in bursts that requests wait behind."""
    server = await servers()
    pool = Pool()
    pool.replace([server.endpoint(f"pod-{i}") for i in range(8)])
    loop = asyncio.get_running_loop()
    finished: list[float] = []
    scraper = Scraper(pool, [(source(interval=0.1), [CoreMetricsExtractor("core")])],
                      on_success=lambda ep, seconds: finished.append(loop.time()))
    await scraper.start()
    try:
        await asyncio.sleep(0.3)
        time.sleep(0.25)  # the stall: the loop runs nothing
        await asyncio.sleep(0.3)  # the catch-up scrapes, all at once
        finished.clear()
        await asyncio.sleep(0.5)
    finally:
        await scraper.stop()
    assert len(finished) >= 8 * 3
    together = max(sum(1 for u in finished if t <= u < t + 0.005) for t in finished)
    assert together < 8, f"{together} of 8 endpoints' scrapes finished within 5 ms of each other: in lockstep"


async def test_a_raising_callback_does_not_stop_scraping(servers):
    server = await servers()
    pool = Pool()
    pool.replace([server.endpoint("pod-a")])

    def broken(ep: Endpoint, seconds: float) -> None:
        raise RuntimeError("metrics registry misconfigured")

    scraper = Scraper(pool, [(source(), [CoreMetricsExtractor("core")])], on_success=broken)
    await scraper.start()
    try:
        await eventually(lambda: server.requests >= 4)
    finally:
        await scraper.stop()


async def test_each_source_gets_its_own_loop_and_extractors(servers):
    server = await servers()
    server.set(waiting=2)
    seen: list[bytes] = []

    class Recording:
        def extract(self, text: bytes, ep: Endpoint, now: float):
            seen.append(text)
            return ep.metrics  # leaves the snapshot as the core extractor made it

    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = Scraper(
        pool,
        [(source(), [CoreMetricsExtractor("core")]), (source(interval=0.02), [Recording()])],
        on_error=rec.on_error,
    )
    await scraper.start()
    try:
        await eventually(lambda: ep.metrics.waiting_queue_size == 2 and len(seen) >= 2)
        assert sorted(scraper.scraping()) == [("pod-a", 0), ("pod-a", 1)]
        assert seen[0] == server.page
        assert rec.errors == []
    finally:
        await scraper.stop()


# ---------------------------------------------------------------------------------------------------------
# https


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "model-server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server_context(tmp_path) -> ssl.SSLContext:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_https_with_insecure_skip_verify_scrapes_a_self_signed_server(servers, tls_server_context):
    server = await servers(ssl_context=tls_server_context)
    server.set(waiting=9)
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = scraper_for(pool, rec, source(scheme="https", insecure_skip_verify=True))
    await scraper.start()
    try:
        await eventually(lambda: ep.metrics.waiting_queue_size == 9 and server.requests >= 3)
        assert len(server.peers) == 1
        assert rec.errors == []
    finally:
        await scraper.stop()


async def test_https_with_verification_refuses_a_self_signed_server(servers, tls_server_context):
    server = await servers(ssl_context=tls_server_context)
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    scraper = scraper_for(pool, rec, source(scheme="https", insecure_skip_verify=False))
    await scraper.start()
    try:
        await eventually(lambda: len(rec.errors) >= 1)
        assert isinstance(rec.errors[0][1], ssl.SSLError)
        assert ep.metrics is NEVER_SCRAPED
    finally:
        await scraper.stop()


async def test_stop_is_prompt_while_tls_connections_keep_failing(servers, tls_server_context):
    """Cancelling a scrape whose TLS handshake fails in the same loop iteration must still stop it (with
    asyncio.wait_for around the connect, Python 3.11 lost that cancellation and stop() hung)."""
    server = await servers(ssl_context=tls_server_context)
    loop = asyncio.get_running_loop()
    for _ in range(8):
        pool, rec = Pool(), Recorder()
        pool.replace([server.endpoint("pod-a")])
        scraper = scraper_for(pool, rec, source(scheme="https", insecure_skip_verify=False, interval=0.001))
        await scraper.start()
        await eventually(lambda: len(rec.errors) >= 3)  # noqa: B023
        t0 = loop.time()
        await asyncio.wait_for(scraper.stop(), 2.0)
        assert loop.time() - t0 < 1.0
        assert scrape_tasks() == []


# ---------------------------------------------------------------------------------------------------------
# The HTTP/1.1 response parser, fed in one piece and byte by byte


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


BODY = b"vllm:num_requests_waiting 1\n"


@pytest.mark.parametrize(
    ("response", "status", "body", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY, 200, BODY, True),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY,
            200,
            BODY,
            False,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nvllm:\r\n17;ext=1\r\nnum_requests_waiting 1\n\r\n0\r\n\r\n",
            200,
            BODY,
            True,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1C\r\n"
            + BODY
            + b"\r\n0\r\nX-Trailer: 1\r\n\r\n",
            200,
            BODY,
            True,
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
            200,
            BODY,
            True,
        ),
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops", 500, b"oops", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY, 200, BODY, False),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
            200,
            BODY,
            True,
        ),
    ],
)
@pytest.mark.parametrize("piecewise", [False, True], ids=["whole", "byte-by-byte"])
async def test_responses_are_framed_by_length_or_chunks(response, status, body, keep_alive, piecewise):
    conn = _Connection()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    fut = conn.request(b"GET /metrics HTTP/1.1\r\n\r\n")
    assert transport.written == b"GET /metrics HTTP/1.1\r\n\r\n"
    pieces = [response[i : i + 1] for i in range(len(response))] if piecewise else [response]
    for piece in pieces:
        assert not fut.done()
        conn.data_received(piece)
    assert fut.done()
    assert fut.result() == (status, body, keep_alive)


async def test_a_body_without_length_is_read_until_the_server_closes():
    conn = _Connection()
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    fut = conn.request(b"GET / HTTP/1.0\r\n\r\n")
    conn.data_received(b"HTTP/1.0 200 OK\r\n\r\n" + BODY[:10])
    conn.data_received(BODY[10:])
    assert not fut.done()
    conn.eof_received()
    conn.connection_lost(None)
    assert fut.result() == (200, BODY, False)


@pytest.mark.parametrize(
    ("response", "complaint"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd", "chunk not followed by CRLF"),
    ],
)
async def test_garbage_is_a_protocol_error_and_drops_the_connection(response, complaint):
    conn = _Connection()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    fut = conn.request(b"GET / HTTP/1.1\r\n\r\n")
    conn.data_received(response)
    with pytest.raises(ScrapeProtocolError, match=complaint):
        fut.result()
    assert transport.aborted and conn.closed


async def test_a_connection_lost_mid_response_fails_the_request():
    conn = _Connection()
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    fut = conn.request(b"GET / HTTP/1.1\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    conn.connection_lost(None)
    with pytest.raises(ConnectionResetError, match="in the middle of its response"):
        fut.result()


async def test_unsolicited_bytes_drop_the_connection():
    conn = _Connection()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.aborted and conn.closed
