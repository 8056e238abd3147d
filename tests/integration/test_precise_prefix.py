"""The precise prefix cache against real model servers publishing KV events.

Three `epp-model-server --engine sim` pods on 127.0.0.170-172 (HTTP on a free port, KV events on 5557 and
replay on 5558 of each pod's own address, as in a cluster), with a small KV cache so that blocks are
evicted, and a Hugging Face tokenizer trained offline by the test (`--tokenizer`), which the EPP side
loads too. Pod 171 publishes the older array-shaped events, the others the newer map-shaped ones.

1. In process: the producer's index equals the servers' caches after evictions. The servers have no
   endpoint that lists their cached blocks, so the truth is taken two ways: (a) every block hash each
   server published as stored and not removed, read from its event stream by a plain msgpack decoder of
   the test's own (a second subscriber, checked to have missed no batch); (b) independently of events,
   the `cached_tokens` each server reports for probe requests, which must equal what the index predicts
   from the same prompt before the request is sent.
2. Central mode: a pod connecting its publisher to the producer's bound subscriber; the topic names it.
3. The real `epp` behind Envoy with a precise config: the second request of each group (same system
   prompt, another question) is routed to the pod that served the first.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import msgpack
import orjson
import pytest
import zmq
import zmq.asyncio

from epp.datastore.endpoint import Endpoint
from epp.datastore.pool import Pool
from epp.request import COMPLETIONS, LLMRequest
from epp.scheduling.registry import PluginHandle, create, load_builtin_plugins
from hack.localstack import free_port
from tests.unit.precise.offline_tokenizer import long_text, write_tokenizer

pytestmark = pytest.mark.integration

HOSTS = ["127.0.0.170", "127.0.0.171", "127.0.0.172"]
FORMATS = ["map", "array", "map"]
MODEL = "epp/sim-precise"
BLOCK = 16
NUM_BLOCKS = 48
_READY = re.compile(r"epp-model-server ready: http://(?P<host>[^ ]+):(?P<port>\d+)")


@dataclass
class Pod:
    host: str
    port: int
    proc: subprocess.Popen

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.hostport}"


def start_pod(host: str, tokenizer: str, fmt: str, endpoint: str = "tcp://*:5557") -> Pod:
    """A pod publishing on `endpoint`: `tcp://*:5557` binds on its own address (per-pod mode); a concrete
    address connects to a central subscriber there."""
    port = free_port(host)
    kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
          "replay_endpoint": "tcp://*:5558", "topic": f"kv@{host}:{port}@{MODEL}"}
    cmd = [sys.executable, "-m", "epp_model_server", "--host", host, "--port", str(port), "--model", MODEL,
           "--engine", "sim", "--tokenizer", tokenizer, "--block-size", str(BLOCK), "--num-gpu-blocks",
           str(NUM_BLOCKS), "--time-scale", "50", "--kv-events-config", json.dumps(kv), "--kv-events-format", fmt,
           "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "POD_NAME"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 60
    output = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if _READY.search(line):
            return Pod(host, port, proc)
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"model server on {host} did not start:\n{''.join(output)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return str(write_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def pods(tokenizer_path):
    started = []
    try:
        for host, fmt in zip(HOSTS, FORMATS, strict=True):
            started.append(start_pod(host, tokenizer_path, fmt))
        yield started
    finally:
        for pod in started:
            stop(pod.proc)


class EventRecorder:
    """The test's own view of each server's cache: engine block hashes stored and not yet removed, from
    a plain SUB socket per pod and a plain msgpack decoding of both event shapes."""

    def __init__(self, pods: list[Pod]) -> None:
        self.ctx = zmq.asyncio.Context()
        self.held: dict[str, set] = {p.hostport: set() for p in pods}
        self.seqs: dict[str, list[int]] = {p.hostport: [] for p in pods}
        self.removed: dict[str, int] = {p.hostport: 0 for p in pods}
        self.tasks = []
        for pod in pods:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(f"tcp://{pod.host}:5557")
            self.tasks.append(asyncio.get_running_loop().create_task(self._read(pod.hostport, sock)))

    async def _read(self, pod: str, sock) -> None:
        try:
            while True:
                _topic, seq, data = await sock.recv_multipart()
                self.seqs[pod].append(int.from_bytes(seq, "big"))
                _ts, events, *_ = msgpack.unpackb(data)
                for event in events:
                    kind, hashes = (event["type"], event.get("block_hashes")) if isinstance(event, dict) else \
                        (event[0], event[1] if len(event) > 1 else None)
                    if kind == "BlockStored":
                        self.held[pod].update(hashes)
                    elif kind == "BlockRemoved":
                        self.held[pod].difference_update(hashes)
                        self.removed[pod] += len(hashes)
                    elif kind == "AllBlocksCleared":
                        self.held[pod].clear()
        finally:
            sock.close(0)

    def last(self, pod: str) -> int | None:
        return self.seqs[pod][-1] if self.seqs[pod] else None

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.ctx.term()


async def settled(producer, recorder: EventRecorder, timeout: float = 10.0) -> None:
    """Wait until the producer has applied every batch the recorder has seen, and nothing new comes."""
    deadline = asyncio.get_running_loop().time() + timeout
    previous = None
    while True:
        state = {pod: (recorder.last(pod), getattr(producer.subscriber._streams.get(pod), "last", None))
                 for pod in recorder.seqs}
        if all(a == b for a, b in state.values()) and state == previous:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the producer did not catch up with the servers' events: {state}")
        previous = state
        await asyncio.sleep(0.05)


async def complete(http: aiohttp.ClientSession, pod: Pod, prompt: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with http.post(pod.url + "/v1/completions", data=orjson.dumps(body)) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["usage"]


def completion(prompt: str) -> LLMRequest:
    return LLMRequest(request_id="probe", api=COMPLETIONS, model=MODEL, target_model=MODEL,
                      body={"model": MODEL, "prompt": prompt}, headers={}, size_bytes=len(prompt), prompt=prompt)


async def test_the_index_equals_the_servers_caches_after_evictions(pods, tokenizer_path):
    load_builtin_plugins()
    pool = Pool()
    pool.replace(Endpoint(p.hostport, p.host, p.port) for p in pods)
    recorder = EventRecorder(pods)
    await asyncio.sleep(0.5)  # let the recorder's subscriptions reach the publishers before any event
    producer = create("precise-prefix-cache-producer", "precise", {
        "tokenizer": tokenizer_path,
        "kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 5557, "replaySocketPort": 5558}},
    }, PluginHandle(pool))
    await producer.start()
    try:
        async with aiohttp.ClientSession() as http:
            prompts = [long_text(170, seed=100 + i) for i in range(8)]  # ~13-15 blocks each
            for i, prompt in enumerate(prompts):  # each prompt on two pods: 48-block caches overflow
                for pod in (pods[i % 3], pods[(i + 1) % 3]):
                    await complete(http, pod, prompt)
            await settled(producer, recorder)
            for pod in pods:
                assert recorder.seqs[pod.hostport] == list(range(len(recorder.seqs[pod.hostport]))), \
                    "the recorder missed batches: its view would not be the truth"
                assert recorder.removed[pod.hostport] > 0, "no evictions happened"
                assert producer.index.engine_hashes(pod.hostport) == recorder.held[pod.hostport]

            # Probes: the index's prediction of each server's prefix hit must equal what the server reports.
            hits = misses = 0
            for prompt in reversed(prompts):
                for pod in pods:
                    request = completion(prompt)
                    producer.prepare(request, list(pool.endpoints))
                    blocks = pool.get(pod.hostport).attributes["precise"].cached_blocks
                    usage = await complete(http, pod, prompt)
                    predicted = min(blocks, (usage["prompt_tokens"] - 1) // BLOCK) * BLOCK
                    assert usage["prompt_tokens_details"]["cached_tokens"] == predicted, (pod.hostport, blocks)
                    hits += predicted > 0
                    misses += predicted == 0
                    await settled(producer, recorder)
                    assert producer.index.engine_hashes(pod.hostport) == recorder.held[pod.hostport]
            assert hits >= 3 and misses >= 3  # both kinds of answer were checked
            for pod in pods:
                assert producer.index.engine_hashes(pod.hostport) == recorder.held[pod.hostport]
            assert producer.dropped == {} and producer.decode_errors == {}
            assert producer.applied["BlockRemoved"] > 0

            # AllBlocksCleared: a reset empties the pod in the index too.
            async with http.post(pods[0].url + "/reset_prefix_cache") as r:
                assert r.status == 200
            await settled(producer, recorder)
            assert producer.index.pod_size(pods[0].hostport) == 0 and recorder.held[pods[0].hostport] == set()
            assert producer.index.pod_size(pods[1].hostport) > 0
        producer.index.check()
    finally:
        await producer.stop()
        await recorder.close()


async def test_central_mode_learns_a_pod_that_connects_to_the_bound_subscriber(tokenizer_path):
    load_builtin_plugins()
    host = "127.0.0.173"
    central = f"tcp://{host}:{free_port(host)}"
    pod = start_pod(host, tokenizer_path, "map", endpoint=central)
    try:
        pool = Pool()
        pool.replace([Endpoint(pod.hostport, pod.host, pod.port), Endpoint("127.0.0.174:8000", "127.0.0.174", 8000)])
        producer = create("precise-prefix-cache-producer", "precise", {
            "tokenizer": tokenizer_path,
            "kvEventsConfig": {"zmqEndpoint": central, "podDiscoveryConfig": {"replaySocketPort": 5558}},
        }, PluginHandle(pool))
        await producer.start()
        try:
            assert producer.subscriber.bound_endpoint == central
            async with aiohttp.ClientSession() as http:
                # The pod's publisher connects to the bound socket on its own schedule, and PUB/SUB drops
                # what is published before the connection is up: warm up until a batch arrives live (what
                # was lost before it is then fetched by the gap's replay; a replay alone does not show
                # that the live connection is up).
                deadline = time.monotonic() + 10
                warm = 0
                while producer.subscriber.stats.messages == 0:
                    assert time.monotonic() < deadline, "no KV event reached the central subscriber"
                    await complete(http, pod, long_text(60, seed=800 + warm))
                    warm += 1
                    await asyncio.sleep(0.05)
                prompts = [long_text(170, seed=900 + i) for i in range(4)]
                for prompt in prompts:
                    await complete(http, pod, prompt)
                for prompt in prompts:
                    deadline = time.monotonic() + 10
                    while True:  # events travel asynchronously: wait for this prompt's blocks
                        request = completion(prompt)
                        producer.prepare(request, list(pool.endpoints))
                        blocks = pool.get(pod.hostport).attributes["precise"].cached_blocks
                        if blocks or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.05)
                    usage = await complete(http, pod, prompt)
                    predicted = min(blocks, (usage["prompt_tokens"] - 1) // BLOCK) * BLOCK
                    stats = producer.subscriber.stats
                    assert predicted > 0 and usage["prompt_tokens_details"]["cached_tokens"] == predicted, (
                        usage, stats, producer.batches, producer.applied, producer.dropped, producer.index.size())
                    assert pool.get("127.0.0.174:8000").attributes["precise"].cached_blocks == 0
            assert producer.subscriber.stats.unknown_pod == 0 and producer.dropped == {}
        finally:
            await producer.stop()
    finally:
        stop(pod.proc)


def precise_config(tokenizer: str) -> str:
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: endpoint-notification-source
- type: metrics-data-source
- type: core-metrics-extractor
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: {BLOCK}}}
    kvEventsConfig:
      podDiscoveryConfig: {{socketPort: 5557, replaySocketPort: 5558}}
    tokenizer: {tokenizer}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: max-score-picker
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{{pluginRef: core-metrics-extractor}}]
  - pluginRef: endpoint-notification-source
    extractors: [{{pluginRef: precise-prefix-cache-producer}}]
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 1}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_the_epp_routes_the_second_request_of_a_group_to_the_pod_holding_its_prefix(
        pods, tokenizer_path, procs, tmp_path):
    config = tmp_path / "precise.yaml"
    config.write_text(precise_config(tokenizer_path))
    epp = procs.epp(",".join(p.hostport for p in pods), "--config-file", str(config))
    envoy = procs.envoy(epp.ports["grpc"])
    url = f"http://127.0.0.1:{envoy.ports['listen']}/v1/chat/completions"
    metrics_url = f"http://127.0.0.1:{epp.ports['metrics']}/metrics"

    async def stored_events(http) -> float:
        async with http.get(metrics_url) as r:
            return metric(await r.text(), "epp_precise_prefix_kv_events_applied_total", type="BlockStored")

    async def chat(http, system: str, question: str) -> tuple[str, int]:
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "system", "content": system},
                                                              {"role": "user", "content": question}]}
        async with http.post(url, data=orjson.dumps(body), headers={"content-type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            usage = (await r.json())["usage"]
            return f"{r.headers['x-inference-pod']}:{r.headers['x-inference-port']}", \
                usage["prompt_tokens_details"]["cached_tokens"]

    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 20
        while True:  # the EPP has subscribed once it has replayed the pods' history
            async with http.get(metrics_url) as r:
                text = await r.text()
            if metric(text, "epp_precise_prefix_kv_event_replay_requests_total", outcome="ok") >= 3:
                break
            assert time.monotonic() < deadline, text[-3000:]
            await asyncio.sleep(0.1)
        assert metric(text, "epp_precise_prefix_kv_event_subscriptions") == 3
        # PUB/SUB drops what is published before a subscription is up, and a lost last batch shows only
        # when the pod publishes again: warm each pod up (directly) until the EPP has a batch from it.
        for pod in pods:
            replayed = metric(text, "epp_precise_prefix_kv_event_batches_total", endpoint=pod.hostport)
            deadline = time.monotonic() + 10
            for attempt in range(1000):
                await complete(http, pod, long_text(40, seed=700 + attempt))
                await asyncio.sleep(0.1)
                async with http.get(metrics_url) as r:
                    seen = metric(await r.text(), "epp_precise_prefix_kv_event_batches_total", endpoint=pod.hostport)
                if seen > replayed:
                    break
                assert time.monotonic() < deadline, f"no KV event from {pod.hostport} reached the EPP"
        for group in range(4):
            system = f"Group {group}. " + long_text(200, seed=500 + group)
            before = await stored_events(http)
            first, _ = await chat(http, system, "What is the first question?")
            for _ in range(100):  # the first request's blocks reach the EPP as events
                if await stored_events(http) > before:
                    break
                await asyncio.sleep(0.05)
            second, cached = await chat(http, system, "And a second, different question?")
            assert second == first, (f"group {group}: second request went to {second}, the prefix is on {first}; "
                                     f"epp log:\n{epp.output()[-2000:]}")
            assert cached >= 10 * BLOCK  # the server confirms the hit
    text = epp.output()
    assert "Traceback" not in text, text[-3000:]
