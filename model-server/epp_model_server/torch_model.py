"""A small decoder-only transformer with a paged KV cache (torch, CPU).

Llama-shaped: token embedding, `num_layers` pre-norm blocks (RMSNorm, multi-head attention with rotary
position embeddings, SwiGLU MLP), final RMSNorm, LM head. Weights are drawn from a fixed-seed generator,
so every process with the same sizes and seed has the same model (its output is gibberish, but
deterministic, which is all a routing testbed needs).

The KV cache is paged exactly like vLLM's: per layer a tensor of `num_blocks` blocks of `block_size` token
slots; a sequence's block table (from the shared BlockManager) maps position p to slot
(block_table[p // block_size], p % block_size). A forward pass computes only the requested positions
`start..start+n-1`, writes their K/V into their slots, and attends over all positions `0..start+n-1`
read back through the block table; positions below `start` (a prefix-cache hit, or earlier chunks) are
not recomputed. LoRA adapters are low-rank deltas on the query and value projections, with weights drawn
from a generator seeded by the adapter name.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class TorchModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_model_len: int = 32768
    rope_theta: float = 10000.0
    seed: int = 0
    lora_rank: int = 8

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("the head size (hidden_size / num_heads) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kv_bytes_per_block(self, block_size: int) -> int:
        return 2 * self.num_layers * block_size * self.hidden_size * 4


def _normal(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * std


@dataclass(slots=True)
class _Layer:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # [d, 3d]
    wo: torch.Tensor  # [d, d]
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor  # [d, 2f]
    w_down: torch.Tensor  # [f, d]


@dataclass(slots=True)
class LoRAWeights:
    """Per layer (A_q, B_q, A_v, B_v): q += h @ A_q @ B_q, v += h @ A_v @ B_v."""

    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class PagedKVCache:
    def __init__(self, config: TorchModelConfig, num_blocks: int, block_size: int) -> None:
        shape = (config.num_layers, num_blocks, block_size, config.num_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32)
        self.v = torch.zeros(shape, dtype=torch.float32)
        self.block_size = block_size
        self.num_blocks = num_blocks


class TinyDecoder:
    def __init__(self, config: TorchModelConfig) -> None:
        self.config = config
        d, f = config.hidden_size, config.intermediate_size
        gen = torch.Generator().manual_seed(config.seed)
        self.embed = _normal(gen, config.vocab_size, d, std=1.0)
        self.layers = [
            _Layer(
                attn_norm=torch.ones(d),
                wqkv=_normal(gen, d, 3 * d, std=1 / math.sqrt(d)),
                wo=_normal(gen, d, d, std=1 / math.sqrt(d)),
                mlp_norm=torch.ones(d),
                w_gate_up=_normal(gen, d, 2 * f, std=1 / math.sqrt(d)),
                w_down=_normal(gen, f, d, std=1 / math.sqrt(f)),
            )
            for _ in range(config.num_layers)
        ]
        self.final_norm = torch.ones(d)
        self.lm_head = _normal(gen, d, config.vocab_size, std=1 / math.sqrt(d))
        half = config.head_dim // 2
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
        angles = torch.outer(torch.arange(config.max_model_len, dtype=torch.float64), inv_freq)
        self._cos = angles.cos().to(torch.float32)
        self._sin = angles.sin().to(torch.float32)

    def make_lora(self, name: str) -> LoRAWeights:
        cfg = self.config
        d, r = cfg.hidden_size, cfg.lora_rank
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")) ^ cfg.seed)
        std_a, std_b = 1 / math.sqrt(d), 0.5 / math.sqrt(r)
        return LoRAWeights([
            (_normal(gen, d, r, std=std_a), _normal(gen, r, d, std=std_b),
             _normal(gen, d, r, std=std_a), _normal(gen, r, d, std=std_b))
            for _ in range(cfg.num_layers)
        ])

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [n, heads, head_dim]; rotate the two halves of each head.
        cos = self._cos[positions].unsqueeze(1)
        sin = self._sin[positions].unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: list[int],
        start: int,
        block_table: list[int],
        cache: PagedKVCache,
        *,
        lora: LoRAWeights | None = None,
        want_logits: bool = True,
    ) -> torch.Tensor | None:
        """Computes positions start..start+len(token_ids)-1; returns the last position's logits."""
        cfg = self.config
        n = len(token_ids)
        end = start + n
        bs = cache.block_size
        heads, hd = cfg.num_heads, cfg.head_dim
        positions = torch.arange(start, end)
        table = torch.tensor(block_table[: -(-end // bs)], dtype=torch.long)
        slot_blocks = table[positions // bs]
        slot_offsets = positions % bs
        mask = None
        if 0 < start and n > 1:
            mask = torch.arange(end).unsqueeze(0) <= positions.unsqueeze(1)
        x = self.embed[torch.tensor(token_ids, dtype=torch.long)]
        for li, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.attn_norm)
            q, k, v = (h @ layer.wqkv).split(cfg.hidden_size, dim=-1)
            if lora is not None:
                aq, bq, av, bv = lora.layers[li]
                q = q + (h @ aq) @ bq
                v = v + (h @ av) @ bv
            q = self._rope(q.reshape(n, heads, hd), positions)
            k = self._rope(k.reshape(n, heads, hd), positions)
            v = v.reshape(n, heads, hd)
            cache.k[li, slot_blocks, slot_offsets] = k
            cache.v[li, slot_blocks, slot_offsets] = v
            keys = cache.k[li, table].reshape(-1, heads, hd)[:end]
            values = cache.v[li, table].reshape(-1, heads, hd)[:end]
            # 4-D [batch, heads, len, head_dim] inputs select torch's fused CPU attention kernel.
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=(start == 0 and n > 1),
            )
            x = x + attn[0].transpose(0, 1).reshape(n, cfg.hidden_size) @ layer.wo
            h = self._rms_norm(x, layer.mlp_norm)
            gate, up = (h @ layer.w_gate_up).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.w_down
        if not want_logits:
            return None
        return self._rms_norm(x[-1], self.final_norm) @ self.lm_head
