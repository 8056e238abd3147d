"""`--transport` selects the ext_proc server in EppApp: the fast one serves the real ExtProcSession (a routing
answer for a chat request, seen by grpcio's client), health stays on grpcio, and stop() closes it."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.app import EppApp, ServeOptions
from epp.cli import build_parser
from epp.config import load_config
from epp.datastore.pool import Pool
from epp.datastore.static import parse_endpoints
from epp.extproc import protocol as p
from epp.scheduling.registry import PluginHandle, load_builtin_plugins
from hack.extproc_messages import CHAT_HEADERS, body_msg, chat_body, headers_msg
from tests.unit.extproc_helpers import destination_of

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
dataLayer: {sources: []}
"""


def make_app(transport: str) -> EppApp:
    load_builtin_plugins()
    pool = Pool()
    pool.replace(parse_endpoints("10.0.0.1:8000,10.0.0.2:8000"))
    config = load_config(CONFIG, "test", PluginHandle(pool))
    options = ServeOptions(host="127.0.0.1", grpc_port=0, grpc_health_port=0, metrics_port=0, secure_serving=False,
                           transport=transport)
    return EppApp(config, pool, options)


@pytest.mark.parametrize("argv,expected", [([], "fast"), (["--transport", "fast"], "fast"),
                                           (["--transport=grpcio"], "grpcio")])
def test_the_transport_flag(argv, expected):
    assert build_parser().parse_args(argv).transport == expected


def test_an_unknown_transport_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--transport", "h3"])
    assert "invalid choice" in capsys.readouterr().err


async def test_an_unknown_transport_in_the_options_says_what_to_use():
    app = make_app("quic")
    with pytest.raises(ValueError, match="use 'fast' or 'grpcio'"):
        await app.start()


@pytest.mark.parametrize("transport", ["fast", "grpcio"])
async def test_the_app_serves_ext_proc_on_the_chosen_transport(transport):
    app = make_app(transport)
    await app.start()
    try:
        assert (app._h2 is not None) == (transport == "fast") and (app._grpc is not None) == (transport == "grpcio")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports['grpc']}") as ch:
            call = ch.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                                    request_serializer=p.ProcessingRequest.SerializeToString,
                                    response_deserializer=p.ProcessingResponse.FromString)

            async def requests():
                yield headers_msg(CHAT_HEADERS)
                yield body_msg(chat_body("hi"), True)

            responses = [r async for r in call(requests())]
        header, metadata = destination_of(responses[0])
        assert header == metadata and header in ("10.0.0.1:8000", "10.0.0.2:8000")
        assert responses[-1].request_body.response.body_mutation.streamed_response.body == chat_body("hi")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports['health']}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="liveness"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop(0)
    if transport == "fast":
        assert not app._h2.connections
