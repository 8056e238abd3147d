"""The sim executor: no model, wall-clock time from the cost model, deterministic output tokens.

Output token i of a request is a pure function of (seed, prompt token ids, i): the seed is the request's
`seed` when it has one, else the server's `--seed`. So the same prompt and seed always give the same
text, whatever the batch, the cache state or preemptions. Special ids (below 4) and the EOS id are never
produced: generation runs to `max_tokens`.
"""

from __future__ import annotations

import asyncio
import zlib
from array import array
from collections.abc import Awaitable, Callable

from .cost_model import CostModel
from .lora import LoRAAdapter
from .request import EngineRequest
from .scheduler import SchedulerOutput
from .tokenizer import FIRST_REGULAR_ID

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """A well-mixed 64-bit function of a 64-bit input (SplitMix64's finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def output_key(seed: int, prompt_token_ids: list[int]) -> int:
    """The per-request key output tokens derive from."""
    prompt_crc = zlib.crc32(array("I", prompt_token_ids).tobytes())
    return splitmix64(((seed & 0xFFFFFFFF) << 32) | prompt_crc)


def output_token(key: int, index: int, vocab_size: int, eos_token_id: int | None) -> int:
    token = FIRST_REGULAR_ID + splitmix64(key ^ index) % (vocab_size - FIRST_REGULAR_ID)
    if token == eos_token_id:
        token = FIRST_REGULAR_ID + (token + 1 - FIRST_REGULAR_ID) % (vocab_size - FIRST_REGULAR_ID)
    return token


class SimExecutor:
    def __init__(
        self,
        cost: CostModel,
        *,
        vocab_size: int,
        eos_token_id: int | None = None,
        seed: int = 0,
        time_scale: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.cost = cost
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.seed = seed
        self.time_scale = time_scale
        self._sleep = sleep

    def prepare(self, request: EngineRequest) -> None:
        seed = request.params.seed if request.params.seed is not None else self.seed
        request.executor_state = output_key(seed, request.prompt_token_ids)

    def load_lora(self, adapter: LoRAAdapter) -> None:
        """Nothing to load: the engine core charges --lora-load-ms."""

    def step_seconds(self, out: SchedulerOutput) -> float:
        return self.cost.step_seconds(out.num_prefill_tokens, out.num_decode_seqs) / self.time_scale

    async def execute(self, out: SchedulerOutput) -> dict[str, int]:
        await self._sleep(self.step_seconds(out))
        sampled = {}
        for s in out.scheduled:
            if s.samples:
                req = s.request
                sampled[req.request_id] = output_token(
                    req.executor_state, req.num_output_tokens, self.vocab_size, self.eos_token_id
                )
        return sampled

    def close(self) -> None:
        pass
