"""H2Connection driven directly (fake transport, the tests' own client codec): the ext_proc call, gRPC
framing, flow control both ways, resets at every stage, errors that end one stream, connection errors,
deadlines, concurrency limits and graceful shutdown. Every test also checks that each session the
connection made was closed exactly once."""

from __future__ import annotations

import asyncio

import hpack
import pytest

from epp.extproc import protocol as p
from epp.extproc.h2 import frames as f
from epp.extproc.h2.connection import SHUTDOWN_PING, H2Config
from tests.unit.extproc_h2.h2client import (
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    Client,
    Harness,
    Sessions,
    echo,
    frame,
    grpc_messages,
    request_body,
)

HEADERS_MSG = p.ProcessingRequest(request_headers=p.pb.HttpHeaders())


def body_replies(body: bytes, eos: bool = True) -> list[p.ProcessingResponse]:
    return [p.ProcessingResponse.FromString(b) for b in p.streamed_chunks(body, eos, response=False)]


def assert_no_leak(h: Harness) -> None:
    assert h.conn.streams == {}
    assert h.conn._blocked == {}
    h.sessions.assert_each_closed_once()


# ------------------------------------------------------------------------------------------- handshake

async def test_server_announces_its_settings_and_a_large_connection_window_then_acks_the_client():
    h = Harness(config=H2Config(max_concurrent_streams=7, stream_window=1 << 20, connection_window=8 << 20))
    assert h.rx.settings[0] == {f.MAX_CONCURRENT_STREAMS: 7, f.INITIAL_WINDOW_SIZE: 1 << 20,
                                f.MAX_FRAME_SIZE: 1 << 20, f.MAX_HEADER_LIST_SIZE: 64 << 10}
    assert h.rx.window_updates == [(0, (8 << 20) - 65_535)]
    assert h.rx.settings_acks == 1
    assert not h.transport.closed


async def test_preface_and_frames_arriving_one_byte_at_a_time():
    h = Harness(handshake=False)
    data = Client.preface() + h.client.headers(1) + Client.data(1, grpc_messages(HEADERS_MSG, request_body(b"hi", True)),
                                                                end_stream=True)
    for i in range(len(data)):
        h.conn.data_received(data[i : i + 1])
    h.pump()
    s = h.rx.stream(1)
    assert s.status == 0 and s.messages()[1:] == body_replies(b"hi")
    assert_no_leak(h)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"])
async def test_a_wrong_preface_is_a_protocol_error(data):
    h = Harness(handshake=False)
    h.send(data)
    assert h.rx.goaways[-1][1] == f.PROTOCOL_ERROR and h.transport.closed


async def test_the_first_frame_must_be_settings():
    h = Harness(handshake=False)
    h.send(f.PREFACE + Client.ping())
    assert h.rx.goaways[-1][1] == f.PROTOCOL_ERROR and h.transport.closed


# ------------------------------------------------------------------------------------------- one call

async def test_a_call_gets_response_headers_replies_in_order_and_ok_trailers():
    h = Harness()
    s = h.call(1, HEADERS_MSG, request_body(b"abc", False), request_body(b"def", True))
    assert s.headers == {":status": "200", "content-type": "application/grpc", "grpc-accept-encoding": "identity"}
    assert s.trailers == {"grpc-status": "0"} and s.ended and s.reset is None
    assert s.messages() == [p.continue_request_headers(), *body_replies(b"abc", False), *body_replies(b"def")]
    assert [m.WhichOneof("request") for m in h.sessions.made[0].messages] == [
        "request_headers", "request_body", "request_body"]
    assert_no_leak(h)


async def test_a_call_with_no_messages_ends_ok_with_trailers_only():
    h = Harness()
    h.send(h.client.headers(1, end_stream=True))
    s = h.rx.stream(1)
    assert s.headers == {":status": "200", "content-type": "application/grpc", "grpc-status": "0"} and s.ended
    assert_no_leak(h)


