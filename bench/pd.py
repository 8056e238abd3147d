"""Disaggregated prefill/decode (P/D) against aggregated serving, on a prefill-heavy workload, through real
Envoy and the EPP.

    python -m bench.pd [--layouts agg,pd:2] [--pd-config epp/profiles/pd.yaml] [--agg-config epp/profiles/default.yaml]
                       [--pods 4] [--rates 2:4:6:8] [--duration 30] [--warmup 5] [--drain 60]
                       [--prompt-tokens 4096:8192] [--output-tokens 32:128] [--shared-prefix 0]
                       [--prefill-tokens-per-s 15928] [--kv-transfer-time-per-token 0.005] [--quick]
                       [--out bench/results]

Layouts, all with the same number of `epp-model-server --engine sim` pods (--pods) on 127.0.0.K:8000 (K from
--first-ip), KV events on :5557 (replay :5558) with llm-d's topic convention:

  agg      every pod serves whole requests (--role both, unlabelled); the EPP runs --agg-config (default: the
           default profile).
  pd:K     K prefill pods (--role prefill, label llm-d.ai/role=prefill) and pods-K decode pods (--role decode:
           the decode sidecar is on; label decode); the EPP runs --pd-config (default epp/profiles/pd.yaml), whose
           disagg-profile-handler picks the decode pod and names a prefill pod in x-prefiller-host-port.
  pd-rr:K  the same pods, but the EPP runs --agg-config over the decode pods only and the client names the
           prefill pods round-robin in x-prefiller-host-port itself: P/D without a P/D-aware picker (a baseline,
           and a way to exercise the P/D pods when no P/D profile is at hand).

Each run (layout x rate): wait until the pods are idle, clear their prefix caches, start the EPP and Envoy
afresh (hack/localstack.py: ext_proc FULL_DUPLEX_STREAMED, ORIGINAL_DST routing on the EPP's header), send
one tiny warm-up request, then send requests open-loop on a seeded Poisson schedule at the rate for
--warmup + --duration seconds (the same prompts and schedule for every layout), streaming every response;
only requests sent after the warm-up seconds are reported. After the last send the run waits up to --drain
seconds; requests still running then are cancelled and counted as unfinished.

Workload: prompts of uniformly drawn length in --prompt-tokens (built-in tokenizer: one token per generated
word, checked against the pods' /tokenize at start), starting with --shared-prefix tokens common to every
request (default 0: every prompt is new, so prefill dominates), and short outputs (--output-tokens,
`ignore_eos`). With the sim's defaults (8B model on an H100: 15928 prefill tokens/s, 10 ms decode steps) a
6k-token prompt costs ~380 ms of prefill and a 80-token output ~0.9 s of decoding, so one pod prefills about
2.6 such requests per second.

Figures per run:
  TTFT      p50/p90/p99 from the scheduled send time to the first streamed body byte (open loop: a late send
            counts against the system; unfinished requests count with the time they waited)
  TPOT      p50/p90 over requests of (last byte - first byte) / (output tokens - 1)
  throughput completed requests and output tokens per second (first reported send to last byte)
  P/D       the share of completed requests the decode pods served as decode legs (their
            epp_model_server_pd_decode_legs_total), the prompt tokens they received over the KV link, the
            prefill pods' prefill legs, and the pods' prefix-cache hit rate (vllm counters)

Outputs (--out, default bench/results/): pd.json (every run and the settings) and pd.md (the table),
printed at the end. The figures are the machine's: run it on a quiet machine (the EPP, Envoy and the
client share its cores with the pods).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench import prefix_routing
from bench.prefix_routing import percentile
from bench.runner import run as run_benchmark
from bench.workloads import MODEL
from hack.localstack import BIN, Proc, Processes, wait_port

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LOGS = HERE / "out" / "pd-logs"
PROFILE_DIR = ROOT / "epp" / "profiles"
POD_PORT = 8000
KV_PORT, REPLAY_PORT = 5557, 5558
ROLE_LABEL = "llm-d.ai/role"
PREFILLER_HEADER = "x-prefiller-host-port"
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:num_requests_running",
            "vllm:num_requests_waiting", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "epp_model_server_pd_prefill_legs_total", "epp_model_server_pd_decode_legs_total",
            "epp_model_server_kv_transfer_tokens_total", "epp_model_server_pd_prefill_calls_total")


# ------------------------------------------------------------------------------------------------ helpers


def int_range(text: str, what: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"--{what}: {text!r} must be N or LOW:HIGH, e.g. 4096:8192") from None
    if not 1 <= a <= b:
        raise SystemExit(f"--{what}: {text!r} needs 1 <= LOW <= HIGH")
    return a, b


# ------------------------------------------------------------------------------------------------ workload


_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def words(rng: random.Random, n: int) -> list[str]:
    """n words of 2-8 letters: one token each for the built-in tokenizer."""
    return ["".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 4)))
            for _ in range(n)]


@dataclass(frozen=True, slots=True)
class Request:
    prompt: str
    prompt_tokens: int
    max_tokens: int

    def body(self) -> bytes:
        return orjson.dumps({"model": MODEL, "prompt": self.prompt, "max_tokens": self.max_tokens,
                             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})


def make_workload(n: int, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int], shared_prefix: int,
                  seed: int) -> list[Request]:
    rng = random.Random(seed)
    prefix = words(random.Random(seed + 1_000_003), shared_prefix)
    out = []
    for _ in range(n):
        length = max(rng.randint(*prompt_tokens), shared_prefix + 1)
        text = " ".join(prefix + words(rng, length - shared_prefix))
        out.append(Request(text, length, rng.randint(*output_tokens)))
    return out


def poisson_times(rate: float, seconds: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


# ------------------------------------------------------------------------------------------------ the stack


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    kind: str  # "agg" | "pd" | "pd-rr"
    prefill_pods: int

    def roles(self, pods: int) -> list[str]:
        if self.kind == "agg":
            return ["both"] * pods
        return ["prefill"] * self.prefill_pods + ["decode"] * (pods - self.prefill_pods)


def parse_layout(text: str, pods: int) -> Layout:
    kind, _, k = text.partition(":")
    if kind == "agg" and not k:
        return Layout("agg", "agg", 0)
    if kind in ("pd", "pd-rr"):
        try:
            n = int(k or pods // 2)
        except ValueError:
            n = -1
        if not 1 <= n < pods:
            raise SystemExit(f"--layouts: {text!r} needs 1 <= prefill pods < --pods ({pods}), e.g. {kind}:{pods // 2}")
        return Layout(f"{kind}:{n}", kind, n)
    raise SystemExit(f"--layouts: unknown layout {text!r}; use agg, pd:K or pd-rr:K (K prefill pods)")


class Pods(prefix_routing.Pods):
    """The pods of one layout, with their roles; started per layout (roles differ), caches cleared per run.
    Port checks, waiting for idle pods and cache resets are the prefix benchmark's."""

    def __init__(self, procs: Processes, settings: Settings, roles: list[str]) -> None:
        self.procs = procs
        self.settings = settings
        self.roles = roles
        self.hosts = [f"127.0.0.{settings.first_ip + i}" for i in range(len(roles))]
        self.endpoints = [f"{h}:{POD_PORT}" for h in self.hosts]
        self.running: list[Proc] = []

    def of_role(self, role: str) -> list[str]:
        return [ep for ep, r in zip(self.endpoints, self.roles, strict=True) if r == role]

    def start(self) -> None:
        s = self.settings
        for i, (host, role) in enumerate(zip(self.hosts, self.roles, strict=True)):
            kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{KV_PORT}",
                  "replay_endpoint": f"tcp://*:{REPLAY_PORT}", "topic": f"kv@{host}:{POD_PORT}@{MODEL}"}
            self.running.append(self.procs.spawn(f"pod-{i}-{role}", [
                str(BIN / "epp-model-server"), "--host", host, "--port", str(POD_PORT), "--engine", "sim",
                "--model", MODEL, "--pod-name", f"pod-{i}", "--role", role, "--num-gpu-blocks", str(s.blocks),
                "--hash-seed", "0", "--time-scale", str(s.time_scale), "--log-level", "warning",
                "--prefill-tokens-per-s", str(s.prefill_tps), "--kv-transfer-time-per-token", str(s.kv_ms_per_token),
                "--max-model-len", str(max(32768, s.prompt_tokens[1] + s.output_tokens[1] + 16)),
                "--kv-events-config", json.dumps(kv)]))
        for proc, host in zip(self.running, self.hosts, strict=True):
            wait_port(host, POD_PORT, timeout=60, proc=proc.popen, log=proc.log)

    def stop(self) -> None:
        for proc in self.running:
            proc.stop()
        self.running.clear()

    async def scrape(self, session: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        out = {}
        for ep in self.endpoints:
            async with session.get(f"http://{ep}/metrics") as r:
                text = await r.text()
            vals: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name in vals and s.labels.get("outcome", "ok") == "ok":
                        vals[s.name] += s.value
            out[ep] = vals
        return out


@dataclass
class Front:
    url: str
    procs: list[Proc]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


async def start_front(layout: Layout, settings: Settings, procs: Processes, pods: Pods,
                      session: aiohttp.ClientSession, run_id: str) -> Front:
    """The EPP (with the layout's config and its view of the pool) behind Envoy, answering 200."""
    if layout.kind == "agg":
        config, endpoints = settings.agg_config, pods.endpoints
    elif layout.kind == "pd":
        config = settings.pd_config
        endpoints = [f"{ep};{ROLE_LABEL}={role}" for ep, role in zip(pods.endpoints, pods.roles, strict=True)]
    else:
        config, endpoints = settings.agg_config, [f"{ep};{ROLE_LABEL}=decode" for ep in pods.of_role("decode")]
    epp = procs.epp(",".join(endpoints), "--config-file", str(config), "--log-level", "warning",
                    name=f"epp-{run_id}")
    envoy = procs.envoy(epp.ports["grpc"])
    front = Front(f"http://127.0.0.1:{envoy.ports['listen']}", [epp, envoy])
    body = {"model": MODEL, "prompt": "warm up", "max_tokens": 1}
    deadline = time.monotonic() + 20
    last = ""
    while time.monotonic() < deadline:
        try:
            async with session.post(f"{front.url}/v1/completions", json=body) as r:
                last = f"{r.status} {(await r.read())[:300]!r}"
                if r.status == 200:
                    return front
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.2)
    front.stop()
    raise RuntimeError(f"the stack at {front.url} did not answer 200 within 20 s; last: {last}; logs in {LOGS}")


