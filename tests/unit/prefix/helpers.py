"""Helpers shared by the prefix-plugin tests: requests, pools and scheduling results built in one line."""

from __future__ import annotations

from typing import Any

from epp.datastore.endpoint import Endpoint, Metrics
from epp.datastore.pool import Pool
from epp.request import CHAT_COMPLETIONS, COMPLETIONS, LLMRequest
from epp.scheduling.registry import PluginHandle, create, load_builtin_plugins
from epp.scheduling.types import ProfileResult, SchedulingResult

load_builtin_plugins()

BLOCK = 64  # characters per block with the default blockSizeTokens (16 tokens × 4 characters)


def completion(prompt: str, model: str = "m", cache_salt: str | None = None, request_id: str = "r") -> LLMRequest:
    return LLMRequest(
        request_id=request_id, api=COMPLETIONS, model=model, target_model=model, body={"prompt": prompt},
        headers={}, size_bytes=len(prompt), prompt=prompt, cache_salt=cache_salt,
    )


def chat(messages: list[dict[str, Any]], model: str = "m", cache_salt: str | None = None) -> LLMRequest:
    return LLMRequest(
        request_id="r", api=CHAT_COMPLETIONS, model=model, target_model=model, body={"messages": messages},
        headers={}, size_bytes=0, messages=messages, cache_salt=cache_salt,
    )


def text(n_blocks: int, tag: str = "a", block: int = BLOCK) -> str:
    """`n_blocks` full blocks, block i different for different (tag, i)."""
    return "".join(f"{tag}{i:06d}".ljust(block, ".") for i in range(n_blocks))


def make_pool(n: int, metrics: Metrics | None = None) -> Pool:
    pool = Pool()
    pool.replace(
        Endpoint(f"pod-{i}", f"127.0.0.{i + 2}", 8000, metrics=metrics or Metrics()) for i in range(n)
    )
    return pool


def producer(pool: Pool, params: dict[str, Any] | None = None, name: str = "approx-prefix-cache-producer"):
    return create("approx-prefix-cache-producer", name, params, PluginHandle(pool))


def scorer(params: dict[str, Any] | None = None, name: str = "prefix-cache-scorer", pool: Pool | None = None):
    return create("prefix-cache-scorer", name, params, PluginHandle(pool))


def routed_to(*endpoints: Endpoint, prefill: Endpoint | None = None, profile: str = "default") -> SchedulingResult:
    results: dict[str, ProfileResult | None] = {profile: ProfileResult(tuple(endpoints))}
    if prefill is not None:
        results["prefill"] = ProfileResult((prefill,))
    return SchedulingResult(results, profile)
