"""The Kubernetes mode, with the real `kubernetes` client against the tests' own API server (tests/kubeapi.py).

In-process: the watchers follow pods that appear, turn unready, terminate and are deleted; the pool's selector and
ports changing; the pool deleted and created again; a watch broken by 410 with events lost meanwhile; bookmarks;
a missing CRD and RBAC refusals (with the messages users get); standalone mode; objectives and InferenceModels
reaching the Director's requests; leader election between two replicas. Every change must show within a second.

Real processes: `epp --pool-name` behind Envoy routes to the pool's pods and applies InferenceModel rewrites and
priorities; two `epp --ha-enable-leader-election` elect one ready leader and fail over when it stops or dies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import sys
import time
from collections.abc import Callable

import aiohttp
import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from epp.config import load_config
from epp.datastore.models import ModelPolicy
from epp.datastore.pool import Pool
from epp.director import Director
from epp.errors import RequestError
from epp.kube.client import collection_lister, connect
from epp.kube.leader import LeaderElectionOptions, lease_name
from epp.kube.objects import LEASES, MODELS, OBJECTIVES, PODS, POOL_V1, POOL_V1ALPHA2, PoolSpec
from epp.kube.reflector import Backoff, Reflector
from epp.kube.runtime import KubeOptions, KubeRuntime
from epp.kube.watchers import WatchOptions
from epp.observability.metrics import EppMetrics
from epp.scheduling.registry import PluginHandle, load_builtin_plugins
from hack.localstack import BIN, HERE, Processes, free_port, wait_port
from tests.kubeapi import FakeKubeAPI

pytestmark = pytest.mark.integration

pod = FakeKubeAPI.pod
inference_pool = FakeKubeAPI.inference_pool
WITHIN = 1.0  # every change must reach the EPP within this many seconds


async def eventually(check: Callable[[], object], what: str, timeout: float = WITHIN) -> float:
    """Wait until check() is truthy; fail naming `what` after `timeout` seconds. Returns the time it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)
    return loop.time() - start


def names(pool: Pool) -> set[str]:
    return {e.name for e in pool.endpoints}


class Kube:
    """The fake API server, a client of it, and the runtimes started in a test (stopped at the end)."""

    def __init__(self, api: FakeKubeAPI, client, kubeconfig) -> None:
        self.api = api
        self.client = client
        self.kubeconfig = kubeconfig
        self.runtimes: list[KubeRuntime] = []

    async def start(self, pool_name: str = "pool", *, election: LeaderElectionOptions | None = None,
                    registry: CollectorRegistry | None = None, **watch) -> KubeRuntime:
        watch.setdefault("watch_timeout_s", 30.0)
        options = KubeOptions(WatchOptions("default", pool_name, backoff_initial_s=0.05, backoff_cap_s=0.2, **watch),
                              leader_election=election)
        rt = KubeRuntime(Pool(pool_name), ModelPolicy(), options, registry=registry, api_client=self.client)
        await rt.start()
        self.runtimes.append(rt)
        return rt


@pytest.fixture
async def kube(tmp_path):
    api = await FakeKubeAPI().start()
    api.install_crd(POOL_V1)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    client = await connect(str(kubeconfig))
    k = Kube(api, client, kubeconfig)
    yield k
    for rt in reversed(k.runtimes):
        await rt.stop()
    await client.close()
    await api.stop()


# ---------------------------------------------------------------------------------------------- pods


