"""Endpoint: one `ip:port` of the pool, its labels, its latest metrics and the EPP's own load counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Metrics:
    """One scrape of a model server, already mapped from its engine's metric names.

    The object is immutable; the scraper replaces `Endpoint.metrics` with a new one after each scrape,
    so a scheduling cycle always sees one consistent snapshot per endpoint.
    """

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0  # a fraction in [0, 1], as vLLM's kv_cache_usage_perc
    active_models: frozenset[str] = frozenset()  # LoRA adapters running
    waiting_models: frozenset[str] = frozenset()  # LoRA adapters waiting
    max_active_models: int = 0  # max_lora
    cache_block_size: int = 0  # tokens per KV block; 0 = unknown
    cache_num_blocks: int = 0  # KV blocks on the device; 0 = unknown
    update_time: float = 0.0  # time.monotonic() of the scrape; 0.0 = never scraped


NEVER_SCRAPED = Metrics()


@dataclass(eq=False, slots=True)
class Endpoint:
    """One serving endpoint. Identity is the object itself (eq=False keeps object's C-level identity hash),
    so endpoints key dicts cheaply.

    `name` is stable for the endpoint's life: `<pod>-rank-<i>` under Kubernetes, `ip:port` for a static pool.
    `in_flight` and `in_flight_tokens` are kept by the EPP itself (requests it routed here that have not
    finished), so load stays fresh between scrapes.
    """

    name: str
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    metrics: Metrics = NEVER_SCRAPED
    in_flight: int = 0
    in_flight_tokens: int = 0
    # Per-endpoint values written by data producers for the scorers of the same cycle, keyed by producer name.
    attributes: dict[str, Any] = field(default_factory=dict)
    hostport: str = ""

    def __post_init__(self) -> None:
        if not self.hostport:
            host = f"[{self.address}]" if ":" in self.address else self.address
            self.hostport = f"{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.hostport})"
