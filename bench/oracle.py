"""The routing oracle of the prefix-routing benchmark: the hit rate a router that sees every cache would get.

Offline: the same request sequence, the same number of pods, each with the same KV cache in blocks and the
model server's own block manager (`epp_model_server.block_manager.BlockManager`: chained vLLM block hashes,
LRU eviction, a request's blocks freed last-block-first). Prompts are tokenized and hashed exactly as the
pods do it (built-in tokenizer, default chat template, sha256 block hashes from the same seed), so a block
the oracle counts as a hit is one a pod would count.

Each request goes to the pod holding the longest cached prefix of its blocks; ties (e.g. no pod holds any
block) go to the least-loaded pod, load being the requests still in flight at the request's arrival, with
durations estimated by the sim cost model (uncached prompt tokens / prefill rate + one step per output
token); then the lowest pod index. Taken literally, that rule herds: a prefix every request shares (one
global system prompt, a chat template's first block) is held by the first pod that served it, so that pod
wins every later request and the other pods' caches go unused. With `load_factor` c, only pods whose
in-flight count is below c x the mean (+1) compete, which spreads shared prefixes over all pods at the
cost of one miss per pod, but at light load also splits what should stay together. With `tie_blocks` k,
pods whose cached prefix is at most k blocks shorter than the longest count as tied, so a short prefix
every request shares (a chat template and system prompt in the first block) does not decide where a new
conversation goes. `simulate` runs any of these rules; the benchmark runs several and reports the best
hit rate as "the oracle" (each is a routing some router could have done, so the best is achievable). Hits and queries are counted as the pods count them (vLLM's rule: at most
all prompt tokens but the last come from the cache; every admission queries its whole prompt).

What the oracle leaves out, all in its favour: requests run one at a time (a request's blocks are allocated
and freed at once, so blocks pinned by concurrent requests never crowd the cache), there is no preemption,
and routing ignores queueing (the longest prefix wins however loaded its pod is). So it is an upper bound
for cache-affinity, not a latency-optimal router.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from epp_model_server.block_manager import BlockManager
from epp_model_server.hashing import block_hashes, hash_function, none_hash
from epp_model_server.tokenizer import BuiltinTokenizer

PREFILL_TOKENS_PER_S = 15928.0  # the sim cost model's defaults (epp_model_server.cost_model)
STEP_S = 0.010


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request as the oracle sees it: its prompt length, its full blocks' hashes and its output length."""

    num_tokens: int
    hashes: tuple[bytes, ...]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class OracleResult:
    hit_rate: float
    hits: int
    queries: int
    per_pod: tuple[int, ...]
    per_request: tuple[int, ...]  # cached prompt tokens of each request, in order

    def hit_rate_of(self, prompts: Sequence[Prompt], first: int, count: int) -> float:
        """The hit rate over requests first..first+count-1 (a stage of a rate ladder)."""
        queries = sum(p.num_tokens for p in prompts[first:first + count])
        return sum(self.per_request[first:first + count]) / queries if queries else 0.0

    @property
    def skew(self) -> float:
        mean = sum(self.per_pod) / len(self.per_pod)
        return max(self.per_pod) / mean if mean else 0.0


def prompts_of(texts: Sequence[str], max_tokens: Sequence[int], *, block_size: int = 16, hash_seed: str = "0",
               hash_algo: str = "sha256") -> list[Prompt]:
    """Tokenizes and hashes prompt texts as a model server started with these settings does."""
    tok = BuiltinTokenizer()
    fn = hash_function(hash_algo)
    root = none_hash(fn, hash_seed)
    out = []
    for text, n_out in zip(texts, max_tokens, strict=True):
        ids = tok.encode(text)
        out.append(Prompt(len(ids), tuple(block_hashes(ids, block_size, fn, root)), n_out))
    return out


def simulate(prompts: Sequence[Prompt], arrivals: Sequence[float], *, pods: int, blocks: int,
             block_size: int = 16, load_factor: float | None = None, tie_blocks: int = 0,
             prefill_tokens_per_s: float = PREFILL_TOKENS_PER_S, step_s: float = STEP_S) -> OracleResult:
    """Routes every prompt to the pod with the longest cached prefix (among the pods under the load bound
    when `load_factor` is given; prefixes within `tie_blocks` of the longest count as ties, broken by load)
    and returns the resulting hit rate."""
    if len(prompts) != len(arrivals):
        raise ValueError(f"{len(prompts)} prompts but {len(arrivals)} arrival times")
    managers = [BlockManager(blocks, block_size) for _ in range(pods)]
    ends: list[list[float]] = [[] for _ in range(pods)]  # per pod, a heap of estimated end times
    per_pod = [0] * pods
    per_request = []
    hits = queries = 0
    for p, now in zip(prompts, arrivals, strict=True):
        limit = (p.num_tokens - 1) // block_size
        for heap in ends:
            while heap and heap[0] <= now:
                heapq.heappop(heap)
        if load_factor is None:
            allowed = range(pods)
        else:
            bound = load_factor * (sum(len(h) for h in ends) + 1) / pods
            allowed = [i for i in range(pods) if len(ends[i]) < bound] or range(pods)
        found = {i: managers[i].lookup(p.hashes, limit) for i in allowed}
        longest = max(len(f) for f in found.values())
        best = min((i for i in found if len(found[i]) >= longest - tie_blocks),
                   key=lambda i: (len(ends[i]), -len(found[i]), i))
        best_hits = found[best]
        bm = managers[best]
        total = bm.blocks_needed(p.num_tokens + p.max_tokens - 1)
        new = bm.allocate(total - len(best_hits), best_hits)
        if new is None:
            raise ValueError(f"a request of {p.num_tokens}+{p.max_tokens} tokens does not fit in {blocks} blocks")
        ids = best_hits + new
        full = p.num_tokens // block_size
        bm.cache_full_blocks(ids, p.hashes, len(best_hits), full, [0] * p.num_tokens)
        bm.free(ids)
        bm.drain_events()
        cached = len(best_hits) * block_size
        hits += cached
        queries += p.num_tokens
        per_request.append(cached)
        per_pod[best] += 1
        duration = (p.num_tokens - cached) / prefill_tokens_per_s + p.max_tokens * step_s
        heapq.heappush(ends[best], now + duration)
    return OracleResult(hits / queries if queries else 0.0, hits, queries, tuple(per_pod), tuple(per_request))