@pytest.mark.parametrize("cut", ["one frame", "a frame per message", "frames of 7 bytes", "frames of 1 byte",
                                 "split inside the 5-byte prefix"])
async def test_grpc_messages_split_across_frames_or_packed_several_per_frame(cut):
    msgs = [HEADERS_MSG, *(request_body(bytes([65 + i]) * (i * 300), False) for i in range(6)),
            request_body(b"end", True)]
    wire = grpc_messages(*msgs)
    if cut == "one frame":
        pieces = [wire]
    elif cut == "a frame per message":
        pieces = [grpc_messages(m) for m in msgs]
    elif cut == "split inside the 5-byte prefix":
        pieces = [wire[:2], wire[2:4], wire[4:]]
    else:
        n = 7 if cut == "frames of 7 bytes" else 1
        pieces = [wire[i : i + n] for i in range(0, len(wire), n)]
    h = Harness()
    h.send(h.client.headers(1), *(Client.data(1, piece) for piece in pieces), Client.data(1, b"", end_stream=True))
    expected = [p.continue_request_headers()]
    for m in msgs[1:]:
        expected += body_replies(m.request_body.body, m.request_body.end_of_stream)
    s = h.rx.stream(1)
    assert s.status == 0 and s.messages() == expected
    assert h.sessions.made[0].messages == msgs
    assert_no_leak(h)


async def test_padded_data_frames_are_unpadded_and_their_padding_counts_for_flow_control():
    h = Harness(config=H2Config(stream_window=1000))
    wire = grpc_messages(request_body(b"x" * 100, False))
    h.send(h.client.headers(1), Client.data(1, wire, pad=255), Client.data(1, wire, pad=200))
    assert h.sessions.made[0].messages == [request_body(b"x" * 100, False)] * 2
    # 2 frames of 1 + len(wire) + padding: more than half the 1000-byte window, handed back in one update.
    assert h.rx.window_granted(1) == 2 * (1 + len(wire)) + 455
    h.send(Client.data(1, b"", end_stream=True))
    assert_no_leak(h)


async def test_everything_one_event_produces_goes_out_in_one_write():
    h = Harness()
    before = h.transport.writes
    batch = b"".join([h.client.headers(sid) + Client.data(sid, grpc_messages(HEADERS_MSG, request_body(b"b" * 10_000, True)),
                                                          end_stream=True) for sid in (1, 3, 5)] + [Client.ping()])
    h.send(batch)
    assert h.transport.writes == before + 1
    assert all(h.rx.stream(sid).status == 0 for sid in (1, 3, 5)) and h.rx.pings[-1] == (b"12345678", True)
    assert_no_leak(h)


async def test_large_replies_are_cut_into_frames_no_larger_than_the_peer_allows():
    h = Harness(client_settings={f.MAX_FRAME_SIZE: 20_000, f.INITIAL_WINDOW_SIZE: 1 << 20})
    h.send(Client.window_update(0, 1 << 20))
    body = bytes(range(256)) * 700  # 179,200 bytes: 3 streamed chunks of at most 62,000
    h.call(1, request_body(body, True))
    data_frames = [fr for fr in h.rx.frames if fr[0] == f.DATA]
    assert max(len(fr[3]) for fr in data_frames) == 20_000
    assert h.rx.stream(1).messages() == body_replies(body)
    assert_no_leak(h)


# ------------------------------------------------------------------------------------------- errors on one stream

async def test_an_unknown_method_is_unimplemented_and_makes_no_session():
    h = Harness()
    h.send(h.client.headers(1, path="/envoy.service.ext_proc.v3.ExternalProcessor/Other"))
    s = h.rx.stream(1)
    assert s.headers["grpc-status"] == str(f.GRPC_UNIMPLEMENTED) and "not found" in s.headers["grpc-message"]
    assert s.ended and s.reset == f.NO_ERROR  # the client had not finished: told to stop
    assert h.sessions.made == []
    # Its DATA still arriving is ignored, and the connection serves the next call.
    h.send(Client.data(1, grpc_messages(HEADERS_MSG), end_stream=True))
    assert h.call(3, HEADERS_MSG).status == 0
    assert_no_leak(h)


