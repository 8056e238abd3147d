"""The engine loop with the sim executor, on a virtual clock: timing by the cost model, outputs, events."""

import asyncio
import itertools

import pytest

from epp_model_server.cost_model import CostModel
from epp_model_server.engine import Engine
from epp_model_server.events import BlockStored
from epp_model_server.lora import LoRAAdapter
from epp_model_server.metrics import ServerMetrics
from epp_model_server.request import EngineRequest, SamplingParams
from epp_model_server.scheduler import Scheduler, SchedulerConfig
from epp_model_server.sim_engine import SimExecutor, output_key, output_token

_ids = itertools.count()
COST = CostModel()  # the calibrated defaults


class VirtualClock:
    """Time that only moves when the engine sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def make_engine(clock: VirtualClock, *, blocks=4096, time_scale=1.0, lora_load_s=0.0, publish=None,
                **sched_kwargs) -> Engine:
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=blocks, **sched_kwargs), eos_token_id=2)
    executor = SimExecutor(COST, vocab_size=32000, eos_token_id=2, seed=0, time_scale=time_scale,
                           sleep=clock.sleep)
    engine = Engine(sched, executor, publish=publish, clock=clock, sleep=clock.sleep, lora_load_s=lora_load_s,
                    time_scale=time_scale)
    engine.metrics = ServerMetrics("m", cache_config={}, max_model_len=32768, max_loras=None,
                                   gauges=engine.gauges)
    return engine


def request(clock, tokens, max_tokens=4, seed=None, lora=None) -> EngineRequest:
    return EngineRequest(request_id=f"q{next(_ids)}", prompt_token_ids=list(tokens),
                         params=SamplingParams(max_tokens=max_tokens, seed=seed), arrival_time=clock(), lora=lora)


async def generate(engine: Engine, req: EngineRequest) -> list[int]:
    tokens = []
    async for out in engine.submit(req).outputs():
        tokens += out.new_token_ids
    return tokens


@pytest.fixture
async def clock_engine():
    clock = VirtualClock()
    engine = make_engine(clock)
    engine.start()
    yield clock, engine
    await engine.stop()


async def test_repeated_2k_prompt_has_a_much_lower_ttft_by_the_cost_model(clock_engine):
    clock, engine = clock_engine
    prompt = list(range(1000, 3048))  # 2048 tokens = 128 blocks
    first = request(clock, prompt)
    await generate(engine, first)
    repeat = request(clock, prompt)
    await generate(engine, repeat)
    ttft_first = first.first_token_time - first.arrival_time
    ttft_repeat = repeat.first_token_time - repeat.arrival_time
    assert ttft_first == pytest.approx(COST.step_base_s + 2048 / COST.prefill_tokens_per_s)
    # 127 blocks hit; the last block is recomputed because the last prompt token always is.
    assert repeat.num_cached_tokens == 2032
    assert ttft_repeat == pytest.approx(COST.step_base_s + 16 / COST.prefill_tokens_per_s)
    assert ttft_first > 10 * ttft_repeat


async def test_decode_steps_take_longer_with_more_sequences_in_the_batch(clock_engine):
    clock, engine = clock_engine
    reqs = [request(clock, range(i * 100, i * 100 + 10), max_tokens=3) for i in range(8)]
    await asyncio.gather(*(generate(engine, r) for r in reqs))
    decode_step = COST.step_base_s + 8 * COST.decode_s_per_seq
    assert clock.sleeps[-1] == pytest.approx(decode_step)
    assert decode_step > COST.step_seconds(0, 1)


async def test_output_is_max_tokens_long_and_a_pure_function_of_seed_and_prompt(clock_engine):
    clock, engine = clock_engine
    a = await generate(engine, request(clock, range(50), max_tokens=6, seed=1))
    b = await generate(engine, request(clock, range(50), max_tokens=6, seed=1))
    c = await generate(engine, request(clock, range(50), max_tokens=6, seed=2))
    d = await generate(engine, request(clock, range(1, 51), max_tokens=6, seed=1))
    assert len(a) == 6 and a == b
    assert a != c and a != d
    key = output_key(1, list(range(50)))
    assert a == [output_token(key, i, 32000, 2) for i in range(6)]


async def test_time_scale_divides_every_modelled_sleep():
    clock = VirtualClock()
    engine = make_engine(clock, time_scale=10.0)
    engine.start()
    try:
        req = request(clock, range(1000))
        await generate(engine, req)
    finally:
        await engine.stop()
    assert clock.sleeps[0] == pytest.approx((COST.step_base_s + 1000 / COST.prefill_tokens_per_s) / 10)


async def test_loading_an_adapter_costs_the_lora_load_time_once():
    clock = VirtualClock()
    engine = make_engine(clock, lora_load_s=0.05, max_loras=1)
    engine.start()
    ad = LoRAAdapter("ad", "/ad", 1)
    try:
        await generate(engine, request(clock, range(10), max_tokens=1, lora=ad))
        await generate(engine, request(clock, range(20, 30), max_tokens=1, lora=ad))
    finally:
        await engine.stop()
    assert clock.sleeps.count(0.05) == 1


async def test_each_step_publishes_its_kv_events_as_one_batch_in_order():
    clock = VirtualClock()
    batches = []
    engine = make_engine(clock, blocks=3, publish=batches.append)
    engine.start()
    try:
        await generate(engine, request(clock, range(40), max_tokens=1))  # 3 blocks, 2 full
        await generate(engine, request(clock, range(100, 140), max_tokens=1))  # evicts both
    finally:
        await engine.stop()
    assert [[type(e).__name__ for e in b] for b in batches] == [
        ["BlockStored"],
        ["BlockRemoved", "BlockRemoved", "BlockStored"],
    ]
    assert isinstance(batches[0][0], BlockStored) and batches[0][0].token_ids == list(range(32))


async def test_an_idle_engine_sleeps_until_work_arrives(clock_engine):
    clock, engine = clock_engine
    await asyncio.sleep(0.05)
    assert engine.num_steps == 0 and clock.sleeps == []
    await generate(engine, request(clock, range(10), max_tokens=2))
    assert engine.num_steps == 2


async def test_abort_finishes_the_stream_and_frees_the_blocks(clock_engine):
    clock, engine = clock_engine
    req = request(clock, range(100), max_tokens=1000)
    handle = engine.submit(req)
    outputs = handle.outputs()
    await outputs.__anext__()
    engine.abort(req)
    rest = [o async for o in outputs]
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert engine.scheduler.block_manager.usage() == 0.0


async def test_metrics_record_ttft_tokens_and_success(clock_engine):
    clock, engine = clock_engine
    await generate(engine, request(clock, range(100), max_tokens=5))
    m = engine.metrics
    assert (m.ttft.count, m.itl.count, m.e2e.count) == (1, 4, 1)
    assert (m.prompt_tokens, m.generation_tokens, m.success["length"]) == (100, 5, 1)
    assert m.ttft.total == pytest.approx(COST.step_base_s + 100 / COST.prefill_tokens_per_s)
