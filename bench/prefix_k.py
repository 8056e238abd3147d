"""Choosing k for `prefix-hash-affinity-scorer` (figures, not assertions): offline, no servers.

    python -m bench.prefix_k [--ks 1,2,4,8,16,32,64,128,256,0] [--endpoints 8,16,64] [--per-endpoint 4]
                             [--virtual-nodes 128] [--load-factor 1.25] [--seed 1] [--json PATH]

Synthetic workloads, ~4 characters a token (every "token" is a 3-letter word and a space), hashed exactly as
the plugin hashes them (`user_input_bytes`, blocks of 16 tokens = 64 characters, `prefix_key`):

  groups     64 groups × 16 prompts: a 2,048-token group system prompt + a unique 128-token question
             (completions), in random order; a group = its system prompt
  chat       128 multi-turn chat sessions (chat completions, JSON messages), 3–10 turns each, 32 open at
             a time, turns interleaved at random; an 8-token system prompt shared by all, a first user
             message of 20–300 tokens, then per turn an assistant reply of 50–400 and a user message of
             10–150 tokens; the whole history is resent each turn; a group = a session
  global     one 1,024-token system prompt in front of 1,024 otherwise unique user messages of 32–512
             tokens (chat completions); a group = the system prompt (every request)
  rag        6 documents of 3,000–8,000 tokens, 1,024 questions of 16–128 tokens each about a random one
             (completions: document, then question); a group = a document
  chat+sys   the chat sessions again, behind a 1,024-token system prompt shared by all sessions: the case
             where a short k sees only the shared prompt (not one of the issue's four; it shows the limit)

For each k (0 = every full block: "the longest block boundary"), each pool size and with or without bounded
loads (c = --load-factor), requests are routed in order to the ring owner of their key, or to the first
endpoint under capacity on the key's walk. In-flight counts are simulated crudely: a fixed concurrency
window of per-endpoint × n requests, each request leaving it when the window has moved past it. Columns:

  aff    of the requests whose group was served before, the fraction sent to the endpoint that served the
         group's previous request (for `global`, where every request is in one group and every request
         but the system prompt is unique, low affinity costs nothing: every endpoint caches the prompt)
  skew   max / mean requests per endpoint over the whole run
  hit    fraction of prompt blocks the chosen endpoint already held, with an unbounded cache per endpoint
         (a ceiling: real caches evict, which punishes spreading a prefix over many endpoints more)

Prints one table per workload and writes the figures as JSON (default bench/out/prefix_k.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from epp.request import CHAT_COMPLETIONS, COMPLETIONS, LLMRequest
from plugins.prefix.hash_affinity import prefix_key
from plugins.prefix.hashing import block_hashes, block_size_chars, chain_seed, user_input_bytes
from plugins.prefix.ring import HashRing

OUT = Path(__file__).parent / "out"
MODEL = "m"
BLOCK_TOKENS = 16
BLOCK = block_size_chars(BLOCK_TOKENS)  # 64 characters
ALL = 0  # k = 0: every full block of the prompt


@dataclass(frozen=True, slots=True)
class Item:
    """One request of a workload: its hashed bytes, its prefix group, and its chained block hashes."""

    data: bytes
    group: str
    hashes: tuple[int, ...]


class Words:
    """Deterministic filler text: `n` tokens as n 3-letter words, each followed by a space."""

    def __init__(self, rng: random.Random) -> None:
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.rng = rng
        self.vocab = ["".join(rng.choice(letters) for _ in range(3)) + " " for _ in range(4000)]

    def __call__(self, n: int) -> str:
        return "".join(self.rng.choices(self.vocab, k=n))


def _completion(prompt: str, i: int) -> LLMRequest:
    return LLMRequest(request_id=str(i), api=COMPLETIONS, model=MODEL, target_model=MODEL,
                      body={"prompt": prompt}, headers={}, size_bytes=len(prompt), prompt=prompt)


def _chat(messages: list[dict[str, str]], i: int) -> LLMRequest:
    return LLMRequest(request_id=str(i), api=CHAT_COMPLETIONS, model=MODEL, target_model=MODEL,
                      body={"messages": messages}, headers={}, size_bytes=0, messages=messages)


def groups(rng: random.Random, words: Words) -> list[tuple[LLMRequest, str]]:
    prompts = [words(2048) for _ in range(64)]
    out = [(g, words(128)) for g in range(64) for _ in range(16)]
    rng.shuffle(out)
    return [(_completion(prompts[g] + q, i), f"g{g}") for i, (g, q) in enumerate(out)]


def chat(rng: random.Random, words: Words, system_tokens: int = 8) -> list[tuple[LLMRequest, str]]:
    system = words(system_tokens)
    sessions = 128
    open_at_once = 32

    def new_session(s: int) -> dict:
        return {"id": s, "turns": rng.randint(3, 10),
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": words(rng.randint(20, 300))}]}

    active = [new_session(s) for s in range(open_at_once)]
    started = open_at_once
    out: list[tuple[LLMRequest, str]] = []
    while active:
        j = rng.randrange(len(active))
        sess = active[j]
        out.append((_chat(list(sess["messages"]), len(out)), f"s{sess['id']}"))
        sess["turns"] -= 1
        if sess["turns"]:
            sess["messages"].append({"role": "assistant", "content": words(rng.randint(50, 400))})
            sess["messages"].append({"role": "user", "content": words(rng.randint(10, 150))})
        elif started < sessions:
            active[j] = new_session(started)
            started += 1
        else:
            active.pop(j)
    return out


def global_prompt(rng: random.Random, words: Words) -> list[tuple[LLMRequest, str]]:
    system = words(1024)
    return [(_chat([{"role": "system", "content": system},
                    {"role": "user", "content": words(rng.randint(32, 512))}], i), "global")
            for i in range(1024)]


def rag(rng: random.Random, words: Words) -> list[tuple[LLMRequest, str]]:
    docs = [words(rng.randint(3000, 8000)) for _ in range(6)]
    out = []
    for i in range(1024):
        d = rng.randrange(len(docs))
        out.append((_completion(f"Document:\n{docs[d]}\nQuestion: {words(rng.randint(16, 128))}", i), f"d{d}"))
    return out


WORKLOADS: dict[str, Callable[[random.Random, Words], list[tuple[LLMRequest, str]]]] = {
    "groups": groups,
    "chat": chat,
    "global": global_prompt,
    "rag": rag,
    "chat+sys": lambda rng, words: chat(rng, words, system_tokens=1024),
}


def items_of(requests: list[tuple[LLMRequest, str]]) -> list[Item]:
    seed = chain_seed(MODEL)
    out = []
    for req, group in requests:
        data = user_input_bytes(req)
        out.append(Item(data, group, tuple(block_hashes(data, BLOCK, 0, seed))))
    return out


def keys_of(items: list[Item], k: int) -> list[int]:
    seed = chain_seed(MODEL)
    return [prefix_key(it.data, BLOCK, k if k != ALL else len(it.data) // BLOCK + 1, seed) for it in items]


def simulate(items: list[Item], keys: list[int], ring: HashRing, window: int, load_factor: float | None) -> dict:
    """Route every request; load_factor None = ring owner, ignoring load."""
    loads = dict.fromkeys(ring.names, 0)
    served = dict.fromkeys(ring.names, 0)
    cached: dict[str, set[int]] = {name: set() for name in ring.names}
    in_flight: deque[str] = deque()
    last: dict[str, str] = {}
    same = repeat = 0
    hit_blocks = total_blocks = 0
    for it, key in zip(items, keys, strict=True):
        if len(in_flight) == window:
            loads[in_flight.popleft()] -= 1
        if load_factor is None:
            target = ring.owner(key)
        else:
            target = ring.bounded(key, loads, load_factor)[0]
        loads[target] += 1
        served[target] += 1
        in_flight.append(target)
        prev = last.get(it.group)
        if prev is not None:
            repeat += 1
            same += prev == target
        last[it.group] = target
        # Longest cached prefix: the chain is prefix-closed in every endpoint's set, so bisect on it.
        hashes, held = it.hashes, cached[target]
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi) // 2
            if hashes[mid] in held:
                lo = mid + 1
            else:
                hi = mid
        hit_blocks += lo
        total_blocks += len(hashes)
        held.update(hashes)
    mean = len(items) / len(ring)
    return {
        "affinity": same / repeat if repeat else 1.0,
        "skew": max(served.values()) / mean,
        "hit": hit_blocks / total_blocks if total_blocks else 0.0,
    }


def print_summary(results: list[dict], n: int, ks: list[int], workloads: list[str]) -> None:
    """One line per k for pool size n: affinity and skew with the ring owner only, then cache hits and skew
    with bounded loads."""
    print(f"\nsummary, {n} endpoints: aff skew (ring owner only) hit skew (bounded loads)")
    print(f"{'k':>3} " + "".join(f"| {w:<19}" for w in workloads))
    table = {(r["workload"], r["k"]): r for r in results if r["endpoints"] == n}
    for k in ks:
        line = f"{'all' if k == ALL else k:>3} "
        for w in workloads:
            off, on = table[(w, k)]["off"], table[(w, k)]["bounded"]
            line += f"| {off['affinity']:.2f} {_num(off['skew'])} {on['hit']:.2f} {_num(on['skew'])} "
        print(line.rstrip())


def _num(x: float) -> str:
    """A ratio in 4 characters: 1.25, 16.0."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def endpoint_names(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,2,4,8,16,32,64,128,256,0", help="prefix blocks to try; 0 = all full blocks")
    ap.add_argument("--endpoints", default="8,16,64")
    ap.add_argument("--per-endpoint", type=int, default=16, help="concurrency window per endpoint")
    ap.add_argument("--virtual-nodes", type=int, default=128)
    ap.add_argument("--load-factor", type=float, default=1.25)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--summary", type=int, default=16, help="pool size of the closing one-screen summary")
    ap.add_argument("--json", type=Path, default=OUT / "prefix_k.json")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    sizes = [int(n) for n in args.endpoints.split(",")]
    rings = {n: HashRing(endpoint_names(n), args.virtual_nodes) for n in sizes}
    results: list[dict] = []
    started = time.perf_counter()
    for wname in args.workloads.split(","):
        rng = random.Random(f"{args.seed}/{wname}")
        items = items_of(WORKLOADS[wname](rng, Words(rng)))
        blocks = sum(len(it.hashes) for it in items) / len(items)
        print(f"\n{wname}: {len(items)} requests, {blocks:.0f} blocks of {BLOCK_TOKENS} tokens on average; "
              f"aff/skew without bounds | aff/skew/hit with c={args.load_factor}")
        head = f"{'k':>5} {'tokens':>6}"
        for n in sizes:
            head += f" | {'n=' + str(n):<8} {'off':>9} {'bounded':>15}"
        print(head)
        for k in ks:
            keys = keys_of(items, k)
            line = f"{'all' if k == ALL else k:>5} {'-' if k == ALL else k * BLOCK_TOKENS:>6}"
            for n in sizes:
                off = simulate(items, keys, rings[n], args.per_endpoint * n, None)
                on = simulate(items, keys, rings[n], args.per_endpoint * n, args.load_factor)
                results.append({"workload": wname, "k": k, "endpoints": n, "off": off, "bounded": on})
                line += (f" | {'':<8} {off['affinity']:.2f}/{off['skew']:5.2f}"
                         f" {on['affinity']:.2f}/{on['skew']:4.2f}/{on['hit']:.2f}")
            print(line, flush=True)
    if args.summary in sizes:
        print_summary(results, args.summary, ks, args.workloads.split(","))
    print(f"\n{time.perf_counter() - started:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                    indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
