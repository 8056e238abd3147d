"""ext_proc messages as Envoy sends them (ProcessingRequest), for tests and benchmarks that drive the
EPP's stream handler or a real EPP without Envoy."""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

Mode = processing_mode_pb2.ProcessingMode


def headers_msg(headers: dict[str, str], end_of_stream: bool = False, subset: list[str] | None = None,
                request_mode: int | None = None, response_mode: int | None = None) -> pb.ProcessingRequest:
    hm = pb.HttpHeaders(end_of_stream=end_of_stream)
    for k, v in headers.items():
        hm.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    msg = pb.ProcessingRequest(request_headers=hm)
    if subset is not None:
        value = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value=s) for s in subset]))
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].fields["x-gateway-destination-endpoint-subset"].CopyFrom(value)
    if request_mode is not None:
        msg.protocol_config.request_body_mode = request_mode
        msg.protocol_config.response_body_mode = request_mode
    if response_mode is not None:
        msg.protocol_config.request_body_mode = Mode.FULL_DUPLEX_STREAMED if request_mode is None else request_mode
        msg.protocol_config.response_body_mode = response_mode
    return msg


def body_msg(body: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def response_headers_msg(status: int = 200, content_type: str = "application/json", end_of_stream: bool = False):
    hm = pb.HttpHeaders(end_of_stream=end_of_stream)
    for k, v in ((":status", str(status)), ("content-type", content_type)):
        hm.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    return pb.ProcessingRequest(response_headers=hm)


def response_body_msg(body: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def chat_body(text: str = "hello", model: str = "m", **extra) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], **extra})


CHAT_HEADERS = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json",
                "x-request-id": "r1"}