@pytest.mark.parametrize("kw,status", [({"content_type": "text/plain"}, "415"), ({"method": "GET"}, "405")])
async def test_a_request_that_is_not_grpc_gets_an_http_error(kw, status):
    h = Harness()
    h.send(h.client.headers(1, **kw))
    assert h.rx.stream(1).headers == {":status": status} and h.rx.stream(1).ended
    assert h.sessions.made == [] and not h.transport.closed


@pytest.mark.parametrize("wire,status,needle", [
    (b"\x00\x00\x80\x00\x01", f.GRPC_RESOURCE_EXHAUSTED, "larger than max (8388609 vs. 8388608)"),
    (b"\x01\x00\x00\x00\x01x", f.GRPC_INTERNAL, "compressed"),
    (b"\x00\x00\x00\x00\x02\xff\xff", f.GRPC_INTERNAL, "could not parse"),
])
async def test_a_bad_message_ends_its_stream_only(wire, status, needle):
    h = Harness()
    h.send(h.client.headers(1), h.client.headers(3), Client.data(3, grpc_messages(HEADERS_MSG)))
    h.send(Client.data(1, wire))
    s = h.rx.stream(1)
    assert s.status == status and needle in s.final["grpc-message"] and s.reset == f.NO_ERROR
    assert h.sessions.made[0].closes == 1
    h.send(Client.data(3, grpc_messages(request_body(b"z", True)), end_stream=True))
    assert h.rx.stream(3).status == 0 and not h.transport.closed
    assert_no_leak(h)


async def test_a_message_of_exactly_the_limit_is_accepted():
    h = Harness(config=H2Config(max_message_bytes=100_000), client_settings={f.INITIAL_WINDOW_SIZE: 1 << 20})
    h.send(Client.window_update(0, 1 << 20))
    msg = request_body(b"q" * (100_000 - 10), True)
    msg.request_body.body += b"q" * (100_000 - msg.ByteSize())
    assert msg.ByteSize() == 100_000
    wire = grpc_messages(msg)
    h.send(h.client.headers(1), *(Client.data(1, wire[i : i + 9000]) for i in range(0, len(wire), 9000)),
           Client.data(1, b"", end_stream=True))
    assert h.rx.stream(1).status == 0 and h.sessions.made[0].messages == [msg]
    assert_no_leak(h)


async def test_a_session_exception_ends_that_stream_with_internal_and_spares_the_others(caplog):
    def handler(msg):
        if msg.request_body.body == b"boom":
            raise ValueError("the director fell over")
        return echo(msg)

    h = Harness(Sessions(handler))
    h.send(h.client.headers(1), h.client.headers(3))
    h.send(Client.data(1, grpc_messages(request_body(b"boom"))), Client.data(3, grpc_messages(request_body(b"ok", True)),
                                                                             end_stream=True))
    s1, s3 = h.rx.stream(1), h.rx.stream(3)
    assert s1.status == f.GRPC_INTERNAL and "ValueError: the director fell over" in s1.final["grpc-message"]
    assert s3.status == 0 and s3.messages() == body_replies(b"ok")
    assert "ext_proc session failed on stream 1" in caplog.text
    assert_no_leak(h)


async def test_a_session_that_cannot_be_made_is_internal():
    def boom():
        raise RuntimeError("no director")

    h = Harness()
    h.conn._new_session = boom
    h.send(h.client.headers(1))
    assert h.rx.stream(1).status == f.GRPC_INTERNAL and not h.transport.closed


async def test_the_request_stream_ending_inside_a_message_is_internal():
    h = Harness()
    h.send(h.client.headers(1), Client.data(1, grpc_messages(request_body(b"abcdef"))[:-2], end_stream=True))
    s = h.rx.stream(1)
    assert s.status == f.GRPC_INTERNAL and "inside a message" in s.final["grpc-message"] and s.reset is None
    assert_no_leak(h)