# ------------------------------------------------------------------------------------------------ a run


@dataclass(slots=True)
class Record:
    sent_at: float
    ttft: float | None = None
    first: float | None = None
    end: float | None = None
    status: int = 0
    pod: str = ""
    completion_tokens: int = 0
    error: str = ""


async def replay(front: Front, requests: Sequence[Request], times: Sequence[float], drain: float,
                 session: aiohttp.ClientSession, prefillers: Sequence[str]) -> list[Record]:
    """Sends request i at times[i] (open loop) and streams the answers; with `prefillers`, names them
    round-robin in x-prefiller-host-port."""
    records = [Record(t) for t in times]
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(i: int) -> None:
        rec = records[i]
        delay = start + rec.sent_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {"content-type": "application/json"}
        if prefillers:
            headers[PREFILLER_HEADER] = prefillers[i % len(prefillers)]
        t0 = start + rec.sent_at
        try:
            async with session.post(front.url + "/v1/completions", data=requests[i].body(), headers=headers) as r:
                rec.status = r.status
                rec.pod = r.headers.get("x-inference-pod", "")
                tail = b""
                async for chunk in r.content.iter_any():
                    if rec.first is None:
                        rec.first = loop.time()
                        rec.ttft = rec.first - t0
                    tail = (tail + chunk)[-4096:]
                rec.end = loop.time()
                if r.status != 200:
                    rec.error = f"HTTP {r.status}: " + tail.decode(errors="replace")[-300:]
                    rec.ttft = None
                else:
                    rec.completion_tokens = _usage(tail).get("completion_tokens", 0)
        except (TimeoutError, aiohttp.ClientError) as exc:
            rec.error = repr(exc)[:300]

    tasks = [asyncio.create_task(one(i)) for i in range(len(records))]
    cutoff = start + (times[-1] if times else 0.0) + drain
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, cutoff - loop.time())) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    now = loop.time()
    for rec in records:
        if rec.end is None and not rec.error:
            rec.error = "unfinished"
            if rec.ttft is None:
                rec.ttft = now - (start + rec.sent_at)
    for rec in records:  # absolute loop times -> seconds from the start
        rec.first = None if rec.first is None else rec.first - start
        rec.end = None if rec.end is None else rec.end - start
    return records


