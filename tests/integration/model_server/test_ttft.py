"""Time to first token depends on the uncached part of the prompt, on both engines; idle servers are idle."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time

import aiohttp
import orjson
import pytest

from epp_model_server.cost_model import CostModel

pytestmark = pytest.mark.integration


def prompt_of_2048_tokens(seed: int) -> str:
    """2,048 words of at most 8 letters: one built-in token each."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(1, 4)))
                    for _ in range(2048))


async def measure_ttft(http, server, prompt: str) -> tuple[float, int]:
    """Client-side time to the first streamed token, and the cached_tokens the server reported."""
    body = {"prompt": prompt, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    cached = None
    async with http.post(server.url + "/v1/completions", data=orjson.dumps(body)) as r:
        assert r.status == 200
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[len("data: "):])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert ttft is not None and cached is not None
    return ttft, cached


async def first_and_repeat(server, prompt: str):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(server.url + "/tokenize", data=orjson.dumps({"prompt": prompt})) as r:
            assert (await r.json())["count"] == 2048
        first = await measure_ttft(http, server, prompt)
        repeat = await measure_ttft(http, server, prompt)
    return first, repeat


async def test_sim_repeated_2k_prompt_has_a_much_lower_ttft(model_servers):
    server = model_servers()
    (ttft_first, cached_first), (ttft_repeat, cached_repeat) = await first_and_repeat(server, prompt_of_2048_tokens(1))
    cost = CostModel()
    assert (cached_first, cached_repeat) == (0, 2032)
    assert ttft_first >= cost.step_seconds(2048, 0)  # about 139 ms by the cost model
    assert ttft_repeat < ttft_first / 3  # about 11 ms by the cost model, plus HTTP


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
async def test_torch_repeated_2k_prompt_has_a_much_lower_ttft_by_measured_compute(model_servers):
    server = model_servers("--engine", "torch", "--torch-threads", "2", "--num-gpu-blocks", "256")
    (ttft_first, cached_first), (ttft_repeat, cached_repeat) = await first_and_repeat(server, prompt_of_2048_tokens(2))
    assert (cached_first, cached_repeat) == (0, 2032)
    assert ttft_repeat < ttft_first / 3, (ttft_first, ttft_repeat)


async def test_an_idle_server_uses_almost_no_cpu(model_servers):
    server = model_servers("--kv-events-config",
                           '{"enable_kv_cache_events":true,"endpoint":"tcp://*:*","replay_endpoint":"tcp://*:*"}')
    await asyncio.sleep(0.5)  # let start-up work settle
    before = server.cpu_seconds()
    await asyncio.sleep(2.0)
    assert server.cpu_seconds() - before <= 0.03  # no busy polling: at most a few scheduler ticks in 2 s
