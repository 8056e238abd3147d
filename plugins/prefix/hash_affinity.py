"""`prefix-hash-affinity-scorer`: stateless prefix affinity by consistent hashing with bounded loads.

The class docstring says what is scored, from which signal, and when it is wrong, with the measurements
that chose the default `prefixBlocks`. The ring itself is `plugins/prefix/ring.py`.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import xxhash

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState
from plugins.prefix.hashing import CHARS_PER_TOKEN, chain_seed, user_input_bytes
from plugins.prefix.ring import HashRing, bounded_capacity

_xxh64 = xxhash.xxh64_intdigest

DEFAULT_PREFIX_BLOCKS = 8  # 128 tokens: see the table in the scorer's docstring
DEFAULT_VIRTUAL_NODES = 128  # each endpoint's share of the key space within ±30% (tests/unit/prefix/test_ring.py)
MAX_VIRTUAL_NODES = 4096


def prefix_key(data: bytes, block_bytes: int, prefix_blocks: int, seed: int) -> int:
    """The ring key of a prompt: xxh64 (seed 0) of the 8-byte little-endian `seed` followed by the first
    `prefix_blocks` full `block_bytes`-byte blocks of `data`.

    With fewer full blocks than that, the key covers every full block there is (a trailing partial block is
    left out, so that the key does not change while the unfinished block grows); with no full block at all
    (a prompt shorter than one block, or empty), it covers the whole of `data`, so that short prompts still
    spread over the ring instead of sharing one key.

    The key equals the chained hash of block `min(prefix_blocks, full blocks) - 1` that
    `plugins.prefix.hashing.block_hashes(data, block_bytes, prefix_blocks, seed)` returns last: the same
    prefix gives the same number here and in the approximate index.
    """
    full = len(data) // block_bytes
    if full:
        end = (full if full < prefix_blocks else prefix_blocks) * block_bytes
        return _xxh64(seed.to_bytes(8, "little") + data[:end])
    return _xxh64(seed.to_bytes(8, "little") + data)


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as the bytes `prefix_key` hashes once a tokenizer is configured: each id an unsigned 32-bit
    little-endian integer, so a block of blockSizeTokens tokens is blockSizeTokens × 4 bytes, the same block
    length in bytes as the character estimate (4 characters a token) uses."""
    units = array("I", token_ids)
    if sys.byteorder != "little":
        units.byteswap()
    return units.tobytes()


@dataclass(frozen=True)
class PrefixHashAffinityParams:
    """Parameters of `prefix-hash-affinity-scorer`.

    blockSizeTokens   tokens per block (a block is blockSizeTokens × 4 characters of the prompt)
    prefixBlocks      k: the key hashes the prompt's first k full blocks
    virtualNodes      points per endpoint on the ring (more: a more even share of keys, a bigger ring)
    loadFactor        c > 1: no candidate takes a request that would put it above c × the mean in-flight
    rankedEndpoints   how many endpoints on the key's walk get a score (1, 1/2, 1/4, …); the rest get 0
    """

    block_size_tokens: int = 16
    prefix_blocks: int = DEFAULT_PREFIX_BLOCKS
    virtual_nodes: int = DEFAULT_VIRTUAL_NODES
    load_factor: float = 1.25
    ranked_endpoints: int = 3

    def validate(self) -> None:
        if self.block_size_tokens <= 0:
            raise ValueError(f"blockSizeTokens must be > 0 (tokens per block, e.g. 16), got {self.block_size_tokens}")
        if self.prefix_blocks <= 0:
            raise ValueError(
                f"prefixBlocks must be >= 1 (how many leading blocks the key hashes, default "
                f"{DEFAULT_PREFIX_BLOCKS}), got {self.prefix_blocks}"
            )
        if not 1 <= self.virtual_nodes <= MAX_VIRTUAL_NODES:
            raise ValueError(
                f"virtualNodes must be between 1 and {MAX_VIRTUAL_NODES} (default {DEFAULT_VIRTUAL_NODES}), "
                f"got {self.virtual_nodes}"
            )
        if not (self.load_factor > 1.0 and math.isfinite(self.load_factor)):
            raise ValueError(
                f"loadFactor must be a finite number > 1.0 (c in capacity = ceil(c × mean in-flight); "
                f"default 1.25), got {self.load_factor}"
            )
        if self.ranked_endpoints < 1:
            raise ValueError(f"rankedEndpoints must be >= 1, got {self.ranked_endpoints}")


