"""The benchmark's offline workloads: deterministic, seeded, and of the shapes the issue states."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from bench.workloads import (
    CHAT,
    COMPLETIONS,
    WORKLOADS,
    Words,
    arrivals,
    chat,
    global_prompt,
    groups,
    ladder,
    rag,
)
from epp_model_server.chat import render_chat
from epp_model_server.tokenizer import BuiltinTokenizer

TOK = BuiltinTokenizer()


def tokens(text: str) -> int:
    return len(TOK.encode(text))


@pytest.fixture(scope="module")
def built() -> dict:
    return {name: make(1) for name, make in WORKLOADS.items()}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_the_same_seed_gives_the_same_requests_and_another_seed_other_ones(name, built):
    assert WORKLOADS[name](1).requests == built[name].requests
    assert WORKLOADS[name](2).requests != built[name].requests


def test_filler_text_of_n_words_is_n_tokens_for_the_model_servers_tokenizer():
    import random

    words = Words(random.Random(3))
    for n in (1, 16, 128, 2048):
        assert tokens(words.text(n)) == n


def test_groups_is_64_groups_of_16_prompts_with_a_2048_token_system_prompt_and_a_128_token_question(built):
    w = built["groups"]
    assert len(w.requests) == 64 * 16
    assert Counter(r.group for r in w.requests) == {f"g{g}": 16 for g in range(64)}
    assert {r.path for r in w.requests} == {COMPLETIONS}
    assert {r.max_tokens for r in w.requests} == {256}
    by_group: dict[str, list[str]] = {}
    for r in w.requests:
        by_group.setdefault(r.group, []).append(r.prompt)
    for prompts in by_group.values():
        systems = {p.split("\n")[0] for p in prompts}
        questions = [p.split("\n")[1] for p in prompts]
        assert len(systems) == 1 and tokens(systems.pop()) == 2048
        assert all(tokens(q) == 128 for q in questions) and len(set(questions)) == 16
    assert len({p.split("\n")[0] for ps in by_group.values() for p in ps}) == 64  # groups share nothing


def test_groups_are_interleaved_not_sent_one_group_after_another(built):
    first_64 = [r.group for r in built["groups"].requests[:64]]
    assert len(set(first_64)) > 30


def test_a_chat_session_resends_its_whole_history_which_grows_every_turn(built):
    w = built["chat"]
    assert {r.path for r in w.requests} == {CHAT}
    sessions: dict[str, list] = {}
    for r in w.requests:
        sessions.setdefault(r.group, []).append(r.messages)
    assert len(sessions) == 160
    assert all(3 <= len(turns) <= 10 for turns in sessions.values())
    for turns in sessions.values():
        for before, after in zip(turns, turns[1:], strict=False):
            assert after[:len(before)] == before  # the previous turn is a prefix of the next
            assert [role for role, _ in after[len(before):]] == ["assistant", "user"]
    systems = {turns[0][0] for turns in sessions.values()}
    assert len(systems) == 1  # one short system prompt shared by every session


def test_chat_keeps_at_most_48_sessions_open_at_a_time(built):
    total = Counter(r.group for r in built["chat"].requests)
    sent: Counter[str] = Counter()
    open_now = []
    for r in built["chat"].requests:
        sent[r.group] += 1
        # sessions that have started and not yet sent their last turn, this one included
        open_now.append(sum(1 for g, n in sent.items() if n < total[g] or g == r.group))
    assert max(open_now) <= 48
    assert statistics.median(open_now) > 40


def test_rag_asks_many_questions_about_a_few_long_documents(built):
    w = built["rag"]
    assert len(w.requests) == 1024
    docs = Counter(r.group for r in w.requests)
    assert len(docs) == 10 and min(docs.values()) > 50
    lengths = {}
    for r in w.requests:
        doc, question = r.prompt.split("\nQuestion: ")
        lengths.setdefault(r.group, set()).add(tokens(doc.removeprefix("Document:\n")))
        assert 16 <= tokens(question) <= 128
    assert all(len(v) == 1 for v in lengths.values())  # the same document text every time
    assert all(3000 <= next(iter(v)) <= 9000 for v in lengths.values())


def test_global_puts_one_2048_token_system_prompt_before_otherwise_unique_requests(built):
    w = built["global"]
    assert len(w.requests) == 1024
    systems = {r.messages[0] for r in w.requests}
    assert len(systems) == 1 and systems.pop()[0] == "system"
    assert tokens(w.requests[0].messages[0][1]) == 2048
    users = [r.messages[1][1] for r in w.requests]
    assert len(set(users)) == len(users)
    assert all(512 <= tokens(u) <= 2048 for u in users)


def test_a_chat_request_is_tokenized_through_the_chat_template_as_the_server_does(built):
    r = built["chat"].requests[0]
    assert r.prompt_text() == render_chat([{"role": a, "content": b} for a, b in r.messages])
    body = r.body("m")
    assert body["messages"][0] == {"role": r.messages[0][0], "content": r.messages[0][1]}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == r.max_tokens and "prompt" not in body


def test_a_completion_request_body_carries_the_prompt_and_the_output_length(built):
    r = built["groups"].requests[0]
    assert r.body("m", stream=False) == {"model": "m", "max_tokens": 256, "stream": False, "prompt": r.prompt}
    assert r.prompt_text() == r.prompt


def test_head_is_a_prefix_of_the_sequence_and_refuses_more_than_there_is(built):
    w = built["rag"]
    assert w.head(10) == w.requests[:10]
    with pytest.raises(ValueError, match="has 1024 requests, 1025 were asked for"):
        w.head(1025)


def test_smaller_workloads_keep_their_shape():
    assert len(groups(num_groups=3, per_group=2).requests) == 6
    assert len(rag(documents=2, questions=5).requests) == 5
    assert len(global_prompt(requests=7).requests) == 7
    assert len({r.group for r in chat(sessions=5, open_at_once=2).requests}) == 5


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    times = arrivals(4000, 20.0, seed=3)
    assert times == arrivals(4000, 20.0, seed=3) and times != arrivals(4000, 20.0, seed=4)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.1)  # exponential: sd = mean


def test_a_ladder_sends_each_stage_at_its_rate_within_its_window_back_to_back():
    times, stages = ladder([("warm-up", 10, 30), ("a", 5, 40), ("b", 20, 30)], seed=2)
    assert [(s.name, s.start, s.end) for s in stages] == [("warm-up", 0, 30), ("a", 30, 70), ("b", 70, 100)]
    assert sum(s.count for s in stages) == len(times) and times == sorted(times)
    for s in stages:
        mine = times[s.first:s.first + s.count]
        assert all(s.start <= t < s.end for t in mine)
        assert len(mine) / (s.end - s.start) == pytest.approx(s.rate, rel=0.25)
    assert ladder([("a", 5, 40)], seed=2) == ladder([("a", 5, 40)], seed=2)


def test_a_ladder_refuses_a_stage_without_rate_or_time():
    with pytest.raises(ValueError, match="stage 'x'"):
        ladder([("x", 0, 5)])
