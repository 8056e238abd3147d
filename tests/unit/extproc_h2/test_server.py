"""The fast transport's server over real sockets: grpcio's own client as an independent peer (status codes,
deadlines, message limits, many concurrent streams), TLS with ALPN h2 (self-signed and --cert-path), and
graceful shutdown with streams in flight, with the tests' raw client where the frames matter."""

from __future__ import annotations

import asyncio
import ssl
import time

import grpc
import pytest

from epp.extproc import protocol as p
from epp.extproc.h2 import frames as f
from epp.extproc.h2.connection import SHUTDOWN_PING, H2Config
from epp.extproc.h2.server import H2Server, server_ssl_context
from epp.extproc.tls import self_signed
from tests.unit.extproc_h2.h2client import (
    PATH,
    Client,
    RawClient,
    Sessions,
    echo,
    grpc_messages,
    request_body,
)

HEADERS_MSG = p.ProcessingRequest(request_headers=p.pb.HttpHeaders())


def boom_or_echo(msg: p.ProcessingRequest) -> list[p.Reply]:
    if msg.request_body.body == b"boom":
        raise RuntimeError("session failure")
    return echo(msg)


@pytest.fixture
async def served():
    """(server, port, sessions) on 127.0.0.1, cleartext."""
    sessions = Sessions(boom_or_echo)
    server = H2Server(sessions)
    port = await server.start("127.0.0.1", 0)
    yield server, port, sessions
    await server.stop(0)


def process(channel: grpc.aio.Channel, path: str = PATH):
    return channel.stream_stream(path, request_serializer=p.ProcessingRequest.SerializeToString,
                                 response_deserializer=p.ProcessingResponse.FromString)


async def gen(*msgs, hold: float = 0.0):
    for m in msgs:
        yield m
    if hold:
        await asyncio.sleep(hold)


def bodies_of(responses: list[p.ProcessingResponse]) -> bytes:
    return b"".join(r.request_body.response.body_mutation.streamed_response.body for r in responses)


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------- grpcio as the peer

async def test_grpcio_client_completes_a_call_with_bytes_and_message_replies(served):
    server, port, sessions = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = process(ch)(gen(HEADERS_MSG, request_body(b"a" * 100_000, False), request_body(b"end", True)))
        responses = [r async for r in call]
        assert await call.code() == grpc.StatusCode.OK
    assert responses[0] == p.continue_request_headers()
    assert bodies_of(responses[1:]) == b"a" * 100_000 + b"end"
    await wait_until(lambda: sessions.made and sessions.made[0].closes == 1)


# A status that arrives while grpc.aio's client is still writing a request message can be reported as
# INTERNAL ("Internal error from Core") by that client (its failed write wins the race), so these calls fail
# while the client has nothing in flight; the frames themselves are checked in test_connection.py.
@pytest.mark.parametrize("case,code,needle", [
    ("unknown method", grpc.StatusCode.UNIMPLEMENTED, "not found"),
    ("session exception", grpc.StatusCode.INTERNAL, "RuntimeError: session failure"),
])
async def test_grpcio_client_sees_the_status_of_a_failed_call(served, case, code, needle):
    server, port, sessions = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        if case == "unknown method":
            call = process(ch, "/envoy.service.ext_proc.v3.ExternalProcessor/Nope")(gen())
        else:
            call = process(ch)(gen(HEADERS_MSG, request_body(b"boom"), hold=5))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == code and needle in err.value.details()
    await wait_until(lambda: all(s.closes == 1 for s in sessions.made) and not any(c.streams for c in server.connections))


async def test_grpcio_deadline_ends_the_call_and_closes_the_session(served):
    server, port, sessions = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = process(ch)(gen(HEADERS_MSG, hold=10), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: sessions.made and sessions.made[0].closes == 1)


