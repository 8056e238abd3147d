"""`make demo`: cache-aware routing against random routing, on a local pool of sim model servers.

Starts 4 `epp-model-server --engine sim` pods (127.0.0.2-5:8000, as pods with their own IPs), `epp` with
the default profile, and real Envoy in front (ext_proc, FULL_DUPLEX_STREAMED, ORIGINAL_DST). It replays a
shared-prefix chat workload (32 long system prompts, each followed by a short question, in multi-turn
conversations) for about 30 s at a fixed rate, then restarts the EPP with a random picker, clears the pods'
prefix caches and replays the same workload. Prints requests, errors, time to first token p50/p99 (as the
client sees it), the prefix-cache hit rate read from the pods' `vllm:prefix_cache_*` counters, and each
pod's share of requests; writes a TTFT CDF plot (SVG) and the figures (JSON) to bench/out/. Every process
it starts is stopped at the end, also on Ctrl-C.

    python -m bench.demo [--duration 30] [--rate 12] [--pods 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from hack.localstack import BIN, Processes, wait_port

OUT = Path(__file__).parent / "out"
MODEL = "epp/sim-8b"
RANDOM_PICKER = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
"""
WORDS = ("the of and to in is that for it as with was on be by this are from at or an model cache token prefix "
         "router gateway kernel block request server latency decode prefill batch queue memory").split()


def free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class Workload:
    """Chat conversations over shared system prompts: each request is one turn of a conversation (its
    history grows turn by turn), and conversations are spread over `groups` system prompts of
    `system_tokens` tokens, so that the prompts of a group share a long prefix."""

    def __init__(self, groups: int = 32, system_tokens: int = 2000, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.systems = [" ".join(rng.choice(WORDS) for _ in range(system_tokens)) for _ in range(groups)]
        self.conversations: list[list[dict]] = []

    def next_body(self) -> dict:
        rng = self.rng
        if not self.conversations or rng.random() < 0.35:
            system = rng.randrange(len(self.systems))
            self.conversations.append([{"role": "system", "content": self.systems[system]}])
        conv = rng.choice(self.conversations[-64:])
        conv.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))})
        body = {"model": MODEL, "messages": list(conv), "max_tokens": 16, "stream": True,
                "stream_options": {"include_usage": True}}
        conv.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(16))})
        return body


async def pod_counters(session: aiohttp.ClientSession, pods: list[str]) -> dict[str, float]:
    totals = {"hits": 0.0, "queries": 0.0}
    for pod in pods:
        async with session.get(f"http://{pod}/metrics") as r:
            text = await r.text()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "vllm:prefix_cache_hits_total":
                    totals["hits"] += s.value
                elif s.name == "vllm:prefix_cache_queries_total":
                    totals["queries"] += s.value
    return totals


