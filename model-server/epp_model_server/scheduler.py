"""Continuous-batching scheduler shared by both engines (modelled on vLLM V1's scheduler).

Each engine step:
1. Running requests first, in admission order: each gets the tokens it still has to compute (1 when
   decoding; the rest of its prompt, up to the step's token budget, when prefilling in chunks). When a
   request needs a new block and none is free, the most recently admitted running request is preempted
   (its blocks freed, recomputed later from the prefix cache), as vLLM's recompute preemption does.
2. Then waiting requests, first come first served, while the token budget (`max_num_batched_tokens`)
   lasts and fewer than `max_num_seqs` run: look up the longest cached prefix of full blocks (at most
   all prompt tokens but one: the last is always computed to produce logits), allocate blocks for the
   rest of this step's chunk, admit. A request whose LoRA adapter cannot get a slot is skipped (it keeps
   its place); a request that does not fit in the free blocks stops admission.
3. After the executor ran the step (`update`): computed-token counts advance, a token is appended to each
   request whose known tokens are now all computed, newly full blocks are registered in the prefix cache
   (`BlockStored` events), finished requests free their blocks.

Prefix-cache statistics follow vLLM: every admission adds the request's token count to `queries` and
its cache hit (in tokens) to `hits`.

Disaggregated prefill/decode (pd.py), as vLLM's KV connectors do it:
- A prefill leg (`remote_decode`) is an ordinary request; when it finishes, the ids of its blocks are kept
  in `transfer_block_ids` for the response's `kv_transfer_params`. Its blocks are cached as usual.
- A decode leg (`remote_prefill`) receives its prompt's KV instead of computing it. At its first admission
  it looks up the local prefix cache (counted in the statistics like any admission), allocates blocks for
  the whole prompt and moves to `loading` (vLLM's WAITING_FOR_REMOTE_KVS) without using the step's token
  budget or a sequence slot: the prompt tokens beyond the local hit are in transfer. The engine calls
  `finish_transfers` when they have arrived: the prompt's full blocks are registered in the prefix cache
  (BlockStored), all prompt tokens but the last count as computed, and the request waits again at the
  head of the queue; its next admission computes only the last prompt token, which samples the first
  output token. A decode leg preempted later recomputes locally, as vLLM does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .hashing import DEFAULT_HASH_SEED, block_hashes, hash_function, none_hash
from .lora import LoRAAdapter, ResidentLoRAs
from .request import EngineRequest, RequestStatus


class RequestRejected(ValueError):
    """A request the engine can never run (too long for the model or the cache)."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    block_size: int = 16
    num_gpu_blocks: int = 1024
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    enable_prefix_caching: bool = True
    max_loras: int = 1
    hash_algo: str = "sha256"
    hash_seed: str = DEFAULT_HASH_SEED


@dataclass(slots=True)
class ScheduledRequest:
    request: EngineRequest
    start: int  # tokens computed before this step
    num_new_tokens: int
    samples: bool  # this step computes every known token, so the executor samples the next one

    @property
    def is_prefill(self) -> bool:
        return self.start < self.request.num_prompt_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    loaded_loras: list[LoRAAdapter] = field(default_factory=list)
    preempted: list[EngineRequest] = field(default_factory=list)
    # Running requests aborted since the last step, finished by this schedule() call.
    aborted: list[EngineRequest] = field(default_factory=list)
    # Decode legs whose KV transfer starts now (they moved to Scheduler.loading).
    transfers: list[EngineRequest] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if s.is_prefill)

    @property
    def num_decode_seqs(self) -> int:
        return sum(1 for s in self.scheduled if not s.is_prefill)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass(slots=True)