@pytest.mark.parametrize("extra,status", [((("grpc-encoding", "gzip"),), f.GRPC_UNIMPLEMENTED),
                                          ((("grpc-encoding", "identity"),), f.GRPC_OK),
                                          ((("grpc-timeout", "soon"),), f.GRPC_INTERNAL)])
async def test_request_metadata_checks(extra, status):
    h = Harness()
    h.send(h.client.headers(1, extra=extra, end_stream=True))
    assert h.rx.stream(1).status == status
    assert_no_leak(h)


# ------------------------------------------------------------------------------------------- resets

STAGES = ["after the headers", "inside a message", "after some replies", "with replies waiting for the window"]


@pytest.mark.parametrize("stage", STAGES)
async def test_a_client_reset_at_any_stage_closes_the_session_once_and_keeps_the_connection(stage):
    h = Harness(client_settings={f.INITIAL_WINDOW_SIZE: 1000})
    h.send(h.client.headers(1))
    if stage == "inside a message":
        h.send(Client.data(1, grpc_messages(request_body(b"x" * 500))[:100]))
    elif stage == "after some replies":
        h.send(Client.data(1, grpc_messages(HEADERS_MSG, request_body(b"x" * 500))))
    elif stage == "with replies waiting for the window":
        h.send(Client.data(1, grpc_messages(request_body(b"x" * 5000))))
        assert 1 in h.conn._blocked
    h.send(Client.rst(1, f.CANCEL))
    assert h.sessions.made[0].closes == 1 and h.conn.streams == {}
    sent = len(h.rx.frames)
    h.send(Client.window_update(1, 100_000), Client.data(1, b"late"), Client.rst(1))  # all ignored
    assert len(h.rx.frames) == sent and not h.transport.closed
    assert h.call(3, HEADERS_MSG).status == 0
    assert_no_leak(h)


async def test_envoy_resetting_right_after_its_end_of_stream_never_costs_the_connection():
    h = Harness()
    h.send(h.client.headers(1) + Client.data(1, grpc_messages(HEADERS_MSG, request_body(b"a", True)), end_stream=True)
           + Client.rst(1, f.NO_ERROR))
    assert h.rx.stream(1).status == 0
    # The same with our trailers held back by the window: the reset drops them, nothing else.
    h2 = Harness(client_settings={f.INITIAL_WINDOW_SIZE: 10})
    h2.send(h2.client.headers(1) + Client.data(1, grpc_messages(request_body(b"a" * 100, True)), end_stream=True))
    assert h2.rx.stream(1).trailers is None and 1 in h2.conn.streams
    h2.send(Client.rst(1, f.CANCEL))
    assert h2.rx.goaways == [] and not h2.transport.closed and h2.call(3, HEADERS_MSG).status == 0
    assert_no_leak(h)
    assert_no_leak(h2)


async def test_client_trailers_end_the_call():
    h = Harness()
    h.send(h.client.headers(1), Client.data(1, grpc_messages(HEADERS_MSG)))
    h.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, h.client.encoder.encode([("x-trailer", "1")])))
    assert h.rx.stream(1).status == 0
    assert_no_leak(h)


# ------------------------------------------------------------------------------------------- flow control

async def test_receive_windows_are_handed_back_once_half_is_used():
    h = Harness(config=H2Config(stream_window=10_000, connection_window=100_000))
    wire = grpc_messages(request_body(b"x" * 4000))
    h.send(h.client.headers(1))
    h.send(Client.data(1, wire))
    assert h.rx.window_granted(1) == 0  # under half of the stream window
    h.send(Client.data(1, wire))
    assert h.rx.window_granted(1) == 2 * len(wire)  # back to the full 10,000
    assert h.rx.window_granted(0) == 100_000 - 65_535  # only the one at the start
    for _ in range(12):
        h.send(Client.data(1, wire))
    # The 13th frame took the connection's window under 50,000: all 13 were handed back, the 14th not yet.
    assert h.rx.window_granted(0) == 100_000 - 65_535 + 13 * len(wire)
    h.send(Client.data(1, b"", end_stream=True))
    assert_no_leak(h)


