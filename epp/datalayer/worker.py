"""Scraping in a worker process: the serving event loop only applies finished snapshots.

Scraping 64 endpoints every 50 ms is ~1,300 HTTP GETs and page parses a second, about a quarter of a core
in Python. On the event loop that also serves ext_proc, every scrape delays whatever request arrives
during it. `ScrapeWorker` runs the same `Scraper` (same sources, same extractors, the same objects sent
over by pickle) in a child process (`python -m epp.datalayer.worker`) with its own copy of the pool, and
hands back each endpoint's new `Metrics`: the serving loop's share drops to reading a few small messages
every few milliseconds. The Go reference EPP gets the same separation from goroutines on other cores.

Wire: msgpack messages over the child's stdin and stdout.
  parent -> child: [SOURCES, pickled [(source, [extractors])]] first; then [ADD, [[name, address, port,
                   labels], ...]] and [REMOVE, [name, ...]] as the pool changes. EOF on stdin: exit.
  child -> parent: batches [[name, seconds, metrics fields...] | [name, None, error type, message], ...],
                   flushed at most every `_FLUSH_S` (snapshots wait at most that long; the scrape period
                   is 50 ms).
`Metrics.update_time` is `time.monotonic()`, one clock for every process of the machine (Linux's
CLOCK_MONOTONIC), so staleness reads the same in both.

The child logs scrape failures itself, once when an endpoint starts failing and once when it recovers, as
the in-process scraper does; the parent reports every failure to `on_error` (the scrape-errors counter).
If the child dies, the parent logs it with its exit status and starts a new one a second later; the
endpoints keep their last snapshots, whose age shows in `update_time` meanwhile. If the parent dies, the
child reads EOF and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable, Sequence

import msgpack

from epp.datastore.endpoint import Endpoint, Metrics
from epp.datastore.pool import Pool
from epp.scheduling.interfaces import MetricsExtractor, MetricsSource

__all__ = ["RemoteScrapeError", "ScrapeWorker"]

log = logging.getLogger("epp.datalayer.worker")

SOURCES, ADD, REMOVE = range(3)
_FLUSH_S = 0.005
_RESTART_DELAY_S = 1.0
_FIELDS = tuple(f.name for f in dataclasses.fields(Metrics))
_SET_FIELDS = tuple(i for i, f in enumerate(dataclasses.fields(Metrics)) if f.type.startswith("frozenset"))


class RemoteScrapeError(Exception):
    """A scrape that failed in the worker process; the message names the original exception's type."""


def _pack_metrics(m: Metrics) -> list:
    values = [getattr(m, name) for name in _FIELDS]
    for i in _SET_FIELDS:
        values[i] = sorted(values[i])
    return values


