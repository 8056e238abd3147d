"""Endpoint Picker Protocol constants and ext_proc response builders.

Builders return xds-protos (upb) messages, or, on the per-request hot path, the already serialized bytes
of one (`Reply`): streamed body frames are encoded by hand around the body (one copy of the body instead
of one per protobuf layer), and routing answers are serialized once per destination and reused. The
transport sends bytes as they are and serializes messages."""

from __future__ import annotations

import struct

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
# Envoy's limit on one streamed body message is 64 KiB; the reference chunks at 62,000 bytes.
BODY_CHUNK = 62_000

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
Reply = pb.ProcessingResponse | bytes


def serialize(reply: Reply) -> bytes:
    return reply if type(reply) is bytes else reply.SerializeToString()


# One-byte varints, prebuilt: most lengths in a frame header below a body are under 128.
_VARINT1 = tuple(bytes((i,)) for i in range(0x80))


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _VARINT1[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Frame heads whose five lengths (body, and the four messages around it) all take 2 or all take 3 varint
# bytes: the common body sizes, packed in one call.
_HEAD2 = struct.Struct("<15B")
_HEAD3 = struct.Struct("<20B")


def _streamed_frame(body: bytes | memoryview, end_of_stream: bool, response: bool) -> bytes:
    """The serialized ProcessingResponse{request_body|response_body: BodyResponse{response: CommonResponse{
    body_mutation: BodyMutation{streamed_response: StreamedBodyResponse{body, end_of_stream}}}}}, built with
    one copy of the body."""
    n = len(body)
    tag = 0x22 if response else 0x1A
    tail = b"\x10\x01" if end_of_stream else b""  # StreamedBodyResponse.end_of_stream (field 2) = true
    # Each enclosing message adds its tag byte and its length's varint; with all varints w bytes long:
    if 0x80 <= n:
        if n < 0x4000:
            l1 = n + 3 + len(tail)
            l4 = l1 + 9
            if l4 < 0x4000:
                l2 = l1 + 3
                l3 = l2 + 3
                head = _HEAD2.pack(tag, l4 & 0x7F | 0x80, l4 >> 7, 0x0A, l3 & 0x7F | 0x80, l3 >> 7, 0x1A,
                                   l2 & 0x7F | 0x80, l2 >> 7, 0x1A, l1 & 0x7F | 0x80, l1 >> 7, 0x0A,
                                   n & 0x7F | 0x80, n >> 7)
                return b"".join((head, body, tail))
        else:
            l1 = n + 4 + len(tail)
            l4 = l1 + 12
            if l4 < 0x200000:
                l2 = l1 + 4
                l3 = l2 + 4
                head = _HEAD3.pack(tag, l4 & 0x7F | 0x80, l4 >> 7 & 0x7F | 0x80, l4 >> 14, 0x0A,
                                   l3 & 0x7F | 0x80, l3 >> 7 & 0x7F | 0x80, l3 >> 14, 0x1A,
                                   l2 & 0x7F | 0x80, l2 >> 7 & 0x7F | 0x80, l2 >> 14, 0x1A,
                                   l1 & 0x7F | 0x80, l1 >> 7 & 0x7F | 0x80, l1 >> 14, 0x0A,
                                   n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14)
                return b"".join((head, body, tail))
    # Any other size: lengths one by one.
    if n:  # proto3 leaves an empty bytes field out
        body_len = _varint(n)
        l1 = 1 + len(body_len) + n + len(tail)  # StreamedBodyResponse
    else:
        body_len = b""
        l1 = len(tail)
    v1 = _varint(l1)
    l2 = 1 + len(v1) + l1  # BodyMutation{streamed_response = 3}
    v2 = _varint(l2)
    l3 = 1 + len(v2) + l2  # CommonResponse{body_mutation = 3}
    v3 = _varint(l3)  # BodyResponse{response = 1}
    return b"".join((bytes((tag,)), _varint(1 + len(v3) + l3), b"\x0a", v3, b"\x1a", v2, b"\x1a", v1,
                     b"\x0a" if n else b"", body_len, body, tail))


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Envoy sends header values in `raw_value` (bytes) or, in older versions, `value`."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        raw = h.raw_value  # a new bytes object on every access: read it once
        out[h.key] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def destination_metadata(destination: str) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.fields[DESTINATION_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = destination
    return md


def routing_headers(destination: str, extra: dict[str, str], content_length: int | None,
                    remove: tuple[str, ...] = ()) -> pb.HeaderMutation:
    sets = [_set(DESTINATION_HEADER, destination)]
    sets.extend(_set(k, v) for k, v in extra.items())
    if content_length is not None:
        sets.append(_set("content-length", str(content_length)))
    return pb.HeaderMutation(set_headers=sets, remove_headers=remove)


def request_headers_routed(destination: str, extra: dict[str, str], content_length: int | None,
                           remove: tuple[str, ...] = ()) -> ProcessingResponse:
    """The (deferred) answer to the request headers: the destination header plus `envoy.lb` metadata; `remove`
    lists client headers the EPP's plugins own and did not set (a client must not set them itself)."""
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=routing_headers(destination, extra, content_length, remove), clear_route_cache=True
            )
        ),
        dynamic_metadata=destination_metadata(destination),
    )


