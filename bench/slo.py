"""SLO benchmark: attainment of the `slo` profile against the `default` profile, light load to past saturation.

    python -m bench.slo [--policies default,slo] [--rates 8:24:40:60] [--stage 20] [--warmup 10]
                        [--ttft-ms 1000] [--tpot-ms 100] [--pods 4] [--blocks 3000]
                        [--prefill-tokens-per-s 4000] [--quick] [--out bench/results/slo]

The stack is the prefix-routing benchmark's (bench/prefix_routing.py): N `epp-model-server --engine sim` pods
on 127.0.0.K:8000 with a finite KV cache, real Envoy (ext_proc FULL_DUPLEX_STREAMED both ways) and a fresh
`epp` per policy:

  default       epp/profiles/default.yaml (approximate prefix 3, queue 2, KV 2)
  slo           epp/profiles/slo.yaml, with two parameters of its predictor set for the benchmark:
                exposeHeaders (each response carries the chosen pod's predicted TTFT/TPOT, so the
                predictor's error is measured per request) and priorPrefillTokensPerS = the pods' prefill
                throughput (what the profile's comments tell a deployment to set)
  latency-only  the slo profile's headroom filter and latency scorer alone, no prefix or load scorer: the
                ranking the issue warns collapses under overload (for comparison; not run by default)

Workload: multi-turn chat (bench/workloads.py `chat`, sessions scaled to the schedule), every request
streamed with `stream_options.include_usage` and carrying the objectives `x-llm-d-slo-ttft-ms` and
`x-llm-d-slo-tpot-ms`. All requests are standard priority (nothing is shed), and every policy gets the same
seeded Poisson schedule: a warm-up stage at the middle rate (not reported), then each rate of the ladder;
so the policies are compared at equal offered load, and the achieved throughput of each is reported to
show it is equal.

Per stage and policy:
  attainment   share of the stage's requests whose client-side TTFT (send → first body byte) is within the
               TTFT objective, whose TPOT ((last byte − first byte) / (completion tokens − 1)) is within the
               TPOT objective, and both; a failed or unfinished request misses both
  TTFT, TPOT   p50 and p90 (ms)
  hit rate     cached / prompt tokens from the responses' usage, and from the pods' counters
  throughput   completed requests per second
  predictor    (slo only) median and p90 of |predicted − actual| / actual for TTFT and TPOT, predicted from
               the response headers, actual as measured by the client (so it includes Envoy's and the EPP's
               own few milliseconds)
The EPP's own SLO counters (/metrics) are kept in the JSON too.

Outputs (--out, default bench/results/slo/): results.json and results.md; the markdown is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.prefix_routing import POD_PORT, Front, Pods, Policy, _usage, percentile, start_front, wait_quiet
from bench.runner import run as run_benchmark
from bench.workloads import MODEL, BenchRequest, Stage, chat, ladder
from hack.localstack import Processes

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "slo"
LOGS = HERE / "out" / "slo-logs"
PROFILES = ROOT / "epp" / "profiles"

TTFT_HEADER = "x-llm-d-slo-ttft-ms"
TPOT_HEADER = "x-llm-d-slo-tpot-ms"
PREDICTED_TTFT = "x-epp-predicted-ttft-ms"
PREDICTED_TPOT = "x-epp-predicted-tpot-ms"
POLICY_NAMES = ("default", "slo", "latency-only")


# ------------------------------------------------------------------------------------------------ configs


def slo_config(prefill_tps: float) -> str:
    """epp/profiles/slo.yaml with the predictor's exposeHeaders on and its prefill prior set."""
    doc = yaml.safe_load((PROFILES / "slo.yaml").read_text())
    for plugin in doc["plugins"]:
        if plugin["type"] == "predicted-latency-producer":
            plugin["parameters"] = {**(plugin.get("parameters") or {}), "exposeHeaders": True,
                                    "priorPrefillTokensPerS": prefill_tps}
    return yaml.safe_dump(doc, sort_keys=False)