def _usage(tail: bytes) -> dict:
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                return orjson.loads(line[6:]).get("usage") or {}
            except orjson.JSONDecodeError:
                return {}
    return {}


def _delta(a: dict, b: dict, endpoints: Sequence[str], name: str) -> float:
    return sum(b[ep][name] - a[ep][name] for ep in endpoints)


def summarize(layout: Layout, rate: float, records: Sequence[Record], warmup: float, pods: Pods, before: dict,
              after: dict) -> dict:
    recs = [r for r in records if r.sent_at >= warmup]
    ok = [r for r in recs if r.status == 200 and r.end is not None]
    ttfts = [r.ttft for r in recs if r.ttft is not None]
    tpots = [(r.end - r.first) / (r.completion_tokens - 1) for r in ok
             if r.first is not None and r.completion_tokens > 1]
    span = (max((r.end for r in ok), default=warmup) - min((r.sent_at for r in recs), default=warmup)) if ok else 0.0
    errors = [r for r in recs if r.error and r.error != "unfinished"]
    every = pods.endpoints
    decode_eps = pods.of_role("decode") or every
    prefill_eps = pods.of_role("prefill")
    done_all = sum(1 for r in records if r.status == 200 and r.end is not None)
    decode_legs = _delta(before, after, decode_eps, "epp_model_server_pd_decode_legs_total")
    queries = _delta(before, after, every, "vllm:prefix_cache_queries_total")
    return {
        "layout": layout.name, "rate": rate, "requests": len(recs), "completed": len(ok),
        "unfinished": sum(1 for r in recs if r.error == "unfinished"), "errors": len(errors),
        "error_sample": errors[0].error if errors else "",
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3, "ttft_p90_ms": percentile(ttfts, 0.9) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
        "tpot_p50_ms": percentile(tpots, 0.5) * 1e3, "tpot_p90_ms": percentile(tpots, 0.9) * 1e3,
        "tpot_mean_ms": sum(tpots) / len(tpots) * 1e3 if tpots else float("nan"),
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "output_tps": sum(r.completion_tokens for r in ok) / span if span > 0 else 0.0,
        # Over the whole run, warm-up seconds included (the counters cannot tell the requests apart).
        "pd_share": decode_legs / done_all if done_all else 0.0,
        "decode_legs": decode_legs,
        "prefill_legs": _delta(before, after, prefill_eps, "epp_model_server_pd_prefill_legs_total"),
        "kv_transfer_tokens": _delta(before, after, decode_eps, "epp_model_server_kv_transfer_tokens_total"),
        "prefill_calls_ok": _delta(before, after, decode_eps, "epp_model_server_pd_prefill_calls_total"),
        "hit_rate": _delta(before, after, every, "vllm:prefix_cache_hits_total") / queries if queries else 0.0,
        "per_pod": {p: sum(1 for r in recs if r.pod == p) for p in sorted({r.pod for r in recs if r.pod})},
    }