async def test_pods_appearing_turning_unready_terminating_and_deleted_are_followed_within_a_second(kube):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    rt = await kube.start()
    await eventually(rt.ready, "ready with an empty pool")
    assert names(rt.pool) == set()
    steps = [
        ("a pod appears", lambda: api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"})), {"a-rank-0"}),
        ("a second pod appears", lambda: api.apply(PODS, pod("b", "10.0.0.2", {"app": "vllm"})),
         {"a-rank-0", "b-rank-0"}),
        ("a pod of another app appears", lambda: api.apply(PODS, pod("x", "10.0.0.9", {"app": "other"})),
         {"a-rank-0", "b-rank-0"}),
        ("b turns unready", lambda: api.apply(PODS, pod("b", "10.0.0.2", {"app": "vllm"}, ready=False)),
         {"a-rank-0"}),
        ("b is ready again", lambda: api.apply(PODS, pod("b", "10.0.0.2", {"app": "vllm"})),
         {"a-rank-0", "b-rank-0"}),
        ("a starts terminating", lambda: api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}, deleting=True)),
         {"b-rank-0"}),
        ("a is deleted", lambda: api.delete(PODS, "a"), {"b-rank-0"}),
        ("b's labels stop matching", lambda: api.apply(PODS, pod("b", "10.0.0.2", {"app": "moved"})), set()),
        ("a pod comes back under the same name", lambda: api.apply(PODS, pod("a", "10.0.0.3", {"app": "vllm"})),
         {"a-rank-0"}),
    ]
    for what, change, expected in steps:
        change()
        await eventually(lambda expected=expected: names(rt.pool) == expected, f"{what}: pool == {expected}")
    assert rt.pool.get("a-rank-0").address == "10.0.0.3"
    assert len(api.calls("list", PODS)) == 1  # all of it by watch events


async def test_an_endpoint_that_stays_keeps_its_object_and_so_its_metrics_and_load(kube):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    rt = await kube.start()
    await eventually(lambda: names(rt.pool) == {"a-rank-0"}, "a listed")
    ep = rt.pool.get("a-rank-0")
    ep.in_flight = 3
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm", "new-label": "x"}))
    await eventually(lambda: rt.pool.get("a-rank-0").labels.get("new-label") == "x", "label update")
    assert rt.pool.get("a-rank-0") is ep and ep.in_flight == 3


async def test_selector_change_re_lists_pods_with_the_new_selector(kube):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "old"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "old"}))
    api.apply(PODS, pod("b", "10.0.0.2", {"app": "new"}))
    rt = await kube.start()
    await eventually(lambda: names(rt.pool) == {"a-rank-0"}, "old selector")
    assert api.calls("list", PODS)[-1]["labelSelector"] == "app=old"
    api.apply(POOL_V1, inference_pool("pool", {"app": "new"}, [8000]))
    await eventually(lambda: names(rt.pool) == {"b-rank-0"}, "new selector")
    assert api.calls("list", PODS)[-1]["labelSelector"] == "app=new"
    await eventually(lambda: api.open_watches(PODS) == 1, "only the new selector's pod watch stays open")
    assert api.calls("watch", PODS)[-1]["labelSelector"] == "app=new"


@pytest.mark.parametrize("ports,expected", [
    ([8000, 8001], {("a-rank-0", 8000), ("a-rank-1", 8001)}),
    ([9000], {("a-rank-0", 9000)}),
    ([8001, 8000, 8002], {("a-rank-0", 8001), ("a-rank-1", 8000), ("a-rank-2", 8002)}),
])
async def test_target_ports_change_gives_one_endpoint_per_port(kube, ports, expected):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    rt = await kube.start()
    await eventually(lambda: names(rt.pool) == {"a-rank-0"}, "one port")
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, ports))
    await eventually(lambda: {(e.name, e.port) for e in rt.pool.endpoints} == expected, f"ports {ports}")
    assert len(api.calls("list", PODS)) == 1  # the selector did not change: no new pod list


async def test_a_deleted_pool_empties_the_pool_and_readiness_until_it_is_created_again(kube):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    rt = await kube.start()
    await eventually(lambda: rt.ready() and names(rt.pool) == {"a-rank-0"}, "synced")
    api.delete(POOL_V1, "pool")
    await eventually(lambda: not rt.ready() and not rt.pool.endpoints, "pool deleted: empty and not ready")
    assert "not found" in rt.status()
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    await eventually(lambda: rt.ready() and names(rt.pool) == {"a-rank-0"}, "pool created again")


async def test_a_pool_that_does_not_exist_yet_is_waited_for(kube):
    api = kube.api
    rt = await kube.start()
    await eventually(lambda: "InferencePool default/pool not found" in rt.status(), "the wait is explained")
    assert not rt.ready()
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    await eventually(lambda: rt.ready() and names(rt.pool) == {"a-rank-0"}, "pool created")


# ---------------------------------------------------------------------------------------------- watch semantics


