"""Offline workloads for the prefix-routing benchmark (`bench/prefix_routing.py`): seeded, deterministic.

Every workload is a fixed sequence of requests (the order they are sent in), each with the prefix group it
belongs to, built from filler text whose token count is exact under the model server's built-in tokenizer
(`epp_model_server.tokenizer.BuiltinTokenizer`): a "word" is three lowercase letters, words are joined by
single spaces, so n words are n tokens. Chat requests gain the chat template's few tokens on top.

  groups   shared-prefix groups, as the issue states them: 64 groups x 16 prompts, each prompt a 2,048-token
           group system prompt followed by a unique 128-token question, 256 output tokens (completions), in
           random order. A group is its system prompt.
  chat     multi-turn chat: 160 sessions of 3-10 turns, 48 open at a time, turns interleaved at random. A
           session starts with an 8-token system prompt shared by all and a first user message of 50-400
           tokens; each turn appends an assistant reply of 50-300 and a user message of 20-150 tokens, and
           the whole history is resent (chat completions, 64 output tokens). A group is a session.
  rag      long-document RAG: 10 documents of 3,000-9,000 tokens, 1,024 questions of 16-128 tokens, each
           about a random document (completions: document, then question; 64 output tokens). A group is
           a document.
  global   one 2,048-token system prompt in front of 1,024 otherwise unique user messages of 512-2,048
           tokens (chat completions, 64 output tokens). Every request is in the one group: the prefix is
           everywhere at once, so this workload tests balance, not affinity.

Arrival times are a seeded Poisson process (`arrivals`). Nothing here touches the network.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp_model_server.chat import render_chat

MODEL = "epp/sim-8b"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload: a completion prompt or chat messages, its group and its output length."""

    path: str
    group: str
    max_tokens: int
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs

    def body(self, model: str = MODEL, *, stream: bool = True) -> dict:
        """The OpenAI request body. The sim engine generates exactly `max_tokens` tokens."""
        body: dict = {"model": model, "max_tokens": self.max_tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        else:
            body["prompt"] = self.prompt
        return body

    def prompt_text(self) -> str:
        """The text the model server tokenizes: the prompt, or the messages under the default chat template."""
        if self.messages is not None:
            return render_chat([{"role": r, "content": c} for r, c in self.messages])
        assert self.prompt is not None
        return self.prompt


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    requests: tuple[BenchRequest, ...]
    params: dict = field(default_factory=dict)

    def head(self, n: int) -> tuple[BenchRequest, ...]:
        """The first n requests: a run sends a prefix of the sequence."""
        if n > len(self.requests):
            raise ValueError(f"workload {self.name} has {len(self.requests)} requests, {n} were asked for")
        return self.requests[:n]


class Words:
    """Filler text from a seeded 4,000-word vocabulary of three-letter words: `text(n)` is n tokens."""

    def __init__(self, rng: random.Random, vocabulary: int = 4000) -> None:
        self.rng = rng
        self.vocab = ["".join(rng.choice(_LETTERS) for _ in range(3)) for _ in range(vocabulary)]

    def text(self, n: int) -> str:
        return " ".join(self.rng.choices(self.vocab, k=n))


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}/{name}")


def groups(seed: int = 1, *, num_groups: int = 64, per_group: int = 16, system_tokens: int = 2048,
           question_tokens: int = 128, output_tokens: int = 256) -> Workload:
    rng = _rng(seed, "groups")
    words = Words(rng)
    systems = [words.text(system_tokens) for _ in range(num_groups)]
    order = [g for g in range(num_groups) for _ in range(per_group)]
    rng.shuffle(order)
    reqs = tuple(BenchRequest(COMPLETIONS, f"g{g}", output_tokens,
                              prompt=systems[g] + "\n" + words.text(question_tokens)) for g in order)
    return Workload("groups", f"shared-prefix groups: {num_groups} groups x {per_group} prompts, "
                    f"{system_tokens}-token system prompt + {question_tokens}-token question, "
                    f"{output_tokens} output tokens", reqs,
                    {"groups": num_groups, "per_group": per_group, "system_tokens": system_tokens,
                     "question_tokens": question_tokens, "output_tokens": output_tokens})


