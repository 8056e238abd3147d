"""One generation request as the engine core sees it (token ids in, token ids out)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .lora import LoRAAdapter


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # A decode leg receiving its prompt's KV from a prefiller (vLLM's WAITING_FOR_REMOTE_KVS): it holds its
    # blocks, computes nothing, and joins the waiting queue again once the transfer is done.
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What decides when generation stops. Decoding itself is greedy / deterministic in both engines."""

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None


@dataclass(eq=False, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    lora: LoRAAdapter | None = None
    cache_salt: str | None = None

    # All tokens so far: the prompt, then the generated tokens.
    token_ids: list[int] = field(default_factory=list)
    # Hashes of the full blocks of token_ids (extended as generation fills blocks).
    block_hashes: list[bytes] = field(default_factory=list)
    # Physical blocks holding this sequence's KV, in order.
    block_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (computed or reused).
    num_computed_tokens: int = 0
    # Leading blocks already offered to the prefix cache (registered, or known duplicates/hits).
    num_cached_blocks: int = 0
    # Prompt tokens served from the prefix cache at the first admission (None until admitted).
    num_cached_tokens: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    aborted: bool = False
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Opaque per-request state of the executor (e.g. the sim's output seed).
    executor_state: object = None

    # Disaggregated prefill/decode (see pd.py). remote_decode: the prefill leg (vLLM's do_remote_decode):
    # its blocks are handed to a decoder, so their ids are kept in transfer_block_ids when it finishes.
    # remote_prefill: the decode leg (do_remote_prefill): the prompt's KV beyond the local prefix-cache hit
    # arrives from the prefiller instead of being computed here.
    remote_decode: bool = False
    remote_prefill: bool = False
    transfer_block_ids: list[int] | None = None
    # Decode leg: prompt tokens found in the local prefix cache, tokens received, and when they arrive.
    num_local_cached_tokens: int | None = None
    num_transferred_tokens: int = 0
    kv_ready_time: float | None = None
    # The transfer is done and the blocks are still held: the next admission resumes at the last prompt token.
    kv_received: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def lora_name(self) -> str | None:
        return self.lora.name if self.lora else None

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