async def replay(url: str, pods: list[str], rate: float, duration: float, seed: int) -> dict:
    workload = Workload(seed=seed)
    ttfts: list[float] = []
    errors = 0
    share: Counter[str] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        before = await pod_counters(session, pods)

        async def one(body: dict) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    if r.status != 200:
                        errors += 1
                        await r.read()
                        return
                    first = None
                    async for _ in r.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - t0
                    share[r.headers.get("x-inference-pod", "?")] += 1
                    ttfts.append(first if first is not None else time.perf_counter() - t0)
            except (TimeoutError, aiohttp.ClientError):
                errors += 1

        tasks = []
        start = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(workload.next_body())))
        await asyncio.gather(*tasks)
        after = await pod_counters(session, pods)
    queries = after["queries"] - before["queries"]
    ttfts.sort()
    return {"requests": n, "errors": errors, "ttft_ms": [t * 1e3 for t in ttfts],
            "ttft_p50_ms": ttfts[len(ttfts) // 2] * 1e3 if ttfts else float("nan"),
            "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1e3 if ttfts else float("nan"),
            "hit_rate": (after["hits"] - before["hits"]) / queries if queries else 0.0,
            "share": dict(share)}


def svg_cdf(series: dict[str, list[float]], path: Path) -> None:
    """A small TTFT CDF chart, written as SVG by hand (no plotting library needed)."""
    w, h, m = 640, 400, 50
    xmax = max((max(v) for v in series.values() if v), default=1.0) * 1.05
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - 20}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="20" x2="{m}" y2="{h - m}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">time to first token (ms)</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">fraction of requests</text>']
    for i in range(6):
        x = m + (w - m - 20) * i / 5
        parts.append(f'<text x="{x:.0f}" y="{h - m + 16}" text-anchor="middle">{xmax * i / 5:.0f}</text>')
        y = h - m - (h - m - 20) * i / 5
        parts.append(f'<text x="{m - 6}" y="{y + 4:.0f}" text-anchor="end">{i / 5:.1f}</text>')
    for (name, values), color in zip(series.items(), colors, strict=False):
        if not values:
            continue
        pts = " ".join(f"{m + (w - m - 20) * v / xmax:.1f},{h - m - (h - m - 20) * (j + 1) / len(values):.1f}"
                       for j, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        k = list(series).index(name)
        parts.append(f'<text x="{w - 200}" y="{h - m - 20 - 16 * k}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


async def run(args: argparse.Namespace) -> int:
    pods = [f"127.0.0.{2 + i}:8000" for i in range(args.pods)]
    busy = [p for p in pods if not free(p.split(":")[0], 8000)]
    if busy:
        print(f"demo: {', '.join(busy)} already in use; stop whatever listens there and retry", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    logs = OUT / "demo-logs"
    logs.mkdir(exist_ok=True)
    procs = Processes(logs)
    results = {}
    try:
        print(f"starting {args.pods} sim model servers, epp and Envoy (logs in {logs}) ...", flush=True)
        for i, pod in enumerate(pods):
            host = pod.split(":")[0]
            procs.spawn(f"pod-{i}", [str(BIN / "epp-model-server"), "--host", host, "--port", "8000",
                                     "--engine", "sim", "--model", MODEL, "--pod-name", f"pod-{i}",
                                     "--num-gpu-blocks", str(args.gpu_blocks), "--log-level", "warning"])
        for i, pod in enumerate(pods):
            host = pod.split(":")[0]
            wait_port(host, 8000, timeout=60, proc=procs.procs[i].popen, log=procs.procs[i].log)
        for label, extra in (("default profile", []), ("random picker", ["--config-text", RANDOM_PICKER])):
            epp = procs.epp(",".join(pods), *extra, name=f"epp-{label.split()[0]}")
            envoy = procs.envoy(epp.ports["grpc"])
            await asyncio.sleep(0.5)
            print(f"replaying {args.duration:.0f} s of shared-prefix chat at {args.rate:g} req/s with the {label} ...",
                  flush=True)
            results[label] = await replay(f"http://127.0.0.1:{envoy.ports['listen']}/v1/chat/completions", pods,
                                          args.rate, args.duration, seed=11)
            envoy.stop()
            epp.stop()
            async with aiohttp.ClientSession() as s:
                for pod in pods:
                    async with s.post(f"http://{pod}/reset_prefix_cache") as r:
                        if r.status != 200:
                            print(f"demo: could not reset the prefix cache of {pod}: {r.status}", file=sys.stderr)
    finally:
        procs.stop_all()
    print()
    names = list(results)
    rows = [("requests", "{requests}"), ("errors", "{errors}"), ("TTFT p50 (ms)", "{ttft_p50_ms:.0f}"),
            ("TTFT p99 (ms)", "{ttft_p99_ms:.0f}"), ("prefix-cache hit rate", "{hit_rate:.1%}")]
    print(f"{'':24}" + "".join(f"{n:>18}" for n in names))
    for label, fmt in rows:
        print(f"{label:24}" + "".join(f"{fmt.format(**results[n]):>18}" for n in names))
    for i in range(args.pods):
        pod = f"pod-{i}"
        print(f"{'share ' + pod:24}" + "".join(
            f"{results[n]['share'].get(pod, 0) / max(1, sum(results[n]['share'].values())):>18.1%}" for n in names))
    svg = OUT / "demo-ttft.svg"
    svg_cdf({n: results[n]["ttft_ms"] for n in names}, svg)
    (OUT / "demo.json").write_text(json.dumps({n: {k: v for k, v in r.items() if k != "ttft_ms"}
                                               for n, r in results.items()}, indent=2))
    print(f"\nTTFT CDF plot: {svg}\nfigures: {OUT / 'demo.json'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of traffic per run (default 30)")
    ap.add_argument("--rate", type=float, default=12.0, help="requests per second (default 12)")
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--gpu-blocks", type=int, default=1500,
                    help="KV blocks per pod (default 1500 x 16 tokens: a pod holds ~12 of the 32 system prompts)")
    args = ap.parse_args()
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("\ndemo: interrupted; every process it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