async def run_layout(layout: Layout, settings: Settings, procs: Processes, requests: list[Request],
                     schedules: dict[float, list[float]], session: aiohttp.ClientSession) -> list[dict]:
    pods = Pods(procs, settings, layout.roles(settings.pods))
    busy = pods.busy()
    if busy:
        raise SystemExit(f"pd: {', '.join(busy)} already in use; stop whatever listens there or pick --first-ip")
    pods.start()
    figures = []
    try:
        await check_tokens(session, pods.endpoints[0], requests[0])
        for rate in settings.rates:
            await pods.wait_idle(session, timeout=120.0)
            await pods.reset(session)
            run_id = f"{layout.name.replace(':', '')}-{rate:g}"
            front = await start_front(layout, settings, procs, pods, session, run_id)
            try:
                before = await pods.scrape(session)
                times = schedules[rate]
                prefillers = pods.of_role("prefill") if layout.kind == "pd-rr" else []
                t0 = time.perf_counter()
                records = await replay(front, requests[:len(times)], times, settings.drain, session, prefillers)
                wall = time.perf_counter() - t0
                await pods.wait_idle(session, timeout=120.0)
                after = await pods.scrape(session)
            finally:
                front.stop()
            fig = summarize(layout, rate, records, settings.warmup, pods, before, after)
            fig["wall_s"] = wall
            figures.append(fig)
            print(line(fig), flush=True)
            if layout.kind != "agg" and fig["decode_legs"] == 0:
                print(f"    warning: no request was disaggregated in {layout.name}: does {settings.pd_config} run "
                      "disagg-profile-handler, and do the prompts reach its decider's nonCachedTokens?",
                      flush=True)
    finally:
        pods.stop()
    return figures