def chat(seed: int = 1, *, sessions: int = 160, open_at_once: int = 48, turns: tuple[int, int] = (3, 10),
         system_tokens: int = 8, first_user: tuple[int, int] = (50, 400), assistant: tuple[int, int] = (50, 300),
         user: tuple[int, int] = (20, 150), output_tokens: int = 64) -> Workload:
    rng = _rng(seed, "chat")
    words = Words(rng)
    system = words.text(system_tokens)

    def new_session(s: int) -> dict:
        return {"id": s, "turns": rng.randint(*turns),
                "messages": [("system", system), ("user", words.text(rng.randint(*first_user)))]}

    active = [new_session(s) for s in range(min(open_at_once, sessions))]
    started = len(active)
    reqs: list[BenchRequest] = []
    while active:
        j = rng.randrange(len(active))
        sess = active[j]
        reqs.append(BenchRequest(CHAT, f"s{sess['id']}", output_tokens, messages=tuple(sess["messages"])))
        sess["turns"] -= 1
        if sess["turns"]:
            sess["messages"].append(("assistant", words.text(rng.randint(*assistant))))
            sess["messages"].append(("user", words.text(rng.randint(*user))))
        elif started < sessions:
            active[j] = new_session(started)
            started += 1
        else:
            active.pop(j)
    return Workload("chat", f"multi-turn chat: {sessions} sessions of {turns[0]}-{turns[1]} turns, "
                    f"{open_at_once} open at a time, history resent each turn, {output_tokens} output tokens",
                    tuple(reqs), {"sessions": sessions, "open_at_once": open_at_once, "turns": list(turns),
                                  "output_tokens": output_tokens})


def rag(seed: int = 1, *, documents: int = 10, document_tokens: tuple[int, int] = (3000, 9000),
        questions: int = 1024, question_tokens: tuple[int, int] = (16, 128), output_tokens: int = 64) -> Workload:
    rng = _rng(seed, "rag")
    words = Words(rng)
    docs = [words.text(rng.randint(*document_tokens)) for _ in range(documents)]
    reqs = []
    for _ in range(questions):
        d = rng.randrange(documents)
        reqs.append(BenchRequest(COMPLETIONS, f"d{d}", output_tokens,
                                 prompt=f"Document:\n{docs[d]}\nQuestion: {words.text(rng.randint(*question_tokens))}"))
    return Workload("rag", f"long-document RAG: {documents} documents of {document_tokens[0]}-{document_tokens[1]} "
                    f"tokens, {questions} questions of {question_tokens[0]}-{question_tokens[1]} tokens, "
                    f"{output_tokens} output tokens", tuple(reqs),
                    {"documents": documents, "document_tokens": list(document_tokens), "questions": questions,
                     "question_tokens": list(question_tokens), "output_tokens": output_tokens})


def global_prompt(seed: int = 1, *, system_tokens: int = 2048, requests: int = 1024,
                  user_tokens: tuple[int, int] = (512, 2048), output_tokens: int = 64) -> Workload:
    rng = _rng(seed, "global")
    words = Words(rng)
    system = words.text(system_tokens)
    reqs = tuple(BenchRequest(CHAT, "global", output_tokens,
                              messages=(("system", system), ("user", words.text(rng.randint(*user_tokens)))))
                 for _ in range(requests))
    return Workload("global", f"one global {system_tokens}-token system prompt, {requests} otherwise unique "
                    f"requests of {user_tokens[0]}-{user_tokens[1]} tokens, {output_tokens} output tokens", reqs,
                    {"system_tokens": system_tokens, "requests": requests, "user_tokens": list(user_tokens),
                     "output_tokens": output_tokens})


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "groups": groups,
    "chat": chat,
    "rag": rag,
    "global": global_prompt,
}


def arrivals(n: int, rate: float, seed: int = 1) -> list[float]:
    """Send times (seconds from the start) of n requests in a Poisson process of `rate` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = random.Random(f"{seed}/arrivals/{rate}")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a rate ladder: requests first..first+count-1 are sent between start and end seconds."""

    name: str
    rate: float
    start: float
    end: float
    first: int
    count: int


def ladder(steps: Sequence[tuple[str, float, float]], seed: int = 1) -> tuple[list[float], list[Stage]]:
    """Send times of a Poisson rate ladder, back to back: each step (name, rate per second, seconds) draws
    its own seeded Poisson arrivals within its window. Returns every send time and the stages."""
    times: list[float] = []
    stages = []
    t0 = 0.0
    for i, (name, rate, seconds) in enumerate(steps):
        if rate <= 0 or seconds <= 0:
            raise ValueError(f"stage {name!r}: rate and duration must be positive, got {rate} and {seconds}")
        rng = random.Random(f"{seed}/ladder/{i}/{rate}")
        first = len(times)
        t = rng.expovariate(rate)
        while t < seconds:
            times.append(t0 + t)
            t += rng.expovariate(rate)
        stages.append(Stage(name, rate, t0, t0 + seconds, first, len(times) - first))
        t0 += seconds
    return times, stages


def prompt_texts(requests: Sequence[BenchRequest]) -> list[str]:
    return [r.prompt_text() for r in requests]