async def test_a_client_overrunning_the_stream_window_gets_its_stream_reset():
    h = Harness(config=H2Config(stream_window=1000))
    h.send(h.client.headers(1), Client.data(1, b"\0" * 1001))
    assert h.rx.stream(1).reset == f.FLOW_CONTROL_ERROR and not h.transport.closed
    assert_no_leak(h)


async def test_a_client_overrunning_the_connection_window_is_a_connection_error():
    h = Harness(config=H2Config(stream_window=1 << 20, connection_window=65_535))
    # 65,536 bytes in one event: the window is handed back only at the event's end, so one byte is over.
    h.send(h.client.headers(1) + b"".join(Client.data(1, b"\0" * 16_000) for _ in range(4))
           + Client.data(1, b"\0" * 1536))
    assert h.rx.goaways[-1][1] == f.FLOW_CONTROL_ERROR and h.transport.closed
    assert_no_leak(h)


async def test_the_connection_window_is_handed_back_between_events():
    h = Harness(config=H2Config(stream_window=1 << 20, connection_window=65_535))
    h.send(h.client.headers(1), *(Client.data(1, b"\0" * 16_000) for _ in range(4)), Client.data(1, b"\0" * 1536))
    # The third frame took the window under half: 48,000 bytes handed back then; the rest not yet.
    assert h.rx.goaways == [] and h.rx.window_granted(0) == 48_000
    h.send(Client.data(1, b"", end_stream=True))
    assert_no_leak(h)


async def test_replies_respect_the_peers_stream_and_connection_windows():
    h = Harness(client_settings={f.INITIAL_WINDOW_SIZE: 3000})
    body = bytes(range(256)) * 600  # 153,600 bytes echoed: more than the connection's 65,535 too
    h.send(h.client.headers(1), Client.data(1, grpc_messages(request_body(body, True)), end_stream=True))
    assert h.rx.data_bytes[1] == 3000 and h.rx.stream(1).trailers is None
    h.send(Client.window_update(1, 200_000))
    assert h.rx.data_bytes[1] == 65_535 and h.rx.stream(1).trailers is None  # now the connection's window
    h.send(Client.window_update(0, 10_000))
    assert h.rx.data_bytes[1] == 75_535
    h.send(Client.window_update(0, 1 << 20))
    s = h.rx.stream(1)
    assert s.status == 0 and s.messages() == body_replies(body)  # trailers only after all the data
    assert_no_leak(h)


async def test_a_settings_change_of_the_initial_window_moves_open_streams_windows():
    h = Harness(client_settings={f.INITIAL_WINDOW_SIZE: 1000})
    h.send(h.client.headers(1), Client.data(1, grpc_messages(request_body(b"z" * 3000))))
    assert h.rx.data_bytes[1] == 1000
    h.send(Client.settings({f.INITIAL_WINDOW_SIZE: 500}))  # the stream's window is now -500
    h.send(Client.window_update(1, 400))
    assert h.rx.data_bytes[1] == 1000
    h.send(Client.settings({f.INITIAL_WINDOW_SIZE: 100_000}))  # +99,500: unblocks
    assert h.rx.stream(1).messages() == body_replies(b"z" * 3000, False)
    h.send(Client.data(1, b"", end_stream=True))
    assert h.rx.stream(1).status == 0
    assert_no_leak(h)


async def test_streams_blocked_on_the_connection_window_resume_in_order():
    h = Harness()
    body = b"w" * 40_000
    for sid in (1, 3, 5):
        h.send(h.client.headers(sid), Client.data(sid, grpc_messages(request_body(body, True)), end_stream=True))
    assert sum(h.rx.data_bytes.values()) == 65_535 and list(h.conn._blocked) == [3, 5]
    h.send(Client.window_update(0, 1 << 20))
    assert all(h.rx.stream(sid).status == 0 and h.rx.stream(sid).messages() == body_replies(body) for sid in (1, 3, 5))
    assert_no_leak(h)


