"""Both P/D legs in the engine core, on a virtual clock: the decode leg pays a KV transfer instead of the
prefill of the tokens it receives, the engine keeps stepping others meanwhile, and the cache, KV events and
metrics say what happened on each pod."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from epp_model_server.cost_model import CostModel
from epp_model_server.engine import Engine
from epp_model_server.events import BlockStored
from epp_model_server.metrics import ServerMetrics
from epp_model_server.request import EngineRequest, RequestStatus, SamplingParams
from epp_model_server.scheduler import Scheduler, SchedulerConfig
from epp_model_server.sim_engine import SimExecutor

BS = 16
COST = CostModel()  # 10 ms per step + uncached prompt tokens at 15928 tokens/s
PER_TOKEN = 0.000005  # the default --kv-transfer-time-per-token, 0.005 ms
_ids = itertools.count()


class VirtualClock:
    """Time that only moves when the engine sleeps (the engine is the only sleeper in these tests)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class GatedClock(VirtualClock):
    """A virtual clock whose sleeps wait until the test opens the gate, to look at the engine mid-transfer."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await self.gate.wait()
        await super().sleep(seconds)


class Pod:
    """One engine with its metrics and the KV events it published."""

    def __init__(self, *, blocks: int = 4096, per_token: float = PER_TOKEN, latency: float = 0.0,
                 time_scale: float = 1.0, caching: bool = True, clock: VirtualClock | None = None) -> None:
        self.clock = clock or VirtualClock()
        self.events: list = []
        sched = Scheduler(SchedulerConfig(block_size=BS, num_gpu_blocks=blocks, enable_prefix_caching=caching),
                          eos_token_id=2)
        executor = SimExecutor(COST, vocab_size=32000, eos_token_id=2, seed=0, time_scale=time_scale,
                               sleep=self.clock.sleep)
        self.engine = Engine(sched, executor, publish=self.events.extend, clock=self.clock, sleep=self.clock.sleep,
                             time_scale=time_scale, kv_transfer_s_per_token=per_token,
                             kv_transfer_latency_s=latency)
        self.metrics = ServerMetrics("m", cache_config={}, max_model_len=32768, max_loras=None,
                                     gauges=self.engine.gauges)
        self.engine.metrics = self.metrics
        self.engine.start()

    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    def request(self, tokens, max_tokens=4, *, leg: str | None = None) -> EngineRequest:
        return EngineRequest(request_id=f"q{next(_ids)}", prompt_token_ids=list(tokens),
                             params=SamplingParams(max_tokens=max_tokens), arrival_time=self.clock(),
                             remote_decode=leg == "prefill", remote_prefill=leg == "decode")

    async def run(self, req: EngineRequest) -> list[int]:
        """The request's output tokens (its timestamps are on the request: first_token_time, ...)."""
        tokens = []
        async for out in self.engine.submit(req).outputs():
            tokens += out.new_token_ids
        return tokens

    def stored_hashes(self) -> list[int]:
        return [h for e in self.events if isinstance(e, BlockStored) for h in e.block_hashes]

    async def stop(self) -> None:
        await self.engine.stop()


def prompt(n: int, base: int = 1000) -> list[int]:
    return [base + i for i in range(n)]


@pytest.fixture
async def pods():
    made: list[Pod] = []

    def make(**kw) -> Pod:
        pod = Pod(**kw)
        made.append(pod)
        return pod

    yield make
    for pod in made:
        await pod.stop()


async def test_decode_leg_ttft_is_the_transfer_plus_one_token_step_not_the_prefill(pods):
    local, decode = pods(), pods()
    tokens = prompt(4000)
    plain = local.request(tokens)
    plain_tokens = await local.run(plain)
    leg = decode.request(tokens, leg="decode")
    leg_tokens = await decode.run(leg)
    transfer = 4000 * PER_TOKEN  # 20 ms, where computing the prompt takes 261 ms
    assert plain.first_token_time - plain.arrival_time == pytest.approx(COST.step_seconds(4000, 0))
    assert leg.first_token_time - leg.arrival_time == pytest.approx(transfer + COST.step_seconds(1, 0))
    # The decode pod waited for the transfer, then never ran a prefill chunk bigger than the last prompt token.
    assert decode.clock.sleeps[0] == pytest.approx(transfer)
    assert max(decode.clock.sleeps[1:]) < COST.step_seconds(2, 1)
    assert leg_tokens == plain_tokens and len(leg_tokens) == 4  # the same output as computing it locally
    assert (leg.num_local_cached_tokens, leg.num_transferred_tokens) == (0, 4000)
    assert leg.num_cached_tokens == 3999  # usage.cached_tokens: every prompt token not computed here


