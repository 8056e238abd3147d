"""The continuous-batching scheduler: prefix hits, chunked prefill, batching limits, preemption, LoRA, stops."""

import itertools

import pytest

from epp_model_server.events import BlockRemoved, BlockStored
from epp_model_server.lora import LoRAAdapter
from epp_model_server.request import EngineRequest, RequestStatus, SamplingParams
from epp_model_server.scheduler import RequestRejected, Scheduler, SchedulerConfig

_ids = itertools.count()


def make_request(tokens, max_tokens=4, *, lora=None, salt=None, **params) -> EngineRequest:
    return EngineRequest(request_id=f"r{next(_ids)}", prompt_token_ids=list(tokens),
                         params=SamplingParams(max_tokens=max_tokens, **params), arrival_time=0.0,
                         lora=lora, cache_salt=salt)


def step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = {s.request.request_id: token for s in out.scheduled if s.samples}
    return out, sched.update(out, sampled, now=1.0)


def run_to_completion(sched: Scheduler, token: int = 7, limit: int = 1000) -> None:
    for _ in range(limit):
        if not sched.has_unfinished():
            return
        step(sched, token)
    raise AssertionError("requests did not finish")


def test_first_request_misses_and_its_repeat_hits_every_full_block_but_the_last_token():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64))
    prompt = list(range(1000, 1040))  # 2 full blocks + 8 tokens
    first = make_request(prompt)
    sched.add_request(first)
    run_to_completion(sched)
    assert first.num_cached_tokens == 0
    repeat = make_request(prompt)
    sched.add_request(repeat)
    out, _ = step(sched)
    assert repeat.num_cached_tokens == 32
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(32, 8)]
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (80, 32)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64))
    prompt = list(range(32))  # exactly two blocks
    sched.add_request(make_request(prompt))
    run_to_completion(sched)
    repeat = make_request(prompt)
    sched.add_request(repeat)
    out, _ = step(sched)
    assert repeat.num_cached_tokens == 16
    assert [(s.start, s.num_new_tokens, s.samples) for s in out.scheduled] == [(16, 16, True)]


def test_a_different_adapter_or_salt_does_not_hit_the_base_models_blocks():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, max_loras=2))
    prompt = list(range(48))
    sched.add_request(make_request(prompt))
    run_to_completion(sched)
    with_lora = make_request(prompt, lora=LoRAAdapter("ad", "/p", 1))
    salted = make_request(prompt, salt="tenant-a")
    for r in (with_lora, salted):
        sched.add_request(r)
    step(sched)
    assert (with_lora.num_cached_tokens, salted.num_cached_tokens) == (0, 0)


def test_long_prompts_are_prefilled_in_chunks_of_the_token_budget():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, max_num_batched_tokens=16))
    req = make_request(range(40))
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out, _ = step(sched)
        chunks += [(s.start, s.num_new_tokens, s.samples) for s in out.scheduled]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert req.num_output_tokens == 1


def test_running_requests_decode_before_waiting_requests_prefill_within_the_budget():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, max_num_batched_tokens=20))
    a = make_request(range(10), max_tokens=5)
    sched.add_request(a)
    step(sched)
    b = make_request(range(100, 140), max_tokens=5)
    sched.add_request(b)
    out, _ = step(sched)
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 19)]


def test_at_most_max_num_seqs_run_and_the_rest_wait_in_order():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, max_num_seqs=2))
    reqs = [make_request(range(i * 10, i * 10 + 5)) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    step(sched)
    assert sched.running == reqs[:2] and list(sched.waiting) == reqs[2:]


def test_when_blocks_run_out_the_latest_admitted_request_is_preempted_and_recomputed_later():
    sched = Scheduler(SchedulerConfig(block_size=4, num_gpu_blocks=4, max_num_batched_tokens=100))
    a = make_request(range(0, 8), max_tokens=4)  # 2 blocks, needs a 3rd when decoding
    b = make_request(range(100, 108), max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # both prefilled, 4 blocks in use, each sampled one token
    out, _ = step(sched)  # a needs block 3 -> b is preempted
    assert out.preempted == [b] and b.status is RequestStatus.WAITING and b.block_ids == []
    assert [s.request for s in out.scheduled] == [a]
    assert sched.num_preemptions == 1
    run_to_completion(sched)
    assert a.num_output_tokens == 4 and b.num_output_tokens == 4


def test_a_request_whose_adapter_has_no_slot_waits_without_blocking_others():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, max_loras=1))
    ad1, ad2 = LoRAAdapter("ad1", "/1", 1), LoRAAdapter("ad2", "/2", 2)
    a = make_request(range(5), max_tokens=2, lora=ad1)
    b = make_request(range(5), max_tokens=2, lora=ad2)
    c = make_request(range(50, 55), max_tokens=2)
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = step(sched)
    assert [s.request for s in out.scheduled] == [a, c]
    assert out.loaded_loras == [ad1]
    assert list(sched.waiting) == [b]
    assert (sched.running_lora_names(), sched.waiting_lora_names()) == (["ad1"], ["ad2"])
    step(sched)  # a and c finish
    out, _ = step(sched)
    assert [s.request for s in out.scheduled] == [b] and out.loaded_loras == [ad2]


