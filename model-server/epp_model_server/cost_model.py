"""The sim engine's step-time model, calibrated to an 8B model (Llama-3.1-8B class) on one H100.

A step computes a batch: the prompt chunks of prefilling requests plus one token for each decoding
request. Its wall time is

    step_seconds = step_base_s
                 + prefill_tokens / prefill_tokens_per_s       (only *uncached* prompt tokens are computed)
                 + decode_seqs * decode_s_per_seq

so time to first token grows with the uncached part of the prompt (cached blocks are skipped by the
scheduler before they reach the cost model), and the inter-token latency of a decoding request grows with
the batch size and with prefill chunks sharing its steps (as with vLLM's chunked prefill).

Defaults and their sources:
- `prefill_tokens_per_s = 15928`: llm-d router's `prefix-cache-affinity-filter` default
  `peakPrefillThroughput` (15928 tokens/s), the figure llm-d uses to turn in-flight uncached tokens into
  an estimated TTFT.
- `step_base_s = 0.010`: a decode step at batch size 1 takes 10 ms, the low end of the inter-token latency
  that llm-d-inference-sim's latency profiles (docs/latency-profiles.md) give for an 8B model on an H100
  (ITL 10-15 ms).
- `decode_s_per_seq = 0.0001`: each decoding sequence adds 0.1 ms, so a batch of 50 decodes reaches the
  high end of that range (15 ms).
- Check against the same profiles' TTFT of 60-120 ms: a 1,000-token uncached prompt alone gets
  10 + 62.8 = 73 ms, a 2,000-token one 136 ms; a fully cached 2,000-token prompt about 10 ms.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    step_base_s: float = 0.010
    prefill_tokens_per_s: float = 15928.0
    decode_s_per_seq: float = 0.0001

    def __post_init__(self) -> None:
        if self.step_base_s < 0 or self.decode_s_per_seq < 0:
            raise ValueError("step_base_s and decode_s_per_seq must not be negative")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be positive")

    def step_seconds(self, prefill_tokens: int, decode_seqs: int) -> float:
        """Modelled wall time of one engine step (before --time-scale)."""
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        return self.step_base_s + prefill_tokens / self.prefill_tokens_per_s + decode_seqs * self.decode_s_per_seq