def latency_only_config(prefill_tps: float) -> str:
    """The headroom filter and the latency scorer alone (no prefix affinity, no load scorer)."""
    return yaml.safe_dump({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1", "kind": "EndpointPickerConfig",
        "plugins": [{"type": "predicted-latency-producer",
                     "parameters": {"exposeHeaders": True, "priorPrefillTokensPerS": prefill_tps}},
                    {"type": "approx-prefix-cache-producer"}, {"type": "slo-headroom-filter"},
                    {"type": "latency-scorer"}, {"type": "max-score-picker"}],
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": "slo-headroom-filter"}, {"pluginRef": "latency-scorer"}, {"pluginRef": "max-score-picker"}]}],
    }, sort_keys=False)


def policies(out: Path, prefill_tps: float) -> dict[str, Policy]:
    out.mkdir(parents=True, exist_ok=True)
    slo = out / "slo-bench.yaml"
    slo.write_text(slo_config(prefill_tps))
    latency = out / "latency-only-bench.yaml"
    latency.write_text(latency_only_config(prefill_tps))
    return {
        "default": Policy("default", "epp", PROFILES / "default.yaml", "epp default profile"),
        "slo": Policy("slo", "epp", slo, "epp slo profile (predictor headers exposed)"),
        "latency-only": Policy("latency-only", "epp", latency, "headroom filter + latency scorer only"),
    }


# ------------------------------------------------------------------------------------------------ replay


@dataclass(slots=True)
class Record:
    sent_at: float  # scheduled send time, seconds from the start
    ttft: float | None = None  # seconds
    tpot: float | None = None  # seconds
    end: float | None = None
    status: int = 0
    pod: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    error: str = ""


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def replay(front: Front, pods: Pods, requests: Sequence[BenchRequest], times: Sequence[float],
                 stages: Sequence[Stage], drain: float, objectives: dict[str, str],
                 session: aiohttp.ClientSession) -> tuple[list[Record], list[dict]]:
    """Sends every request at its scheduled time (open loop), streaming the responses; the pods' counters are
    scraped at every stage boundary. Requests still running `drain` seconds after the last send are
    cancelled and marked unfinished."""
    bodies = [(r.path, orjson.dumps(r.body(MODEL))) for r in requests]
    records = [Record(t) for t in times]
    headers = {"content-type": "application/json", **objectives}
    loop = asyncio.get_running_loop()
    counters = [await pods.scrape(session)]
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
                rec.predicted_ttft_ms = _float(r.headers.get(PREDICTED_TTFT))
                rec.predicted_tpot_ms = _float(r.headers.get(PREDICTED_TPOT))
                tail = b""
                first = None
                async for chunk in r.content.iter_any():
                    if first is None:
                        first = loop.time()
                        rec.ttft = first - t0
                    tail = (tail + chunk)[-2048:]
                last = loop.time()
                rec.end = last - start
                if r.status != 200:
                    rec.error = f"HTTP {r.status}: " + tail.decode(errors="replace")[-300:]
                    rec.ttft = None
                    return
                usage = _usage(tail)
                rec.prompt_tokens = usage.get("prompt_tokens", 0)
                rec.completion_tokens = usage.get("completion_tokens", 0)
                rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                if first is not None and rec.completion_tokens >= 2:
                    rec.tpot = (last - first) / (rec.completion_tokens - 1)
        except (TimeoutError, aiohttp.ClientError) as exc:
            rec.error = repr(exc)[:300]

    async def boundaries() -> None:
        for st in stages[:-1]:
            delay = start + st.end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            counters.append(await pods.scrape(session))

    marks = asyncio.create_task(boundaries())
    tasks = [asyncio.create_task(one(i)) for i in range(len(records))]
    cutoff = start + (stages[-1].end if stages else 0.0) + drain
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, cutoff - loop.time()))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await marks
    for rec in records:
        if rec.end is None and not rec.error:
            rec.error = "unfinished"
    await pods.wait_idle(session)
    counters.append(await pods.scrape(session))
    return records, counters


# ------------------------------------------------------------------------------------------------ figures


def relative_errors(pairs: Sequence[tuple[float | None, float | None]]) -> list[float]:
    """|predicted − actual| / actual over the pairs where both are known and actual > 0."""
    return [abs(p - a) / a for p, a in pairs if p is not None and a is not None and a > 0]