async def test_a_full_socket_buffer_pauses_reading_until_it_drains():
    h = Harness()
    h.conn.pause_writing()
    assert h.transport.paused
    h.conn.resume_writing()
    assert not h.transport.paused


# ------------------------------------------------------------------------------------------- connection level

async def test_ping_is_answered_with_the_same_payload():
    h = Harness()
    h.send(Client.ping(b"abcdefgh"))
    assert h.rx.pings == [(b"abcdefgh", True)]
    h.send(Client.ping(b"ackedack", ack=True))  # an ACK is not answered
    assert len(h.rx.pings) == 1


async def test_unknown_frame_types_and_priority_are_ignored():
    h = Harness()
    h.send(frame(0xEE, 0xFF, 1, b"whatever"), frame(2, 0, 1, b"\0\0\0\0\x10"))
    assert h.call(1, HEADERS_MSG).status == 0 and not h.transport.closed


async def test_header_blocks_in_continuation_frames_and_indexed_across_streams():
    h = Harness()
    extra = tuple((f"x-h{i}", "v" * 50) for i in range(20))
    block = h.client.header_block(extra=extra)
    h.send(frame(HEADERS, 0, 1, block[:10]), frame(CONTINUATION, 0, 1, block[10:100]),
           frame(CONTINUATION, END_HEADERS, 1, block[100:]), Client.data(1, b"", end_stream=True))
    assert h.rx.stream(1).status == 0
    second = h.client.header_block(extra=extra)
    assert len(second) < len(block) / 5  # the client indexed them: the server's decoder must follow
    h.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, second))
    assert h.rx.stream(3).status == 0
    assert_no_leak(h)


async def test_refused_streams_still_feed_the_hpack_table():
    h = Harness(config=H2Config(max_concurrent_streams=1))
    h.send(h.client.headers(1))
    h.send(h.client.headers(3, extra=(("x-new", "indexed now"),)))
    assert h.rx.stream(3).reset == f.REFUSED_STREAM and len(h.sessions.made) == 1
    h.send(Client.data(1, b"", end_stream=True))
    h.send(h.client.headers(5, extra=(("x-new", "indexed now"),), end_stream=True))  # refers to the table entry
    assert h.rx.stream(5).status == 0 and h.rx.goaways == []
    assert_no_leak(h)


async def test_max_concurrent_streams_refuses_the_excess_until_one_ends():
    h = Harness(config=H2Config(max_concurrent_streams=2))
    h.send(h.client.headers(1), h.client.headers(3), h.client.headers(5))
    assert h.rx.stream(5).reset == f.REFUSED_STREAM and len(h.sessions.made) == 2
    h.send(Client.data(1, b"", end_stream=True))
    h.send(h.client.headers(7))
    assert h.rx.stream(7).reset is None and len(h.sessions.made) == 3
    h.lose()
    assert_no_leak(h)


def _garbage_hpack() -> bytes:
    return b"\xff\xff\xff\xff\xff"  # an index far beyond any table


