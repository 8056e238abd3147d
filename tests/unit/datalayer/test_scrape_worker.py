"""ScrapeWorker: the scraper run in a child process, against the same local model-server stand-ins as the
in-process Scraper's tests. What the serving process sees must be what an in-process scraper gives it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager

import pytest

from epp.datalayer.worker import RemoteScrapeError, ScrapeWorker
from epp.datastore.endpoint import NEVER_SCRAPED, Endpoint
from epp.datastore.pool import Pool
from plugins.core_metrics_extractor import CoreMetricsExtractor

from .test_scraper import Recorder, closed_port, eventually, servers, source  # noqa: F401  (servers is a fixture)

pytestmark = pytest.mark.timeout(30)


def worker_for(pool: Pool, rec: Recorder, src=None) -> ScrapeWorker:
    return ScrapeWorker(pool, [(src or source(), [CoreMetricsExtractor("core")])],
                        on_success=rec.on_success, on_error=rec.on_error)


@asynccontextmanager
async def running(worker: ScrapeWorker):
    """The worker started for the block and stopped after it, whatever the block raises."""
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_snapshots_scraped_in_the_worker_appear_in_the_serving_processes_endpoints(servers):  # noqa: F811
    server = await servers()
    server.set(waiting=3, running=1, kv=0.5, lora_series=[(1.0, "a,b", "c", 4)])
    pool, rec = Pool(), Recorder()
    ep = pool_ep = server.endpoint("pod-a")
    pool.replace([pool_ep])
    worker = worker_for(pool, rec)
    async with running(worker):
        assert worker.pid is not None and worker.pid != os.getpid()
        await eventually(lambda: ep.metrics.waiting_queue_size == 3, timeout=10)
        m = ep.metrics
        assert (m.running_requests_size, m.kv_cache_usage_percent, m.cache_block_size) == (1, 0.5, 16)
        assert m.active_models == frozenset({"a", "b"}) and m.waiting_models == frozenset({"c"})
        assert m.max_active_models == 4
        server.set(waiting=8)
        await eventually(lambda: ep.metrics.waiting_queue_size == 8)
        assert ep.metrics is not m and m.waiting_queue_size == 3  # replaced, never mutated
        assert ep.metrics.update_time > m.update_time
        loop_clock = asyncio.get_running_loop().time()
        assert abs(ep.metrics.update_time - loop_clock) < 1.0  # one monotonic clock for both processes
        assert rec.errors == []
        assert rec.successes and all(name == "pod-a" and 0 < s < 0.5 for name, s in rec.successes)


async def test_failures_reach_on_error_with_the_original_message_and_keep_the_snapshot(servers):  # noqa: F811
    server = await servers()
    server.set(waiting=4)
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    worker = worker_for(pool, rec)
    async with running(worker):
        await eventually(lambda: ep.metrics.waiting_queue_size == 4, timeout=10)
        server.status = 503
        # A scrape answered just before the switch may still land (one in flight, batches up to 5 ms old):
        # take the snapshot once failures have begun, as the in-process scraper's test does.
        await eventually(lambda: len(rec.errors) >= 1)
        good = ep.metrics
        await eventually(lambda: len(rec.errors) >= 4)
        assert ep.metrics is good
        name, exc = rec.errors[0]
        assert name == "pod-a" and isinstance(exc, RemoteScrapeError)
        assert "HttpStatusError" in str(exc) and "HTTP 503" in str(exc) and "engine is restarting" in str(exc)


async def test_the_worker_follows_the_pool(servers):  # noqa: F811
    a, b = await servers(), await servers()
    a.set(waiting=1)
    b.set(waiting=2)
    pool, rec = Pool(), Recorder()
    ep_a = a.endpoint("pod-a")
    pool.replace([ep_a])
    worker = worker_for(pool, rec)
    async with running(worker):
        await eventually(lambda: ep_a.metrics.waiting_queue_size == 1, timeout=10)
        ep_b = b.endpoint("pod-b")
        pool.replace([ep_a, ep_b])
        await eventually(lambda: ep_b.metrics.waiting_queue_size == 2)
        pool.replace([ep_a])
        await eventually(lambda: b.open_connections == 0)
        seen, before_a = b.requests, a.requests
        await asyncio.sleep(0.15)
        assert b.requests == seen  # the removed endpoint is no longer scraped
        assert a.requests > before_a


async def test_stop_ends_the_worker_process_and_its_connections(servers):  # noqa: F811
    server = await servers()
    pool, rec = Pool(), Recorder()
    pool.replace([server.endpoint("pod-a")])
    worker = worker_for(pool, rec)
    await worker.start()
    pid = worker.pid
    await eventually(lambda: server.requests >= 2, timeout=10)
    await worker.stop()
    assert not alive(pid)
    await eventually(lambda: server.open_connections == 0)
    seen = server.requests
    pool.replace([server.endpoint("pod-b")])  # after stop, pool changes start nothing
    await asyncio.sleep(0.1)
    assert server.requests == seen
    assert worker.tasks() == []


async def test_a_worker_that_dies_is_replaced_and_scraping_resumes(servers, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="epp.datalayer.worker")
    server = await servers()
    server.set(waiting=5)
    pool, rec = Pool(), Recorder()
    ep = server.endpoint("pod-a")
    pool.replace([ep])
    worker = worker_for(pool, rec)
    async with running(worker):
        await eventually(lambda: ep.metrics.waiting_queue_size == 5, timeout=10)
        first = worker.pid
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: worker.pid is not None and worker.pid != first, timeout=10)
        server.set(waiting=7)
        await eventually(lambda: ep.metrics.waiting_queue_size == 7, timeout=10)
        assert worker.restarts == 1
        ended = [r for r in caplog.records if "ended" in r.getMessage()]
        assert len(ended) == 1 and ended[0].levelno == logging.ERROR
        assert "signal 9" in ended[0].getMessage()


async def test_an_endpoint_never_scraped_stays_so_until_a_scrape_succeeds():
    pool, rec = Pool(), Recorder()
    ep = Endpoint("gone", "127.0.0.1", await closed_port())
    pool.replace([ep])
    worker = worker_for(pool, rec)
    async with running(worker):
        await eventually(lambda: len(rec.errors) >= 2, timeout=10)
        assert ep.metrics is NEVER_SCRAPED
        assert all(str(exc).startswith("ConnectionRefusedError: ") for _, exc in rec.errors)


async def test_a_metrics_plugin_that_cannot_be_sent_to_the_worker_is_refused_with_what_to_do():
    class Unpicklable:
        name = "my-extractor"

        def __init__(self) -> None:
            self.fn = lambda: None

        def extract(self, text, ep, now):
            return ep.metrics

    pool = Pool()
    worker = ScrapeWorker(pool, [(source(), [Unpicklable()])])
    with pytest.raises(RuntimeError, match=r"my-extractor.*--metrics-scraper=inline"):
        await worker.start()
    assert not worker.running
