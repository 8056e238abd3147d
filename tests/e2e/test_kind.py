"""End to end on kind (hack/kind-e2e.sh): requests go client → Envoy → EPP (ext_proc) → a model-server
pod of the InferencePool; the pool follows the Deployment as it scales; a deleted EPP leader is replaced by a
standby; sheddable traffic is refused (429) while the pool is saturated and served when it is not.

epp-model-server names the pod that served a request in the `x-inference-pod` response header."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import pytest

from tests.e2e.conftest import Cluster

MODEL_SERVER_PODS = "app={}"
EPP_PODS = "inferencepool={}"


async def complete(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: str,
    max_tokens: int = 8,
    headers: dict | None = None,
) -> tuple[int, str | None, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    async with session.post(f"{url}/v1/completions", json=body, headers=headers or {}) as r:
        return r.status, r.headers.get("x-inference-pod"), await r.text()


def served_pods(cluster: Cluster, url: str, n: int) -> list[tuple[int, str | None]]:
    """n sequential completions with distinct prompts (no prefix affinity): (status, serving pod) each."""

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            out = []
            for _ in range(n):
                status, pod, _ = await complete(s, url, cluster.model, f"{uuid.uuid4()} tell me a story")
                out.append((status, pod))
            return out

    return asyncio.run(run())


def model_server_pods(cluster: Cluster) -> list[str]:
    return cluster.ready_pods(MODEL_SERVER_PODS.format(cluster.model_server))


def scale(cluster: Cluster, replicas: int) -> None:
    cluster.kubectl("scale", f"deployment/{cluster.model_server}", f"--replicas={replicas}")
    cluster.wait_until(
        f"{replicas} model-server pods are ready and no other exists",
        lambda: (
            len(model_server_pods(cluster))
            == replicas
            == len(cluster.pods(MODEL_SERVER_PODS.format(cluster.model_server)))
        ),
        timeout=180,
    )


def test_requests_route_through_envoy_to_pool_pods(cluster, envoy_url):
    pods = model_server_pods(cluster)
    assert len(pods) == 3
    results = served_pods(cluster, envoy_url, 30)
    assert [s for s, _ in results] == [200] * 30
    served = {pod for _, pod in results}
    assert served <= set(pods)
    assert len(served) >= 2  # no prefix to stick to: the load scorers spread the requests

    async def chat():
        async with aiohttp.ClientSession() as s:
            body = {"model": cluster.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            async with s.post(f"{envoy_url}/v1/chat/completions", json=body) as r:
                return r.status, r.headers.get("x-inference-pod")

    status, pod = asyncio.run(chat())
    assert status == 200 and pod in pods


@pytest.mark.timeout(600)
def test_scaling_the_model_servers_changes_where_traffic_goes(cluster, envoy_url):
    try:
        scale(cluster, 1)
        (survivor,) = model_server_pods(cluster)

        def only_survivor():
            results = served_pods(cluster, envoy_url, 10)
            return all(status == 200 and pod == survivor for status, pod in results)

        cluster.wait_until(f"every request is served by {survivor}", only_survivor, timeout=60)

        scale(cluster, 3)
        newcomers = set(model_server_pods(cluster)) - {survivor}
        assert len(newcomers) == 2

        def reaches_newcomers():
            results = served_pods(cluster, envoy_url, 20)
            return all(s == 200 for s, _ in results) and {pod for _, pod in results} & newcomers

        cluster.wait_until("requests reach the new pods", reaches_newcomers, timeout=60)
    finally:
        scale(cluster, 3)


@pytest.mark.timeout(600)
def test_deleting_the_epp_leader_fails_over_to_a_standby(cluster, envoy_url):
    selector = EPP_PODS.format(cluster.epp)
    assert len(cluster.pods(selector)) == 3
    (leader,) = cluster.wait_until(
        "exactly one EPP replica is ready",
        lambda: (r := cluster.ready_pods(selector)) and len(r) == 1 and r,
        timeout=120,
    )
    assert [s for s, _ in served_pods(cluster, envoy_url, 5)] == [200] * 5

    cluster.kubectl("delete", "pod", leader, "--wait=false")
    (new_leader,) = cluster.wait_until(
        "another EPP replica takes over",
        lambda: (r := cluster.ready_pods(selector)) and len(r) == 1 and r[0] != leader and r,
        timeout=120,
    )
    assert new_leader != leader

    def serving_again():
        return all(s == 200 for s, _ in served_pods(cluster, envoy_url, 5))

    cluster.wait_until("requests succeed through the new leader", serving_again, timeout=60)
    # The Deployment replaces the deleted replica, which stays a standby.
    cluster.wait_until(
        "three EPP replicas exist again", lambda: len(cluster.pods(selector)) == 3, timeout=120
    )
    assert cluster.ready_pods(selector) == [new_leader]


@pytest.mark.timeout(600)
def test_a_sheddable_model_is_shed_under_saturation(cluster, envoy_url):
    pods = model_server_pods(cluster)
    sheddable = [
        ("the Sheddable InferenceModel", {"model": cluster.sheddable_model, "headers": {}}),
        (
            "a negative-priority InferenceObjective",
            {
                "model": cluster.model,
                "headers": {"x-gateway-inference-objective": cluster.sheddable_objective},
            },
        ),
    ]

    async def run():
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
            # Idle pool: sheddable requests are served.
            for what, req in sheddable:
                status, _, text = await complete(s, envoy_url, req["model"], "idle?", headers=req["headers"])
                assert status == 200, f"{what} refused on an idle pool: {status} {text}"

            # Saturate: each pod runs 2 sequences (--max-num-seqs 2) and queues the rest, well past the
            # saturation detector's queue threshold (5 waiting per endpoint).
            load = [
                asyncio.create_task(
                    complete(s, envoy_url, cluster.model, f"{uuid.uuid4()} long story", max_tokens=300)
                )
                for _ in range(len(pods) * 10)
            ]
            refused: dict[str, int] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(refused) < len(sheddable):
                await asyncio.sleep(0.5)
                for what, req in sheddable:
                    if what in refused:
                        continue
                    # The EPP sheds at once; a request it admits waits in a server queue: give up on it.
                    try:
                        status, _, _ = await asyncio.wait_for(
                            complete(s, envoy_url, req["model"], "now?", headers=req["headers"]), timeout=2
                        )
                    except TimeoutError:
                        continue
                    if status == 429:
                        refused[what] = status
            critical = await asyncio.gather(*load)
            return refused, critical

    refused, critical = asyncio.run(run())
    assert set(refused) == {what for what, _ in sheddable}, f"not shed under saturation: {refused}"
    # The critical model's requests were queued by the servers, not refused by the EPP.
    assert [status for status, _, _ in critical] == [200] * len(critical)
