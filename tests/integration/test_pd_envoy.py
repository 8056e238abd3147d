"""Disaggregated prefill/decode end to end: real Envoy, `epp` with the pd profile, one prefill pod and two
decode pods (epp-model-server --role prefill|decode; decode pods run the sidecar). A long uncached prompt
takes the P/D path (the prefill leg on the prefill pod, the decode leg on a decode pod, both in their
metrics); a short prompt, and the long one once a decode pod caches it, are served aggregated."""

from __future__ import annotations

import json
import sys
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hack.localstack import free_port, wait_port

pytestmark = pytest.mark.integration

PREFILL, DECODES = "127.0.0.180", ["127.0.0.181", "127.0.0.182"]
LONG = " ".join(f"clause {i}: the archive lists every shipment by port, date and weight." for i in range(60))


def counters(hostport: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{hostport}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def legs(pods: dict[str, str]) -> dict[str, float]:
    """P/D legs so far: prefill legs on the prefill pod, decode legs summed over the decode pods."""
    c = {role_host: counters(hp) for role_host, hp in pods.items()}
    return {"prefill": c[PREFILL]["epp_model_server_pd_prefill_legs_total"],
            "decode": sum(c[h]["epp_model_server_pd_decode_legs_total"] for h in DECODES),
            "decode_on_prefill_pod": c[PREFILL]["epp_model_server_pd_decode_legs_total"]}


@pytest.fixture(scope="module")
def pd_stack(module_procs):
    pods: dict[str, str] = {}
    for host, role in [(PREFILL, "prefill"), *((h, "decode") for h in DECODES)]:
        port = free_port(host)
        proc = module_procs.spawn(f"pod-{role}-{host}", [
            sys.executable, "-m", "epp_model_server", "--host", host, "--port", str(port), "--engine", "sim",
            "--model", "m", "--role", role, "--time-scale", "10", "--log-level", "info"])
        wait_port(host, port, proc=proc.popen, log=proc.log)
        pods[host] = f"{host}:{port}"
    endpoints = ",".join(f"{pods[h]};llm-d.ai/role={'prefill' if h == PREFILL else 'decode'}" for h in pods)
    epp = module_procs.epp(endpoints, "--config-file", "epp/profiles/pd.yaml")
    envoy = module_procs.envoy(epp.ports["grpc"], response_body_mode="NONE")
    return {"pods": pods, "url": f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"}


async def complete(url: str, prompt: str) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 4}
    async with aiohttp.ClientSession() as s, s.post(url, data=json.dumps(body),
                                                    headers={"content-type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_long_uncached_prompts_take_the_pd_path_short_and_cached_ones_do_not(pd_stack):
    pods, url = pd_stack["pods"], pd_stack["url"]
    assert legs(pods) == {"prefill": 0, "decode": 0, "decode_on_prefill_pod": 0}

    await complete(url, "What is the capital of France?")
    assert legs(pods) == {"prefill": 0, "decode": 0, "decode_on_prefill_pod": 0}  # short: aggregated

    out = await complete(url, LONG)
    assert out["usage"]["completion_tokens"] == 4
    assert legs(pods) == {"prefill": 1, "decode": 1, "decode_on_prefill_pod": 0}  # long and uncached: P/D

    await complete(url, LONG + " Which port handled the most weight?")
    # the decode pod that received the prompt's KV caches it now: served there, aggregated
    assert legs(pods) == {"prefill": 1, "decode": 1, "decode_on_prefill_pod": 0}
    prefill = counters(pods[PREFILL])
    assert prefill["vllm:generation_tokens_total"] == 1  # the prefill pod only ever ran the one prefill leg
