"""Overhead benchmark (figures, not assertions): the latency Envoy + epp adds over Envoy routing straight
to a backend, and epp's in-process scheduling time per request.

    python -m bench.overhead [--endpoints 16,64] [--rates 50,200,500] [--duration 10] [--prompt-tokens 8192]

For each pool size it starts that many stub backends (hack/stub_backend.py, one process, distinct loopback
IPs), `epp` with the default profile (plaintext ext_proc, scraping every backend every 50 ms), Envoy with
the ext_proc filter (FULL_DUPLEX_STREAMED, ORIGINAL_DST) and a second Envoy that round-robins over the same
backends without ext_proc. At each rate an open-loop client sends chat completions of ~prompt-tokens
tokens (~4 characters a token; 32 shared system prompts plus a unique question, as chat traffic is) to
both Envoys in turn; "added" is the difference of the two latency percentiles. Prints a table and writes
bench/out/overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from hack.localstack import Processes

OUT = Path(__file__).parent / "out"


def make_bodies(n: int, prompt_tokens: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    words = "the of and to in is that for it as with was on be by this are from at or an".split()
    chars = prompt_tokens * 4
    systems = [" ".join(rng.choice(words) for _ in range(int(chars * 0.75) // 4)) for _ in range(32)]
    bodies = []
    for i in range(n):
        question = f"{i} " + " ".join(rng.choice(words) for _ in range(int(chars * 0.25) // 4))
        bodies.append(json.dumps({"model": "m", "max_tokens": 16, "messages": [
            {"role": "system", "content": systems[i % 32]}, {"role": "user", "content": question}]}).encode())
    return bodies


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def open_loop(url: str, bodies: list[bytes], rate: float, duration: float) -> dict:
    """Send at a fixed rate regardless of responses; latency = send to last response byte."""
    latencies: list[float] = []
    errors = 0
    n = int(rate * duration)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one(body: bytes) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)

        # warm the connections
        await asyncio.gather(*[one(bodies[i]) for i in range(8)])
        latencies.clear()
        tasks = []
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(bodies[i % len(bodies)])))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"sent": n, "ok": len(latencies), "errors": errors, "achieved_rps": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5) * 1e3, "p99_ms": pct(latencies, 0.99) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan")}


def scheduling_time(n_endpoints: int, bodies: list[bytes], iterations: int = 2000) -> dict:
    """In-process: ExtProcSession over the default profile, request headers + body in, routing answer and
    echoed body out (the work epp does per request besides the gRPC transport)."""
    from epp.config import load_profile
    from epp.datastore.endpoint import Endpoint, Metrics
    from epp.datastore.pool import Pool
    from epp.director import Director
    from epp.extproc.protocol import ReplyCache
    from epp.extproc.session import ExtProcSession
    from epp.observability.metrics import EppMetrics
    from epp.scheduling.registry import PluginHandle, load_builtin_plugins
    from hack.extproc_messages import CHAT_HEADERS, body_msg, headers_msg

    load_builtin_plugins()
    pool = Pool()
    now = time.monotonic()
    rng = random.Random(3)
    eps = []
    for i in range(n_endpoints):
        ep = Endpoint(f"10.0.{i // 250}.{i % 250 + 1}:8000", f"10.0.{i // 250}.{i % 250 + 1}", 8000)
        ep.metrics = Metrics(waiting_queue_size=rng.randint(0, 5), running_requests_size=rng.randint(0, 20),
                             kv_cache_usage_percent=rng.random() * 0.8, cache_block_size=16,
                             cache_num_blocks=10000, update_time=now + 3600)
        eps.append(ep)
    pool.replace(eps)
    config = load_profile("default", PluginHandle(pool))
    director = Director(config, pool, EppMetrics(pool))
    hmsg = headers_msg(CHAT_HEADERS)
    bmsgs = [body_msg(b, True) for b in bodies]
    replies = ReplyCache()
    times = []
    for i in range(iterations):
        t0 = time.perf_counter()
        s = ExtProcSession(director, 64 << 20, replies)
        s.handle(hmsg)
        s.handle(bmsgs[i % len(bmsgs)])
        times.append(time.perf_counter() - t0)
        s.close()
    times = times[iterations // 10:]
    return {"p50_us": pct(times, 0.5) * 1e6, "p99_us": pct(times, 0.99) * 1e6,
            "mean_us": statistics.fmean(times) * 1e6}


async def run_pool(n: int, rates: list[float], duration: float, bodies: list[bytes], workdir: Path,
                   epp_args: list[str]) -> list[dict]:
    procs = Processes(workdir)
    rows = []
    try:
        _, backends = procs.backends(n, first_ip=2, name=f"backends-{n}")
        epp = procs.epp(",".join(backends), *epp_args, name=f"epp-{n}")
        via_epp = procs.envoy(epp.ports["grpc"])
        direct = procs.envoy(0, pool=backends, direct=True)
        await asyncio.sleep(1.0)  # scrapes settle
        for rate in rates:
            base = await open_loop(f"http://127.0.0.1:{direct.ports['listen']}/v1/chat/completions", bodies, rate,
                                   duration)
            with_epp = await open_loop(f"http://127.0.0.1:{via_epp.ports['listen']}/v1/chat/completions", bodies,
                                       rate, duration)
            row = {"endpoints": n, "rate": rate, "direct": base, "epp": with_epp,
                   "added_p50_ms": with_epp["p50_ms"] - base["p50_ms"],
                   "added_p99_ms": with_epp["p99_ms"] - base["p99_ms"]}
            rows.append(row)
            print(f"{n:>9} {rate:>6.0f} {base['p50_ms']:>9.2f} {base['p99_ms']:>9.2f} {with_epp['p50_ms']:>9.2f} "
                  f"{with_epp['p99_ms']:>9.2f} {row['added_p50_ms']:>9.2f} {row['added_p99_ms']:>9.2f} "
                  f"{with_epp['achieved_rps']:>8.0f} {with_epp['errors'] + base['errors']:>6}", flush=True)
    finally:
        procs.stop_all()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", default="16,64")
    ap.add_argument("--rates", default="50,200,500")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--refresh-metrics-interval", default="50ms", help="epp's scrape period (default 50ms)")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    pools = [int(x) for x in args.endpoints.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    bodies = make_bodies(512, args.prompt_tokens)
    print(f"request body: {len(bodies[0])} bytes (~{args.prompt_tokens} tokens)")
    print("in-process per request (ExtProcSession, default profile, protobuf in/out):")
    sched = {}
    for n in pools:
        sched[n] = scheduling_time(n, bodies)
        print(f"  {n:>3} endpoints: p50 {sched[n]['p50_us']:.0f} µs, p99 {sched[n]['p99_us']:.0f} µs, "
              f"mean {sched[n]['mean_us']:.0f} µs")
    print("\nlatency through Envoy (ms): direct = Envoy only; epp = Envoy + ext_proc epp; added = epp - direct")
    print(f"{'endpoints':>9} {'rate':>6} {'dir p50':>9} {'dir p99':>9} {'epp p50':>9} {'epp p99':>9} "
          f"{'add p50':>9} {'add p99':>9} {'rps':>8} {'errors':>6}")
    OUT.mkdir(exist_ok=True)
    workdir = OUT / "overhead-logs"
    workdir.mkdir(exist_ok=True)
    rows = []
    for n in pools:
        rows += asyncio.run(run_pool(n, rates, args.duration, bodies, workdir,
                                     ["--refresh-metrics-interval", args.refresh_metrics_interval]))
    result = {"prompt_tokens": args.prompt_tokens, "body_bytes": len(bodies[0]), "scheduling": sched,
              "refresh_metrics_interval": args.refresh_metrics_interval,
              "latency": rows}
    out = OUT / f"overhead-{args.refresh_metrics_interval}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
