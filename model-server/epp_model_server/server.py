"""Wiring: a ServerConfig becomes a running server (tokenizer, engine, KV publisher, metrics, HTTP)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from .api import ServerState, build_app
from .config import ServerConfig
from .cost_model import CostModel
from .engine import Engine, Executor
from .hf_tokenizer import load_tokenizer
from .kv_publisher import KVEventsConfig, ZmqEventPublisher
from .lora import LoRARegistry
from .metrics import ServerMetrics
from .pd import PrefillClient, new_engine_id
from .scheduler import Scheduler, SchedulerConfig
from .sim_engine import SimExecutor
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ConfigurationError(ValueError):
    """A flag combination the server cannot run with; the message says which and what to do."""


def _make_executor(cfg: ServerConfig, tokenizer: Tokenizer) -> Executor:
    if cfg.engine == "sim":
        cost = CostModel(
            step_base_s=cfg.step_base_ms / 1000.0,
            prefill_tokens_per_s=cfg.prefill_tokens_per_s,
            decode_s_per_seq=cfg.decode_ms_per_seq / 1000.0,
        )
        return SimExecutor(cost, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                           seed=cfg.seed, time_scale=cfg.time_scale)
    if cfg.engine == "torch":
        try:
            from .torch_engine import TorchExecutor  # noqa: PLC0415 (torch is optional and heavy)
            from .torch_model import TorchModelConfig  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigurationError(
                f"--engine torch needs PyTorch ({exc}); install the CPU build (see the Makefile) or use --engine sim"
            ) from exc
        model_cfg = TorchModelConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, max_model_len=cfg.max_model_len,
            seed=cfg.seed,
        )
        return TorchExecutor(model_cfg, num_blocks=cfg.gpu_blocks, block_size=cfg.block_size,
                             threads=cfg.torch_threads)
    raise ConfigurationError(f"unknown --engine {cfg.engine!r}; choose sim or torch")


def cache_config_labels(cfg: ServerConfig) -> dict[str, str]:
    """The labels of vllm:cache_config_info (vLLM's CacheConfig fields as strings)."""
    return {
        "block_size": str(cfg.block_size),
        "cache_dtype": "auto",
        "enable_prefix_caching": str(cfg.enable_prefix_caching),
        "gpu_memory_utilization": "0.9",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(cfg.gpu_blocks),
        "prefix_caching_hash_algo": cfg.prefix_caching_hash_algo,
    }


def advertised_host(cfg: ServerConfig) -> str:
    """The address a prefill leg names as `remote_host`: --host when it is one address, else $POD_IP, else the
    host name."""
    if cfg.host not in ("", "0.0.0.0", "::"):
        return cfg.host
    return os.environ.get("POD_IP") or socket.gethostname()


class ModelServer:
    """One model-server pod: build with a config, `await start()`, `await stop()`."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        if cfg.sidecar_enabled and cfg.engine != "sim":
            raise ConfigurationError(
                f"the decode sidecar (--pd-sidecar, on by default for --role decode) needs --engine sim: the "
                f"{cfg.engine} engine's K/V are real tensors that no prefiller sends; pass --no-pd-sidecar or use "
                "--engine sim")
        self.kv_config = KVEventsConfig.from_json(cfg.kv_events_config)
        names = cfg.served_names
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.vocab_size)
        chat_template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
        self.loras = LoRARegistry(cfg.lora_modules, reserved_names=names)
        self.scheduler = Scheduler(
            SchedulerConfig(
                block_size=cfg.block_size, num_gpu_blocks=cfg.gpu_blocks, max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_model_len,
                enable_prefix_caching=cfg.enable_prefix_caching, max_loras=cfg.max_loras,
                hash_algo=cfg.prefix_caching_hash_algo, hash_seed=cfg.hash_seed,
            ),
            eos_token_id=self.tokenizer.eos_token_id,
        )
        self.executor = _make_executor(cfg, self.tokenizer)
        self.publisher: ZmqEventPublisher | None = None
        self.engine = Engine(self.scheduler, self.executor, publish=self._publish,
                             lora_load_s=cfg.lora_load_ms / 1000.0,
                             time_scale=cfg.time_scale if cfg.engine == "sim" else 1.0,
                             kv_transfer_s_per_token=cfg.kv_transfer_ms_per_token / 1000.0,
                             kv_transfer_latency_s=cfg.kv_transfer_latency_ms / 1000.0)
        self.metrics = ServerMetrics(
            names[0], cache_config=cache_config_labels(cfg), max_model_len=cfg.max_model_len,
            max_loras=cfg.max_loras if cfg.lora_enabled else None, gauges=self.engine.gauges,
        )
        self.engine.metrics = self.metrics
        self.state = ServerState(
            served_model_names=names, model_path=cfg.model, max_model_len=cfg.max_model_len,
            tokenizer=self.tokenizer, engine=self.engine, metrics=self.metrics, loras=self.loras,
            default_max_tokens=cfg.default_max_tokens, chat_template=chat_template,
            pod_name=cfg.resolved_pod_name(), namespace=os.environ.get("POD_NAMESPACE") or None,
            role=cfg.role, engine_id=new_engine_id(), advertised_host=advertised_host(cfg),
            accepts_remote_kv=cfg.engine == "sim",
        )
        if cfg.sidecar_enabled:
            self.state.sidecar = PrefillClient(
                max_retries=cfg.prefill_max_retries, backoff_s=cfg.prefill_retry_backoff_ms / 1000.0,
                timeout_s=cfg.prefill_timeout_s, metrics=self.metrics,
            )
        self._runner: web.AppRunner | None = None
        self.port = cfg.port

    def _publish(self, events) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)

    async def start(self) -> None:
        cfg = self.cfg
        if self.kv_config.active:
            self.publisher = ZmqEventPublisher(self.kv_config, host=cfg.host, fmt=cfg.kv_events_format)
            self.publisher.start()
        self.engine.start()
        self._runner = web.AppRunner(build_app(self.state), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        sock = _listen_socket(cfg.host, cfg.port)
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.port = sock.getsockname()[1]
        self.state.port = self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.state.sidecar is not None:
            await self.state.sidecar.close()
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.aclose()
            self.publisher = None

    def describe(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        parts = [f"epp-model-server ready: http://{host}:{self.port}", f"engine={self.cfg.engine}",
                 f"model={self.state.served_model_names[0]}", f"blocks={self.cfg.gpu_blocks}x{self.cfg.block_size}",
                 f"role={self.cfg.role}", f"pd-sidecar={'on' if self.cfg.sidecar_enabled else 'off'}"]
        if self.publisher is not None:
            parts.append(f"kv-events={self.publisher.endpoint}")
            if self.publisher.replay_endpoint:
                parts.append(f"kv-replay={self.publisher.replay_endpoint}")
        return " ".join(parts)


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --host/--port") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(cfg: ServerConfig, on_ready: Callable[[ModelServer], None] | None = None) -> None:
    """Runs a server until SIGINT/SIGTERM."""
    server = ModelServer(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
    finally:
        await server.stop()
