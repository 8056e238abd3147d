"""`approx-prefix-cache-producer`: the router-side (approximate) prefix cache."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client.core import GaugeMetricFamily

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import SchedulingResult
from plugins.prefix import APPROX_PRODUCER_TYPE, PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo, hashes_key
from plugins.prefix.hashing import (
    CHARS_PER_TOKEN,
    BlockHashCache,
    chain_seed,
    max_blocks_to_match,
    user_input_bytes,
)
from plugins.prefix.index import PrefixIndex

log = logging.getLogger(__name__)

# The profile whose first endpoint also learns a request's blocks (disaggregated prefill), as upstream.
PREFILL_PROFILE = "prefill"


@dataclass(frozen=True)
class ApproxPrefixParams:
    """Parameters of the approximate prefix cache (also accepted by `prefix-cache-scorer`, which passes
    them to the producer it auto-creates).

    autoTune               take the block size from the first candidate's `cache_block_size` metric and each
                           endpoint's LRU capacity from its `cache_num_blocks` metric, when they are > 0
    blockSizeTokens        tokens per block when not auto-tuned (a block is blockSizeTokens × 4 characters)
    maxPrefixBlocksToMatch at most this many blocks are hashed (0 = no cap)
    maxPrefixTokensToMatch when > 0, wins over maxPrefixBlocksToMatch: at most this many tokens are hashed
    lruCapacityPerServer   blocks remembered per endpoint when not auto-tuned
    blockSize              deprecated character-based block size; accepted and ignored
    """

    auto_tune: bool = True
    block_size_tokens: int = 16
    max_prefix_blocks_to_match: int = 256
    max_prefix_tokens_to_match: int = 0
    lru_capacity_per_server: int = 31250
    block_size: int | None = None

    def validate(self) -> None:
        if self.block_size_tokens <= 0:
            raise ValueError(f"blockSizeTokens must be > 0, got {self.block_size_tokens}")
        if self.max_prefix_blocks_to_match < 0:
            raise ValueError(f"maxPrefixBlocksToMatch must be >= 0 (0 = no cap), got {self.max_prefix_blocks_to_match}")
        if self.max_prefix_tokens_to_match < 0:
            raise ValueError(f"maxPrefixTokensToMatch must be >= 0 (0 = unused), got {self.max_prefix_tokens_to_match}")
        if self.lru_capacity_per_server <= 0:
            raise ValueError(f"lruCapacityPerServer must be > 0, got {self.lru_capacity_per_server}")


@register
class ApproxPrefixCacheProducer:
    """Estimates, for every candidate endpoint, how many leading blocks of the request's prompt it holds in
    its KV cache, and writes `PrefixMatchInfo` to `endpoint.attributes[<this plugin's name>]`.

    Signal: the EPP's own routing decisions. The prompt's user input (see hashing.py) is cut into blocks of
    blockSizeTokens × 4 characters and hashed as a chain; after each decision the chosen endpoint (and the
    first endpoint of a `prefill` profile, if any) is recorded as holding the request's blocks, in a
    per-endpoint LRU sized like its KV cache. Endpoints that leave the pool are forgotten at once.

    When it is wrong: it learns from decisions, not outcomes (a request that failed, or whose blocks the
    engine evicted early, still counts); character blocks only approximate token blocks, so the matched
    length is an estimate; and it sees only the requests routed by this EPP replica, so with several
    replicas each knows part of the picture. The precise producer (KV events) has none of these errors.
    """

    type: ClassVar[str] = APPROX_PRODUCER_TYPE
    produces: ClassVar[frozenset[str]] = frozenset({PREFIX_CACHE_MATCH_INFO})
    consumes: ClassVar[frozenset[str]] = frozenset()
    Params = ApproxPrefixParams

    def __init__(self, name: str, params: ApproxPrefixParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.index = PrefixIndex()
        self._hasher = BlockHashCache()  # prefixes shared between requests are hashed once
        self._hashes_key = hashes_key(name)
        self._pool = handle.pool
        if params.block_size is not None:
            log.warning(
                "plugin %r (type %s): parameter blockSize is deprecated and ignored; the block size is "
                "blockSizeTokens (%d tokens = %d characters)",
                name, self.type, params.block_size_tokens, params.block_size_tokens * CHARS_PER_TOKEN,
            )
        self._pool.add_listener(self._on_pool_change)

    # -- DataProducer ------------------------------------------------------------------------------------

    def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        """Hash the request's prompt, look the hashes up, and give every candidate its PrefixMatchInfo."""
        if not endpoints:
            return
        p = self.params
        block_tokens = p.block_size_tokens
        if p.auto_tune:
            tuned = endpoints[0].metrics.cache_block_size
            if tuned > 0:
                block_tokens = tuned
        hashes = self._hasher.block_hashes(
            user_input_bytes(request),
            block_tokens * CHARS_PER_TOKEN,
            max_blocks_to_match(block_tokens, p.max_prefix_tokens_to_match, p.max_prefix_blocks_to_match),
            chain_seed(request.target_model or request.model, request.cache_salt),
        )
        request.scratch[self._hashes_key] = hashes
        total = len(hashes)
        counts = self.index.match(hashes) if total else {}
        # PrefixMatchInfo is immutable: endpoints with the same match share one instance.
        none = PrefixMatchInfo(0, total, block_tokens)
        key = self.name
        if not counts:
            for ep in endpoints:
                ep.attributes[key] = none
            return
        infos = {0: none}
        for ep in endpoints:
            name = ep.name
            if name in counts:
                n = counts[name]
                info = infos.get(n)
                if info is None:
                    info = infos[n] = PrefixMatchInfo(n, total, block_tokens)
                ep.attributes[key] = info
            else:
                ep.attributes[key] = none

    # -- PreRequest --------------------------------------------------------------------------------------

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """Learn the decision: the primary target, and the first endpoint of a `prefill` profile, now hold
        the request's blocks."""
        hashes = request.scratch.get(self._hashes_key)
        if not hashes:
            return
        primary = result.profile_results.get(result.primary_profile)
        target = primary.endpoints[0] if primary is not None and primary.endpoints else None
        if target is not None:
            self._learn(target, hashes)
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if prefill is not None and prefill.endpoints and prefill.endpoints[0] is not target:
            self._learn(prefill.endpoints[0], hashes)

    def _learn(self, endpoint: Endpoint, hashes: list[int]) -> None:
        if self._pool.synced and self._pool.get(endpoint.name) is not endpoint:
            return  # it left the pool while the request was being scheduled: nothing to remember
        capacity = self.params.lru_capacity_per_server
        if self.params.auto_tune and endpoint.metrics.cache_num_blocks > 0:
            capacity = endpoint.metrics.cache_num_blocks
        self.index.add(endpoint.name, hashes, capacity)

    # -- pool and introspection --------------------------------------------------------------------------

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            self.index.remove_endpoint(ep.name)

    def index_size(self) -> int:
        """Distinct block hashes remembered (for the `prefix_indexer_size` gauge)."""
        return self.index.size()

    def collect(self):
        """MetricsCollector: the index size under the reference EPP's metric name."""
        family = GaugeMetricFamily("inference_extension_prefix_indexer_size",
                                   "Distinct prefix block hashes in the approximate index.", labels=["plugin"])
        family.add_metric([self.name], self.index.size())
        yield family