@pytest.mark.parametrize(("per_token", "latency", "time_scale", "tokens", "expected"), [
    (0.000005, 0.0, 1.0, 8000, 0.040),
    (0.00001, 0.002, 1.0, 1000, 0.012),
    (0.000005, 0.0, 10.0, 8000, 0.004),
    (0.0, 0.0, 1.0, 8000, 0.0),
])
async def test_transfer_time_is_latency_plus_tokens_times_per_token_over_the_time_scale(
        pods, per_token, latency, time_scale, tokens, expected):
    pod = pods(per_token=per_token, latency=latency, time_scale=time_scale)
    assert pod.engine.transfer_seconds(tokens) == pytest.approx(expected)
    leg = pod.request(prompt(tokens), max_tokens=1, leg="decode")
    await pod.run(leg)
    assert leg.first_token_time - leg.arrival_time == pytest.approx(expected + COST.step_seconds(1, 0) / time_scale)
    assert pod.metrics.kv_transfer_tokens == tokens
    assert pod.metrics.kv_transfer_seconds == pytest.approx(expected)


async def test_a_decode_leg_receives_only_what_its_local_prefix_cache_lacks(pods):
    pod = pods()
    tokens = prompt(1000)
    await pod.run(pod.request(tokens[:330]))  # caches 20 full blocks (320 tokens) of the same prefix
    queries, hits = pod.scheduler.prefix_cache_queries, pod.scheduler.prefix_cache_hits
    leg = pod.request(tokens, leg="decode")
    await pod.run(leg)
    assert (leg.num_local_cached_tokens, leg.num_transferred_tokens) == (320, 680)
    assert leg.first_token_time - leg.arrival_time == pytest.approx(680 * PER_TOKEN + COST.step_seconds(1, 0))
    # vLLM's prefix-cache counters: the decode leg queried its 1000 tokens and hit the 320 local ones only.
    assert (pod.scheduler.prefix_cache_queries - queries, pod.scheduler.prefix_cache_hits - hits) == (1000, 320)
    assert pod.metrics.kv_transfer_tokens == 680


async def test_received_blocks_are_cached_and_published_as_if_computed_here(pods):
    computed, received = pods(), pods()
    tokens = prompt(100)  # 6 full blocks + 4 tokens
    await computed.run(computed.request(tokens, max_tokens=1))
    await received.run(received.request(tokens, max_tokens=1, leg="decode"))
    assert len(received.stored_hashes()) == 6
    assert received.stored_hashes() == computed.stored_hashes()
    # A later request of the same prompt on the decode pod hits them like any cached prefix.
    again = received.request(tokens, max_tokens=1)
    await received.run(again)
    assert again.num_cached_tokens == 96


async def test_a_prompt_of_whole_blocks_publishes_its_last_block_when_the_last_token_is_computed(pods):
    pod = pods()
    tokens = prompt(96)  # 6 full blocks: 5 arrive whole, the 6th is full once its last token is computed
    await pod.run(pod.request(tokens, max_tokens=1, leg="decode"))
    stores = [e for e in pod.events if isinstance(e, BlockStored)]
    assert [len(e.block_hashes) for e in stores] == [5, 1]
    assert stores[1].token_ids == tokens[80:96]


async def test_the_engine_keeps_stepping_other_requests_during_a_transfer(pods):
    pod = pods(per_token=0.0001)  # a slow link: 8000 tokens take 800 ms
    other = pod.request(prompt(16, base=50000), max_tokens=200)
    leg = pod.request(prompt(8000), max_tokens=2, leg="decode")
    await asyncio.gather(pod.run(other), pod.run(leg))
    ready = leg.kv_ready_time
    assert ready == pytest.approx(0.8)
    # The other request decoded during the transfer: the engine ran a step every ~10 ms while the KV was in
    # flight (a step is one sleep of the virtual clock).
    steps_during = sum(1 for end in itertools.accumulate(pod.clock.sleeps) if end <= ready)
    assert steps_during >= 70
    assert other.first_token_time < ready
    # The transfer is noticed at the next step boundary, then the leg computes its last prompt token.
    assert ready <= leg.first_token_time <= ready + 2 * COST.step_seconds(1, 2) + 1e-9