@register
class PrefixHashAffinityScorer:
    """Scores the endpoint that owns the request's prompt prefix on a consistent-hash ring 1.0, the next
    endpoints on the ring 1/2, 1/4, …, and every other endpoint 0, with bounded loads.

    Signal: the prompt's first k blocks and the EPP's in-flight counts, nothing else. The key is xxh64 of the
    first `prefixBlocks` full blocks of the request's user input (blockSizeTokens × 4 characters each,
    `plugins.prefix.hashing.user_input_bytes`), seeded by the target model and cache salt (see `prefix_key`).
    The ring holds `virtualNodes` points per endpoint of the pool, placed by the endpoint name only
    (`plugins.prefix.ring`). Requests that share their first k blocks share a key, so they meet on one
    endpoint, whose KV cache then holds their common prefix. A prompt with fewer than k full blocks is keyed
    by all of them; one without a full block by its whole text.

    Bounded loads: with L the candidates' `in_flight` requests (kept by the EPP) and n the candidates,
    capacity = ceil(loadFactor × (ΣL + 1) / n). Walking clockwise from the key, the first candidate whose
    in-flight count is below capacity scores 1.0, and the next `rankedEndpoints` − 1 distinct such
    candidates score 2^−j (j = 1, 2, …), so the picker's second choice is where the key spills next on every
    replica. Candidates at or above capacity, endpoints the filters removed and everything after the ranked
    ones score 0 (they are left out of the returned map, which the Scorer contract reads as 0). With the
    weights of `epp/profiles/prefix-hash.yaml`, load scorers can move the pick from the endpoint scored 1.0
    to the one scored 0.5, never further.

    Why stateless: the ring depends only on the pool's endpoint names and the parameters, and the key only
    on the request, so every EPP replica, and an EPP after a restart, sends the same prefix to the same
    endpoint without sharing any state; the ring is rebuilt when the pool's names change (about 10 ms for
    64 endpoints), never per request. Cost per request: one xxh64 of at most k blocks, one bisect, a short walk.

    When it is wrong:
    - it knows nothing of caches: it does not learn where a prefix really is (a prefix first served
      elsewhere, an engine that evicted it, a restarted pod all look the same), and it cannot tell a prefix
      shared by a few requests from one shared by all. The approximate and precise prefix scorers know more;
      this one is for several EPP replicas, or as a cheap first opinion next to them;
    - requests sharing a prefix shorter than k blocks get different keys (no affinity), and requests sharing
      one longer than k blocks all share one key, however different their tails (see the table below);
    - a prompt shorter than k blocks is keyed by all its full blocks, so a conversation's key changes each
      turn until its history reaches k blocks;
    - bounded loads trade affinity for balance: a key whose owner is full goes to the next endpoint on its
      walk, which may not hold the prefix yet; the smaller loadFactor, the more often (c → 1 is round
      robin, c → ∞ plain consistent hashing). In-flight counts are this replica's own, so with several
      replicas each bounds only its share of the load.

    Choosing the default k (`python -m bench.prefix_k`, 16 endpoints, 16 requests in flight per endpoint,
    loadFactor 1.25; workloads in its docstring). aff = share of requests sent where their group's previous
    request went, skew = max/mean requests per endpoint, both with the ring owner only (no bounds); hit =
    share of prompt blocks the chosen endpoint already held (unbounded caches) and bskew = skew, with bounded
    loads:

          | groups (64 × 16)    | chat sessions       | global system prompt
        k | aff  skew hit  bskew| aff  skew hit  bskew| aff  skew hit  bskew
        1 | 1.00 1.75 0.81 1.20 | 1.00 16.0 0.14 1.26 | 1.00 16.0 0.78 1.25
        2 | 1.00 2.25 0.79 1.22 | 1.00 1.52 0.59 1.21 | 1.00 16.0 0.78 1.25
        4 | 1.00 2.00 0.80 1.22 | 0.99 1.62 0.59 1.19 | 1.00 16.0 0.78 1.25
        8 | 1.00 1.50 0.81 1.19 | 0.97 1.43 0.61 1.15 | 1.00 16.0 0.78 1.25
       16 | 1.00 1.75 0.81 1.20 | 0.88 1.55 0.58 1.17 | 1.00 16.0 0.78 1.25
       32 | 1.00 2.00 0.80 1.20 | 0.77 1.39 0.59 1.17 | 1.00 16.0 0.78 1.25
       64 | 1.00 2.25 0.80 1.22 | 0.52 1.66 0.49 1.17 | 1.00 16.0 0.78 1.25
      128 | 1.00 1.75 0.79 1.20 | 0.20 1.48 0.27 1.15 | 0.06 1.19 0.77 1.11
      256 | 0.05 1.36 0.33 1.16 | 0.08 1.30 0.14 1.12 | 0.06 1.19 0.77 1.11
      all | 0.05 1.36 0.33 1.16 | 0.08 1.30 0.14 1.12 | 0.06 1.19 0.77 1.11

          | RAG (6 documents)   | chat behind a 1,024-token system prompt
        k | aff  skew hit  bskew| aff  skew hit  bskew
        1 | 1.00 5.27 0.95 1.25 | 1.00 16.0 0.53 1.26
        2 | 1.00 5.48 0.95 1.25 | 1.00 16.0 0.53 1.26
        4 | 1.00 5.25 0.95 1.25 | 1.00 16.0 0.53 1.26
        8 | 1.00 5.25 0.95 1.25 | 1.00 16.0 0.53 1.26
       16 | 1.00 3.00 0.95 1.25 | 1.00 16.0 0.53 1.26
       32 | 1.00 5.89 0.95 1.25 | 1.00 16.0 0.53 1.26
       64 | 1.00 3.00 0.95 1.25 | 1.00 16.0 0.53 1.26
      128 | 1.00 3.00 0.96 1.23 | 0.48 1.46 0.71 1.15
      256 | 0.86 5.50 0.94 1.25 | 0.07 1.26 0.53 1.19
      all | 0.06 1.41 0.89 1.16 | 0.07 1.28 0.53 1.19

    Groups (2,048-token group prompts) and RAG (3,000+-token documents) keep full affinity for every k up to
    their shared prefix (128 blocks). Chat loses affinity as k grows past the first user message (the key
    moves while the history is shorter than k blocks), and collapses at k = 1, where the JSON of the shared
    8-token system prompt fills the block. The global system prompt (1,024 tokens = 64 blocks) gives every
    request one key for any k ≤ 64: the ring alone sends all traffic to one endpoint (skew = n), bounded
    loads keep it at ≤ 1.25 × the mean, and caching loses nothing by it (hit 0.78, against 0.77 with unique
    keys: every endpoint ends up holding the one prompt). Hashing a longer prefix (k = 128, 256, or every
    full block, "the longest block boundary") does separate those requests, but it equally separates the
    requests of any group whose shared part is shorter than k, and a conversation's turns, which is where
    affinity pays (groups hit 0.81 → 0.33, chat 0.61 → 0.14). No k tells a prompt everyone shares from a
    prompt one group shares (only the traffic, i.e. state, can), so k is chosen for affinity and the hot
    prefix is left to bounded loads. Among k = 2 … 8, which keep chat affinity ≥ 0.97, the largest, 8 blocks
    (128 tokens), is the default: the more of the prompt the key covers, the less a short shared preamble
    (a chat template, a one-line system prompt) makes unrelated requests collide. With bounded loads, the
    hit rates of k = 2 … 32 are within 0.03 of each other on all five workloads.
    """

    type: ClassVar[str] = "prefix-hash-affinity-scorer"
    Params = PrefixHashAffinityParams

    def __init__(self, name: str, params: PrefixHashAffinityParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self._block_bytes = params.block_size_tokens * CHARS_PER_TOKEN
        self._k = params.prefix_blocks
        self._c = params.load_factor
        self._scores = tuple(0.5**j for j in range(params.ranked_endpoints))
        self._pool = handle.pool
        self.ring = HashRing((), params.virtual_nodes)
        # The pool's endpoints by name and as a set (identity), refreshed with the ring.
        self._by_name: dict[str, Endpoint] = {}
        self._members: frozenset[Endpoint] = frozenset()
        self._pool.add_listener(self._on_pool_change)

    # -- Scorer ------------------------------------------------------------------------------------------

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        """The ranked candidates and their scores; every other candidate scores 0 by its absence. Candidates
        that are not endpoints of the pool are never ranked, but count in the capacity."""
        if not endpoints or not self._members:
            return {}
        candidates = set(endpoints)
        members = self._members
        on_ring = len(candidates) if candidates <= members else len(candidates & members)
        if not on_ring:
            return {}
        capacity = bounded_capacity(sum(map(_in_flight, candidates)), len(candidates), self._c)
        by_name = self._by_name
        if len(candidates) <= _FEW:
            # Few candidates: the walk meets many non-candidates, so make skipping them one C call.
            load_of = {ep.name: ep.in_flight for ep in candidates if ep in members}.get
        else:
            # Many: the walk is short, and building a map of every candidate would cost more than it.
            def load_of(name: str) -> int | None:
                ep = by_name[name]
                return ep.in_flight if ep in candidates else None

        names = self.ring.walk_below(self.key(request), load_of, capacity, len(self._scores), on_ring)
        return {by_name[name]: s for name, s in zip(names, self._scores, strict=False)}

    def key(self, request: LLMRequest) -> int:
        """The request's ring key (see `prefix_key`), seeded by its target model and cache salt.

        The seam for token blocks: once a tokenizer producer leaves the prompt's token ids on the request,
        hash `token_bytes(ids)` here instead of the characters; the block length in bytes stays
        blockSizeTokens × 4, so nothing else changes."""
        return prefix_key(
            user_input_bytes(request),
            self._block_bytes,
            self._k,
            chain_seed(request.target_model or request.model, request.cache_salt),
        )

    # -- pool --------------------------------------------------------------------------------------------

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Follow the pool: rebuild the ring when its set of names changes (an endpoint replaced under the
        same name keeps its points), and always refresh the name → endpoint map."""
        endpoints = self._pool.endpoints
        by_name = {ep.name: ep for ep in endpoints}
        if by_name.keys() != self._by_name.keys():
            self.ring = HashRing(by_name, self.params.virtual_nodes)
        self._by_name = by_name
        self._members = frozenset(endpoints)


_in_flight = attrgetter("in_flight")
_FEW = 16  # up to this many candidates, the walk looks their loads up in a map built for the request
