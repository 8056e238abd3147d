"""A director over a static pool and decoded sessions, for session tests (the message builders live in
hack/extproc_messages.py, shared with the benchmarks)."""

from __future__ import annotations

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config import load_config
from epp.datastore.pool import Pool
from epp.datastore.static import parse_endpoints
from epp.director import Director
from epp.extproc.session import ExtProcSession
from epp.observability.metrics import EppMetrics
from epp.scheduling.registry import PluginHandle, load_builtin_plugins
from hack.extproc_messages import (  # noqa: F401  (re-exported for the tests)
    CHAT_HEADERS,
    body_msg,
    chat_body,
    headers_msg,
    response_body_msg,
    response_headers_msg,
)

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