async def test_a_request_receiving_kv_counts_as_waiting_and_holds_its_blocks(pods):
    clock = GatedClock()
    pod = pods(per_token=0.001, blocks=100, clock=clock)
    leg = pod.request(prompt(160), max_tokens=1, leg="decode")
    handle = pod.engine.submit(leg)
    for _ in range(5):
        await asyncio.sleep(0)
    assert leg.status is RequestStatus.WAITING_FOR_REMOTE_KV
    assert clock.now == 0.0 and leg.kv_ready_time == pytest.approx(0.16)
    gauges = pod.engine.gauges()
    assert (gauges.num_running, gauges.num_waiting) == (0, 1)
    assert pod.scheduler.block_manager.num_free_blocks == 90  # 10 blocks for 160 prompt tokens
    clock.gate.set()
    async for out in handle.outputs():
        assert out.finished
    assert pod.scheduler.block_manager.num_free_blocks == 100


async def test_aborting_a_request_receiving_kv_frees_its_blocks_and_finishes_it(pods):
    clock = GatedClock()
    pod = pods(per_token=0.01, blocks=100, clock=clock)  # a 1.6 s transfer
    leg = pod.request(prompt(160), max_tokens=1, leg="decode")
    handle = pod.engine.submit(leg)
    for _ in range(5):
        await asyncio.sleep(0)
    assert leg.status is RequestStatus.WAITING_FOR_REMOTE_KV
    pod.engine.abort(leg)
    clock.gate.set()
    outs = [out async for out in handle.outputs()]
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert pod.scheduler.loading == [] and not pod.scheduler.has_unfinished()
    assert pod.scheduler.block_manager.num_free_blocks == 100
    assert pod.metrics.kv_transfer_tokens == 0  # nothing arrived
    assert pod.stored_hashes() == []


async def test_the_prefill_leg_keeps_the_ids_of_the_blocks_holding_its_prompt(pods):
    pod = pods()
    tokens = prompt(100)
    leg = pod.request(tokens, max_tokens=1, leg="prefill")
    assert len(await pod.run(leg)) == 1 and leg.finish_reason == "length"
    assert leg.transfer_block_ids is not None and len(leg.transfer_block_ids) == 7  # ceil(100 / 16)
    assert len(set(leg.transfer_block_ids)) == 7
    # Its blocks are cached as usual: the 6 full ones were published, and a later prefill leg hits them.
    assert len(pod.stored_hashes()) == 6
    again = pod.request(tokens, max_tokens=1, leg="prefill")
    await pod.run(again)
    assert again.num_cached_tokens == 96
    assert again.transfer_block_ids[:6] == leg.transfer_block_ids[:6]


async def test_decode_leg_metrics_count_the_prompt_and_a_ttft_that_includes_the_transfer(pods):
    pod = pods(per_token=0.00005)  # 2000 tokens in 100 ms
    await pod.run(pod.request(prompt(2000), max_tokens=3, leg="decode"))
    m = pod.metrics
    assert (m.prompt_tokens, m.generation_tokens) == (2000, 3)
    assert m.ttft.count == 1 and m.ttft.total == pytest.approx(0.1 + COST.step_seconds(1, 0))
    assert m.success["length"] == 1
    assert (pod.scheduler.prefix_cache_queries, pod.scheduler.prefix_cache_hits) == (2000, 0)


async def test_without_prefix_caching_the_whole_prompt_is_received_and_nothing_published(pods):
    pod = pods(caching=False)
    leg = pod.request(prompt(100), max_tokens=2, leg="decode")
    assert len(await pod.run(leg)) == 2
    assert leg.num_transferred_tokens == 100
    assert pod.stored_hashes() == []


async def test_a_decode_leg_preempted_after_its_transfer_recomputes_locally(pods):
    # 12 blocks: the leg (8 blocks for 120 tokens + output) runs beside a request that grows until one must go.
    pod = pods(blocks=12)
    leg = pod.request(prompt(120), max_tokens=40, leg="decode")
    hog = pod.request(prompt(40, base=60000), max_tokens=30)
    results = await asyncio.gather(pod.run(leg), pod.run(hog))
    assert [len(r) for r in results] == [40, 30]
    assert leg.num_preemptions >= 1  # the leg, admitted last after its transfer, was the victim
    assert leg.num_transferred_tokens == 120  # received once; a preempted leg recomputes, it is not re-sent
    assert pod.metrics.kv_transfer_tokens == 120