async def test_a_watch_broken_by_410_re_lists_and_catches_the_changes_it_lost(kube):
    api = kube.api
    registry = CollectorRegistry()
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    api.apply(PODS, pod("b", "10.0.0.2", {"app": "vllm"}))
    rt = await kube.start(registry=registry)
    await eventually(lambda: names(rt.pool) == {"a-rank-0", "b-rank-0"}, "synced")
    with api.silently():  # events no watch will ever hear
        api.delete(PODS, "a")
        api.apply(PODS, pod("c", "10.0.0.3", {"app": "vllm"}))
        api.apply(PODS, pod("b", "10.0.0.2", {"app": "vllm"}, ready=False))
    assert names(rt.pool) == {"a-rank-0", "b-rank-0"}
    api.expire_watches()
    await eventually(lambda: names(rt.pool) == {"c-rank-0"}, "re-listed after 410")
    assert len(api.calls("list", PODS)) == 2
    assert registry.get_sample_value("inference_extension_kube_relists_total",
                                     {"resource": "pods", "reason": "gone"}) == 1
    api.apply(PODS, pod("d", "10.0.0.4", {"app": "vllm"}))  # and the new watch works
    await eventually(lambda: names(rt.pool) == {"c-rank-0", "d-rank-0"}, "watching again")


async def test_a_watch_ended_by_its_timeout_resumes_from_the_last_bookmark_without_a_list(kube):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    rt = await kube.start(watch_timeout_s=1.0)  # the server ends each watch after 1 s
    await eventually(lambda: api.open_watches(PODS) == 1, "pod watch open")
    first = api.calls("watch", PODS)[-1]
    assert first["allowWatchBookmarks"] == "true" and first["timeoutSeconds"] == "1"
    api.apply(PODS, pod("elsewhere", "10.9.9.9", {"app": "vllm"}, namespace="other"))  # moves the version on
    bookmark = api.get(PODS, "elsewhere", "other")["metadata"]["resourceVersion"]
    assert first["resourceVersion"] != bookmark
    api.send_bookmarks()
    await eventually(lambda: any(q.get("resourceVersion") == bookmark for q in api.calls("watch", PODS)),
                     "a watch resumed from the bookmark's resourceVersion", timeout=2.5)
    assert len(api.calls("list", PODS)) == 1
    api.apply(PODS, pod("b", "10.0.0.2", {"app": "vllm"}))
    await eventually(lambda: names(rt.pool) == {"a-rank-0", "b-rank-0"}, "events after the resume")


async def test_a_failing_handler_does_not_end_the_watch(kube):
    """A bug while handling one list must not stop the reflector: it backs off and lists again."""
    api = kube.api
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    seen: list[set[str]] = []

    class Flaky:
        calls = 0

        def replace(self, items):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise KeyError("boom")
            seen.append({i["metadata"]["name"] for i in items})

        def event(self, kind, obj):
            seen.append({obj["metadata"]["name"]})

    errors: list[Exception] = []
    reflector = Reflector(PODS, "default", collection_lister(kube.client, PODS, "default"), Flaky(),
                          backoff=Backoff(0.01, 0.05), on_error=lambda r, exc: errors.append(exc))
    task = asyncio.get_running_loop().create_task(reflector.run())
    try:
        await eventually(lambda: seen == [{"a"}], "listed again after the handler failed")
        assert [type(e) for e in errors] == [KeyError] and reflector.last_error is None  # reported, then cleared
        api.apply(PODS, pod("b", "10.0.0.2", {"app": "vllm"}))
        await eventually(lambda: seen[-1] == {"b"}, "and watching")
    finally:
        task.cancel()


# ---------------------------------------------------------------------------------------------- errors


async def test_a_missing_inference_pool_crd_is_explained_and_installing_it_later_is_picked_up(kube):
    api = kube.api
    api.uninstall_crd(POOL_V1)
    rt = await kube.start()
    await eventually(lambda: "CRD" in rt.status(), "the missing CRD is reported")
    message = rt.status()
    assert "InferencePool CRD (inferencepools.inference.networking.k8s.io/v1) is not installed" in message
    assert "--pool-group inference.networking.x-k8s.io" in message and "--endpoint-selector" in message
    assert not rt.ready()
    api.install_crd(POOL_V1)
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    await eventually(lambda: rt.ready() and names(rt.pool) == {"a-rank-0"}, "synced once the CRD exists")


