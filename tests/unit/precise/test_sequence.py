"""Sequence tracking of one pod's event stream: gaps ask for replays, restarts clear and replay."""

from __future__ import annotations

import asyncio

import pytest

from plugins.prefix.precise.events import Topic
from plugins.prefix.precise.subscriber import PodStream, SubscriberConfig, SubscriberStats

POD = "10.0.0.1:8000"
T = Topic(POD, "m")


class FakeSubscriber:
    """What a PodStream needs from its subscriber; replays answer from `history` (seq -> payload)."""

    def __init__(self, history: dict[int, bytes] | None = None, *, answer: bool = True) -> None:
        self.config = SubscriberConfig(replay_port=5558, replay_cooldown_s=30.0)
        self.stats = SubscriberStats()
        self.history = history if history is not None else {}
        self.answer = answer
        self.applied: list[bytes] = []
        self.log: list[str] = []  # applied payloads, clears and replay requests, in order
        self.release = asyncio.Event()
        self.release.set()
        self.now = 0.0

    def loop_time(self) -> float:
        return self.now

    def apply(self, pod, topic, payload) -> None:
        assert pod == POD
        self.applied.append(payload)
        self.log.append(payload.decode())

    def clear(self, pod) -> None:
        self.log.append("clear")

    async def fetch_replay(self, endpoint, start):
        self.log.append(f"replay from {start}")
        await self.release.wait()
        if not self.answer:
            return None
        return [(Topic(None, None), seq, p) for seq, p in sorted(self.history.items()) if seq >= start]


def b(seq: int) -> bytes:
    return f"b{seq}".encode()


async def settle(stream: PodStream) -> None:
    for _ in range(100):
        if stream.replay_task is None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the replay did not finish")


def live(stream: PodStream, *seqs: int) -> None:
    for seq in seqs:
        stream.on_live(T, seq, b(seq))


async def test_without_replay_batches_apply_in_order_and_gaps_are_counted():
    sub = FakeSubscriber()
    stream = PodStream(sub, POD, replay_endpoint=None)
    live(stream, 5, 6, 9, 10)
    assert sub.log == ["b5", "b6", "b9", "b10"]
    assert sub.stats.gaps[POD] == 1 and sub.stats.missed[POD] == 2


async def test_a_gap_is_filled_by_a_replay_before_later_batches_apply():
    sub = FakeSubscriber({seq: b(seq) for seq in range(0, 12)})
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.last = 4
    live(stream, 5, 8)
    assert stream.replay_task is not None
    live(stream, 9, 10)  # held while the replay runs
    await settle(stream)
    assert sub.log == ["b5", "replay from 6", "b6", "b7", "b8", "b9", "b10", "b11"]
    live(stream, 11, 12)  # 11 came by replay already: it is a duplicate now, and 12 follows
    assert sub.log[-1] == "b12"
    assert sub.stats.gaps[POD] == 1 and sub.stats.missed[POD] == 0 and sub.stats.replays["ok"] == 1


async def test_a_sequence_going_back_is_a_restart_that_clears_and_replays_from_zero():
    sub = FakeSubscriber()
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.last = stream.last_live = 40
    sub.history = {0: b"n0", 1: b"n1"}  # the new process has published 0 and 1
    stream.on_live(T, 1, b"n1")
    await settle(stream)
    assert sub.log == ["clear", "replay from 0", "n0", "n1"]
    assert sub.stats.restarts[POD] == 1 and stream.last == 1


async def test_a_restart_without_replay_still_clears():
    sub = FakeSubscriber()
    stream = PodStream(sub, POD, None)
    live(stream, 7, 8, 0, 1)
    assert sub.log == ["b7", "b8", "clear", "b0", "b1"]
    assert sub.stats.restarts[POD] == 1


async def test_first_contact_replays_the_publishers_history():
    sub = FakeSubscriber({0: b(0), 1: b(1), 2: b(2)})
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.start_replay(0)
    live(stream, 2, 3)  # arrived live while the history was being fetched
    await settle(stream)
    assert sub.log == ["replay from 0", "b0", "b1", "b2", "b3"]


async def test_first_contact_with_a_silent_publisher_expects_seq_zero_next():
    sub = FakeSubscriber({})
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.start_replay(0)
    await settle(stream)
    assert stream.last == -1
    live(stream, 0, 1)
    assert sub.log == ["replay from 0", "b0", "b1"] and sub.stats.gaps[POD] == 0


async def test_batches_gone_from_the_publishers_buffer_are_counted_as_missed():
    sub = FakeSubscriber({seq: b(seq) for seq in range(7, 10)})  # 3..6 fell out of the buffer
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.last = 2
    live(stream, 9)
    await settle(stream)
    assert sub.log == ["replay from 3", "b7", "b8", "b9"]
    assert sub.stats.missed[POD] == 4


async def test_a_failed_replay_applies_what_was_held_and_pauses_replays():
    sub = FakeSubscriber(answer=False)
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.last = 1
    live(stream, 4, 5)
    await settle(stream)
    assert sub.log == ["replay from 2", "b4", "b5"]
    assert sub.stats.replays["failed"] == 1 and sub.stats.missed[POD] == 2
    live(stream, 8)  # within the cooldown: no replay
    assert sub.log[-1] == "b8" and sub.stats.replays["cooldown"] == 1
    sub.now = 31.0
    sub.answer = True
    sub.history = {9: b(9), 10: b(10)}
    live(stream, 11)
    await settle(stream)
    assert sub.log[-3:] == ["b9", "b10", "b11"]


async def test_closing_cancels_a_running_replay_and_drops_held_batches():
    sub = FakeSubscriber({0: b(0)})
    sub.release.clear()  # the replay hangs
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.start_replay(0)
    live(stream, 1)
    task = stream.replay_task
    await asyncio.sleep(0)
    stream.close()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sub.applied == [] and stream.held == []


async def test_held_batches_are_bounded():
    sub = FakeSubscriber({})
    sub.config = SubscriberConfig(replay_port=5558, max_held=3)
    sub.release.clear()
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.start_replay(0)
    live(stream, *range(6))
    assert [seq for _, seq, _ in stream.held] == [3, 4, 5]
    assert sub.stats.missed[POD] == 3
    sub.release.set()
    await settle(stream)


async def test_a_restart_during_a_replay_abandons_it_and_starts_over():
    sub = FakeSubscriber({seq: b(seq) for seq in range(0, 50)})
    sub.release.clear()
    stream = PodStream(sub, POD, "tcp://10.0.0.1:5558")
    stream.last = stream.last_live = 20
    live(stream, 30)  # a gap: replay from 21 (hangs)
    first = stream.replay_task
    await asyncio.sleep(0)
    sub.history = {0: b"n0"}
    stream.on_live(T, 0, b"n0")  # the publisher restarted meanwhile
    await asyncio.sleep(0)
    assert first.cancelled() or first.done()
    sub.release.set()
    await settle(stream)
    assert sub.log == ["replay from 21", "clear", "replay from 0", "n0"]
    assert stream.last == 0 and sub.stats.restarts[POD] == 1
