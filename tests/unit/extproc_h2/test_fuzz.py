"""Random frame sequences and malformed frames (hypothesis), fed to the fast transport cut at random points:
the server never fails internally, never writes invalid framing, never holds more streams than it allows,
and every session it made is closed exactly once when the connection ends. Driven two ways: the Protocol
object on a fake transport, and a real server over a socket with the tests' raw client."""

from __future__ import annotations

import asyncio
import logging
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.extproc import protocol as p
from epp.extproc.h2 import frames as f
from epp.extproc.h2.connection import H2Config
from epp.extproc.h2.server import H2Server
from tests.unit.extproc_h2.h2client import (
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PATH,
    Client,
    Harness,
    RawClient,
    Received,
    Sessions,
    echo,
    frame,
    grpc_messages,
    request_body,
)

CONFIG = H2Config(max_concurrent_streams=4, stream_window=4096, connection_window=65_535, max_frame_size=32_768,
                  max_message_bytes=20_000)
SIDS = st.sampled_from([1, 3, 5, 7, 9, 11, 0, 2, 1001])
BODIES = st.one_of(st.binary(max_size=40), st.just(b"!boom"), st.binary(min_size=3000, max_size=9000))

ACTIONS = st.one_of(
    st.tuples(st.just("headers"), SIDS, st.booleans(), st.sampled_from([PATH, "/other", PATH]),
              st.sampled_from([None, "1S", "bad"])),
    st.tuples(st.just("headers_split"), SIDS, st.booleans(), st.integers(0, 60)),
    st.tuples(st.just("data"), SIDS, st.lists(BODIES, max_size=3), st.booleans(), st.none() | st.integers(0, 20),
              st.none() | st.integers(0, 200)),
    st.tuples(st.just("raw_data"), SIDS, st.binary(max_size=64), st.booleans()),
    st.tuples(st.just("rst"), SIDS, st.integers(0, 13)),
    st.tuples(st.just("window_update"), SIDS, st.sampled_from([0, 1, 100, 65_535, 1 << 20, 2**31 - 1])),
    st.tuples(st.just("settings"), st.dictionaries(st.integers(1, 8), st.sampled_from(
        [0, 1, 2, 100, 16_384, 65_535, 1 << 20, 2**31 - 1, 2**32 - 1]), max_size=3)),
    st.tuples(st.just("ping"), st.booleans(), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("goaway"), st.integers(0, 20)),
    st.tuples(st.just("frame"), st.integers(0, 12), st.integers(0, 255), SIDS, st.binary(max_size=40)),
)


def boom_or_echo(msg: p.ProcessingRequest) -> list[p.Reply]:
    if msg.request_body.body.startswith(b"!boom"):
        raise RuntimeError("a session failure the transport must contain")
    return echo(msg)


def encode(actions: list[tuple], client: Client) -> bytes:
    out = []
    for a in actions:
        kind = a[0]
        if kind == "headers":
            _, sid, end, path, timeout = a
            extra = (("grpc-timeout", timeout),) if timeout else ()
            out.append(client.headers(sid, end_stream=end, path=path, extra=extra))
        elif kind == "headers_split":
            _, sid, end, cut = a
            block = client.header_block()
            out.append(frame(HEADERS, END_STREAM if end else 0, sid, block[:cut]))
            out.append(frame(CONTINUATION, END_HEADERS, sid, block[cut:]))
        elif kind == "data":
            _, sid, bodies, end, pad, cut = a
            wire = grpc_messages(*(request_body(b) for b in bodies))
            out.append(Client.data(sid, wire[:cut] if cut is not None else wire, end_stream=end, pad=pad))
        elif kind == "raw_data":
            out.append(Client.data(a[1], a[2], end_stream=a[3]))
        elif kind == "rst":
            out.append(Client.rst(a[1], a[2]))
        elif kind == "window_update":
            out.append(Client.window_update(a[1], a[2]))
        elif kind == "settings":
            out.append(frame(4, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in a[1].items())))
        elif kind == "ping":
            out.append(Client.ping(a[2], ack=a[1]))
        elif kind == "goaway":
            out.append(Client.goaway(a[1]))
        else:
            out.append(frame(a[1], a[2], a[3], a[4]))
    return b"".join(out)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(x % (len(data) + 1) for x in points)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