@pytest.mark.parametrize("verb,resource,needle", [
    ("list", PODS, "RBAC forbids list pods/v1 in namespace 'default'"),
    ("watch", PODS, "RBAC forbids watch pods/v1 in namespace 'default'"),
    ("list", POOL_V1, "RBAC forbids list inferencepools.inference.networking.k8s.io/v1"),
])
async def test_rbac_refusals_say_what_is_forbidden_and_what_to_grant_and_recover_once_granted(
        kube, verb, resource, needle):
    api = kube.api
    registry = CollectorRegistry()
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    api.forbid(verb, resource)
    rt = await kube.start(registry=registry)
    await eventually(lambda: needle in rt.status(), f"status mentions {needle!r}")
    message = rt.status()
    assert 'cannot ' + verb in message and "grant the EPP's service account get/list/watch" in message
    assert registry.get_sample_value("inference_extension_kube_api_errors_total",
                                     {"resource": resource.plural, "code": "403"}) >= 1
    if verb != "watch":  # a refused watch still leaves the listed pool usable
        assert not rt.ready()
    api.allow(verb, resource)
    await eventually(lambda: names(rt.pool) == {"a-rank-0"} and "synced" in rt.status(), "recovered")


async def test_optional_crds_missing_do_not_block_readiness_and_say_what_is_lost(kube):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    rt = await kube.start()
    await eventually(rt.ready, "ready without InferenceObjective/InferenceModel CRDs")
    objectives = rt.watcher.reflectors["inferenceobjectives"]
    await eventually(lambda: objectives.last_error is not None, "objective CRD missing noticed")
    assert "InferenceObjective CRD" in objectives.last_error and "optional" in objectives.last_error


async def test_v1alpha2_pool_with_pool_group(kube):
    api = kube.api
    api.install_crd(POOL_V1ALPHA2)
    api.apply(POOL_V1ALPHA2, inference_pool("legacy", {"app": "vllm"}, [8000],
                                            api_version="inference.networking.x-k8s.io/v1alpha2"))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    rt = await kube.start("legacy", pool_group="inference.networking.x-k8s.io")
    await eventually(lambda: names(rt.pool) == {"a-rank-0"}, "v1alpha2 pool followed")
    assert rt.pool.get("a-rank-0").hostport == "10.0.0.1:8000"


async def test_standalone_endpoint_selector_mode_needs_no_crd(kube):
    api = kube.api
    api.uninstall_crd(POOL_V1)
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    rt = await kube.start("standalone", standalone=PoolSpec.of({"app": "vllm"}, [8000, 8001]),
                          watch_objectives=False)
    await eventually(lambda: rt.ready() and names(rt.pool) == {"a-rank-0", "a-rank-1"}, "standalone synced")
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}, ready=False))
    await eventually(lambda: not rt.pool.endpoints, "unready pod leaves")
    assert not any("inferencepools" in path for _, path, _ in api.requests)