async def check_tokens(session: aiohttp.ClientSession, endpoint: str, request: Request) -> None:
    async with session.post(f"http://{endpoint}/tokenize", json={"model": MODEL, "prompt": request.prompt}) as r:
        count = (await r.json())["count"]
    if abs(count - request.prompt_tokens) > 1:  # the built-in tokenizer may add a BOS token
        raise RuntimeError(f"a {request.prompt_tokens}-word prompt is {count} tokens on {endpoint}; the workload "
                           "assumes one token per word (the built-in tokenizer)")


def line(fig: dict) -> str:
    return (f"{fig['layout']:>8} {fig['rate']:5g}/s  TTFT p50/p90/p99 {fig['ttft_p50_ms']:7.0f}/{fig['ttft_p90_ms']:7.0f}/"
            f"{fig['ttft_p99_ms']:7.0f} ms  TPOT p50/p90 {fig['tpot_p50_ms']:6.1f}/{fig['tpot_p90_ms']:6.1f} ms  "
            f"{fig['throughput_rps']:5.2f} req/s {fig['output_tps']:7.1f} tok/s  done {fig['completed']}/"
            f"{fig['requests']}  P/D {fig['pd_share']:5.1%}  hit {fig['hit_rate']:5.1%}"
            + (f"  errors {fig['errors']}: {fig['error_sample'][:120]}" if fig["errors"] else ""))


def markdown(results: dict) -> str:
    s = results["settings"]
    out = [f"# P/D vs aggregated ({s['pods']} pods, prompts {s['prompt_tokens'][0]}-{s['prompt_tokens'][1]} tokens, "
           f"outputs {s['output_tokens'][0]}-{s['output_tokens'][1]}, shared prefix {s['shared_prefix']})", "",
           f"Sim pods: prefill {s['prefill_tokens_per_s']:g} tokens/s, KV transfer {s['kv_transfer_ms_per_token']:g} "
           f"ms/token, time scale {s['time_scale']:g}; {s['duration_s']:g} s measured per rate after {s['warmup_s']:g} "
           f"s of warm-up. EPP configs: agg {s['agg_config']}, pd {s['pd_config']}.", "",
           "| layout | rate | done | TTFT p50 | p90 | p99 (ms) | TPOT p50 | p90 (ms) | req/s | out tok/s | P/D | "
           "KV tokens moved | hit rate | errors |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in results["runs"]:
        out.append(f"| {f['layout']} | {f['rate']:g}/s | {f['completed']}/{f['requests']} | {f['ttft_p50_ms']:.0f} | "
                   f"{f['ttft_p90_ms']:.0f} | {f['ttft_p99_ms']:.0f} | {f['tpot_p50_ms']:.1f} | {f['tpot_p90_ms']:.1f} | "
                   f"{f['throughput_rps']:.2f} | {f['output_tps']:.0f} | {f['pd_share']:.0%} | "
                   f"{f['kv_transfer_tokens']:.0f} | {f['hit_rate']:.1%} | {f['errors'] + f['unfinished']} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ main


@dataclass
class Settings:
    layouts: list[Layout]
    pd_config: Path
    agg_config: Path
    pods: int
    rates: list[float]
    duration: float
    warmup: float
    drain: float
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    shared_prefix: int
    blocks: int
    prefill_tps: float
    kv_ms_per_token: float
    time_scale: float
    first_ip: int
    seed: int
    out: Path


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="agg,pd:2", help="comma-separated: agg, pd:K, pd-rr:K (default agg,pd:2)")
    ap.add_argument("--pd-config", type=Path, default=PROFILE_DIR / "pd.yaml",
                    help="the EPP config of the pd layouts (default epp/profiles/pd.yaml)")
    ap.add_argument("--agg-config", type=Path, default=PROFILE_DIR / "default.yaml",
                    help="the EPP config of agg and pd-rr (default epp/profiles/default.yaml)")
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--rates", default="2:4:6:8", help="requests per second, e.g. 2:4:6:8")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds of arrivals per rate")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of arrivals before, not reported")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds to wait for answers after the last send")
    ap.add_argument("--prompt-tokens", default="4096:8192")
    ap.add_argument("--output-tokens", default="32:128")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with (default 0)")
    ap.add_argument("--blocks", type=int, default=25000, help="KV blocks of 16 tokens per pod (sim default 25000)")
    ap.add_argument("--prefill-tokens-per-s", type=float, default=15928.0, help="the sim pods' prefill speed")
    ap.add_argument("--kv-transfer-time-per-token", type=float, default=0.005,
                    help="ms per prompt token moved to a decode pod (the server's default)")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--first-ip", type=int, default=2, help="pods on 127.0.0.<first-ip>.. (default 2)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: rate 1, 3 s, prompts 1024-2048 tokens, outputs 8-16")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    a = ap.parse_args(argv)
    if a.quick:
        a.rates, a.duration, a.warmup, a.drain = "1", 3.0, 1.0, 20.0
        a.prompt_tokens, a.output_tokens = "1024:2048", "8:16"
    if a.pods < 2:
        raise SystemExit("--pods must be at least 2")
    try:
        rates = [float(r) for r in a.rates.split(":") if r]
    except ValueError:
        rates = []
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"--rates: {a.rates!r} needs positive rates separated by ':', e.g. 2:4:6")
    layouts = [parse_layout(t.strip(), a.pods) for t in a.layouts.split(",") if t.strip()]
    for lay in layouts:
        config = a.pd_config if lay.kind == "pd" else a.agg_config
        if not config.exists():
            raise SystemExit(f"--{'pd' if lay.kind == 'pd' else 'agg'}-config: {config} does not exist (layout "
                             f"{lay.name})")
    prompt = int_range(a.prompt_tokens, "prompt-tokens")
    if a.shared_prefix >= prompt[0]:
        raise SystemExit("--shared-prefix must be shorter than the shortest prompt")
    return Settings(layouts, a.pd_config, a.agg_config, a.pods, rates, a.duration, a.warmup, a.drain, prompt,
                    int_range(a.output_tokens, "output-tokens"), a.shared_prefix, a.blocks, a.prefill_tokens_per_s,
                    a.kv_transfer_time_per_token, a.time_scale, a.first_ip, a.seed, a.out)