async def test_a_message_just_under_8_mib_is_echoed_in_62000_byte_chunks(served):
    server, port, sessions = served
    body = bytes(range(251)) * ((8 << 20) // 251 - 1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]) as ch:
        call = process(ch)(gen(request_body(body, True)))
        responses = [r async for r in call]
    assert len(responses) == -(-len(body) // p.BODY_CHUNK) and bodies_of(responses) == body
    await wait_until(lambda: sessions.made and sessions.made[0].closes == 1)


async def test_many_concurrent_streams_on_one_connection(served):
    server, port, sessions = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        async def one(i: int) -> bytes:
            responses = [r async for r in process(ch)(gen(HEADERS_MSG, request_body(b"%d" % i * 500, True)))]
            return bodies_of(responses[1:])

        results = await asyncio.gather(*(one(i) for i in range(300)))
    assert results == [b"%d" % i * 500 for i in range(300)]
    assert len(server.connections) == 1
    await wait_until(lambda: len(sessions.made) == 300 and all(s.closes == 1 for s in sessions.made))


def test_served_under_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def run() -> list[p.ProcessingResponse]:
        server = H2Server(Sessions())
        port = await server.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return [r async for r in process(ch)(gen(HEADERS_MSG, request_body(b"u" * 200_000, True)))]
        finally:
            await server.stop(0)

    responses = uvloop.run(run())
    assert bodies_of(responses[1:]) == b"u" * 200_000


# ------------------------------------------------------------------------------------------- TLS

def client_tls(alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@pytest.mark.parametrize("alpn", [["h2"], None], ids=["alpn h2", "no alpn (prior knowledge, as Envoy)"])
async def test_tls_with_a_self_signed_certificate(alpn):
    sessions = Sessions()
    server = H2Server(sessions, ssl_context=server_ssl_context(None))
    port = await server.start("127.0.0.1", 0)
    try:
        c = await RawClient.connect(port, ssl=client_tls(alpn))
        assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() == ("h2" if alpn else None)
        await c.send(c.client.headers(1), Client.data(1, grpc_messages(HEADERS_MSG), end_stream=True))
        rx = await c.until(lambda rx: rx.stream(1).ended)
        assert rx.stream(1).status == 0 and rx.stream(1).messages() == [p.continue_request_headers()]
        await c.close()
    finally:
        await server.stop(0)


async def test_tls_alpn_picks_h2_among_the_clients_offers():
    server = H2Server(Sessions(), ssl_context=server_ssl_context(None))
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(["http/1.1", "h2"]))
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.close()
    finally:
        await server.stop(0)


async def test_an_http1_client_over_tls_gets_goaway_and_the_connection_closed():
    server = H2Server(Sessions(), ssl_context=server_ssl_context(None))
    port = await server.start("127.0.0.1", 0)
    try:
        c = RawClient(*await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(["http/1.1"])))
        assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
        await c.send(b"GET / HTTP/1.1\r\nHost: epp\r\n\r\n")
        rx = await c.read_to_eof()
        assert rx.goaways[-1][1] == f.PROTOCOL_ERROR
        await wait_until(lambda: not server.connections)
    finally:
        await server.stop(0)


async def test_tls_from_cert_path_with_grpcio_verifying_the_certificate(tmp_path):
    key, cert = self_signed("localhost")
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    sessions = Sessions()
    server = H2Server(sessions, ssl_context=server_ssl_context(str(tmp_path)))
    port = await server.start("127.0.0.1", 0)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        async with grpc.aio.secure_channel(f"localhost:{port}", creds) as ch:
            responses = [r async for r in process(ch)(gen(HEADERS_MSG))]
        assert responses == [p.continue_request_headers()]
    finally:
        await server.stop(0)


def test_cert_path_without_the_files_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="missing .*tls.crt.*tls.key"):
        server_ssl_context(str(tmp_path))


# ------------------------------------------------------------------------------------------- shutdown

async def test_graceful_stop_lets_streams_in_flight_finish():
    sessions = Sessions()
    server = H2Server(sessions)
    port = await server.start("127.0.0.1", 0)
    c = await RawClient.connect(port)
    for sid in (1, 3, 5):
        await c.send(c.client.headers(sid), Client.data(sid, grpc_messages(HEADERS_MSG)))
    await c.until(lambda rx: all(rx.stream(sid).headers for sid in (1, 3, 5)))
    stopping = asyncio.ensure_future(server.stop(grace=5))
    rx = await c.until(lambda rx: (SHUTDOWN_PING, False) in rx.pings)
    assert rx.goaways[0][:2] == (2**31 - 1, f.NO_ERROR)
    with pytest.raises(OSError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", port)
    await c.send(c.client.headers(7), Client.ping(SHUTDOWN_PING, ack=True))  # 7 was sent before the ACK
    rx = await c.until(lambda rx: len(rx.goaways) == 2)
    assert rx.goaways[1][:2] == (7, f.NO_ERROR)
    assert not stopping.done()
    for sid in (1, 3, 5, 7):
        await c.send(Client.data(sid, grpc_messages(request_body(b"bye", True)), end_stream=True))
    rx = await c.read_to_eof()
    assert all(rx.stream(sid).status == 0 and rx.stream(sid).messages()[-1] == p.ProcessingResponse.FromString(
        p.streamed_chunks(b"bye", True, response=False)[0]) for sid in (1, 3, 5, 7))
    await asyncio.wait_for(stopping, 2)
    sessions.assert_each_closed_once()
    await c.close()


async def test_stop_cancels_what_is_left_after_the_grace_period():
    sessions = Sessions()
    server = H2Server(sessions, H2Config(goaway_ping_timeout_s=0.05))
    port = await server.start("127.0.0.1", 0)
    c = await RawClient.connect(port)
    await c.send(c.client.headers(1), Client.data(1, grpc_messages(HEADERS_MSG)))
    await c.until(lambda rx: rx.stream(1).headers is not None)
    t0 = time.monotonic()
    await server.stop(grace=0.3)
    assert 0.25 < time.monotonic() - t0 < 2
    rx = await c.read_to_eof()
    assert rx.stream(1).reset == f.CANCEL
    sessions.assert_each_closed_once()
    await c.close()


async def test_a_client_vanishing_with_streams_open_closes_their_sessions(served):
    server, port, sessions = served
    c = await RawClient.connect(port)
    for sid in (1, 3):
        await c.send(c.client.headers(sid), Client.data(sid, grpc_messages(HEADERS_MSG)))
    await c.until(lambda rx: rx.stream(3).headers is not None)
    c.writer.transport.abort()
    await wait_until(lambda: not server.connections)
    sessions.assert_each_closed_once()
    assert len(sessions.made) == 2