def request_body_routed(destination: str, extra: dict[str, str], body: bytes | None,
                        remove: tuple[str, ...] = ()) -> ProcessingResponse:
    """Buffered mode: the destination goes out with the body answer (headers are still held by Envoy)."""
    common = pb.CommonResponse(header_mutation=routing_headers(destination, extra,
                                                               len(body) if body is not None else None, remove),
                               clear_route_cache=True)
    if body is not None:
        common.body_mutation.body = body
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common),
                                 dynamic_metadata=destination_metadata(destination))


def continue_request_headers() -> ProcessingResponse:
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse())


_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()


def continue_response_headers() -> Reply:
    return _CONTINUE_RESPONSE_HEADERS


def response_headers_reply(set_headers: dict[str, str]) -> Reply:
    """The answer to the response headers: continue, setting `set_headers` on the client's response."""
    if not set_headers:
        return _CONTINUE_RESPONSE_HEADERS
    mutation = pb.HeaderMutation(set_headers=[_set(k, v) for k, v in set_headers.items()])
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse(
        header_mutation=mutation)))


def request_trailers() -> ProcessingResponse:
    return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def response_trailers() -> ProcessingResponse:
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def streamed_body(chunk: bytes, end_of_stream: bool, response: bool) -> ProcessingResponse:
    mutation = pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream))
    body = pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
    return pb.ProcessingResponse(response_body=body) if response else pb.ProcessingResponse(request_body=body)


def streamed_chunks(body: bytes | memoryview, end_of_stream: bool, response: bool) -> list[bytes]:
    """`body` as serialized streamed body answers of at most BODY_CHUNK bytes; the last carries
    end_of_stream."""
    n = len(body)
    if n <= BODY_CHUNK:
        return [_streamed_frame(body, end_of_stream, response)]
    view = memoryview(body)
    return [_streamed_frame(view[off : off + BODY_CHUNK], end_of_stream and off + BODY_CHUNK >= n, response)
            for off in range(0, n, BODY_CHUNK)]


class ReplyCache:
    """Serialized routing answers per destination, so the common answer (destination only, no extra
    headers, unchanged body) is built once per destination rather than once per request. Bounded: cleared
    when it grows past `limit` destinations (pools change; fallback lists multiply the keys)."""

    def __init__(self, limit: int = 8192) -> None:
        self._headers: dict[str, bytes] = {}
        self._limit = limit

    def request_headers_routed(self, destination: str) -> bytes:
        reply = self._headers.get(destination)
        if reply is None:
            if len(self._headers) >= self._limit:
                self._headers.clear()
            reply = self._headers[destination] = request_headers_routed(destination, {}, None).SerializeToString()
        return reply


def buffered_body(body: bytes | None, response: bool) -> ProcessingResponse:
    common = pb.CommonResponse()
    if body is not None:
        common.body_mutation.body = body
    b = pb.BodyResponse(response=common)
    return pb.ProcessingResponse(response_body=b) if response else pb.ProcessingResponse(request_body=b)


def immediate(status: int, body: bytes, details: str) -> ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=[_set("content-type", "application/json")]),
            body=body,
            details=details[:200].replace(" ", "_"),
        )
    )


def subset_hint(request: ProcessingRequest) -> list[str] | None:
    """The subset hint from `metadata_context` (a list of `ip:port`, or a comma-separated string), or None
    when absent."""
    if not request.HasField("metadata_context"):  # the common case, and much cheaper to ask
        return None
    ns = request.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if ns is None or SUBSET_KEY not in ns.fields:
        return None
    value = ns.fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [v.string_value for v in value.list_value.values if v.string_value]
    if kind == "string_value":
        return [s.strip() for s in value.string_value.split(",") if s.strip()]
    return []


def served_endpoint(request: ProcessingRequest) -> str | None:
    if not request.HasField("metadata_context"):
        return None
    ns = request.metadata_context.filter_metadata.get(DESTINATION_NAMESPACE)
    if ns is None or SERVED_KEY not in ns.fields:
        return None
    return ns.fields[SERVED_KEY].string_value or None
