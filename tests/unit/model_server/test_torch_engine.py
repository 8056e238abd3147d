"""The torch engine: reusing cached KV blocks gives exactly the tokens of computing from scratch."""

import asyncio
import dataclasses
import itertools

import pytest

torch = pytest.importorskip("torch")

from epp_model_server.engine import Engine  # noqa: E402
from epp_model_server.lora import LoRAAdapter  # noqa: E402
from epp_model_server.request import EngineRequest, SamplingParams  # noqa: E402
from epp_model_server.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from epp_model_server.torch_engine import TorchExecutor  # noqa: E402
from epp_model_server.torch_model import PagedKVCache, TinyDecoder, TorchModelConfig  # noqa: E402

SMALL = TorchModelConfig(vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                         max_model_len=2048, seed=3)
_ids = itertools.count()


def greedy(model: TinyDecoder, cache: PagedKVCache, tokens: list[int], table: list[int], n: int,
           start: int = 0) -> list[int]:
    """Greedy decoding computing positions start.. of `tokens` (earlier positions must be in the cache)."""
    seq = list(tokens)
    out = []
    logits = model.forward(seq[start:], start, table, cache)
    for _ in range(n):
        token = int(torch.argmax(logits))
        out.append(token)
        seq.append(token)
        logits = model.forward([token], len(seq) - 1, table, cache)
    return out


def test_model_with_a_cached_prefix_generates_the_same_tokens_as_from_scratch():
    model = TinyDecoder(SMALL)
    prompt = [(i * 37) % 490 + 5 for i in range(100)]
    scratch = greedy(model, PagedKVCache(SMALL, 32, 16), prompt, list(range(32)), 12)
    cache = PagedKVCache(SMALL, 32, 16)
    table = [31 - i for i in range(32)]  # a scattered block table
    model.forward(prompt[:64], 0, table, cache, want_logits=False)  # prefix computed by an earlier request
    assert greedy(model, cache, prompt, table, 12, start=64) == scratch


def test_chunked_prefill_equals_one_pass_prefill():
    model = TinyDecoder(SMALL)
    prompt = [(i * 11) % 490 + 5 for i in range(70)]
    one = model.forward(prompt, 0, list(range(8)), PagedKVCache(SMALL, 8, 16))
    cache = PagedKVCache(SMALL, 8, 16)
    for start in range(0, 60, 20):
        model.forward(prompt[start:start + 20], start, list(range(8)), cache, want_logits=False)
    chunked = model.forward(prompt[60:], 60, list(range(8)), cache)
    assert int(torch.argmax(one)) == int(torch.argmax(chunked))
    torch.testing.assert_close(one, chunked, rtol=1e-4, atol=1e-4)


def test_weights_are_a_function_of_the_seed():
    a, b, c = TinyDecoder(SMALL), TinyDecoder(SMALL), TinyDecoder(dataclasses.replace(SMALL, seed=4))
    assert torch.equal(a.lm_head, b.lm_head) and not torch.equal(a.lm_head, c.lm_head)


def make_engine(blocks=64, **sched) -> Engine:
    scheduler = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=blocks, max_model_len=2048, **sched))
    return Engine(scheduler, TorchExecutor(SMALL, num_blocks=blocks, block_size=16))


async def run(engine: Engine, tokens, max_tokens=8, lora=None) -> EngineRequest:
    req = EngineRequest(request_id=f"t{next(_ids)}", prompt_token_ids=list(tokens), arrival_time=0.0,
                        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), lora=lora)
    async for _ in engine.submit(req).outputs():
        pass
    return req


async def test_engine_generation_reusing_cached_blocks_matches_a_fresh_engine():
    system = [(i * 7) % 490 + 5 for i in range(96)]
    question = [(i * 13) % 490 + 5 for i in range(30)]
    warm = make_engine()
    warm.start()
    fresh = make_engine()
    fresh.start()
    try:
        await run(warm, system + [9, 9, 9])  # fills the cache with the shared system prompt
        reused = await run(warm, system + question)
        scratch = await run(fresh, system + question)
    finally:
        await warm.stop()
        await fresh.stop()
    assert reused.num_cached_tokens == 96 and scratch.num_cached_tokens == 0
    assert reused.output_token_ids == scratch.output_token_ids


async def test_engine_with_chunked_prefill_and_batching_matches_single_requests():
    prompts = [[(i * k) % 490 + 5 for i in range(60)] for k in (3, 5, 7)]
    solo = make_engine()
    solo.start()
    batched = make_engine(max_num_batched_tokens=32)
    batched.start()
    try:
        expected = [(await run(solo, p)).output_token_ids for p in prompts]
        got = await asyncio.gather(*(run(batched, p) for p in prompts))
    finally:
        await solo.stop()
        await batched.stop()
    assert [r.output_token_ids for r in got] == expected


async def test_a_lora_adapter_changes_the_output_and_does_not_share_the_base_cache():
    engine = make_engine(max_loras=1)
    engine.start()
    prompt = [(i * 17) % 490 + 5 for i in range(64)]
    try:
        base = await run(engine, prompt)
        ad = LoRAAdapter("ad", "/ad", 1)
        tuned = await run(engine, prompt, lora=ad)
        again = await run(engine, prompt, lora=ad)
    finally:
        await engine.stop()
    assert tuned.num_cached_tokens == 0 and again.num_cached_tokens == 48
    assert tuned.output_token_ids != base.output_token_ids
    assert again.output_token_ids == tuned.output_token_ids


def test_prompt_ids_outside_the_vocabulary_are_refused():
    executor = TorchExecutor(SMALL, num_blocks=4, block_size=16)
    req = EngineRequest(request_id="x", prompt_token_ids=[1, 500], arrival_time=0.0,
                        params=SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        executor.prepare(req)
    executor.close()