async def main_async(settings: Settings) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.iterdir():
        if old.is_file():
            old.unlink()
    seconds = settings.warmup + settings.duration
    schedules = {r: poisson_times(r, seconds, settings.seed + i) for i, r in enumerate(settings.rates)}
    n = max(len(t) for t in schedules.values())
    t = time.perf_counter()
    requests = make_workload(n, settings.prompt_tokens, settings.output_tokens, settings.shared_prefix, settings.seed)
    print(f"workload: {n} prompts of {settings.prompt_tokens[0]}-{settings.prompt_tokens[1]} tokens "
          f"(mean {sum(r.prompt_tokens for r in requests) / n:.0f}), outputs {settings.output_tokens[0]}-"
          f"{settings.output_tokens[1]}, built in {time.perf_counter() - t:.1f} s; logs in {LOGS}", flush=True)
    procs = Processes(LOGS)
    results: dict = {"settings": {
        "layouts": [lay.name for lay in settings.layouts], "pd_config": str(settings.pd_config),
        "agg_config": str(settings.agg_config), "pods": settings.pods, "rates": settings.rates,
        "duration_s": settings.duration, "warmup_s": settings.warmup, "drain_s": settings.drain,
        "prompt_tokens": settings.prompt_tokens, "output_tokens": settings.output_tokens,
        "shared_prefix": settings.shared_prefix, "blocks_per_pod": settings.blocks,
        "prefill_tokens_per_s": settings.prefill_tps, "kv_transfer_ms_per_token": settings.kv_ms_per_token,
        "time_scale": settings.time_scale, "seed": settings.seed, "model": MODEL}, "runs": []}
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    try:
        for layout in settings.layouts:
            print(f"{layout.name}: {', '.join(layout.roles(settings.pods))}", flush=True)
            # A session per layout: the pods restart on the same addresses, so no kept-alive connection survives.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
                results["runs"] += await run_layout(layout, settings, procs, requests, schedules, session)
    finally:
        procs.stop_all()
    results["wall_s"] = time.perf_counter() - started
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "pd.json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results)
    (settings.out / "pd.md").write_text(text)
    print()
    print(text)
    print(f"wrote {settings.out / 'pd.json'} and {settings.out / 'pd.md'} in {results['wall_s']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(main_async(parse_args(argv)), "pd")


if __name__ == "__main__":
    sys.exit(main())

