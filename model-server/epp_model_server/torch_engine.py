"""The torch executor: runs each scheduled chunk through the TinyDecoder with the paged KV cache.

The KV cache has exactly the BlockManager's blocks, and each request's block table comes from it, so a
prefix-cache hit means the hit blocks' K/V are already in the cache and their positions are not
recomputed: a cached repeat of a long prompt only computes its last token. Decoding is greedy (argmax).

The computation runs in one worker thread so the event loop keeps serving /metrics and new requests
during a step; the thread gets a snapshot of each chunk (tokens, start, block table), and the engine
touches no request state until the step returns.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .lora import LoRAAdapter
from .request import EngineRequest
from .scheduler import SchedulerOutput
from .torch_model import LoRAWeights, PagedKVCache, TinyDecoder, TorchModelConfig


@dataclass(frozen=True, slots=True)
class _Chunk:
    request_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]
    samples: bool
    lora: str | None


class TorchExecutor:
    def __init__(
        self,
        config: TorchModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model = TinyDecoder(config)
        self.cache = PagedKVCache(config, num_blocks, block_size)
        self._loras: dict[str, LoRAWeights] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-step")

    def prepare(self, request: EngineRequest) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")

    def load_lora(self, adapter: LoRAAdapter) -> None:
        if adapter.name not in self._loras:
            self._loras[adapter.name] = self.model.make_lora(adapter.name)

    def unload_lora(self, name: str) -> None:
        self._loras.pop(name, None)

    def run_chunks(self, chunks: list[_Chunk]) -> dict[str, int]:
        sampled = {}
        for c in chunks:
            logits = self.model.forward(
                c.token_ids, c.start, c.block_table, self.cache,
                lora=self._loras.get(c.lora) if c.lora else None, want_logits=c.samples,
            )
            if c.samples and logits is not None:
                sampled[c.request_id] = int(torch.argmax(logits))
        return sampled

    async def execute(self, out: SchedulerOutput) -> dict[str, int]:
        chunks = []
        for s in out.scheduled:
            req = s.request
            if req.lora is not None:
                self.load_lora(req.lora)
            chunks.append(_Chunk(
                request_id=req.request_id,
                token_ids=req.token_ids[s.start : s.start + s.num_new_tokens],
                start=s.start,
                block_table=list(req.block_ids),
                samples=s.samples,
                lora=req.lora_name,
            ))
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.run_chunks, chunks)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
