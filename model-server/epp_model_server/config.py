"""Server configuration: the command-line flags (vLLM's names where the meaning is the same)."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from .events import FORMATS
from .hashing import DEFAULT_HASH_SEED, HASH_ALGOS
from .tokenizer import DEFAULT_VOCAB_SIZE

DEFAULT_MODEL = "epp/sim-8b"

# The sim's default cache: Llama-3.1-8B on one H100-80GB at vLLM's gpu_memory_utilization 0.9 leaves
# about 52 GB for KV after 16 GB of bf16 weights and activations; one token's KV is
# 2 (K,V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB, so about 400k tokens = 25,000 blocks.
SIM_DEFAULT_NUM_GPU_BLOCKS = 25_000
# The torch engine's default cache: 16k tokens (128 MiB of K/V at the default model sizes).
TORCH_DEFAULT_NUM_GPU_BLOCKS = 1024

# llm-d's pod roles (label llm-d.ai/role); prefill-decode is the same as both.
ROLES = ("both", "prefill", "decode", "prefill-decode")
# KV transfer time per token of a decode leg: one token of the sim's model (8B) holds 128 KiB of K/V
# (32 layers x 8 KV heads x 128 dims x K,V x 2 bytes); NIXL over one 200 Gb/s RDMA link moves ~25 GB/s,
# so 131072 B / 25e9 B/s = 5.2 us per token: an 8k-token prompt in ~43 ms, where prefilling it takes ~520 ms.
DEFAULT_KV_TRANSFER_MS_PER_TOKEN = 0.005


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    model: str = DEFAULT_MODEL
    served_model_name: tuple[str, ...] = ()
    engine: str = "sim"
    pod_name: str | None = None
    # cache and scheduling
    block_size: int = 16
    num_gpu_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    hash_seed: str = DEFAULT_HASH_SEED
    default_max_tokens: int = 16
    # KV events
    kv_events_config: str | None = None
    kv_events_format: str = "map"
    # tokenizer
    tokenizer: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    chat_template: str | None = None
    # LoRA
    enable_lora: bool = False
    lora_modules: tuple[str, ...] = ()
    max_loras: int = 1
    lora_load_ms: float = 50.0
    # sim cost model
    seed: int = 0
    time_scale: float = 1.0
    step_base_ms: float = 10.0
    prefill_tokens_per_s: float = 15928.0
    decode_ms_per_seq: float = 0.1
    # torch model
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    torch_threads: int | None = None
    log_level: str = "info"
    # disaggregated prefill/decode (pd.py)
    role: str = "both"
    pd_sidecar: bool | None = None  # None: on when role is decode
    kv_transfer_ms_per_token: float = DEFAULT_KV_TRANSFER_MS_PER_TOKEN
    kv_transfer_latency_ms: float = 0.0
    prefill_max_retries: int = 3
    prefill_retry_backoff_ms: float = 50.0
    prefill_timeout_s: float = 300.0

    @property
    def served_names(self) -> list[str]:
        return list(self.served_model_name) or [self.model]

    @property
    def gpu_blocks(self) -> int:
        if self.num_gpu_blocks is not None:
            return self.num_gpu_blocks
        return SIM_DEFAULT_NUM_GPU_BLOCKS if self.engine == "sim" else TORCH_DEFAULT_NUM_GPU_BLOCKS

    @property
    def sidecar_enabled(self) -> bool:
        """Whether a request with x-prefiller-host-port is first prefilled there (llm-d's decode sidecar)."""
        return self.pd_sidecar if self.pd_sidecar is not None else self.role == "decode"

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    def resolved_pod_name(self) -> str:
        if self.pod_name:
            return self.pod_name
        env = os.environ.get("POD_NAME")
        if env:
            return env
        return self.host if self.host not in ("", "0.0.0.0", "::") else socket.gethostname()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (their help text says what applies)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], ()) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp-model-server",
        description="A vLLM-compatible prefix-caching model server for CPU (simulated or small torch model).",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (one pod = one loopback address locally)")
    g.add_argument("--port", type=_port, default=8000, help="HTTP port (0 picks a free one)")
    g.add_argument("--model", default=DEFAULT_MODEL, help="model name served when --served-model-name is unset")
    g.add_argument("--served-model-name", nargs="+", default=[], help="names the API accepts (first = metrics)")
    g.add_argument("--engine", choices=("sim", "torch"), default="sim", help="sim: cost model; torch: real model")
    g.add_argument("--pod-name", default=None, help="x-inference-pod header (default: $POD_NAME, else --host)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="logging threshold")

    g = p.add_argument_group("cache and scheduling")
    g.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV-cache block")
    g.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=_positive_int,
                   default=None, help=f"KV-cache blocks (default: sim {SIM_DEFAULT_NUM_GPU_BLOCKS}, "
                                      f"torch {TORCH_DEFAULT_NUM_GPU_BLOCKS})")
    g.add_argument("--max-num-seqs", type=_positive_int, default=256, help="most requests running at once")
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192,
                   help="token budget of one engine step (chunked prefill)")
    g.add_argument("--max-model-len", type=_positive_int, default=32768, help="prompt + output token limit")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached KV blocks of shared prefixes")
    g.add_argument("--prefix-caching-hash-algo", choices=HASH_ALGOS, default="sha256",
                   help="block hash function (vLLM's names)")
    g.add_argument("--hash-seed", default=None,
                   help=f"seed of the block-hash chain (default: $PYTHONHASHSEED, else {DEFAULT_HASH_SEED!r})")
    g.add_argument("--default-max-tokens", type=_positive_int, default=16,
                   help="output length when a request sets no max_tokens")

    g = p.add_argument_group("KV events")
    g.add_argument("--kv-events-config", default=None,
                   help='vLLM\'s JSON, e.g. \'{"enable_kv_cache_events":true,"publisher":"zmq",'
                        '"endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv-events"}\'')
    g.add_argument("--kv-events-format", choices=FORMATS, default="map",
                   help="map: current vLLM (tagged maps); array: older vLLM (tagged arrays)")

    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default=None,
                   help="a Hugging Face tokenizer.json (or its directory); default: the built-in tokenizer")
    g.add_argument("--vocab-size", type=_positive_int, default=DEFAULT_VOCAB_SIZE,
                   help="vocabulary size of the built-in tokenizer")
    g.add_argument("--chat-template", default=None,
                   help="a jinja2 chat template file overriding the tokenizer's")

    g = p.add_argument_group("LoRA")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (implied by --lora-modules)")
    g.add_argument("--lora-modules", nargs="+", action="extend", default=[],
                   help='adapters as name=path or {"name":..,"path":..,"base_model_name":..}')
    g.add_argument("--max-loras", type=_positive_int, default=1, help="adapters resident at once")
    g.add_argument("--lora-load-ms", type=_non_negative_float, default=50.0,
                   help="time to load an adapter that is not resident")

    g = p.add_argument_group("sim cost model (see cost_model.py for the calibration)")
    g.add_argument("--seed", type=int, default=0, help="output seed when a request sets none")
    g.add_argument("--time-scale", type=_positive_float, default=1.0,
                   help="speed-up of the sim clock (10 = ten times faster than modelled)")
    g.add_argument("--step-base-ms", type=_non_negative_float, default=10.0,
                   help="fixed time of one engine step (decode ITL at batch 1)")
    g.add_argument("--prefill-tokens-per-s", type=_positive_float, default=15928.0,
                   help="prefill throughput for uncached prompt tokens")
    g.add_argument("--decode-ms-per-seq", type=_non_negative_float, default=0.1,
                   help="time each decoding sequence adds to a step")

    g = p.add_argument_group("disaggregated prefill/decode (llm-d's P/D; see the README)")
    g.add_argument("--role", choices=ROLES, default="both",
                   help="this pod's llm-d.ai/role; informational (reported in /v1/models and the ready line) "
                        "except that decode turns the sidecar on; the EPP reads the pod label, not this flag")
    g.add_argument("--pd-sidecar", action=argparse.BooleanOptionalAction, default=None,
                   help="act as llm-d's decode sidecar: a request with x-prefiller-host-port is first prefilled "
                        "there, then decoded here with the KV it sent (default: on for --role decode)")
    g.add_argument("--kv-transfer-time-per-token", "--kv-cache-transfer-time-per-token",
                   dest="kv_transfer_ms_per_token", type=_non_negative_float,
                   default=DEFAULT_KV_TRANSFER_MS_PER_TOKEN,
                   help="ms a decode leg spends receiving one prompt token's KV (NIXL, 128 KiB/token at 25 GB/s)")
    g.add_argument("--kv-transfer-latency", "--kv-cache-transfer-latency", dest="kv_transfer_latency_ms",
                   type=_non_negative_float, default=0.0, help="fixed ms added to every KV transfer")
    g.add_argument("--prefill-max-retries", type=_non_negative_int, default=3,
                   help="sidecar: retries of a prefill call answered 502/503/504 or failing to connect")
    g.add_argument("--prefill-retry-backoff-ms", type=_non_negative_float, default=50.0,
                   help="sidecar: wait before the first retry, doubled for each next one")
    g.add_argument("--prefill-timeout", dest="prefill_timeout_s", type=_positive_float, default=300.0,
                   help="sidecar: seconds a prefill call may take before the request fails with 502")

    g = p.add_argument_group("torch model")
    g.add_argument("--hidden-size", type=_positive_int, default=256)
    g.add_argument("--num-layers", type=_positive_int, default=4)
    g.add_argument("--num-heads", type=_positive_int, default=4)
    g.add_argument("--intermediate-size", type=_positive_int, default=512)
    g.add_argument("--torch-threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    values["served_model_name"] = tuple(values["served_model_name"])
    values["lora_modules"] = tuple(values["lora_modules"])
    if values["hash_seed"] is None:
        values["hash_seed"] = os.environ.get("PYTHONHASHSEED") or DEFAULT_HASH_SEED
    return ServerConfig(**values)