@pytest.mark.parametrize("name,data,code", [
    ("DATA on stream 0", frame(0, 0, 0, b"x"), f.PROTOCOL_ERROR),
    ("DATA on an idle stream", frame(0, 0, 99, b"x"), f.PROTOCOL_ERROR),
    ("HEADERS on an even stream", frame(HEADERS, END_HEADERS, 2, b"\x82"), f.PROTOCOL_ERROR),
    ("HEADERS on stream 0", frame(HEADERS, END_HEADERS, 0, b"\x82"), f.PROTOCOL_ERROR),
    ("an undecodable header block", frame(HEADERS, END_HEADERS, 1, _garbage_hpack()), f.COMPRESSION_ERROR),
    ("CONTINUATION without HEADERS", frame(CONTINUATION, END_HEADERS, 1, b"\x82"), f.PROTOCOL_ERROR),
    ("a header block interrupted", frame(HEADERS, 0, 1, b"\x83") + Client.ping(), f.PROTOCOL_ERROR),
    ("CONTINUATION of another stream", frame(HEADERS, 0, 1, b"\x83") + frame(CONTINUATION, END_HEADERS, 3, b""),
     f.PROTOCOL_ERROR),
    ("a frame above SETTINGS_MAX_FRAME_SIZE", frame(0, 0, 1, b"\0" * ((1 << 20) + 1)), f.FRAME_SIZE_ERROR),
    ("SETTINGS of 5 bytes", frame(4, 0, 0, b"\0" * 5), f.FRAME_SIZE_ERROR),
    ("SETTINGS on a stream", frame(4, 0, 1, b""), f.PROTOCOL_ERROR),
    ("SETTINGS ACK with a payload", frame(4, 1, 0, b"\0" * 6), f.FRAME_SIZE_ERROR),
    ("SETTINGS_MAX_FRAME_SIZE too small", Client.settings({f.MAX_FRAME_SIZE: 100}), f.PROTOCOL_ERROR),
    ("SETTINGS_INITIAL_WINDOW_SIZE too large", Client.settings({f.INITIAL_WINDOW_SIZE: 2**31}), f.FLOW_CONTROL_ERROR),
    ("SETTINGS_ENABLE_PUSH of 2", Client.settings({f.ENABLE_PUSH: 2}), f.PROTOCOL_ERROR),
    ("PING of 7 bytes", frame(6, 0, 0, b"1234567"), f.FRAME_SIZE_ERROR),
    ("PING on a stream", frame(6, 0, 1, b"12345678"), f.PROTOCOL_ERROR),
    ("WINDOW_UPDATE of 0 on the connection", Client.window_update(0, 0), f.PROTOCOL_ERROR),
    ("WINDOW_UPDATE of 3 bytes", frame(8, 0, 0, b"\0\0\1"), f.FRAME_SIZE_ERROR),
    ("the connection window above 2^31-1", Client.window_update(0, 2**31 - 1), f.FLOW_CONTROL_ERROR),
    ("RST_STREAM on stream 0", Client.rst(0), f.PROTOCOL_ERROR),
    ("RST_STREAM on an idle stream", Client.rst(41), f.PROTOCOL_ERROR),
    ("RST_STREAM of 3 bytes", frame(3, 0, 1, b"\0\0\0"), f.FRAME_SIZE_ERROR),
    ("PUSH_PROMISE from a client", frame(5, END_HEADERS, 1, b"\0\0\0\2\x82"), f.PROTOCOL_ERROR),
    ("PRIORITY on stream 0", frame(2, 0, 0, b"\0\0\0\1\x10"), f.PROTOCOL_ERROR),
    ("GOAWAY on a stream", frame(7, 0, 1, b"\0" * 8), f.PROTOCOL_ERROR),
    ("padding longer than the DATA frame", frame(0, 0x8, 1, b"\x05"), f.PROTOCOL_ERROR),
])
async def test_connection_errors_send_goaway_and_close_releasing_every_session(name, data, code):
    h = Harness()
    h.send(h.client.headers(1), Client.data(1, grpc_messages(HEADERS_MSG)))  # one call in flight
    h.send(data)
    assert h.rx.goaways and h.rx.goaways[-1][:2] == (1, code), name
    assert h.transport.closed
    assert_no_leak(h)


async def test_a_stream_window_update_of_zero_or_overflowing_resets_only_that_stream():
    h = Harness()
    h.send(h.client.headers(1), h.client.headers(3), Client.window_update(1, 0), Client.window_update(3, 2**31 - 1))
    assert h.rx.stream(1).reset == f.PROTOCOL_ERROR and h.rx.stream(3).reset == f.FLOW_CONTROL_ERROR
    assert not h.transport.closed
    assert_no_leak(h)


