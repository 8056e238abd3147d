"""bench/extproc_load.py's client against a real `epp` on both ext_proc transports: its requests complete
with no errors and every routing decision names one of the pool's endpoints, however the streams end and
whatever the server's flow-control windows; and what goes wrong is counted as an error, never measured as a
completed request. Plus the replayed message sequence is Envoy's."""

from __future__ import annotations

import pytest

from bench.extproc_load import (
    ENVOY_FRAME,
    ExtProcClient,
    closed_loop,
    envoy_response_headers,
    make_template,
    open_loop,
)
from bench.overhead import make_bodies
from epp.extproc import protocol as p
from hack.extproc_messages import Mode, chat_body

BODIES = make_bodies(16, 8192)  # ~29.8 KB chat bodies, as the benchmark sends


@pytest.fixture(scope="module")
def pool(module_procs) -> list[str]:
    return module_procs.backends(4)[1]


@pytest.fixture(scope="module", params=["fast", "grpcio"])
def epp(request, module_procs, pool):
    """One epp per transport (the test id's suffix), scraping the pool every 50 ms."""
    proc = module_procs.epp(",".join(pool), "--transport", request.param, "--refresh-metrics-interval", "50ms",
                            name=f"epp-load-{request.param}")
    yield proc
    proc.stop()


async def connect(epp, pool: list[str], bodies: list[bytes] = BODIES, finish: str = "reset",
                  body_chunk: int = 0) -> ExtProcClient:
    templates = [make_template(b, body_chunk) for b in bodies]
    return await ExtProcClient.connect("127.0.0.1", epp.ports["grpc"], templates, pool, finish)


def assert_all_routed(stats, pool: list[str]) -> None:
    assert dict(stats.errors) == {}
    assert stats.completed == stats.started > 0
    assert stats.in_pool == stats.completed and stats.elsewhere == 0
    assert set(stats.chosen) <= set(pool)
    assert len(stats.decision) == stats.completed
    assert all(0 < d <= s for d, s in zip(stats.decision, stats.stream, strict=True))


def decode(payloads: list[bytes]) -> list[p.ProcessingRequest]:
    """DATA payloads -> the gRPC messages they carry."""
    data, out, pos = b"".join(payloads), [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append(p.ProcessingRequest.FromString(data[pos + 5 : pos + 5 + n]))
        pos += 5 + n
    return out


def test_the_replayed_request_is_envoys_message_sequence_in_16k_frames():
    body = BODIES[0]
    tpl = make_template(body)
    head = tpl.head[0] + b"r" * 36 + tpl.head[1]
    msgs = decode([head, *tpl.body])
    assert [m.WhichOneof("request") for m in msgs] == ["request_headers", "request_body", "request_body"]
    headers = p.header_map(msgs[0].request_headers)
    assert headers["content-length"] == str(len(body)) and headers["x-request-id"] == "r" * 36
    assert msgs[0].protocol_config.request_body_mode == Mode.FULL_DUPLEX_STREAMED
    assert msgs[0].protocol_config.response_body_mode == Mode.NONE
    assert (msgs[1].request_body.body, msgs[1].request_body.end_of_stream) == (body, False)
    assert (msgs[2].request_body.body, msgs[2].request_body.end_of_stream) == (b"", True)
    assert all(m.HasField("metadata_context") for m in msgs)
    assert all(len(x) <= ENVOY_FRAME for x in tpl.body) and len(tpl.body) == 3  # 16,384 + rest + the empty end
    response = envoy_response_headers("10.0.0.7:8000")  # as recorded: the envoy.lb metadata the EPP set
    assert p.header_map(response.response_headers)[":status"] == "200"
    lb = response.metadata_context.filter_metadata[p.DESTINATION_NAMESPACE]
    assert lb.fields[p.DESTINATION_HEADER].string_value == "10.0.0.7:8000"


@pytest.mark.integration
@pytest.mark.parametrize("finish", ["reset", "half-close"])
async def test_closed_and_open_loop_requests_complete_routed_to_pool_endpoints(epp, pool, finish):
    client = await connect(epp, pool, finish=finish)
    try:
        closed = await closed_loop(client, 8, 0.5)
        opened = await open_loop(client, 200, 0.25)
    finally:
        client.close()
    assert_all_routed(closed, pool)
    assert_all_routed(opened, pool)
    assert opened.started == 50


@pytest.mark.integration
async def test_bodies_larger_than_the_servers_windows_wait_for_window_updates(epp, pool):
    """5 MiB bodies in 1 MiB request_body messages, two at a time: more than either transport's initial
    stream window (4 MiB) and than the connection's first 64 KiB."""
    big = chat_body("x" * (5 << 20))
    client = await connect(epp, pool, [big], body_chunk=1 << 20)
    try:
        stats = await closed_loop(client, 2, 0.2, timeout=20.0)
    finally:
        client.close()
    assert_all_routed(stats, pool)
    assert client.window_stalls > 0  # some DATA did wait for the server's WINDOW_UPDATEs


@pytest.mark.integration
async def test_a_request_the_epp_rejects_is_an_error_not_a_completion(epp, pool):
    client = await connect(epp, pool, [b"this is not json"])
    try:
        stats = await open_loop(client, 200, 0.05)
    finally:
        client.close()
    assert stats.completed == 0
    assert dict(stats.errors) == {"immediate_response 400": stats.started}


@pytest.mark.integration
async def test_a_destination_outside_the_pool_is_counted_as_such(epp, pool):
    client = await connect(epp, ["10.255.255.1:8000"])
    try:
        stats = await open_loop(client, 200, 0.05)
    finally:
        client.close()
    assert dict(stats.errors) == {} and stats.completed == stats.started > 0
    assert (stats.in_pool, stats.elsewhere) == (0, stats.completed)