def summarize_stage(records: Sequence[Record], stage: Stage, before: dict, after: dict, ttft_ms: float,
                    tpot_ms: float) -> dict:
    recs = records[stage.first:stage.first + stage.count]
    n = len(recs)
    ok = [r for r in recs if r.status == 200 and r.end is not None and not r.error]
    ttft_met = [r for r in ok if r.ttft is not None and r.ttft * 1e3 <= ttft_ms]
    tpot_met = [r for r in ok if r.tpot is not None and r.tpot * 1e3 <= tpot_ms]
    both = [r for r in ttft_met if r.tpot is not None and r.tpot * 1e3 <= tpot_ms]
    ttfts = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    tpots = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)

    def delta(name: str) -> float:
        return sum(after[ep].get(name, 0.0) - before[ep].get(name, 0.0) for ep in after)

    queries = delta("vllm:prefix_cache_queries_total")
    last = max((r.end for r in ok), default=stage.end)
    span = max(last, stage.end) - stage.start
    ttft_err = relative_errors([(r.predicted_ttft_ms, r.ttft * 1e3 if r.ttft is not None else None) for r in ok])
    tpot_err = relative_errors([(r.predicted_tpot_ms, r.tpot * 1e3 if r.tpot is not None else None) for r in ok])
    share = lambda k: k / n if n else math.nan  # noqa: E731
    return {
        "stage": stage.name, "rate": stage.rate, "requests": n, "completed": len(ok),
        "errors": sum(1 for r in recs if r.error and r.error != "unfinished"),
        "unfinished": sum(1 for r in recs if r.error == "unfinished"),
        "error_sample": next((r.error for r in recs if r.error), ""),
        "attainment_ttft": share(len(ttft_met)), "attainment_tpot": share(len(tpot_met)),
        "attainment_both": share(len(both)),
        "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p90_ms": percentile(ttfts, 0.9),
        "tpot_p50_ms": percentile(tpots, 0.5), "tpot_p90_ms": percentile(tpots, 0.9),
        "hit_rate": cached / prompt if prompt else 0.0,
        "hit_rate_counters": delta("vllm:prefix_cache_hits_total") / queries if queries else 0.0,
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "predictor_samples": len(ttft_err),
        "ttft_error_p50": percentile(ttft_err, 0.5), "ttft_error_p90": percentile(ttft_err, 0.9),
        "tpot_error_p50": percentile(tpot_err, 0.5), "tpot_error_p90": percentile(tpot_err, 0.9),
        "_ttft_errors": ttft_err, "_tpot_errors": tpot_err,
    }


async def epp_slo_metrics(session: aiohttp.ClientSession, front: Front) -> dict[str, float]:
    """The EPP's inference_extension_slo_* samples (totals, the predictor's coefficients and pending prefill at
    the end), by sample name and labels; histogram buckets are left out."""
    if front.router is None or "metrics" not in front.router.ports:
        return {}
    try:
        async with session.get(f"http://127.0.0.1:{front.router.ports['metrics']}/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("inference_extension_slo_"):
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "plugin")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


# ------------------------------------------------------------------------------------------------ the runs


@dataclass
class Settings:
    policies: list[str]
    rates: tuple[float, ...]
    stage_s: float
    warmup_s: float
    drain: float
    pods: int
    first_ip: int
    blocks: int
    prefill_tps: float
    ttft_ms: float
    tpot_ms: float
    seed: int
    out: Path


