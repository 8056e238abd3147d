"""Overhead benchmark (figures, not assertions): the latency Envoy + epp adds over Envoy routing straight
to a backend, the most requests per second one epp process serves, and epp's CPU per request — for each
ext_proc transport side by side, with each profile.

    python -m bench.overhead [--transports fast,grpcio] [--profiles default,precise] [--endpoints 64]
                             [--rates 50,200,500,1000] [--duration 10] [--max-duration 10]
                             [--concurrency 64] [--prompt-tokens 8192]

For each pool size it starts that many stub backends (hack/stub_backend.py, one process, distinct loopback
IPs) and an Envoy that round-robins over them without ext_proc (the baseline). For each profile (a
built-in one, epp/profiles/<name>.yaml) it starts one `epp` per transport (plaintext ext_proc, scraping
every backend every 50 ms), each behind its own Envoy with the ext_proc filter (FULL_DUPLEX_STREAMED,
ORIGINAL_DST). At each rate an open-loop client sends chat completions of ~prompt-tokens tokens (~4
characters a token; 32 shared system prompts plus a unique question, as chat traffic is) to the baseline
and then to each transport's Envoy in turn (interleaved, so that drift of a busy machine hits all alike);
"added" is the difference of the latency percentiles (p50/p90/p99). "epp CPU/req" is the epp process's
user+system CPU time (/proc/<pid>/stat) over the run divided by the requests served. ("net" in the JSON: less
what the process burns idle, scraping, measured for 2 s before the load). "max req/s" is a closed loop
of --concurrency clients for --max-duration seconds against each transport's Envoy. All transports' epps
run at once by default; --one-at-a-time starts them in turn (each scrapes the pool in the background,
which on 2 cores and 64 endpoints is a load of its own).

`--transports null,...` adds the floor: bench/null_extproc.py, an ext_proc server on epp's fast transport
that routes round-robin and echoes the body with nothing else (no plugins, metrics or scraping), run and
measured like an epp; what an epp adds above it is the cost of routing. On a 2-core machine, run the
benchmark under `taskset -c 1` with `--epp-cpus 0` to give the epp (or the floor) a core of its own, as its
pod has in a cluster; unpinned, it competes with Envoy, the client and the stub pods for both cores.

The precise profile runs without KV events (the stub backends publish none), so it measures its
tokenization and scoring cost, not its routing quality. Prints tables and writes bench/out/overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from bench.httpclient import Client
from hack.localstack import Proc, Processes, free_port, wait_port

OUT = Path(__file__).parent / "out"
PROFILES = Path(__file__).parent.parent / "epp" / "profiles"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads; not its children), in seconds: fields 14 and 15 of
    /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live children (epp's scrape worker)."""
    total = process_cpu_seconds(pid)
    for child in _children(pid):
        try:
            total += process_cpu_seconds(child)
        except FileNotFoundError:
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except FileNotFoundError:
        return []


def summarize(latencies: list[float], sent: int, errors: int, elapsed: float) -> dict:
    return {"sent": sent, "ok": len(latencies), "errors": errors, "achieved_rps": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5) * 1e3, "p90_ms": pct(latencies, 0.9) * 1e3,
            "p99_ms": pct(latencies, 0.99) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan")}


def add_cpu(out: dict, pid: int | None, cpu0: float, elapsed: float, idle_per_s: float) -> None:
    """epp CPU per served request: raw, and net of what the process burns idle (scraping, timers)."""
    if pid:
        used = cpu_seconds(pid) - cpu0
        ok = max(1, out["ok"])
        out["epp_cpu_ms_per_req"] = used / ok * 1e3
        out["epp_cpu_ms_per_req_net"] = max(0.0, used - idle_per_s * elapsed) / ok * 1e3


async def idle_cpu(pid: int, seconds: float = 2.0) -> float:
    """CPU seconds per second the process uses with no requests."""
    cpu0 = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / seconds


async def open_loop(client: Client, bodies: list[bytes], rate: float, duration: float, pid: int | None,
                    idle_per_s: float = 0.0) -> dict:
    """Send at a fixed rate regardless of responses."""
    await asyncio.gather(*[client.one(bodies[i]) for i in range(8)])  # warm the connections
    client.reset()
    n = max(1, int(rate * duration))
    cpu0 = cpu_seconds(pid) if pid else 0.0
    tasks = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(client.one(bodies[i % len(bodies)])))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    out = summarize(client.latencies, n, client.errors, elapsed)
    add_cpu(out, pid, cpu0, elapsed, idle_per_s)
    return out


