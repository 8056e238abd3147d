"""`precise-prefix-cache-producer` and the scorers reading it: events in, PrefixMatchInfo and scores out."""

from __future__ import annotations

import time

import msgpack
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from epp.config import ConfigError, load_config
from epp.datastore.endpoint import Endpoint
from epp.datastore.pool import Pool
from epp.request import COMPLETIONS, LLMRequest
from epp.scheduling.registry import PluginHandle, create, load_builtin_plugins
from epp.scheduling.types import CycleState, ProfileResult, SchedulingResult
from epp_model_server.tokenizer import BuiltinTokenizer
from plugins.prefix import PrefixMatchInfo
from plugins.prefix.precise.events import Topic
from plugins.prefix.precise.producer import PreciseMatchInfo, PrecisePrefixCacheProducer

from .helpers import CLEARED, FakeEngine, batch_payload

load_builtin_plugins()

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SYSTEM = " ".join(f"word{i} and more" for i in range(120))  # ~360 tokens with the built-in tokenizer


def make_pool(n: int = 3) -> Pool:
    pool = Pool()
    pool.replace(Endpoint(f"127.0.0.{i + 10}:8000", f"127.0.0.{i + 10}", 8000) for i in range(n))
    return pool


def completion(prompt: str, model: str = MODEL, salt: str | None = None) -> LLMRequest:
    return LLMRequest(request_id="r", api=COMPLETIONS, model=model, target_model=model, body={"prompt": prompt},
                      headers={}, size_bytes=len(prompt), prompt=prompt, cache_salt=salt)


def server_tokens(prompt: str) -> list[int]:
    return BuiltinTokenizer().encode(prompt)


def topic(ep: Endpoint, model: str = MODEL) -> Topic:
    return Topic(ep.hostport, model)


def feed(producer, ep: Endpoint, events, shape: str = "map", model: str = MODEL) -> None:
    producer._apply_batch(ep.hostport, topic(ep, model), batch_payload(events, shape))


def infos(producer, pool: Pool, request: LLMRequest) -> dict[str, PreciseMatchInfo]:
    producer.prepare(request, list(pool.endpoints))
    return {ep.name: ep.attributes[producer.name] for ep in pool.endpoints}


@pytest.fixture
def pool():
    return make_pool()


@pytest.fixture
def producer(pool):
    return create("precise-prefix-cache-producer", "precise-prefix-cache-producer", None, PluginHandle(pool))


@pytest.mark.parametrize("shape", ["map", "array"])
def test_each_candidate_gets_the_blocks_its_events_say_it_holds(producer, pool, shape):
    a, b, c = pool.endpoints
    doc = SYSTEM + " the question"
    ids = server_tokens(doc)
    engine = FakeEngine()
    feed(producer, a, [engine.stored(ids)], shape)
    feed(producer, b, [engine.stored(ids, 0, 4)], shape)
    result = infos(producer, pool, completion(doc))
    total = len(ids) // 16
    assert result[a.name] == PreciseMatchInfo(float(total), total, 16, total)
    assert result[b.name] == PreciseMatchInfo(4.0, total, 16, 4)
    assert result[c.name] == PreciseMatchInfo(0, total, 16, 0)
    assert isinstance(result[a.name], PrefixMatchInfo)
    assert producer.applied == {"BlockStored": 2} and producer.dropped == {}


def test_evictions_and_clears_shrink_the_match(producer, pool):
    a, b, _ = pool.endpoints
    ids = server_tokens(SYSTEM)
    engine = FakeEngine(seed="other-seed")  # whatever the engine's hashing, the keys are ours
    feed(producer, a, [engine.stored(ids)])
    feed(producer, b, [engine.stored(ids)])
    feed(producer, a, [engine.removed(ids, [5])])
    feed(producer, b, [CLEARED])
    result = infos(producer, pool, completion(SYSTEM))
    assert (result[a.name].cached_blocks, result[b.name].cached_blocks) == (5, 0)
    assert producer.clears["all_blocks_cleared"] == 1


def test_requests_for_another_model_salt_or_adapter_match_nothing(producer, pool):
    a = pool.endpoints[0]
    ids = server_tokens(SYSTEM)
    feed(producer, a, [FakeEngine().stored(ids)])
    feed(producer, a, [FakeEngine().stored(ids, salt="s1")])
    feed(producer, a, [FakeEngine(lora="sql").stored(ids)])
    assert infos(producer, pool, completion(SYSTEM))[a.name].cached_blocks > 0
    assert infos(producer, pool, completion(SYSTEM, salt="s1"))[a.name].cached_blocks > 0
    assert infos(producer, pool, completion(SYSTEM, model="sql"))[a.name].cached_blocks > 0
    assert infos(producer, pool, completion(SYSTEM, salt="s2"))[a.name].cached_blocks == 0
    assert infos(producer, pool, completion(SYSTEM, model="other-lora"))[a.name].cached_blocks == 0


