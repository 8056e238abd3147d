"""The plain-Envoy manifest (manifests/envoy/envoy.yaml) run for real on loopback: its Envoy configuration,
with only the addresses changed to this machine's, in front of a TLS-serving `epp` and stand-in model
servers. Requests reach the endpoint the EPP picked, streamed or not, and the readiness listener answers."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
import yaml

from hack.localstack import envoy_binary, free_port, wait_port

pytestmark = pytest.mark.integration

ENVOY_MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "envoy" / "envoy.yaml"


def local_envoy_config(epp_port: int, listen: int, ready: int, admin: int) -> str:
    """The manifest's Envoy config with the cluster addresses replaced by loopback ones: the EPP Service
    becomes 127.0.0.1:<epp_port>, the listeners bind 127.0.0.1 on free ports."""
    (cm,) = [d for d in yaml.safe_load_all(ENVOY_MANIFEST.read_text()) if d and d["kind"] == "ConfigMap"]
    cfg = yaml.safe_load(cm["data"]["envoy.yaml"])
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    ports = {"inference": listen, "ready": ready}
    for listener in cfg["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": ports[listener["name"]],
        }
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] == "ext_proc":
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": epp_port}
        if cluster["name"] == "admin":
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"]["socket_address"]["port_value"] = admin
    return yaml.safe_dump(cfg, sort_keys=False)


@pytest.fixture
def manifest_stack(procs, tmp_path):
    _, backends = procs.backends(2)
    epp = procs.epp(",".join(backends), secure=True)  # the chart's default: --secure-serving
    listen, ready, admin = free_port(), free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(local_envoy_config(epp.ports["grpc"], listen, ready, admin))
    envoy = procs.spawn(
        "envoy",
        [
            str(envoy_binary()),
            "-c",
            str(config),
            "--log-level",
            "warning",
            "--base-id",
            str(listen),
            "--concurrency",
            "1",
            "--disable-hot-restart",
        ],
    )
    wait_port("127.0.0.1", listen, proc=envoy.popen, log=envoy.log)
    wait_port("127.0.0.1", ready, proc=envoy.popen, log=envoy.log)
    return {
        "backends": backends,
        "url": f"http://127.0.0.1:{listen}",
        "ready": f"http://127.0.0.1:{ready}/ready",
    }


async def test_the_manifest_envoy_routes_through_the_tls_epp_to_the_picked_endpoint(manifest_stack):
    served = set()
    async with aiohttp.ClientSession() as s:
        async with s.get(manifest_stack["ready"]) as r:
            assert r.status == 200
        for i in range(12):
            body = {"model": "m", "prompt": f"request {i}: " + "a long shared prompt " * 20, "max_tokens": 4}
            async with s.post(manifest_stack["url"] + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                answer = json.loads(await r.read())
                assert r.headers["x-served-by"] == answer["served_by"]
                assert answer["model"] == "m"
                served.add(answer["served_by"])
    assert served and served <= set(manifest_stack["backends"])


async def test_the_manifest_envoy_streams_responses(manifest_stack):
    body = {"model": "m", "prompt": "stream me", "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            manifest_stack["url"] + "/v1/completions", json=body, headers={"x-events": "4"}
        ) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            text = (await r.read()).decode()
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) >= 4 and events[-1] == "data: [DONE]"
