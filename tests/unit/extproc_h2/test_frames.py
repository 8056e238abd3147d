"""Frame and header-block encoding of the fast ext_proc transport, checked against the tests' own decoder."""

from __future__ import annotations

import hpack
import pytest

from epp.extproc.h2 import frames as f
from tests.unit.extproc_h2.h2client import Received


def decode_one(data: bytes) -> tuple[int, int, int, bytes]:
    rx = Received()
    rx.feed(data)
    assert len(rx.frames) == 1 and not rx.buf
    return rx.frames[0]


@pytest.mark.parametrize("length,kind,flags,sid", [
    (0, f.SETTINGS, f.ACK, 0),
    (16_384, f.DATA, f.END_STREAM, 1),
    (f.MAX_FRAME_LIMIT, f.HEADERS, f.END_HEADERS | f.END_STREAM, 2**31 - 1),
    (70_000, f.CONTINUATION, 0, 12345),
])
def test_frame_header_encodes_24_bit_length_type_flags_and_31_bit_stream(length, kind, flags, sid):
    head = f.frame(length, kind, flags, sid)
    assert len(head) == 9
    assert int.from_bytes(head[:3], "big") == length
    assert (head[3], head[4]) == (kind, flags)
    assert int.from_bytes(head[5:], "big") == sid
    hi, lo, k, fl, s = f.FRAME_HEADER.unpack_from(head)
    assert ((hi << 8) | lo, k, fl, s) == (length, kind, flags, sid)


@pytest.mark.parametrize("data,expected", [
    (f.ping(b"abcdefgh", ack=True), (f.PING, f.ACK, 0, b"abcdefgh")),
    (f.window_update(3, 1000), (f.WINDOW_UPDATE, 0, 3, (1000).to_bytes(4, "big"))),
    (f.rst_stream(5, f.CANCEL), (f.RST_STREAM, 0, 5, (8).to_bytes(4, "big"))),
    (f.goaway(7, f.PROTOCOL_ERROR, b"why"), (f.GOAWAY, 0, 0, (7).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"why")),
    (f.SETTINGS_ACK, (f.SETTINGS, f.ACK, 0, b"")),
])
def test_control_frames(data, expected):
    assert decode_one(data) == expected


def test_settings_round_trip():
    values = {f.MAX_CONCURRENT_STREAMS: 100, f.INITIAL_WINDOW_SIZE: 1 << 22, f.MAX_FRAME_SIZE: 1 << 20}
    kind, flags, sid, payload = decode_one(f.settings(values))
    assert (kind, flags, sid, len(payload)) == (f.SETTINGS, 0, 0, 18)
    assert dict(f.parse_settings(payload)) == values
    assert dict(f.parse_settings(memoryview(payload))) == values


def test_headers_frame_carries_the_whole_block_with_end_headers():
    kind, flags, sid, payload = decode_one(f.headers_frame(9, f.TRAILERS_OK, end_stream=True))
    assert (kind, flags, sid, payload) == (f.HEADERS, f.END_HEADERS | f.END_STREAM, 9, f.TRAILERS_OK)
    kind, flags, _, _ = decode_one(f.headers_frame(9, f.RESPONSE_HEADERS, end_stream=False))
    assert flags == f.END_HEADERS


def test_fixed_header_blocks_decode_to_grpc_response_headers_and_never_grow_the_peer_table():
    d = hpack.Decoder()
    assert d.decode(f.RESPONSE_HEADERS) == [(":status", "200"), ("content-type", "application/grpc"),
                                            ("grpc-accept-encoding", "identity")]
    assert d.decode(f.TRAILERS_OK) == [("grpc-status", "0")]
    assert d.decode(f.trailers(12, "method x not found", with_response_headers=True)) == [
        (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "12"),
        ("grpc-message", "method x not found")]
    assert len(d.header_table.dynamic_entries) == 0  # stateless: the same bytes mean the same on every connection
    # Decoded again, the very same bytes still mean the same.
    assert hpack.Decoder().decode(f.RESPONSE_HEADERS) == d.decode(f.RESPONSE_HEADERS)


@pytest.mark.parametrize("message,encoded", [
    ("plain text", "plain text"),
    ("100% sure", "100%25 sure"),
    ("line\nbreak", "line%0Abreak"),
    ("café", "caf%C3%A9"),
])
def test_grpc_message_is_percent_encoded(message, encoded):
    assert f.percent_encode(message) == encoded
    headers = dict(hpack.Decoder().decode(f.trailers(13, message)))
    assert headers == {"grpc-status": "13", "grpc-message": encoded}


def test_long_grpc_message_is_truncated():
    headers = dict(hpack.Decoder().decode(f.trailers(13, "x" * 5000)))
    assert len(headers["grpc-message"]) == 1024


@pytest.mark.parametrize("value,seconds", [
    (b"1S", 1.0), (b"100m", 0.1), (b"2M", 120.0), (b"1H", 3600.0), (b"250000u", 0.25), (b"5000000n", 0.005),
    (b"99999999S", 99999999.0),
    (b"S", None), (b"1", None), (b"123456789S", None), (b"1x", None), (b"-1S", None), (b"1.5S", None), (b"", None),
])
def test_grpc_timeout(value, seconds):
    got = f.parse_grpc_timeout(value)
    assert got == (pytest.approx(seconds) if seconds is not None else None)