class RequestUpdate:
    """What a step did for one request: tokens it appended, and whether it finished."""

    request: EngineRequest
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, *, eos_token_id: int | None = None) -> None:
        self.config = config
        self.block_manager = BlockManager(
            config.num_gpu_blocks, config.block_size, enable_caching=config.enable_prefix_caching
        )
        self.loras = ResidentLoRAs(config.max_loras)
        self.eos_token_id = eos_token_id
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        # Decode legs whose KV is in transfer from a prefiller (they hold blocks, compute nothing).
        self.loading: list[EngineRequest] = []
        self._hash_fn = hash_function(config.hash_algo)
        self._root_hash = none_hash(self._hash_fn, config.hash_seed)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    # ---- requests --------------------------------------------------------------------------------

    def validate(self, prompt_len: int, max_tokens: int) -> None:
        """Raises RequestRejected when a request of this size could never run."""
        cfg = self.config
        if prompt_len < 1:
            raise RequestRejected("the prompt is empty; send at least one token")
        if prompt_len + max_tokens > cfg.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        blocks = self.block_manager.blocks_needed(prompt_len + max_tokens - 1)
        if blocks > cfg.num_gpu_blocks:
            raise RequestRejected(
                f"the request needs {blocks} KV-cache blocks of {cfg.block_size} tokens ({prompt_len} prompt + "
                f"{max_tokens} completion tokens) but the cache has {cfg.num_gpu_blocks}; shorten the request "
                "or start the server with more --num-gpu-blocks"
            )

    def add_request(self, request: EngineRequest) -> None:
        self.validate(request.num_prompt_tokens, request.params.max_tokens)
        self._extend_hashes(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def abort(self, request: EngineRequest) -> bool:
        """Marks the request aborted; a waiting one is finished at once (returns True), a running one at
        the next `update` or `schedule`."""
        if request.finished:
            return False
        request.aborted = True
        if request.status is RequestStatus.WAITING:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
            self._finish(request, "abort")
            return True
        if request.status is RequestStatus.WAITING_FOR_REMOTE_KV:
            self.loading.remove(request)
            self._finish(request, "abort")
            return True
        return False

    def fail(self, request: EngineRequest) -> None:
        """Finishes a request with reason "error" (its step failed), freeing its blocks."""
        if not request.finished:
            if request in self.waiting:
                self.waiting.remove(request)
            self._finish(request, "error")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def num_waiting(self) -> int:
        """Requests not running: queued ones and decode legs receiving KV (vLLM counts both as waiting)."""
        return len(self.waiting) + len(self.loading)

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset()

    def _extend_hashes(self, req: EngineRequest) -> None:
        if not self.config.enable_prefix_caching:
            return
        done = len(req.block_hashes)
        if len(req.token_ids) // self.config.block_size > done:
            req.block_hashes.extend(
                block_hashes(
                    req.token_ids, self.config.block_size, self._hash_fn, self._root_hash,
                    lora_name=req.lora_name, cache_salt=req.cache_salt,
                    start=done, parent=req.block_hashes[-1] if done else None,
                )
            )

    # ---- scheduling ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        bm = self.block_manager
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens
        for req in [r for r in self.running if r.aborted]:
            self._finish(req, "abort")
            out.aborted.append(req)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            need = bm.blocks_needed(req.num_computed_tokens + n) - len(req.block_ids)
            new = bm.allocate(need) if need > 0 else []
            while new is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
                new = bm.allocate(need)
            if new is None:
                break
            req.block_ids.extend(new)
            out.scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n, self._samples(req, n)))
            budget -= n
            i += 1

        if out.preempted:
            return out
        busy = {r.lora.name for r in self.running if r.lora}
        skipped: list[EngineRequest] = []
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting.popleft()
            if req.lora and not self.loras.can_load(req.lora.name, busy):
                skipped.append(req)
                continue
            if req.kv_received:
                # A decode leg whose KV arrived: it holds its prompt's blocks; only the last token is left.
                computed = req.num_computed_tokens
                n = min(req.num_tokens - computed, budget)
                new = bm.allocate(bm.blocks_needed(computed + n) - len(req.block_ids))
                if new is None:
                    self.waiting.appendleft(req)
                    break
                req.block_ids.extend(new)
                req.kv_received = False
                if req.num_cached_tokens is None:
                    req.num_cached_tokens = computed
            else:
                hits = bm.lookup(req.block_hashes, (req.num_tokens - 1) // cfg.block_size)
                computed = len(hits) * cfg.block_size
                if req.remote_prefill and req.num_local_cached_tokens is None:
                    if not self._start_transfer(req, hits):
                        self.waiting.appendleft(req)
                        break
                    out.transfers.append(req)
                    continue
                n = min(req.num_tokens - computed, budget)
                new = bm.allocate(bm.blocks_needed(computed + n) - len(hits), hits)
                if new is None:
                    self.waiting.appendleft(req)
                    break
                req.block_ids = hits + new
                req.num_computed_tokens = computed
                req.num_cached_blocks = len(hits)
                if req.num_cached_tokens is None:
                    req.num_cached_tokens = computed
                if cfg.enable_prefix_caching:
                    self.prefix_cache_queries += req.num_tokens
                    self.prefix_cache_hits += computed
            if req.lora:
                if self.loras.acquire(req.lora.name, busy):
                    out.loaded_loras.append(req.lora)
                busy.add(req.lora.name)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, computed, n, self._samples(req, n)))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return out

    def _start_transfer(self, req: EngineRequest, hits: list[int]) -> bool:
        """Admits a decode leg into `loading`: blocks for the whole prompt, the local hit counted, the rest of
        the prompt in transfer. False (nothing changed) when the blocks are not free."""
        cfg = self.config
        bm = self.block_manager
        computed = len(hits) * cfg.block_size
        new = bm.allocate(bm.blocks_needed(req.num_tokens) - len(hits), hits)
        if new is None:
            return False
        req.block_ids = hits + new
        req.num_computed_tokens = computed
        req.num_cached_blocks = len(hits)
        req.num_local_cached_tokens = computed
        req.num_transferred_tokens = req.num_tokens - computed
        if cfg.enable_prefix_caching:
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += computed
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.loading.append(req)
        return True

    def finish_transfers(self, requests: list[EngineRequest]) -> None:
        """The KV of these decode legs has arrived (in this order): register the prompt's full blocks in the
        prefix cache and queue them first, resuming at their last prompt token."""
        cfg = self.config
        for req in reversed(requests):
            if req.status is not RequestStatus.WAITING_FOR_REMOTE_KV:
                continue  # aborted meanwhile
            self.loading.remove(req)
            req.num_computed_tokens = req.num_tokens - 1
            full = req.num_computed_tokens // cfg.block_size
            if full > req.num_cached_blocks:
                self.block_manager.cache_full_blocks(
                    req.block_ids, req.block_hashes, req.num_cached_blocks, full, req.token_ids,
                    lora_id=req.lora.id if req.lora else None, lora_name=req.lora_name,
                    cache_salt=req.cache_salt,
                )
                req.num_cached_blocks = full
            req.kv_received = True
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)

    @staticmethod
    def _samples(req: EngineRequest, n: int) -> bool:
        return req.num_computed_tokens + n == req.num_tokens

    def _preempt(self, req: EngineRequest) -> None:
        self.block_manager.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_cached_blocks = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: EngineRequest, reason: str) -> None:
        if req.remote_decode and req.transfer_block_ids is None:
            req.transfer_block_ids = list(req.block_ids)
        if req.block_ids:
            self.block_manager.free(req.block_ids)
            req.block_ids = []
        if req in self.running:
            self.running.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    # ---- after the step ----------------------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: dict[str, int], now: float) -> list[RequestUpdate]:
        """Applies a finished step: `sampled` maps request id -> the token sampled for it."""
        cfg = self.config
        updates = []
        for s in out.scheduled:
            req = s.request
            if req.status is not RequestStatus.RUNNING:
                continue
            if req.aborted:
                self._finish(req, "abort")
                updates.append(RequestUpdate(req, [], True))
                continue
            req.num_computed_tokens += s.num_new_tokens
            new_tokens: list[int] = []
            reason = None
            if s.samples:
                token = sampled[req.request_id]
                req.token_ids.append(token)
                new_tokens.append(token)
                if req.first_token_time is None:
                    req.first_token_time = now
                req.last_token_time = now
                self._extend_hashes(req)
                reason = self._stop_reason(req, token)
            full = req.num_computed_tokens // cfg.block_size
            if full > req.num_cached_blocks:
                self.block_manager.cache_full_blocks(
                    req.block_ids, req.block_hashes, req.num_cached_blocks, full, req.token_ids,
                    lora_id=req.lora.id if req.lora else None, lora_name=req.lora_name,
                    cache_salt=req.cache_salt,
                )
                req.num_cached_blocks = full
            if reason is not None:
                self._finish(req, reason)
            updates.append(RequestUpdate(req, new_tokens, reason is not None))
        return updates

    def _stop_reason(self, req: EngineRequest, token: int) -> str | None:
        p = req.params
        n_out = req.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and self.eos_token_id is not None and token == self.eos_token_id:
                return "stop"
            if token in p.stop_token_ids:
                return "stop"
        if n_out >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    # ---- gauges ------------------------------------------------------------------------------------

    def running_lora_names(self) -> list[str]:
        return _distinct(r.lora.name for r in self.running if r.lora)

    def waiting_lora_names(self) -> list[str]:
        return _distinct(r.lora.name for r in (*self.waiting, *self.loading) if r.lora)


def _distinct(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
