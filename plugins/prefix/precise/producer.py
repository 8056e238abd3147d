"""`precise-prefix-cache-producer`: the accurate prefix cache, fed by the model servers' KV events."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import Duration, PluginHandle, register
from epp.scheduling.types import SchedulingResult
from plugins.prefix import PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo
from plugins.prefix.precise import PRECISE_PRODUCER_TYPE
from plugins.prefix.precise.events import (
    ALL_BLOCKS_CLEARED,
    BLOCK_REMOVED,
    BLOCK_STORED,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    Topic,
    decode_batch,
)
from plugins.prefix.precise.index import APPLIED, BLOCK_SIZE, UNKNOWN_PARENT, BlockIndex, Match
from plugins.prefix.precise.subscriber import KVEventSubscriber, SubscriberConfig
from plugins.prefix.precise.tokenize import RequestTokenizer, TokenizerError, load_backend, read_chat_template

log = logging.getLogger(__name__)

# The profile whose first endpoint also gets speculative holds (disaggregated prefill), as upstream.
PREFILL_PROFILE = "prefill"
UNKNOWN_TYPE = "unknown_type"

# What to do about each reason an event is dropped (logged the first time it happens).
_DROP_ADVICE = {
    UNKNOWN_PARENT: "its parent block was never seen (events were lost before this EPP subscribed, or the "
                    "index cap evicted it); turn on replay (podDiscoveryConfig.replaySocketPort) so lost "
                    "batches are fetched again",
    BLOCK_SIZE: "the engine's block size is not a multiple of tokenProcessorConfig.blockSize; set blockSize "
                "to the engine's --block-size or a divisor of it",
}


# -- parameters (llm-d's names where they exist) -----------------------------------------------------------


@dataclass(frozen=True)
class TokenProcessorConfig:
    """blockSize (alias blockSizeTokens): tokens per index block; the engines' block size must be a multiple
    of it. hashSeed: salts our keys (they never need to equal vLLM's hashes, so vLLM's PYTHONHASHSEED does
    not matter). hashAlgorithm: accepted for llm-d configs; our keys are always xxh3-64."""

    block_size: int = 16
    block_size_tokens: int | None = None
    hash_seed: str = ""
    hash_algorithm: Literal["", "cbor-fnv", "fnv", "xxh64"] = ""

    def validate(self) -> None:
        if self.block_size <= 0 or (self.block_size_tokens is not None and self.block_size_tokens <= 0):
            raise ValueError("tokenProcessorConfig.blockSize must be > 0")

    @property
    def effective_block_size(self) -> int:
        return self.block_size_tokens if self.block_size_tokens is not None else self.block_size


@dataclass(frozen=True)
class PodDiscoveryConfig:
    """socketPort: each pod's publisher port (+ the endpoint's data-parallel rank); replaySocketPort: each
    pod's replay port (0 or unset: no replay). podLabelSelector and podNamespace are accepted for llm-d
    configs: here the pool already decides which endpoints there are."""

    socket_port: int = 5557
    replay_socket_port: int | None = None
    pod_label_selector: str = "llm-d.ai/inference-serving=true"
    pod_namespace: str = ""

    def validate(self) -> None:
        for key, port in (("socketPort", self.socket_port), ("replaySocketPort", self.replay_socket_port)):
            if port is not None and not 0 <= port < 65536:
                raise ValueError(f"podDiscoveryConfig.{key} must be a port number, got {port}")


@dataclass(frozen=True)
class KVEventsConfig:
    """zmqEndpoint: when set, bind one central SUB socket there (model servers connect to it) instead of
    subscribing to every pod. topicFilter: topic prefix subscribed to ("" takes every topic).
    discoverPods: subscribe to every pool endpoint's publisher (per-pod mode). concurrency and engineType
    are accepted for llm-d configs (events are applied on the one event loop; only vLLM's format is
    decoded)."""

    zmq_endpoint: str = ""
    topic_filter: str = "kv@"
    concurrency: int = 4
    engine_type: Literal["vllm"] = "vllm"
    discover_pods: bool = True
    pod_discovery_config: PodDiscoveryConfig = field(default_factory=PodDiscoveryConfig)


@dataclass(frozen=True)
class InMemoryConfig:
    """llm-d's in-memory index sizes (keys, pods per key); accepted for llm-d configs. The memory bound
    here is `maxIndexEntries`."""

    size: int = 100_000_000
    pod_cache_size: int = 10


@dataclass(frozen=True)
class KVBlockIndexConfig:
    in_memory_config: InMemoryConfig = field(default_factory=InMemoryConfig)
    enable_metrics: bool = False  # accepted; the metrics are always exported
    metrics_logging_interval: Duration = field(default_factory=lambda: Duration(0.0))


@dataclass(frozen=True)
class BackendConfig:
    """A KV-cache tier (an event's `medium`, lowercased) and the weight of a block held there."""

    name: str
    weight: float


@dataclass(frozen=True)
class IndexerConfig:
    kv_block_index_config: KVBlockIndexConfig = field(default_factory=KVBlockIndexConfig)
    kv_cache_backend_configs: list[BackendConfig] = field(
        default_factory=lambda: [BackendConfig("gpu", 1.0), BackendConfig("cpu", 0.8)]
    )

    def validate(self) -> None:
        if not self.kv_cache_backend_configs:
            raise ValueError("indexerConfig.kvCacheBackendConfigs needs at least one tier, e.g. {name: gpu, weight: 1.0}")
        for tier in self.kv_cache_backend_configs:
            if not 0.0 < tier.weight <= 1.0:
                raise ValueError(f"indexerConfig.kvCacheBackendConfigs: weight of {tier.name!r} must be in (0, 1], "
                                 f"got {tier.weight}")


@dataclass(frozen=True)
class PrecisePrefixParams:
    """Parameters of the precise prefix cache (also accepted by `precise-prefix-cache-scorer`, which
    forwards them to this producer).

    llm-d's: tokenProcessorConfig, kvEventsConfig, indexerConfig, speculativeIndexing, speculativeTTL.
    Ours:
      tokenizer        `builtin` (the model server's built-in tokenizer and chat template) or the path of the
                       tokenizer.json the model servers load with --tokenizer (its chat template and BOS/EOS
                       come from tokenizer_config.json beside it)
      vocabSize        the built-in tokenizer's vocabulary (the model servers' --vocab-size)
      chatTemplate     a jinja file overriding the chat template (the model servers' --chat-template)
      tokenCacheBytes  memory for the prefix token cache (0 turns it off)
      maxIndexEntries  the cap on (endpoint, block) entries in the index (about 450 bytes each); beyond it
                       the oldest entries of the endpoint holding the most go first
    """

    token_processor_config: TokenProcessorConfig = field(default_factory=TokenProcessorConfig)
    kv_events_config: KVEventsConfig = field(default_factory=KVEventsConfig)
    indexer_config: IndexerConfig = field(default_factory=IndexerConfig)
    speculative_indexing: bool = False
    speculative_ttl: Duration = field(default_factory=lambda: Duration(2.0), metadata={"key": "speculativeTTL"})
    tokenizer: str = "builtin"
    vocab_size: int = 32000
    chat_template: str = ""
    token_cache_bytes: int = 64 << 20
    max_index_entries: int = 1_000_000

    def validate(self) -> None:
        if self.max_index_entries <= 0:
            raise ValueError(f"maxIndexEntries must be > 0, got {self.max_index_entries}")
        if self.token_cache_bytes < 0:
            raise ValueError(f"tokenCacheBytes must be >= 0 (0 = off), got {self.token_cache_bytes}")
        if self.speculative_ttl.seconds <= 0:
            raise ValueError("speculativeTTL must be positive, e.g. 2s")
        kv = self.kv_events_config
        if not kv.zmq_endpoint and not kv.discover_pods:
            raise ValueError("kvEventsConfig: set zmqEndpoint (central mode) or discoverPods: true (per-pod "
                             "mode), or the producer never hears an event")


@dataclass(frozen=True, slots=True)
class PreciseMatchInfo(PrefixMatchInfo):
    """A PrefixMatchInfo whose `match_blocks` is tier-weighted (a GPU block counts 1.0, a CPU-only block
    its tier's weight), with the unweighted count in `cached_blocks` (for hit ratios and cached tokens)."""

    cached_blocks: int = 0


_NO_MATCH = Match(0, 0.0)


@register
class PrecisePrefixCacheProducer:
    """Writes, for every candidate endpoint, how much of the request's prompt prefix its KV cache holds
    now, as the engines' own KV events say: a `PrefixMatchInfo` in `endpoint.attributes[<this name>]`.

    Signal: vLLM KV events (BlockStored / BlockRemoved / AllBlocksCleared over ZMQ), indexed under keys we
    compute from the events' token ids; the request is tokenized exactly as the model server does it
    (tokenizer, chat template, special tokens) and keyed the same way. The match is the longest
    consecutive run of the prompt's blocks from the first that the endpoint holds, weighted by tier
    (GPU 1.0, CPU 0.8 by default). With speculativeIndexing, the chosen endpoint holds the request's
    blocks for speculativeTTL right after the decision, until its own events arrive.

    When it is wrong: between a decision and the engine's events (a burst of requests sharing a new
    prefix spreads unless speculativeIndexing is on); when events are lost and cannot be replayed (the
    chains after the loss are dropped until stored again), and until a pod's next batch reveals a loss
    (PUB/SUB drops silently: a lost last batch shows as a gap only when the pod publishes again); when the request-side tokenizer or chat
    template differs from the model server's (nothing matches: configure `tokenizer` as the pods'
    --tokenizer); and for multimodal prompts, whose extra keys the request side does not compute.
    """

    type: ClassVar[str] = PRECISE_PRODUCER_TYPE
    produces: ClassVar[frozenset[str]] = frozenset({PREFIX_CACHE_MATCH_INFO})
    consumes: ClassVar[frozenset[str]] = frozenset()
    Params = PrecisePrefixParams

    def __init__(self, name: str, params: PrecisePrefixParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        tp = params.token_processor_config
        tiers = {t.name.lower(): t.weight for t in params.indexer_config.kv_cache_backend_configs}
        self.index = BlockIndex(tp.effective_block_size, tiers, params.max_index_entries, tp.hash_seed)
        try:
            backend = load_backend(params.tokenizer, params.vocab_size)
            template = read_chat_template(params.chat_template) if params.chat_template else None
        except TokenizerError as exc:
            raise ValueError(f"parameter tokenizer/chatTemplate: {exc}") from None
        self.tokenizer = RequestTokenizer(backend, chat_template=template, cache_bytes=params.token_cache_bytes)
        kv = params.kv_events_config
        pd = kv.pod_discovery_config
        self.subscriber = KVEventSubscriber(
            SubscriberConfig(
                topic_filter=kv.topic_filter,
                socket_port=pd.socket_port,
                replay_port=pd.replay_socket_port or None,
                central_endpoint=kv.zmq_endpoint or None,
            ),
            self._apply_batch,
            self._clear_pod,
        )
        self._ttl = params.speculative_ttl.seconds
        self._keys_key = f"precise.keys/{name}"
        self.received: Counter = Counter()  # event type -> count
        self.applied: Counter = Counter()  # event type -> count
        self.dropped: Counter = Counter()  # (event type, reason) -> count
        self.decode_errors: Counter = Counter()  # "payload" | "event" -> count
        self.batches: Counter = Counter()  # endpoint -> batches applied
        self.tokenize_errors = 0
        self.clears: Counter = Counter()  # reason -> count
        self._logged: set[str] = set()
        self._pool = handle.pool
        self._pool.add_listener(self._on_pool_change)

    # -- Lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the subscriptions (awaited by the EPP before it serves)."""
        await self.subscriber.start()

    async def stop(self) -> None:
        """Close every socket."""
        await self.subscriber.stop()

    # -- the pool ----------------------------------------------------------------------------------------

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        self.endpoints_changed(added, removed)

    def endpoints_changed(self, added: Iterable[Endpoint], removed: Iterable[Endpoint]) -> None:
        """Subscribe to endpoints that joined; unsubscribe from and forget those that left."""
        removed = list(removed)
        self.subscriber.set_endpoints(added, removed)
        for ep in removed:
            self.index.clear(ep.hostport)
            self.clears["endpoint_removed"] += 1

    # -- the write path ----------------------------------------------------------------------------------

    def _clear_pod(self, pod: str) -> None:
        self.index.clear(pod)
        self.clears["publisher_restart"] += 1

    def _apply_batch(self, pod: str, topic: Topic, payload: bytes) -> None:
        """Decode one batch from `pod` and apply its events to the index, counting every outcome."""
        self.batches[pod] += 1
        try:
            batch = decode_batch(payload)
        except DecodeError as exc:
            self.decode_errors["payload"] += 1
            self._log_once("payload", "undecodable KV-event batch from %s: %s", pod, exc)
            return
        if batch.errors:
            self.decode_errors["event"] += len(batch.errors)
            self._log_once("event", "malformed KV event from %s skipped: %s", pod, batch.errors[0])
        index = self.index
        received, applied, dropped = self.received, self.applied, self.dropped
        default_model = topic.model or ""
        for event in batch.events:
            if isinstance(event, BlockStored):
                kind = BLOCK_STORED
                outcome = index.apply_stored(pod, event.lora_name or default_model, event)
            elif isinstance(event, BlockRemoved):
                kind = BLOCK_REMOVED
                outcome = index.apply_removed(pod, event)
            elif isinstance(event, AllBlocksCleared):
                kind = ALL_BLOCKS_CLEARED
                index.clear(pod)
                self.clears["all_blocks_cleared"] += 1
                outcome = APPLIED
            else:
                kind = event.tag
                outcome = UNKNOWN_TYPE
            received[kind] += 1
            if outcome == APPLIED:
                applied[kind] += 1
            else:
                dropped[kind, outcome] += 1
                advice = _DROP_ADVICE.get(outcome)
                if advice:
                    self._log_once(outcome, "%s from %s dropped: %s", kind, pod, advice)

    def _log_once(self, what: str, message: str, *args: Any) -> None:
        if what in self._logged:
            log.debug(message, *args)
        else:
            self._logged.add(what)
            log.warning(message + " (logged once; see the precise-prefix metrics for counts)", *args)

    # -- DataProducer ------------------------------------------------------------------------------------

    def request_keys(self, request: LLMRequest) -> list[list[int]]:
        """The request's block keys, one list per prompt (kept in request.scratch for pre_request)."""
        keys = request.scratch.get(self._keys_key)
        if keys is not None:
            return keys
        try:
            prompts = self.tokenizer.prompts(request)
        except TokenizerError as exc:
            self.tokenize_errors += 1
            self._log_once("tokenize", "request %s cannot be tokenized (it matches nothing): %s",
                           request.request_id, exc)
            prompts = []
        model = request.target_model or request.model
        index = self.index
        keys = [index.request_keys(model, tokens, request.cache_salt) for tokens in prompts]
        request.scratch[self._keys_key] = keys
        return keys

    def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        """Tokenize and key the request, look its keys up, and give every candidate its PrefixMatchInfo."""
        if not endpoints:
            return
        index = self.index
        index.expire(time.monotonic())
        keys = self.request_keys(request)
        total = sum(map(len, keys))
        size = index.block_size
        attr = self.name
        if not total:
            info = PreciseMatchInfo(0, 0, size, 0)
            for ep in endpoints:
                ep.attributes[attr] = info
            return
        pods = {ep.hostport for ep in endpoints}
        if len(keys) == 1:
            matches = index.longest_prefix(keys[0], pods)
        else:
            matches = {}
            for prompt_keys in keys:
                for pod, m in index.longest_prefix(prompt_keys, pods).items():
                    old = matches.get(pod, _NO_MATCH)
                    matches[pod] = Match(old.blocks + m.blocks, old.weighted + m.weighted)
        none = PreciseMatchInfo(0, total, size, 0)
        for ep in endpoints:
            m = matches.get(ep.hostport)
            ep.attributes[attr] = none if m is None else PreciseMatchInfo(m.weighted, total, size, m.blocks)

    # -- PreRequest --------------------------------------------------------------------------------------

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """With speculativeIndexing: the chosen endpoint (and a `prefill` profile's first endpoint) holds
        the request's blocks for speculativeTTL, until its own KV events say what it really cached."""
        if not self.params.speculative_indexing:
            return
        keys = request.scratch.get(self._keys_key)
        if not keys:
            return
        expires = time.monotonic() + self._ttl
        targets = []
        primary = result.profile_results.get(result.primary_profile)
        if primary is not None and primary.endpoints:
            targets.append(primary.endpoints[0])
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if prefill is not None and prefill.endpoints and prefill.endpoints[0] not in targets:
            targets.append(prefill.endpoints[0])
        for ep in targets:
            if self._pool.synced and self._pool.get(ep.name) is not ep:
                continue
            for prompt_keys in keys:
                self.index.add_speculative(ep.hostport, prompt_keys, expires)

    # -- MetricsCollector --------------------------------------------------------------------------------

    def collect(self):
        """The index size, event counters by type and outcome, replays, decode errors, and per-endpoint
        sequence gaps, missed batches and publisher restarts."""
        plugin = [self.name]
        stats = self.subscriber.stats
        p = "epp_precise_prefix_"

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(p + name, doc, labels=["plugin"])
            family.add_metric(plugin, value)
            return family

        def counter(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> CounterMetricFamily:
            family = CounterMetricFamily(p + name, doc, labels=["plugin", *labels])
            for label_values, value in sorted(values.items()):
                family.add_metric([*plugin, *label_values], value)
            return family

        yield gauge("index_entries", "(endpoint, KV block) entries in the precise prefix index.", self.index.size())
        yield gauge("index_keys", "Distinct block keys held by at least one endpoint.", self.index.num_keys())
        yield gauge("index_speculative_requests", "Requests whose blocks are held speculatively.",
                    self.index.speculative_count())
        yield gauge("kv_event_subscriptions", "Endpoints whose KV events are followed.",
                    len(self.subscriber.subscribed()))
        yield counter("index_evictions", "Index entries dropped by the maxIndexEntries cap.", [],
                      {(): self.index.evictions})
        yield counter("kv_event_batches", "KV-event batches applied (live and replayed), by endpoint.", ["endpoint"],
                      {(k,): v for k, v in self.batches.items()})
        yield counter("kv_events_received", "KV events decoded, by type.", ["type"],
                      {(k,): v for k, v in self.received.items()})
        yield counter("kv_events_applied", "KV events applied to the index, by type.", ["type"],
                      {(k,): v for k, v in self.applied.items()})
        yield counter("kv_events_dropped", "KV events not applied, by type and reason.", ["type", "reason"],
                      {k: v for k, v in self.dropped.items()})
        errors = {(k,): v for k, v in self.decode_errors.items()}
        for reason, v in stats.bad_messages.items():
            errors[("message_" + reason,)] = v
        yield counter("kv_event_decode_errors", "Undecodable KV-event messages, batches and events.", ["what"],
                      errors)
        yield counter("kv_event_unknown_pod_batches", "Central-mode batches from pods not in the pool (dropped).",
                      [], {(): stats.unknown_pod})
        yield counter("kv_event_replay_requests", "Replay requests by outcome (ok, failed, cooldown).",
                      ["outcome"], {(k,): v for k, v in stats.replays.items()})
        yield counter("kv_event_sequence_gaps", "Sequence gaps seen, by endpoint.", ["endpoint"],
                      {(k,): v for k, v in stats.gaps.items()})
        yield counter("kv_event_missed_batches", "Batches lost (neither received live nor replayed), by endpoint.",
                      ["endpoint"], {(k,): v for k, v in stats.missed.items()})
        yield counter("kv_event_publisher_restarts", "Publisher restarts seen (sequence went back), by endpoint.",
                      ["endpoint"], {(k,): v for k, v in stats.restarts.items()})
        yield counter("index_clears", "Endpoints cleared from the index, by reason.", ["reason"],
                      {(k,): v for k, v in self.clears.items()})
        cache = self.tokenizer.cache.stats
        yield counter("token_cache_segments", "Prompt segments tokenized, by outcome (hit, encoded).", ["outcome"],
                      {("hit",): cache.segments_hit, ("encoded",): cache.segments_encoded})
        yield counter("tokenize_errors", "Requests that could not be tokenized (they match nothing).", [],
                      {(): self.tokenize_errors})