def plan(settings: Settings) -> tuple[list[float], list[Stage]]:
    steps = [(f"{r:g}/s", r, settings.stage_s) for r in settings.rates]
    if settings.warmup_s > 0:
        steps.insert(0, ("warm-up", settings.rates[len(settings.rates) // 2], settings.warmup_s))
    return ladder(steps, settings.seed)


def workload_for(n: int, seed: int) -> tuple[BenchRequest, ...]:
    """At least n chat requests (sessions of 3–10 turns, 6.5 on average)."""
    sessions = max(48, math.ceil(n / 6.0) + 48)
    while True:
        requests = chat(seed, sessions=sessions).requests
        if len(requests) >= n:
            return requests[:n]
        sessions *= 2


async def run_policy(policy: Policy, settings: Settings, requests: Sequence[BenchRequest], times: list[float],
                     stages: list[Stage], procs: Processes, pods: Pods, session: aiohttp.ClientSession) -> dict:
    t0 = time.perf_counter()
    await pods.wait_idle(session)
    await pods.reset(session)
    front = await start_front(policy, procs, pods, session, f"slo-{policy.name}")
    await wait_quiet(front)
    objectives = {TTFT_HEADER: f"{settings.ttft_ms:g}", TPOT_HEADER: f"{settings.tpot_ms:g}"}
    try:
        records, counters = await replay(front, pods, requests, times, stages, settings.drain, objectives, session)
        epp_metrics = await epp_slo_metrics(session, front)
    finally:
        front.stop()
    figures = [summarize_stage(records, st, counters[i], counters[i + 1], settings.ttft_ms, settings.tpot_ms)
               for i, st in enumerate(stages)]
    reported = [f for f in figures if f["stage"] != "warm-up"]
    ttft_err = [e for f in reported for e in f.pop("_ttft_errors")]
    tpot_err = [e for f in reported for e in f.pop("_tpot_errors")]
    for f in figures:
        f.pop("_ttft_errors", None)
        f.pop("_tpot_errors", None)
    return {
        "policy": policy.name, "summary": policy.summary, "wall_s": time.perf_counter() - t0,
        "stages": figures, "epp_slo_metrics": epp_metrics,
        "predictor_after_warmup": {
            "samples": len(ttft_err),
            "ttft_error_p50": percentile(ttft_err, 0.5), "ttft_error_p90": percentile(ttft_err, 0.9),
            "tpot_error_p50": percentile(tpot_err, 0.5), "tpot_error_p90": percentile(tpot_err, 0.9),
        },
    }


def _pct(v: float) -> str:
    return "-" if v != v else f"{v:.0%}"


def _ms(v: float) -> str:
    return "-" if v != v else f"{v:.0f}"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# SLO attainment: {', '.join(s['policies'])}", "",
             f"{s['pods']} sim pods ({s['blocks']} KV blocks of 16 tokens, prefill {s['prefill_tokens_per_s']:g} "
             f"tokens/s); chat workload; objectives TTFT <= {s['ttft_ms']:g} ms, TPOT <= {s['tpot_ms']:g} ms; "
             f"{s['stage_s']:g} s per rate after a {s['warmup_s']:g} s warm-up (not reported).", "",
             "| rate | policy | done/sent | req/s | TTFT met | TPOT met | both met | TTFT p50/p90 ms | "
             "TPOT p50/p90 ms | hit rate (usage / pods) | TTFT err p50/p90 | TPOT err p50/p90 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_stage: dict[str, list[tuple[str, dict]]] = {}
    for run in results["runs"]:
        for f in run["stages"]:
            if f["stage"] != "warm-up":
                by_stage.setdefault(f["stage"], []).append((run["policy"], f))
    for stage, rows in by_stage.items():
        for policy, f in rows:
            err = (f"{_pct(f['ttft_error_p50'])}/{_pct(f['ttft_error_p90'])}",
                   f"{_pct(f['tpot_error_p50'])}/{_pct(f['tpot_error_p90'])}") if f["predictor_samples"] else ("-", "-")
            lines.append(
                f"| {stage} | {policy} | {f['completed']}/{f['requests']} | {f['throughput_rps']:.1f} | "
                f"{_pct(f['attainment_ttft'])} | {_pct(f['attainment_tpot'])} | {_pct(f['attainment_both'])} | "
                f"{_ms(f['ttft_p50_ms'])}/{_ms(f['ttft_p90_ms'])} | {_ms(f['tpot_p50_ms'])}/{_ms(f['tpot_p90_ms'])} | "
                f"{_pct(f['hit_rate'])} / {_pct(f['hit_rate_counters'])} | {err[0]} | {err[1]} |")
    lines.append("")
    for run in results["runs"]:
        p = run["predictor_after_warmup"]
        if p["samples"]:
            lines.append(f"- {run['policy']}: predictor error after warm-up over {p['samples']} requests: TTFT "
                         f"median {_pct(p['ttft_error_p50'])}, p90 {_pct(p['ttft_error_p90'])}; TPOT median "
                         f"{_pct(p['tpot_error_p50'])}, p90 {_pct(p['tpot_error_p90'])}")
    return "\n".join(lines) + "\n"


async def main_async(settings: Settings) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.iterdir():  # this benchmark's own logs and Envoy configs from the previous run
        if old.is_file():
            old.unlink()
    known = policies(settings.out, settings.prefill_tps)
    procs = Processes(LOGS)
    pods = Pods(procs, settings.pods, settings.blocks, 1.0, settings.prefill_tps)
    pods.hosts = [f"127.0.0.{settings.first_ip + i}" for i in range(settings.pods)]
    pods.endpoints = [f"{h}:{POD_PORT}" for h in pods.hosts]
    busy = pods.busy()
    if busy:
        print(f"slo: {', '.join(busy)} already in use; stop whatever listens there or pass --first-ip",
              file=sys.stderr)
        return 1
    times, stages = plan(settings)
    requests = workload_for(len(times), settings.seed)
    results: dict = {"settings": {**{k: v for k, v in asdict(settings).items() if k != "out"},
                                  "prefill_tokens_per_s": settings.prefill_tps, "model": MODEL,
                                  "stages": [asdict(s) for s in stages]}, "runs": []}
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    try:
        print(f"starting {settings.pods} sim pods on {pods.hosts[0]}..{pods.hosts[-1]}:{POD_PORT}; "
              f"{len(times)} requests per policy; logs in {LOGS}", flush=True)
        pods.start()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            for name in settings.policies:
                run = await run_policy(known[name], settings, requests, times, stages, procs, pods, session)
                results["runs"].append(run)
                print(f"[{time.perf_counter() - t0:5.0f} s] {name}: " + "; ".join(
                    f"{f['stage']} both-met {_pct(f['attainment_both'])} hit {_pct(f['hit_rate'])} "
                    f"{f['completed']}/{f['requests']}" for f in run["stages"]), flush=True)
    finally:
        procs.stop_all()
    results["wall_s"] = time.perf_counter() - t0
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results)
    (settings.out / "results.md").write_text(text)
    print()
    print(text)
    print(f"wrote {settings.out / 'results.json'} and {settings.out / 'results.md'} in {results['wall_s']:.0f} s")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="default,slo", help=f"comma-separated, of {', '.join(POLICY_NAMES)}")
    ap.add_argument("--rates", default="8:24:40:60",
                    help="the rate ladder in requests/s (default 8:24:40:60: on 2 pods, 4:12:20:30 went from light "
                         "load to well past saturation, so twice that for the default 4)")
    ap.add_argument("--stage", type=float, default=20.0, help="seconds of arrivals per rate (default 20)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up at the middle rate (default 10)")
    ap.add_argument("--drain", type=float, default=30.0, help="seconds to wait for responses after the last send")
    ap.add_argument("--ttft-ms", type=float, default=1000.0, help="the TTFT objective sent (default 1000)")
    ap.add_argument("--tpot-ms", type=float, default=100.0, help="the TPOT objective sent (default 100)")
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--first-ip", type=int, default=2, help="pods listen on 127.0.0.<first-ip + i> (default 2)")
    ap.add_argument("--blocks", type=int, default=3000, help="KV blocks of 16 tokens per pod (default 3000)")
    ap.add_argument("--prefill-tokens-per-s", type=float, default=4000.0,
                    help="the sim pods' prefill throughput (default 4000, as bench/prefix_routing.py)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 pods, rates 2:4, 3 s stages")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results/slo)")
    args = ap.parse_args(argv)
    chosen = [p for p in args.policies.split(",") if p]
    for p in chosen:
        if p not in POLICY_NAMES:
            raise SystemExit(f"unknown policy {p!r}; choose from {', '.join(POLICY_NAMES)}")
    try:
        rates = tuple(float(r) for r in args.rates.split(":") if r)
    except ValueError:
        rates = ()
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"--rates: {args.rates!r} needs positive rates separated by ':', e.g. 4:8:16")
    if args.quick:
        args.pods, rates, args.stage, args.warmup, args.drain = 2, (2.0, 4.0), 3.0, 2.0, 10.0
    return Settings(chosen, rates, args.stage, args.warmup, args.drain, args.pods, args.first_ip, args.blocks,
                    args.prefill_tokens_per_s, args.ttft_ms, args.tpot_ms, args.seed, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(main_async(parse_args(argv)), "slo")


if __name__ == "__main__":
    sys.exit(main())