def test_a_prompt_shorter_than_a_block_has_no_blocks(producer, pool):
    result = infos(producer, pool, completion("hi"))
    assert all(info.total_blocks == 0 for info in result.values())


def test_an_endpoint_leaving_the_pool_is_forgotten(producer, pool):
    a, b, c = pool.endpoints
    ids = server_tokens(SYSTEM)
    feed(producer, a, [FakeEngine().stored(ids)])
    pool.replace([b, c])
    assert producer.index.pod_size(a.hostport) == 0
    pool.replace([a, b, c])  # back again: it starts from nothing
    assert infos(producer, pool, completion(SYSTEM))[a.name].cached_blocks == 0


def test_speculative_holds_route_a_burst_before_events_arrive(pool):
    params = {"speculativeIndexing": True, "speculativeTTL": "50ms"}
    producer = create("precise-prefix-cache-producer", "p", params, PluginHandle(pool))
    a, b, _ = pool.endpoints
    first = completion(SYSTEM)
    producer.prepare(first, list(pool.endpoints))
    producer.pre_request(first, SchedulingResult({"default": ProfileResult((b,)), "prefill": ProfileResult((a,))},
                                                 "default"))
    result = infos(producer, pool, completion(SYSTEM))
    total = result[b.name].total_blocks
    assert result[b.name].cached_blocks == total and result[a.name].cached_blocks == total
    time.sleep(0.06)
    assert infos(producer, pool, completion(SYSTEM))[b.name].cached_blocks == 0


def test_without_speculative_indexing_decisions_are_not_learned(producer, pool):
    a = pool.endpoints[0]
    req = completion(SYSTEM)
    producer.prepare(req, list(pool.endpoints))
    producer.pre_request(req, SchedulingResult({"default": ProfileResult((a,))}, "default"))
    assert infos(producer, pool, completion(SYSTEM))[a.name].cached_blocks == 0


def test_dropped_and_malformed_events_are_counted_and_exported(producer, pool):
    a = pool.endpoints[0]
    ids = server_tokens(SYSTEM)
    engine = FakeEngine()
    feed(producer, a, [engine.stored(ids, 2, 4)])  # its parent was never seen
    feed(producer, a, [FakeEngine(block_size=24).stored(ids)])  # not a multiple of 16
    producer._apply_batch(a.hostport, topic(a), b"\xc1")
    producer._apply_batch(a.hostport, topic(a), msgpack.packb([0.0, [{"type": "BlockStored"},
                                                                     {"type": "Mystery"}], 0]))
    feed(producer, a, [engine.stored(ids), engine.removed(ids, [0])])
    assert producer.dropped == {("BlockStored", "unknown_parent"): 1, ("BlockStored", "block_size_mismatch"): 1,
                                ("Mystery", "unknown_type"): 1}
    assert producer.decode_errors == {"payload": 1, "event": 1}
    registry = CollectorRegistry()
    registry.register(producer)
    text = generate_latest(registry).decode()
    name = 'plugin="precise-prefix-cache-producer"'
    for line in (
        f"epp_precise_prefix_index_entries{{{name}}} {len(ids) // 16 - 1}.0",
        f'epp_precise_prefix_kv_events_received_total{{{name},type="BlockStored"}} 3.0',
        f'epp_precise_prefix_kv_events_applied_total{{{name},type="BlockRemoved"}} 1.0',
        f'epp_precise_prefix_kv_events_dropped_total{{{name},reason="unknown_parent",type="BlockStored"}} 1.0',
        f'epp_precise_prefix_kv_event_decode_errors_total{{{name},what="payload"}} 1.0',
        f'epp_precise_prefix_kv_event_batches_total{{endpoint="{a.hostport}",{name}}} 5.0',
    ):
        assert line in text, line