class _Unpacker:
    """Metrics fields from the wire -> Metrics, sharing frozensets between snapshots."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, ...], frozenset[str]] = {(): frozenset()}

    def metrics(self, values: list) -> Metrics:
        for i in _SET_FIELDS:
            key = tuple(values[i])
            s = self._sets.get(key)
            if s is None:
                if len(self._sets) > 1024:
                    self._sets = {(): frozenset()}
                s = self._sets[key] = frozenset(key)
            values[i] = s
        return Metrics(*values)


# --------------------------------------------------------------------------------------------------------
# Parent side


class _WorkerProtocol(asyncio.SubprocessProtocol):
    """The parent's end of one worker process: its stdout's batches, its exit."""

    def __init__(self, owner: ScrapeWorker) -> None:
        self.owner = owner
        self.unpacker = msgpack.Unpacker(raw=False, use_list=True)
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        self.unpacker.feed(data)
        apply = self.owner._apply
        for batch in self.unpacker:
            apply(batch)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
        self.owner._exited(self)


class ScrapeWorker:
    """Same contract as `Scraper` (start, stop, `on_success(endpoint, seconds)`, `on_error(endpoint, exc)`),
    with the scraping done in a child process. `sources` must pickle (the built-in data source and
    extractor do); `start()` says which one does not, and what to do, when one does not."""

    def __init__(
        self,
        pool: Pool,
        sources: Sequence[tuple[MetricsSource, Sequence[MetricsExtractor]]],
        *,
        on_success: Callable[[Endpoint, float], None] | None = None,
        on_error: Callable[[Endpoint, BaseException], None] | None = None,
        log_level: str = "info",
        log_format: str = "text",
    ) -> None:
        self.pool = pool
        self.sources = [(src, list(extractors)) for src, extractors in sources]
        self._on_success = on_success
        self._on_error = on_error
        self.log_level = log_level
        self.log_format = log_format
        self._worker: _WorkerProtocol | None = None
        self._by_name: dict[str, Endpoint] = {}
        self._unpack = _Unpacker()
        self._running = False
        self._restart: asyncio.TimerHandle | None = None
        self._respawning: asyncio.Task[None] | None = None
        self._callback_error_logged = False
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self._running

    @property
    def pid(self) -> int | None:
        w = self._worker
        return w.transport.get_pid() if w is not None and w.transport is not None else None

    def tasks(self) -> list[asyncio.Task[None]]:
        t = self._respawning
        return [t] if t is not None and not t.done() else []

    async def start(self) -> None:
        if self._running:
            return
        for src, extractors in self.sources:
            for what in (src, *extractors):
                try:
                    pickle.dumps(what)
                except Exception as exc:
                    raise RuntimeError(
                        f"the metrics plugin {getattr(what, 'name', what)!r} ({type(what).__name__}) cannot be "
                        f"sent to the scrape worker process ({type(exc).__name__}: {exc}); run epp with "
                        f"--metrics-scraper=inline to scrape on the serving event loop instead"
                    ) from None
        await self._spawn()
        self._running = True
        self.pool.add_listener(self._on_pool_change)  # calls back at once with the current endpoints

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self.pool.remove_listener(self._on_pool_change)
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._respawning is not None:
            self._respawning.cancel()
            await asyncio.gather(self._respawning, return_exceptions=True)
            self._respawning = None
        worker, self._worker = self._worker, None
        if worker is None or worker.transport is None:
            return
        stdin = worker.transport.get_pipe_transport(0)
        if stdin is not None:
            stdin.close()  # EOF: the worker stops its scrapes and exits
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), 3.0)
        except TimeoutError:
            log.warning("the scrape worker process %d did not exit within 3s of EOF; killing it",
                        worker.transport.get_pid())
            worker.transport.kill()
            await worker.exited
        worker.transport.close()

    # -- the child

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        _, worker = await loop.subprocess_exec(
            lambda: _WorkerProtocol(self),
            sys.executable, "-m", "epp.datalayer.worker", "--log-level", self.log_level,
            "--log-format", self.log_format,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
        )
        self._worker = worker
        self._send([SOURCES, pickle.dumps(self.sources)])
        eps = list(self._by_name.values())
        if eps:
            self._send([ADD, [_endpoint_entry(ep) for ep in eps]])
        assert worker.transport is not None
        log.info("scraping metrics in worker process %d", worker.transport.get_pid())

    def _exited(self, worker: _WorkerProtocol) -> None:
        if not self._running or worker is not self._worker:
            return
        assert worker.transport is not None
        code = worker.transport.get_returncode()
        reason = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        log.error("the scrape worker process %d ended (%s); starting a new one in %gs; endpoints keep their "
                  "last metrics meanwhile", worker.transport.get_pid(), reason, _RESTART_DELAY_S)
        worker.transport.close()
        self._worker = None
        self._restart = asyncio.get_running_loop().call_later(_RESTART_DELAY_S, self._respawn)

    def _respawn(self) -> None:
        self._restart = None
        if self._running:
            self.restarts += 1
            self._respawning = asyncio.get_running_loop().create_task(self._respawn_async(),
                                                                      name="scrape-worker-respawn")

    async def _respawn_async(self) -> None:
        try:
            await self._spawn()
        except Exception:
            log.exception("could not start the scrape worker process; trying again in %gs", _RESTART_DELAY_S)
            self._restart = asyncio.get_running_loop().call_later(_RESTART_DELAY_S, self._respawn)

    def _send(self, message: list) -> None:
        w = self._worker
        if w is None or w.transport is None:
            return  # no worker right now: a new one gets the whole pool when it starts
        stdin = w.transport.get_pipe_transport(0)
        if stdin is not None and not stdin.is_closing():
            stdin.write(msgpack.packb(message, use_bin_type=True))

    # -- the pool

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if removed:
            for ep in removed:
                if self._by_name.get(ep.name) is ep:
                    del self._by_name[ep.name]
            self._send([REMOVE, [ep.name for ep in removed]])
        if added:
            for ep in added:
                self._by_name[ep.name] = ep
            self._send([ADD, [_endpoint_entry(ep) for ep in added]])

    # -- results

    def _apply(self, batch: list) -> None:
        by_name = self._by_name
        for item in batch:
            ep = by_name.get(item[0])
            if ep is None:
                continue  # removed since the worker scraped it
            seconds = item[1]
            if seconds is not None:
                ep.metrics = self._unpack.metrics(item[2:])
                if self._on_success is not None:
                    self._callback(self._on_success, ep, seconds)
            elif self._on_error is not None:
                self._callback(self._on_error, ep, RemoteScrapeError(f"{item[2]}: {item[3]}"))

    def _callback(self, fn: Callable, ep: Endpoint, arg: object) -> None:
        try:
            fn(ep, arg)
        except Exception:
            if not self._callback_error_logged:
                self._callback_error_logged = True
                log.exception("a scrape callback raised (logged once; scraping goes on)")


def _endpoint_entry(ep: Endpoint) -> list:
    return [ep.name, ep.address, ep.port, dict(ep.labels)]


# --------------------------------------------------------------------------------------------------------
# Child side


class _Child:
    def __init__(self, loop: asyncio.AbstractEventLoop, out: asyncio.WriteTransport) -> None:
        self.loop = loop
        self.out = out
        self.pool = Pool()
        self.scraper = None
        self.batch: list[list] = []
        self.flush_at: asyncio.TimerHandle | None = None
        self.done = loop.create_future()

    # From the parent

    def handle(self, msg: list) -> None:
        kind, payload = msg
        if kind == SOURCES:
            from epp.datalayer.scraper import Scraper

            sources = pickle.loads(payload)
            self.scraper = Scraper(self.pool, sources, on_success=self.succeeded, on_error=self.failed)
            self.loop.create_task(self.scraper.start())
        elif kind == ADD:
            known = {ep.name: ep for ep in self.pool.endpoints}
            for name, address, port, labels in payload:
                known[name] = Endpoint(name, address, port, labels)
            self.pool.replace(list(known.values()))
        elif kind == REMOVE:
            gone = set(payload)
            self.pool.replace([ep for ep in self.pool.endpoints if ep.name not in gone])

    # To the parent

    def succeeded(self, ep: Endpoint, seconds: float) -> None:
        self.batch.append([ep.name, seconds, *_pack_metrics(ep.metrics)])
        self._flush_soon()

    def failed(self, ep: Endpoint, exc: BaseException) -> None:
        self.batch.append([ep.name, None, type(exc).__name__, str(exc)])
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self.flush_at is None:
            self.flush_at = self.loop.call_later(_FLUSH_S, self.flush)

    def flush(self) -> None:
        self.flush_at = None
        if self.batch and not self.out.is_closing():
            self.out.write(msgpack.packb(self.batch, use_bin_type=True))
        self.batch = []


class _FromParent(asyncio.Protocol):
    def __init__(self, child: _Child) -> None:
        self.child = child
        self.unpacker = msgpack.Unpacker(raw=False, use_list=True)

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for msg in self.unpacker:
            self.child.handle(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.child.done.done():
            self.child.done.set_result(None)


async def _child_main() -> None:
    loop = asyncio.get_running_loop()
    wire = os.dup(1)
    os.dup2(2, 1)  # a stray print goes to stderr, never into the messages to the parent
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(wire, "wb", 0))
    child = _Child(loop, out)  # type: ignore[arg-type]
    await loop.connect_read_pipe(lambda: _FromParent(child), os.fdopen(os.dup(0), "rb", 0))
    gc.collect()
    gc.freeze()  # as epp does after startup: full collections then skip the imported modules
    await child.done  # the parent closed our stdin (it stops, or it died)
    if child.scraper is not None:
        await child.scraper.stop()
    if child.flush_at is not None:
        child.flush_at.cancel()
    out.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from epp.observability.logging import setup_logging

    ap = argparse.ArgumentParser(description="epp's scrape worker (started by epp; speaks msgpack on stdio)")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--log-format", default="text")
    args = ap.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C goes to epp, which stops us by EOF
    # Plugin modules must be importable for the pickled sources (they are, by module path).
    try:
        import uvloop

        uvloop.run(_child_main())
    except ImportError:
        asyncio.run(_child_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