async def closed_loop(client: Client, bodies: list[bytes], concurrency: int, duration: float, pid: int | None,
                      idle_per_s: float = 0.0) -> dict:
    """`concurrency` clients sending back to back: the most requests per second the path serves."""
    await asyncio.gather(*[client.one(bodies[i]) for i in range(8)])
    client.reset()
    stop = time.perf_counter() + duration
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < stop:
            await client.one(bodies[next(counter) % len(bodies)])

    cpu0 = cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    out = summarize(client.latencies, len(client.latencies) + client.errors, client.errors, elapsed)
    add_cpu(out, pid, cpu0, elapsed, idle_per_s)
    return out


def scheduling_time(profile: str, n_endpoints: int, bodies: list[bytes], iterations: int = 2000) -> dict:
    """In-process: ExtProcSession over the profile, request headers + body in, routing answer and echoed
    body out (the work epp does per request besides the ext_proc transport)."""
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
    config = load_profile(profile, PluginHandle(pool))
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


def _cells(r: dict) -> str:
    if r["rate"] == "max":
        e = r["epp"]
        return (f"max {e['achieved_rps']:.0f} req/s, p50 {e['p50_ms']:.1f} ms, "
                f"cpu {e.get('epp_cpu_ms_per_req', float('nan')):.3f} ms/req")
    e = r["epp"]
    return (f"{e['added_p50_ms']:>7.2f} {e['added_p90_ms']:>7.2f} {e['added_p99_ms']:>7.2f} "
            f"{e.get('epp_cpu_ms_per_req', float('nan')):>7.3f} {e['achieved_rps']:>6.0f} {e['errors']:>4}")


def print_table(rows: list[dict], transports: list[str]) -> None:
    """Side by side: one line per pool size, profile and rate; one column group per transport."""
    cols = " | ".join(f"{t + ': add p50/p90/p99 ms, cpu ms/req, rps, err':<50}" for t in transports)
    print(f"{'endpoints':>9} {'profile':>8} {'rate':>6} | {cols}")
    keys = list(dict.fromkeys((r["endpoints"], r["profile"], r["rate"]) for r in rows))
    for n, profile, rate in keys:
        by_t = {r["transport"]: r for r in rows if (r["endpoints"], r["profile"], r["rate"]) == (n, profile, rate)}
        label = rate if rate == "max" else f"{rate:.0f}"
        print(f"{n:>9} {profile:>8} {label:>6} | " + " | ".join(
            f"{_cells(by_t[t]) if t in by_t else '-':<50}" for t in transports))


