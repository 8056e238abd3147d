"""A gateway whose ext_proc filter sends no response bodies (response_body_mode NONE), which is what the EPP
recommends when no plugin reads them: Envoy keeps the EPP's stream open until the response ends, so the
EPP's in-flight count still follows the whole response, and ends it as completed, not aborted."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


async def test_in_flight_follows_the_whole_streamed_response_and_it_ends_completed(procs):
    _, backends = procs.backends(2)
    epp = procs.epp(",".join(backends))
    envoy = procs.envoy(epp.ports["grpc"], response_body_mode="NONE")
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"
    body = json.dumps({"model": "m", "prompt": "hello", "stream": True}).encode()
    headers = {"content-type": "application/json", "x-events": "8", "x-event-delay-ms": "150"}
    port = epp.ports["metrics"]
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=body, headers=headers) as r:
            assert r.status == 200
            first = await r.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            during = total(metrics(port), "inference_extension_endpoint_in_flight_requests")
            rest = await r.content.read()
    assert during == 1  # the response is still streaming: the request still counts against its endpoint
    assert rest.endswith(b"data: [DONE]\n\n") and rest.count(b"data: ") == 9  # 7 more events, usage, DONE
    for _ in range(50):  # Envoy closes the EPP's stream right after the response
        after = metrics(port)
        if total(after, "inference_extension_endpoint_in_flight_requests") == 0:
            break
        await asyncio.sleep(0.05)
    assert total(after, "inference_extension_endpoint_in_flight_requests") == 0
    assert total(after, "inference_objective_request_total") == 1
    assert total(after, "inference_objective_request_error_total") == 0  # completed, not "Aborted"
    assert total(after, "inference_objective_request_duration_seconds_count") == 1