async def test_start_subscribes_to_the_pool_and_stop_closes_every_socket(pool):
    producer = create("precise-prefix-cache-producer", "p",
                      {"kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 45557, "replaySocketPort": 45558}}},
                      PluginHandle(pool))
    assert producer.subscriber.subscribed() == []
    await producer.start()
    assert producer.subscriber.subscribed() == sorted(ep.hostport for ep in pool.endpoints)
    await producer.stop()
    assert producer.subscriber.subscribed() == [] and not producer.subscriber.started


# -- configs ----------------------------------------------------------------------------------------------

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"

# llm-d's epp-precise-prefix-cache-config (reference notes 1.9), less the token-producer we do not have.
LLM_D_PRECISE = HEADER + """
plugins:
- type: endpoint-notification-source
- type: metrics-data-source
- type: core-metrics-extractor
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSize: 64
    indexerConfig:
      kvBlockIndexConfig:
        enableMetrics: true
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: max-score-picker
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
  - pluginRef: endpoint-notification-source
    extractors:
    - pluginRef: precise-prefix-cache-producer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: max-score-picker
"""

# llm-d's sim-epp-kvcache-config: the central mode, with the deprecated scorer.
LLM_D_SIM_KVCACHE = HEADER + """
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig:
      blockSize: 16
    kvEventsConfig:
      zmqEndpoint: tcp://0.0.0.0:5557
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
"""


def test_llm_ds_precise_config_loads_and_scores_with_prefix_cache_scorer():
    pool = make_pool(2)
    config = load_config(LLM_D_PRECISE, "llm-d precise", PluginHandle(pool))
    producer = config.plugins["precise-prefix-cache-producer"]
    assert producer.index.block_size == 64
    assert config.plugins["endpoint-notification-source"].extractors == [producer]
    assert [type(s).type for s, _ in config.data_sources] == ["metrics-data-source"]
    a, b = pool.endpoints
    ids = server_tokens(SYSTEM)
    feed(producer, a, [FakeEngine(block_size=64).stored(ids)])
    request = completion(SYSTEM)
    for p in config.producers:
        p.prepare(request, [a, b])
    scorer = config.plugins["prefix-cache-scorer"]
    assert scorer.score(CycleState(), request, [a, b]) == {a: 1.0, b: 0.0}
    assert config.scheduler.schedule(request, [b, a]).target_endpoints == (a,)


def test_the_deprecated_precise_scorer_forwards_its_parameters_to_the_producer_it_adds():
    pool = make_pool(2)
    config = load_config(LLM_D_SIM_KVCACHE, "llm-d sim", PluginHandle(pool))
    producer = config.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PrecisePrefixCacheProducer)
    assert producer.subscriber.central and producer.subscriber.config.central_endpoint == "tcp://0.0.0.0:5557"
    a, b = pool.endpoints
    ids = server_tokens(SYSTEM)
    feed(producer, b, [FakeEngine().stored(ids, 0, 10)])
    request = completion(SYSTEM)
    producer.prepare(request, [a, b])
    scores = config.plugins["precise-prefix-cache-scorer"].score(CycleState(), request, [a, b])
    assert scores[a] == 0.0 and scores[b] == pytest.approx(10 / (len(ids) // 16))


def test_the_precise_profile_loads():
    from epp.config import load_profile

    config = load_profile("precise", PluginHandle(make_pool(1)))
    producer = config.plugins["precise-prefix-cache-producer"]
    assert producer.params.speculative_indexing
    assert producer.subscriber.config.socket_port == 5557 and producer.subscriber.config.replay_port == 5558
    assert [ws.weight for ws in config.scheduler.profiles["default"].scorers] == [2.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{blockSize: 16}", "unknown parameter 'blockSize'"),
        ("{tokenProcessorConfig: {blockSize: 0}}", "blockSize must be > 0"),
        ("{kvEventsConfig: {discoverPods: false}}", "set zmqEndpoint"),
        ("{kvEventsConfig: {engineType: sglang}}", "'sglang' is not allowed"),
        ("{tokenizer: /nonexistent/tokenizer.json}", "no tokenizer.json there"),
        ("{indexerConfig: {kvCacheBackendConfigs: [{name: gpu, weight: 2}]}}", "must be in \\(0, 1\\]"),
        ("{indexerConfig: {kvBlockIndexConfig: {redisConfig: {address: x}}}}", "unknown parameter 'redisConfig'"),
    ],
)
def test_bad_parameters_are_errors_that_name_them(params, message):
    text = HEADER + f"plugins:\n- type: precise-prefix-cache-producer\n  parameters: {params}\n- type: max-score-picker\n"
    with pytest.raises(ConfigError, match=message):
        load_config(text, "t", PluginHandle(make_pool(1)))


def test_an_endpoint_notification_source_refuses_extractors_that_do_not_follow_endpoints():
    text = HEADER + """
plugins:
- type: endpoint-notification-source
- type: core-metrics-extractor
- type: max-score-picker
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors:
    - pluginRef: core-metrics-extractor
"""
    with pytest.raises(ConfigError, match=r"extractors\[0\].*does not follow endpoints"):
        load_config(text, "t", PluginHandle(make_pool(1)))