def test_an_adapter_already_resident_is_not_loaded_again():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, max_loras=1))
    ad = LoRAAdapter("ad", "/1", 1)
    sched.add_request(make_request(range(5), max_tokens=1, lora=ad))
    out, _ = step(sched)
    assert out.loaded_loras == [ad]
    sched.add_request(make_request(range(5), max_tokens=1, lora=ad))
    out, _ = step(sched)
    assert out.loaded_loras == []


@pytest.mark.parametrize(
    ("params", "tokens", "expected_reason", "expected_len"),
    [
        ({"max_tokens": 3}, [5, 5, 5, 5], "length", 3),
        ({"max_tokens": 5}, [5, 2, 5], "stop", 2),  # EOS (id 2)
        ({"max_tokens": 5, "ignore_eos": True}, [2, 2, 2, 2, 2], "length", 5),
        ({"max_tokens": 5, "min_tokens": 2}, [2, 2, 5], "stop", 2),  # EOS counts only from min_tokens on
        ({"max_tokens": 5, "stop_token_ids": frozenset({9})}, [5, 9], "stop", 2),
    ],
)
def test_generation_stops_on_length_eos_and_stop_token_ids(params, tokens, expected_reason, expected_len):
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64), eos_token_id=2)
    req = make_request(range(4), **params)
    sched.add_request(req)
    for t in tokens:
        if req.finished:
            break
        step(sched, token=t)
    assert (req.finish_reason, req.num_output_tokens) == (expected_reason, expected_len)
    assert sched.block_manager.num_free_blocks == 64


def test_generated_tokens_fill_blocks_that_are_stored_like_prompt_blocks():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64))
    req = make_request(range(15), max_tokens=3)
    sched.add_request(req)
    step(sched, token=40)  # computes the prompt, samples token 40 (block 0 now has 16 tokens)
    assert sched.block_manager.drain_events() == []
    step(sched, token=41)  # computes token 40: block 0 is full and computed
    (stored,) = sched.block_manager.drain_events()
    assert isinstance(stored, BlockStored) and stored.token_ids == [*range(15), 40]
    assert stored.parent_block_hash is None


def test_eviction_events_come_before_the_stores_of_the_request_that_caused_them():
    sched = Scheduler(SchedulerConfig(block_size=4, num_gpu_blocks=3))
    sched.add_request(make_request(range(0, 9), max_tokens=1))  # 3 blocks, 2 full
    run_to_completion(sched)
    sched.block_manager.drain_events()
    sched.add_request(make_request(range(100, 109), max_tokens=1))
    run_to_completion(sched)
    kinds = [type(e).__name__ for e in sched.block_manager.drain_events()]
    assert kinds == ["BlockRemoved", "BlockRemoved", "BlockStored"]


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "match"),
    [
        (0, 4, "empty"),
        (100, 29, "maximum context length is 128"),
        (60, 10, "needs 5 KV-cache blocks"),
    ],
)
def test_requests_that_can_never_run_are_rejected_with_the_reason(prompt_len, max_tokens, match):
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=4, max_model_len=128))
    with pytest.raises(RequestRejected, match=match):
        sched.add_request(make_request(range(prompt_len), max_tokens=max_tokens))


def test_aborting_a_waiting_request_finishes_it_at_once():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, max_num_seqs=1))
    running = make_request(range(5))
    waiting = make_request(range(10, 15))
    sched.add_request(running)
    sched.add_request(waiting)
    step(sched)
    assert sched.abort(waiting) is True
    assert waiting.finish_reason == "abort" and list(sched.waiting) == [] and sched.running == [running]


def test_aborting_a_running_request_frees_its_blocks_at_the_next_update():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64))
    req = make_request(range(40), max_tokens=10)
    sched.add_request(req)
    out = sched.schedule()
    assert sched.abort(req) is False
    updates = sched.update(out, {req.request_id: 5}, 1.0)
    assert [(u.request, u.finished) for u in updates] == [(req, True)]
    assert req.finish_reason == "abort" and sched.block_manager.num_free_blocks == 64


def test_without_prefix_caching_nothing_is_hit_counted_or_published():
    sched = Scheduler(SchedulerConfig(block_size=16, num_gpu_blocks=64, enable_prefix_caching=False))
    for _ in range(2):
        req = make_request(range(40))
        sched.add_request(req)
        run_to_completion(sched)
        assert req.num_cached_tokens == 0
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (0, 0)
    assert sched.block_manager.drain_events() == []


def test_a_repeat_after_eviction_misses_again():
    sched = Scheduler(SchedulerConfig(block_size=4, num_gpu_blocks=3))
    prompt = list(range(9))
    sched.add_request(make_request(prompt, max_tokens=1))
    run_to_completion(sched)
    sched.add_request(make_request(range(100, 109), max_tokens=1))
    run_to_completion(sched)
    repeat = make_request(prompt, max_tokens=1)
    sched.add_request(repeat)
    step(sched)
    assert repeat.num_cached_tokens == 0
    assert any(isinstance(e, BlockRemoved) for e in sched.block_manager.drain_events())