class InternalErrors(logging.Handler):
    """Catches the transport's 'internal error' log: a bug path that the fuzzing must never reach."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "internal error" in record.getMessage():
            self.records.append(record)


def watch_internal_errors() -> InternalErrors:
    handler = InternalErrors()
    logging.getLogger("epp.extproc.h2").addHandler(handler)
    return handler


def check_session_invariants(h: Harness) -> None:
    open_sessions = {id(s.session) for s in h.conn.streams.values() if s.session is not None}
    assert {id(s) for s in h.sessions.made if s.closes == 0} == open_sessions
    assert all(s.closes <= 1 for s in h.sessions.made)
    assert len(h.conn.streams) <= CONFIG.max_concurrent_streams
    assert set(h.conn._blocked) <= set(h.conn.streams)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, max_size=14), st.lists(st.integers(0, 10**6), max_size=6), st.booleans())
def test_random_frames_on_the_protocol_object(actions, points, garbage):
    async def run() -> None:
        errors = watch_internal_errors()
        try:
            h = Harness(Sessions(boom_or_echo), config=CONFIG)
            h.rx = Received(max_frame=f.MAX_FRAME_LIMIT)
            data = encode(actions, h.client) + (b"\x00\x00\x10\x00" if garbage else b"")
            for chunk in cut(data, points):
                h.conn.data_received(chunk)
                h.pump()  # the output decodes as valid framing, checked frame by frame
                check_session_invariants(h)
            if not h.transport.closed and not garbage:  # still at a frame boundary: a PING is answered
                pings = len(h.rx.pings)
                h.send(Client.ping(b"live?ok!"))
                assert h.transport.closed or h.rx.pings[pings:] == [(b"live?ok!", True)]
            h.lose()
            assert h.conn.streams == {} and h.conn._blocked == {}
            h.sessions.assert_each_closed_once()
            assert errors.records == []
        finally:
            logging.getLogger("epp.extproc.h2").removeHandler(errors)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, max_size=12), st.lists(st.integers(0, 10**6), max_size=4))
def test_random_frames_over_a_real_socket(actions, points):
    async def run() -> None:
        errors = watch_internal_errors()
        sessions = Sessions(boom_or_echo)
        server = H2Server(sessions, CONFIG)
        port = await server.start("127.0.0.1", 0)
        try:
            client = await RawClient.connect(port)
            client.rx = Received(max_frame=f.MAX_FRAME_LIMIT)
            for chunk in cut(encode(actions, client.client), points):
                await client.send(chunk)
            try:
                await client.send(Client.ping(b"live?ok!"))
                await client.until(lambda rx: (b"live?ok!", True) in rx.pings, timeout=5)
            except (ConnectionError, OSError):
                pass  # the server ended the connection (a connection error): also fine
            await client.close()
            for _ in range(200):
                if not server.connections:
                    break
                await asyncio.sleep(0.01)
            assert not server.connections
            sessions.assert_each_closed_once()
            assert errors.records == []
        finally:
            await server.stop(0)
            logging.getLogger("epp.extproc.h2").removeHandler(errors)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


HEADER_LISTS = st.lists(st.tuples(st.sampled_from([":path", "content-type", "x-a", "x-b", "grpc-timeout"]),
                                  st.sampled_from(["1", "2", "/p", "application/grpc", "x" * 40]), st.booleans()),
                        min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("encode"), HEADER_LISTS),
                          st.tuples(st.just("replay"), st.integers(0, 100)),
                          st.tuples(st.just("table size"), st.sampled_from([0, 64, 256, 4096]))), max_size=25))
def test_cached_header_decoding_always_equals_a_plain_decoder(steps):
    """The connection remembers decoded blocks that do not change the HPACK table; whatever the sequence
    (insertions, evictions, table size updates, the very same bytes sent again), it decodes exactly as a
    plain decoder does."""
    import hpack

    from epp.extproc.h2.connection import H2Connection

    conn = H2Connection(Sessions())
    reference = hpack.Decoder()
    encoder = hpack.Encoder()
    sent: list[bytes] = []
    for kind, arg in steps:
        if kind == "encode":
            block = encoder.encode([(n, v) if index else hpack.NeverIndexedHeaderTuple(n, v) for n, v, index in arg])
        elif kind == "replay" and sent:
            block = sent[arg % len(sent)]
        elif kind == "table size":
            encoder.header_table_size = arg  # the next encoded block starts with a size update
            continue
        else:
            continue
        sent.append(block)
        try:
            expected = reference.decode(block, raw=True)
        except hpack.HPACKError:
            # A replayed block can point past the table after evictions: the connection must fail too, and
            # both decoders are then out of step; stop here.
            try:
                conn._decode(block)
            except hpack.HPACKError:
                return
            raise AssertionError("the cached decode accepted a block a plain decoder rejects") from None
        assert conn._decode(block) == expected
