"""HTTP/2 frames (RFC 9113) and gRPC's framing on top of them, as bytes: constants, encoders, the few parsers.

Only what a gRPC server for one bidi method needs. Frames are built with one `struct.pack` for the 9-byte
header; payloads stay as the caller's bytes or memoryview (nothing here copies a body). Header blocks the
server sends are fixed, so they are HPACK-encoded once, at import, as literals that are never indexed: the
encoder is then stateless (no dynamic table to keep in step with the peer's decoder, and the peer's
SETTINGS_HEADER_TABLE_SIZE does not matter).
"""

from __future__ import annotations

import struct

from hpack import Encoder, NeverIndexedHeaderTuple

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings identifiers.
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1

# gRPC status codes the transport itself produces.
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14

FRAME_HEADER = struct.Struct(">HBBBL")  # length as 16 + 8 bits, type, flags, R bit + stream id
GRPC_PREFIX = struct.Struct(">BL")  # compressed flag, message length
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


def frame(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte header of a frame with `length` bytes of payload."""
    return FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


def settings(values: dict[int, int]) -> bytes:
    payload = b"".join(_SETTING.pack(k, v) for k, v in values.items())
    return frame(len(payload), SETTINGS, 0, 0) + payload


SETTINGS_ACK = frame(0, SETTINGS, ACK, 0)


def parse_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    """(identifier, value) pairs; the caller has checked that the length is a multiple of 6."""
    return [_SETTING.unpack_from(payload, off) for off in range(0, len(payload), 6)]


def ping(payload: bytes, ack: bool) -> bytes:
    return frame(8, PING, ACK if ack else 0, 0) + payload


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(4, RST_STREAM, 0, stream_id) + _U32.pack(code)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(8 + len(debug), GOAWAY, 0, 0) + _GOAWAY.pack(last_stream_id, code) + debug


def u32(payload: bytes | memoryview, offset: int = 0) -> int:
    return _U32.unpack_from(payload, offset)[0]


def headers_frame(stream_id: int, block: bytes, end_stream: bool) -> bytes:
    """One HEADERS frame carrying a whole (small, pre-encoded) header block."""
    return frame(len(block), HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id) + block


# ----------------------------------------------------------------------------------------- header blocks

def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    """An HPACK block of literals never added to the peer's dynamic table (`:status` uses the static table)."""
    items = [h if h[0] == ":status" else NeverIndexedHeaderTuple(*h) for h in headers]
    return Encoder().encode(items, huffman=True)


RESPONSE_HEADERS = encode_headers([(":status", "200"), ("content-type", "application/grpc"),
                                   ("grpc-accept-encoding", "identity")])
TRAILERS_OK = encode_headers([("grpc-status", "0")])


def percent_encode(message: str) -> str:
    """grpc-message's encoding: UTF-8, with bytes outside printable ASCII and '%' as %XX."""
    out = []
    for b in message.encode("utf-8", "replace"):
        out.append(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}")
    return "".join(out)


def trailers(status: int, message: str = "", *, with_response_headers: bool = False) -> bytes:
    """The trailers block ending a call with `status`; with `with_response_headers`, a Trailers-Only
    response (the stream sent nothing before)."""
    if status == GRPC_OK and not message and not with_response_headers:
        return TRAILERS_OK
    headers = [(":status", "200"), ("content-type", "application/grpc")] if with_response_headers else []
    headers.append(("grpc-status", str(status)))
    if message:
        headers.append(("grpc-message", percent_encode(message[:1024])))
    return encode_headers(headers)


_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (1 to 8 digits and a unit: H M S m u n) in seconds, or None when malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit
