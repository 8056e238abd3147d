"""Builders for ext_proc messages and a director over a static pool, for session tests."""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from epp.config import load_config
from epp.datastore.pool import Pool
from epp.datastore.static import parse_endpoints
from epp.director import Director
from epp.extproc.session import ExtProcSession
from epp.observability.metrics import EppMetrics
from epp.scheduling.registry import PluginHandle, load_builtin_plugins

Mode = processing_mode_pb2.ProcessingMode

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: %d}
dataLayer: {sources: []}
"""


def make_director(endpoints: str = "10.0.0.1:8000,10.0.0.2:8000,10.0.0.3:8000", fallbacks: int = 1,
                  objectives: dict[str, int] | None = None) -> Director:
    load_builtin_plugins()
    pool = Pool()
    pool.replace(parse_endpoints(endpoints))
    config = load_config(CONFIG % fallbacks, "test", PluginHandle(pool))
    return Director(config, pool, EppMetrics(pool), objectives or {})


def headers_msg(headers: dict[str, str], end_of_stream: bool = False, subset: list[str] | None = None,
                request_mode: int | None = None) -> pb.ProcessingRequest:
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


def destination_of(resp: pb.ProcessingResponse) -> tuple[str, str]:
    """(header value, envoy.lb metadata value) of a routing answer."""
    common = (resp.request_headers.response if resp.HasField("request_headers") else resp.request_body.response)
    header = next(h.header.raw_value.decode() for h in common.header_mutation.set_headers
                  if h.header.key == "x-gateway-destination-endpoint")
    meta = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value
    return header, meta


class DecodedSession(ExtProcSession):
    """An ExtProcSession whose answers are decoded back into messages (the real one may emit serialized
    bytes on the hot path), so tests read every answer the same way."""

    __slots__ = ()

    def handle(self, msg):
        return [pb.ProcessingResponse.FromString(r) if isinstance(r, bytes) else r for r in super().handle(msg)]