async def test_losing_the_connection_closes_every_open_session():
    h = Harness()
    for sid in (1, 3, 5):
        h.send(h.client.headers(sid), Client.data(sid, grpc_messages(HEADERS_MSG)))
    assert h.sessions.open_count() == 3
    h.lose()
    assert_no_leak(h)


async def test_the_peers_goaway_lets_open_streams_finish_then_closes():
    h = Harness()
    h.send(h.client.headers(1), Client.goaway(1))
    assert not h.transport.closed
    h.send(h.client.headers(3))
    assert h.rx.stream(3).reset == f.REFUSED_STREAM
    h.send(Client.data(1, b"", end_stream=True))
    assert h.rx.stream(1).status == 0 and h.transport.closed
    assert_no_leak(h)


# ------------------------------------------------------------------------------------------- deadlines

async def test_grpc_timeout_ends_the_call_with_deadline_exceeded():
    h = Harness()
    h.send(h.client.headers(1, extra=(("grpc-timeout", "30m"),)), Client.data(1, grpc_messages(HEADERS_MSG)))
    h.send(h.client.headers(3, extra=(("grpc-timeout", "10S"),)))
    await asyncio.sleep(0.1)
    h.pump()
    s = h.rx.stream(1)
    assert s.status == f.GRPC_DEADLINE_EXCEEDED and s.reset == f.CANCEL
    assert h.sessions.made[0].closes == 1 and h.rx.stream(3).status is None
    h.send(Client.data(3, b"", end_stream=True))
    assert h.rx.stream(3).status == 0
    assert_no_leak(h)


async def test_a_call_ending_before_its_deadline_cancels_the_timer():
    h = Harness()
    h.send(h.client.headers(1, extra=(("grpc-timeout", "20m"),), end_stream=True))
    frames = len(h.rx.frames)
    await asyncio.sleep(0.05)
    h.pump()
    assert len(h.rx.frames) == frames and h.rx.stream(1).status == 0
    assert_no_leak(h)


# ------------------------------------------------------------------------------------------- shutdown

async def test_graceful_shutdown_finishes_streams_in_flight_and_refuses_new_ones():
    h = Harness()
    h.send(h.client.headers(1), Client.data(1, grpc_messages(HEADERS_MSG)))
    h.send(h.client.headers(3), Client.data(3, grpc_messages(HEADERS_MSG)))
    h.conn.shutdown()
    h.pump()
    assert h.rx.goaways == [(2**31 - 1, f.NO_ERROR, b"")] and h.rx.pings[-1] == (SHUTDOWN_PING, False)
    h.send(h.client.headers(5))  # opened before the client saw the GOAWAY: still served
    h.send(Client.ping(SHUTDOWN_PING, ack=True))
    assert h.rx.goaways[-1] == (5, f.NO_ERROR, b"")
    h.send(h.client.headers(7))
    assert h.rx.stream(7).reset == f.REFUSED_STREAM
    for sid in (1, 3, 5):
        assert not h.transport.closed
        h.send(Client.data(sid, grpc_messages(request_body(b"last", True)), end_stream=True))
        assert h.rx.stream(sid).status == 0
    assert h.transport.closed
    assert_no_leak(h)


async def test_shutdown_without_a_ping_ack_sends_the_final_goaway_after_a_timeout():
    h = Harness(config=H2Config(goaway_ping_timeout_s=0.02))
    h.conn.shutdown()
    await asyncio.sleep(0.06)
    h.pump()
    assert [g[0] for g in h.rx.goaways] == [2**31 - 1, 0] and h.transport.closed


async def test_abort_cancels_the_open_streams():
    h = Harness()
    h.send(h.client.headers(1), h.client.headers(3))
    h.conn.shutdown()
    h.conn.abort()
    h.pump()
    assert h.rx.stream(1).reset == f.CANCEL and h.rx.stream(3).reset == f.CANCEL and h.transport.closed
    assert_no_leak(h)


def test_the_client_codec_encodes_what_a_standard_decoder_reads():
    block = Client().header_block()
    assert dict(hpack.Decoder().decode(block))[":path"] == "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