# ---------------------------------------------------------------------------------------------- Director

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
dataLayer: {sources: []}
"""


def route(director: Director, model: str, objective: str | None = None):
    headers = {":path": "/v1/completions"}
    if objective:
        headers["x-gateway-inference-objective"] = objective
    body = orjson.dumps({"model": model, "prompt": "hello", "max_tokens": 3})
    routed = director.route(headers, body, "r1", None, 0.0)
    director.complete(routed)
    return routed


async def test_inference_models_and_objectives_reach_the_directors_requests(kube):
    api = kube.api
    for crd in (OBJECTIVES, MODELS):
        api.install_crd(crd)
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    ref = {"name": "pool", "group": "inference.networking.k8s.io"}
    api.apply(OBJECTIVES, {"metadata": {"name": "batch"}, "spec": {"priority": -1, "poolRef": ref}})
    api.apply(OBJECTIVES, {"metadata": {"name": "other-pool"}, "spec": {"priority": 9, "poolRef": {"name": "x"}}})
    api.apply(MODELS, {"metadata": {"name": "food"}, "spec": {
        "modelName": "food-review", "criticality": "Critical", "poolRef": {"name": "pool"},
        "targetModels": [{"name": "food-review-1", "weight": 1}]}})
    rt = await kube.start()
    load_builtin_plugins()
    config = load_config(CONFIG, "test", PluginHandle(rt.pool))
    director = Director(config, rt.pool, EppMetrics(rt.pool), policy=rt.policy)
    await eventually(lambda: rt.ready() and "food-review" in rt.policy.models and "batch" in rt.policy.objectives,
                     "objectives and models watched")

    routed = route(director, "food-review")
    assert (routed.request.priority, routed.request.target_model) == (1, "food-review-1")
    assert orjson.loads(routed.body)["model"] == "food-review-1"
    # never-scraped endpoints count as saturated, so sheddable requests are refused
    with pytest.raises(RequestError) as exc:
        route(director, "food-review", objective="batch")
    assert exc.value.status == 429
    with pytest.raises(RequestError) as exc:
        route(director, "unlisted-model")  # a pool with InferenceModels sheds unlisted models (v0.5 rule)
    assert exc.value.status == 429
    # an objective of another pool is not ours: the InferenceModel's criticality applies, not its priority 9
    assert route(director, "food-review", objective="other-pool").request.priority == 1

    api.apply(OBJECTIVES, {"metadata": {"name": "batch"}, "spec": {"priority": 3, "poolRef": ref}})
    api.apply(MODELS, {"metadata": {"name": "food"}, "spec": {
        "modelName": "food-review", "criticality": "Sheddable", "poolRef": {"name": "pool"},
        "targetModels": [{"name": "food-review-2", "weight": 1}]}})
    await eventually(lambda: rt.policy.objectives.get("batch") == 3 and
                     rt.policy.models["food-review"].priority == -1, "updates reach the policy")
    routed = route(director, "food-review", objective="batch")
    assert (routed.request.priority, routed.request.target_model) == (3, "food-review-2")
    api.delete(MODELS, "food")
    await eventually(lambda: not rt.policy.models, "deleted InferenceModel")
    routed = route(director, "food-review")
    assert (routed.request.priority, routed.request.target_model) == (0, "food-review")


# ---------------------------------------------------------------------------------------------- leader election

FAST = {"lease_duration_s": 1.0, "renew_deadline_s": 0.8, "retry_period_s": 0.2}


def election(identity: str) -> LeaderElectionOptions:
    return LeaderElectionOptions("default", lease_name("default", "pool"), identity, **FAST)


async def test_two_replicas_elect_one_ready_leader_and_the_other_takes_over_when_it_stops(kube):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    one = await kube.start(election=election("one"))
    two = await kube.start(election=election("two"))
    await eventually(lambda: one.ready() != two.ready(), "exactly one replica is ready", timeout=2.0)
    await asyncio.sleep(0.5)  # and it stays so through several renewals
    assert one.ready() != two.ready()
    assert one.pool.synced and two.pool.synced  # the standby keeps its pool warm
    leader, standby = (one, two) if one.ready() else (two, one)
    lease = api.get(LEASES, lease_name("default", "pool"))
    assert lease["spec"]["holderIdentity"] == leader.options.leader_election.identity
    assert lease["metadata"]["name"] == "epp-default-pool.gateway-api-inference-extension.sigs.k8s.io"

    await leader.stop()
    kube.runtimes.remove(leader)
    took = await eventually(standby.ready, "the standby takes over after the leader released the Lease")
    assert took < WITHIN
    lease = api.get(LEASES, lease_name("default", "pool"))
    assert lease["spec"]["holderIdentity"] == standby.options.leader_election.identity
    assert lease["spec"]["leaseTransitions"] >= 1


async def test_lease_updates_race_with_optimistic_concurrency(kube):
    """Three candidates at once on a fresh Lease: one wins, the others get 409s and stay standby."""
    kube.api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    rts = [await kube.start(election=election(f"r{i}")) for i in range(3)]
    await eventually(lambda: sum(r.ready() for r in rts) == 1, "one leader of three", timeout=2.0)
    await asyncio.sleep(0.6)
    assert sum(r.ready() for r in rts) == 1


# ---------------------------------------------------------------------------------------------- real processes


def health(port: int, service: str = "readiness") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError as exc:
            return f"error {exc.code().name}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


async def astatus(port: int, service: str = "readiness") -> str:
    return await asyncio.to_thread(health, port, service)


async def eventually_async(check, what: str, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return loop.time() - start


def spawn_epp(procs, kubeconfig, *extra: str, name: str = "epp"):
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    args = [str(BIN / "epp"), "--host", "127.0.0.1", "--grpc-port", str(ports["grpc"]), "--grpc-health-port",
            str(ports["health"]), "--metrics-port", str(ports["metrics"]), "--secure-serving=false",
            "--pool-name", "pool", "--pool-namespace", "default", "--kubeconfig", str(kubeconfig), *extra]
    proc = procs.spawn(name, args)
    proc.ports = ports
    return proc


async def wait_listening(proc, port: int) -> None:
    await asyncio.to_thread(wait_port, "127.0.0.1", port, 20.0, proc.popen, proc.log)


def stub_pods(procs, ips: list[str]) -> int:
    """Stub model servers on one common port of several loopback addresses, as pods share targetPorts."""
    for _ in range(50):
        port = free_port(ips[0])
        try:
            for ip in ips[1:]:
                with socket.socket() as sock:
                    sock.bind((ip, port))
            break
        except OSError:
            continue
    proc = procs.spawn("pods", [sys.executable, str(HERE / "stub_backend.py"),
                                "--listen", ",".join(f"{ip}:{port}" for ip in ips)])
    for ip in ips:
        wait_port(ip, port, proc=proc.popen, log=proc.log)
    return port


async def terminate(proc, sig: int = signal.SIGTERM) -> None:
    """Signal a process and wait for it without blocking the loop (the fake API server runs on it, and an EPP
    releases its Lease through it on the way out)."""
    proc.popen.send_signal(sig)
    await asyncio.to_thread(proc.popen.wait, 15)


@pytest.fixture
async def procs(kube, tmp_path):
    """Processes of one test, stopped while the fake API server still answers (so that EPPs exit cleanly)."""
    p = Processes(tmp_path)
    yield p
    for proc in reversed(p.procs):
        if proc.alive():
            try:
                await terminate(proc)
            except Exception:
                proc.popen.kill()


async def post(session: aiohttp.ClientSession, url: str, body: dict, headers: dict | None = None):
    async with session.post(url, json=body, headers=headers or {}) as r:
        return r.status, await r.read()


async def test_epp_in_kubernetes_mode_routes_to_the_pools_pods_through_envoy_with_inference_models(kube, procs):
    api = kube.api
    for crd in (OBJECTIVES, MODELS):
        api.install_crd(crd)
    ips = ["127.0.0.141", "127.0.0.142"]
    port = stub_pods(procs, ips)
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [port]))
    api.apply(PODS, pod("a", ips[0], {"app": "vllm"}))
    api.apply(PODS, pod("b", ips[1], {"app": "vllm"}))
    ref = {"name": "pool"}
    api.apply(OBJECTIVES, {"metadata": {"name": "batch"}, "spec": {"priority": -1, "poolRef": ref}})
    api.apply(MODELS, {"metadata": {"name": "food"}, "spec": {
        "modelName": "food-review", "criticality": "Critical", "poolRef": ref,
        "targetModels": [{"name": "food-review-1", "weight": 1}]}})
    epp = spawn_epp(procs, kube.kubeconfig, "--config-text", CONFIG.replace("dataLayer: {sources: []}\n", ""))
    await wait_listening(epp, epp.ports["health"])
    await eventually_async(lambda: _is(astatus(epp.ports["health"]), "SERVING"), "epp ready", timeout=10)
    assert await astatus(epp.ports["health"], "liveness") == "SERVING"
    envoy = procs.envoy(epp.ports["grpc"])
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/completions"
    request = {"model": "food-review", "prompt": "hello"}
    async with aiohttp.ClientSession() as s:
        served = set()
        for _ in range(20):
            status, body = await post(s, url, request)
            assert status == 200, body
            out = json.loads(body)
            served.add(out["served_by"])
            # the model server was asked for the InferenceModel's target model
            expected = orjson.dumps({**request, "model": "food-review-1"})
            assert out["body_sha256"] == hashlib.sha256(expected).hexdigest()
        assert served == {f"{ip}:{port}" for ip in ips}

        # pods report a saturated pool: sheddable requests (objective batch, unlisted models) get 429
        for ip in ips:
            async with s.post(f"http://{ip}:{port}/admin/metrics", json={"waiting": 50, "kv": 0.95}) as r:
                assert r.status == 200
        await asyncio.sleep(0.3)  # a few scrapes
        assert (await post(s, url, request, {"x-gateway-inference-objective": "batch"}))[0] == 429
        assert (await post(s, url, {"model": "unlisted", "prompt": "x"}))[0] == 429
        assert (await post(s, url, request))[0] == 200  # Critical
        api.apply(OBJECTIVES, {"metadata": {"name": "batch"}, "spec": {"priority": 0, "poolRef": ref}})

        async def batch_admitted():
            return (await post(s, url, request, {"x-gateway-inference-objective": "batch"}))[0] == 200

        await eventually_async(batch_admitted, "objective priority change reaches the running epp", WITHIN)

        # pod b turns unready: requests stop landing there within a second
        api.apply(PODS, pod("b", ips[1], {"app": "vllm"}, ready=False))

        async def only_a():
            outs = [json.loads((await post(s, url, request))[1])["served_by"] for _ in range(8)]
            return set(outs) == {f"{ips[0]}:{port}"}

        await eventually_async(only_a, "unready pod b leaves the running epp's pool", WITHIN)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{epp.ports['metrics']}/metrics") as r:
        metrics = {(x.name, tuple(sorted(x.labels.items()))): x.value
                   for fam in text_string_to_metric_families(await r.text()) for x in fam.samples}
    key = (("model_name", "food-review"), ("priority", "1"), ("target_model_name", "food-review-1"))
    assert metrics[("inference_objective_request_total", key)] >= 20
    assert metrics[("inference_extension_leader_election_is_leader", ())] == 1.0
    assert metrics[("inference_extension_kube_pool_synced", ())] == 1.0


async def _is(coro, value: str) -> bool:
    return (await coro) == value


async def test_two_epp_processes_one_ready_leader_failover_on_stop_and_on_crash(kube, procs):
    api = kube.api
    api.apply(POOL_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.apply(PODS, pod("a", "127.0.0.151", {"app": "vllm"}))
    ha = ["--ha-enable-leader-election", "--leader-election-lease-duration", "1s",
          "--leader-election-renew-deadline", "800ms", "--leader-election-retry-period", "200ms",
          "--config-text", CONFIG]
    epps = [spawn_epp(procs, kube.kubeconfig, *ha, name=f"epp-{i}") for i in range(2)]
    for e in epps:
        await wait_listening(e, e.ports["health"])

    async def states() -> list[str]:
        return [await astatus(e.ports["health"]) for e in epps if e.alive()]

    async def one_leader() -> bool:
        s = await states()
        return s.count("SERVING") == 1 and s.count("NOT_SERVING") == len(s) - 1

    await eventually_async(one_leader, "one of two EPPs ready", timeout=10)
    await asyncio.sleep(0.6)
    assert await one_leader()
    leader, standby = epps if await astatus(epps[0].ports["health"]) == "SERVING" else epps[::-1]
    assert await astatus(standby.ports["health"], "liveness") == "SERVING"

    t = time.monotonic()
    leader.popen.send_signal(signal.SIGTERM)  # it releases the Lease on the way out
    await eventually_async(lambda: _is(astatus(standby.ports["health"]), "SERVING"),
                           "the standby takes over after a clean stop", timeout=WITHIN + 0.5)
    assert time.monotonic() - t < WITHIN + 0.5

    # a new standby joins; then the leader dies without releasing: the standby waits out the lease (1 s)
    third = spawn_epp(procs, kube.kubeconfig, *ha, name="epp-2")
    await wait_listening(third, third.ports["health"])
    await eventually_async(lambda: _is(astatus(third.ports["health"]), "NOT_SERVING"), "third is standby", 10)
    await terminate(standby, signal.SIGKILL)
    await eventually_async(lambda: _is(astatus(third.ports["health"]), "SERVING"),
                           "the standby takes over once the dead leader's lease expires", timeout=3.0)