def _closed_loop_process(url: str, bodies: list[bytes], concurrency: int, start_at: float,
                         duration: float) -> tuple[list[float], int]:
    """One client process of a multi-process closed loop: its latencies and errors."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run() -> tuple[list[float], int]:
        client = Client(url)
        await asyncio.gather(*[client.one(bodies[i]) for i in range(4)])
        client.reset()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        stop = time.perf_counter() + duration
        counter = iter(range(10**9))

        async def worker() -> None:
            while time.perf_counter() < stop:
                await client.one(bodies[next(counter) % len(bodies)])

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        await client.close()
        return client.latencies, client.errors

    return asyncio.run(run())


async def closed_loop_processes(url: str, bodies: list[bytes], concurrency: int, duration: float, procs: int,
                                pid: int | None, idle_per_s: float = 0.0) -> dict:
    """The closed loop spread over `procs` client processes (one Python client tops out near a few
    thousand requests per second, below what a fast EPP on a dedicated core serves)."""
    import concurrent.futures
    import multiprocessing

    loop = asyncio.get_running_loop()
    start_at = time.time() + 2.0  # every process connected and warm before the clock starts
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = [loop.run_in_executor(ex, _closed_loop_process, url, bodies, c, start_at, duration) for c in per]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_seconds(pid) if pid else 0.0
        start = time.perf_counter()
        results = await asyncio.gather(*futs)
        elapsed = min(time.perf_counter() - start, duration)
    latencies = [x for lat, _ in results for x in lat]
    errors = sum(e for _, e in results)
    out = summarize(latencies, len(latencies) + errors, errors, elapsed)
    add_cpu(out, pid, cpu0, elapsed, idle_per_s)
    out["client_processes"] = procs
    return out


NULL = "null"  # not a transport: bench/null_extproc.py, the floor (see --transports)


def null_extproc(procs: Processes, backends: list[str], name: str, cpus: str | None) -> Proc:
    """bench/null_extproc.py on a free loopback port, pinned like the epps."""
    port = free_port()
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = procs.spawn(name, [*pin, sys.executable, "-m", "bench.null_extproc", "--port", str(port),
                              "--endpoints", ",".join(backends)])
    proc.ports = {"grpc": port}
    wait_port("127.0.0.1", port, proc=proc.popen, log=proc.log)
    return proc


async def run_pool(n: int, profiles: list[str], transports: list[str], args, bodies: list[bytes],
                   workdir: Path) -> list[dict]:
    """Rows for one pool size: per profile, transport and rate (and "max"), the baseline and the epp run."""
    procs = Processes(workdir)
    rows = []
    groups = [[t] for t in transports] if args.one_at_a_time else [transports]
    try:
        backends: list[str] = []
        per = -(-n // args.backend_procs)
        for i, first in enumerate(range(0, n, per)):
            backends += procs.backends(min(per, n - first), first_ip=2 + first, name=f"backends-{n}-{i}")[1]
        direct = procs.envoy(0, pool=backends, direct=True, concurrency=args.envoy_concurrency)
        base_client = Client(f"http://127.0.0.1:{direct.ports['listen']}/v1/chat/completions")
        for profile in profiles:
            for group in groups:
                epps, clients = {}, {}
                for t in group:
                    if t == NULL:
                        epp = null_extproc(procs, backends, name=f"null-{n}-{profile}", cpus=args.epp_cpus)
                    else:
                        epp = procs.epp(",".join(backends), "--transport", t, "--config-file",
                                        str(PROFILES / f"{profile}.yaml"), "--refresh-metrics-interval",
                                        args.refresh_metrics_interval, "--metrics-scraper", args.metrics_scraper,
                                        name=f"epp-{n}-{profile}-{t}", cpus=args.epp_cpus)
                    envoy = procs.envoy(epp.ports["grpc"], response_body_mode=args.response_body_mode,
                                        concurrency=args.envoy_concurrency)
                    epps[t] = epp
                    clients[t] = Client(f"http://127.0.0.1:{envoy.ports['listen']}/v1/chat/completions")
                await asyncio.sleep(1.0)  # scrapes settle
                idle = {t: await idle_cpu(epps[t].popen.pid) for t in group}
                for t in group:
                    print(f"  {n} endpoints, {profile}, {t}: epp CPU when idle {idle[t] * 1e3:.1f} ms/s", flush=True)
                for rate in args.rates:
                    base = await open_loop(base_client, bodies, rate, args.duration, None)
                    for t in group:  # interleaved with the baseline, so that drift hits all alike
                        r = await open_loop(clients[t], bodies, rate, args.duration, epps[t].popen.pid, idle[t])
                        for q in ("p50", "p90", "p99"):
                            r[f"added_{q}_ms"] = r[f"{q}_ms"] - base[f"{q}_ms"]
                        rows.append({"endpoints": n, "profile": profile, "transport": t, "rate": rate,
                                     "direct": base, "epp": r, "epp_idle_cpu_ms_per_s": idle[t] * 1e3})
                        print(f"  {n} endpoints, {profile}, {t}, {rate:.0f} req/s: direct p50/p90/p99 "
                              f"{base['p50_ms']:.2f}/{base['p90_ms']:.2f}/{base['p99_ms']:.2f} ms; "
                              f"added {_cells(rows[-1])}", flush=True)
                if args.max_duration > 0:
                    for t in group:
                        if args.client_procs > 1:
                            sat = await closed_loop_processes(clients[t].url, bodies, args.concurrency,
                                                              args.max_duration, args.client_procs,
                                                              epps[t].popen.pid, idle[t])
                        else:
                            sat = await closed_loop(clients[t], bodies, args.concurrency, args.max_duration,
                                                    epps[t].popen.pid, idle[t])
                        rows.append({"endpoints": n, "profile": profile, "transport": t, "rate": "max",
                                     "epp": sat, "epp_idle_cpu_ms_per_s": idle[t] * 1e3})
                        print(f"  {n} endpoints, {profile}, {t}: {_cells(rows[-1])}", flush=True)
                for c in clients.values():
                    await c.close()
                for t in group:
                    epps[t].stop()
        await base_client.close()
    finally:
        procs.stop_all()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="fast,grpcio",
                    help="ext_proc transports to compare (--transport); add `null` for the floor: "
                         "bench/null_extproc.py, which routes round-robin and echoes the body on the fast "
                         "transport with nothing else, run like an epp")
    ap.add_argument("--profiles", default="default,precise", help="built-in profiles (epp/profiles/<name>.yaml)")
    ap.add_argument("--endpoints", default="64")
    ap.add_argument("--rates", default="50,200,500,1000")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate and target")
    ap.add_argument("--max-duration", type=float, default=10.0, help="seconds of the max req/s run (0: skip)")
    ap.add_argument("--concurrency", type=int, default=64, help="clients of the max req/s run")
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--metrics-scraper", choices=("inline", "worker"), default="inline",
                    help="epp's --metrics-scraper; epp CPU always counts the scrape worker process too")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes of the max req/s run (more than one where a core is free for each)")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (each Envoy)")
    ap.add_argument("--backend-procs", type=int, default=1, help="processes the stub backends are spread over")
    ap.add_argument("--epp-cpus", default=None,
                    help="pin each epp to these CPUs (a taskset list, e.g. 0); with the rest of the benchmark "
                         "run under `taskset -c 1-15`, the epp has a core of its own: its max req/s per process")
    ap.add_argument("--refresh-metrics-interval", default="50ms", help="epp's scrape period (default 50ms)")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="run one transport's epp at a time (its idle scraping then does not load the other's "
                         "runs; on a 2-core machine this matters with many endpoints); default: all at once, "
                         "interleaved")
    ap.add_argument("--epp-response-body", choices=("none", "streamed"), default="none",
                    help="Envoy's ext_proc response_body_mode: none (as manifests/envoy/envoy.yaml, since neither "
                         "profile reads responses; default) or streamed (FULL_DUPLEX_STREAMED)")
    ap.add_argument("--out", default=str(OUT / "overhead.json"))
    args = ap.parse_args()
    args.response_body_mode = "NONE" if args.epp_response_body == "none" else "FULL_DUPLEX_STREAMED"
    args.rates = [float(x) for x in args.rates.split(",")]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    pools = [int(x) for x in args.endpoints.split(",")]
    bodies = make_bodies(512, args.prompt_tokens)
    print(f"request body: {len(bodies[0])} bytes (~{args.prompt_tokens} tokens); transports {', '.join(transports)}")
    print("in-process per request (ExtProcSession: headers + body in, routing answer + echoed body out):")
    sched: dict[str, dict[int, dict]] = {}
    for profile in profiles:
        sched[profile] = {}
        for n in pools:
            sched[profile][n] = r = scheduling_time(profile, n, bodies)
            print(f"  {profile:>8}, {n:>3} endpoints: p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
                  f"mean {r['mean_us']:.0f} µs")
    print("\nruns:")
    OUT.mkdir(exist_ok=True)
    workdir = OUT / "overhead-logs"
    workdir.mkdir(exist_ok=True)
    rows = []
    for n in pools:
        rows += asyncio.run(run_pool(n, profiles, transports, args, bodies, workdir))
    print("\nlatency through Envoy: add = (Envoy + epp) - Envoy alone, per percentile; cpu = epp CPU per request "
          "(raw; net of idle in the JSON)")
    print_table(rows, transports)
    result = {"prompt_tokens": args.prompt_tokens, "body_bytes": len(bodies[0]), "transports": transports,
              "profiles": profiles, "scheduling": sched, "refresh_metrics_interval": args.refresh_metrics_interval,
              "duration_s": args.duration, "concurrency": args.concurrency, "one_at_a_time": args.one_at_a_time,
              "client_procs": args.client_procs, "envoy_concurrency": args.envoy_concurrency,
              "backend_procs": args.backend_procs, "epp_cpus": args.epp_cpus, "cpus": os.cpu_count(),
              "metrics_scraper": args.metrics_scraper,
              "latency": rows}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
