"""The async engine loop: scheduler + executor + KV-event publication + metrics.

One asyncio task runs steps back to back while there is work and sleeps on an event when there is none
(an idle server uses no CPU). A step is: schedule (may evict blocks), charge LoRA loads, execute (the sim
sleeps for the cost model's time; torch computes in a worker thread), update (append tokens, register
full blocks, finish requests), publish the step's KV events as one batch, and deliver new tokens to the
waiting HTTP handlers. Everything but the torch computation runs on the event loop thread, so engine
state needs no locks.

KV transfers of decode legs (pd.py): a decode leg admitted by the scheduler starts receiving its prompt's
KV; the engine gives the transfer `kv_transfer_latency_s + tokens * kv_transfer_s_per_token` (divided by
the time scale) of wall time, during which the engine keeps stepping other requests. Arrived transfers
are handed back to the scheduler before each schedule, so, as with vLLM's connectors, a transfer that
ends during a step is noticed at the next one. An engine with nothing to run but transfers sleeps until
the first one ends (or a new request arrives).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .events import KVEvent
from .lora import LoRAAdapter
from .metrics import EngineGauges, ServerMetrics
from .request import EngineRequest
from .scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


class Executor(Protocol):
    def prepare(self, request: EngineRequest) -> None: ...

    def load_lora(self, adapter: LoRAAdapter) -> None: ...

    async def execute(self, out: SchedulerOutput) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestOutput:
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


class RequestHandle:
    """The caller's side of a submitted request: an async stream of outputs."""

    __slots__ = ("request", "_queue")

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def put(self, output: RequestOutput) -> None:
        self._queue.put_nowait(output)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = await self._queue.get()
            # Merge whatever else is already queued, so a slow consumer catches up in one write.
            while not out.finished and not self._queue.empty():
                nxt = self._queue.get_nowait()
                out = RequestOutput(out.new_token_ids + nxt.new_token_ids, nxt.finished, nxt.finish_reason)
            yield out
            if out.finished:
                return


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        metrics: ServerMetrics | None = None,
        *,
        publish: Callable[[list[KVEvent]], None] | None = None,
        lora_load_s: float = 0.0,
        time_scale: float = 1.0,
        kv_transfer_s_per_token: float = 0.0,
        kv_transfer_latency_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.metrics = metrics
        self._publish = publish
        self._lora_load_s = lora_load_s
        self._time_scale = time_scale
        self.kv_transfer_s_per_token = kv_transfer_s_per_token
        self.kv_transfer_latency_s = kv_transfer_latency_s
        self._clock = clock
        self._sleep = sleep
        self._handles: dict[str, RequestHandle] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_steps = 0

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for handle in list(self._handles.values()):
            handle.put(RequestOutput([], True, "abort"))
        self._handles.clear()
        self.executor.close()

    # ---- requests ----------------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queues a request; raises RequestRejected when it can never run."""
        if request.request_id in self._handles:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.executor.prepare(request)
        self.scheduler.add_request(request)
        handle = RequestHandle(request)
        self._handles[request.request_id] = handle
        self._wake.set()
        return handle

    def abort(self, request: EngineRequest) -> None:
        if self.scheduler.abort(request):
            self._finished(request, self._clock())
        self._wake.set()

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()
        self._wake.set()

    def gauges(self) -> EngineGauges:
        s = self.scheduler
        return EngineGauges(
            num_running=len(s.running),
            num_waiting=s.num_waiting,
            kv_cache_usage=s.block_manager.usage(),
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            running_loras=s.running_lora_names(),
            waiting_loras=s.waiting_lora_names(),
        )

    # ---- the loop ----------------------------------------------------------------------------------

    def _flush_events(self) -> None:
        events = self.scheduler.block_manager.drain_events()
        if events and self._publish is not None:
            try:
                self._publish(events)
            except Exception:  # a publisher failure must not stop serving
                log.exception("publishing %d KV events failed", len(events))

    def transfer_seconds(self, num_tokens: int) -> float:
        """Wall time of receiving `num_tokens` tokens' KV from a prefiller."""
        return (self.kv_transfer_latency_s + num_tokens * self.kv_transfer_s_per_token) / self._time_scale

    def _receive_transfers(self, now: float) -> None:
        arrived = [r for r in self.scheduler.loading if r.kv_ready_time is not None and r.kv_ready_time <= now]
        if not arrived:
            return
        arrived.sort(key=lambda r: r.kv_ready_time)
        self.scheduler.finish_transfers(arrived)
        if self.metrics is not None:
            for req in arrived:
                self.metrics.on_kv_transfer(req.num_transferred_tokens,
                                            self.transfer_seconds(req.num_transferred_tokens))

    async def _idle(self) -> None:
        """Waits for a new request, or for the first transfer in flight to end."""
        self._wake.clear()
        ready = [r.kv_ready_time for r in self.scheduler.loading if r.kv_ready_time is not None]
        if not ready:
            await self._wake.wait()
            return
        delay = min(ready) - self._clock()
        if delay <= 0:
            return
        waiter = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self._sleep(delay))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, sleeper):
                if not task.done():
                    task.cancel()

    async def _run(self) -> None:
        sched = self.scheduler
        while True:
            self._flush_events()
            if not sched.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            self._receive_transfers(self._clock())
            out = sched.schedule()
            now = self._clock()
            for req in out.transfers:
                req.kv_ready_time = now + self.transfer_seconds(req.num_transferred_tokens)
            for req in out.aborted:
                self._finished(req, now)
            if not out:
                self._flush_events()
                await self._idle()
                continue
            for s in out.scheduled:
                if s.request.first_scheduled_time is None:
                    s.request.first_scheduled_time = now
            await self._step(out)

    async def _step(self, out: SchedulerOutput) -> None:
        sched = self.scheduler
        if out.loaded_loras:
            for adapter in out.loaded_loras:
                self.executor.load_lora(adapter)
            await self._sleep(self._lora_load_s * len(out.loaded_loras) / self._time_scale)
        try:
            sampled = await self.executor.execute(out)
        except Exception:
            log.exception("engine step failed; failing its %d requests", len(out.scheduled))
            now = self._clock()
            for s in out.scheduled:
                if not s.request.finished:
                    sched.fail(s.request)
                    self._finished(s.request, now)
            self._flush_events()
            return
        self.num_steps += 1
        previous = {s.request.request_id: s.request.last_token_time for s in out.scheduled}
        now = self._clock()
        updates = sched.update(out, sampled, now)
        self._flush_events()
        metrics = self.metrics
        for u in updates:
            req = u.request
            if u.new_token_ids and metrics is not None:
                prev = previous.get(req.request_id)
                if prev is None:
                    metrics.on_first_token(now - req.arrival_time, req.num_prompt_tokens)
                metrics.on_token(None if prev is None else now - prev)
            if u.finished:
                self._finished(req, now, u.new_token_ids)
            elif u.new_token_ids:
                handle = self._handles.get(req.request_id)
                if handle is not None:
                    handle.put(RequestOutput(u.new_token_ids, False))

    def _finished(self, req: EngineRequest, now: float, new_token_ids: list[int] | None = None) -> None:
        handle = self._handles.pop(req.request_id, None)
        if handle is not None:
            handle.put(RequestOutput(new_token_ids or [], True, req.finish_reason))
        if self.metrics is not None:
            self.metrics.on_finished(
                reason=req.finish_reason or "abort",
                arrival=req.arrival_time,
                first_scheduled=req.first_scheduled_time,
                first_token=req.first_token_time,
                now=now,
                prompt_tokens=req.num_prompt_tokens,
                generation_tokens=req.num_output_tokens,
            )
