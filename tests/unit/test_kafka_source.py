"""Commit pacing: the source's interval and the worker's commit step (no broker: only
the decisions are under test; the integration suite commits against a real one)."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

import pytest

from pipeline.config import KafkaSettings
from pipeline.metrics import Metrics
from pipeline.sources import kafka as kafka_mod
from pipeline.sources.kafka import KafkaSource
from pipeline.worker import Batch, Worker


def _source(interval_ms: int, now: list[float], monkeypatch: pytest.MonkeyPatch) -> KafkaSource:
    monkeypatch.setattr(kafka_mod.time, "monotonic", lambda: now[0])
    src = object.__new__(KafkaSource)  # the decision needs no consumer
    src.settings = KafkaSettings(commit_interval_ms=interval_ms)
    src.pending = {}
    src._last_commit_attempt = now[0]
    return src


def test_commits_are_paced_by_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    src = _source(1000, now, monkeypatch)
    assert not src.commit_due()  # nothing pending
    src.mark_done({("t", 0): 10})
    assert not src.commit_due()  # pending, but the last attempt was just now
    now[0] += 0.999
    assert not src.commit_due()
    now[0] += 0.002
    assert src.commit_due()
    src.mark_done({("t", 0): 5})  # an older offset never moves a partition back
    assert src.pending == {("t", 0): 10}


def test_interval_zero_commits_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [5.0]
    src = _source(0, now, monkeypatch)
    src.mark_done({("t", 1): 3})
    assert src.commit_due()


def test_interval_is_validated() -> None:
    with pytest.raises(ValueError, match="commit_interval_ms"):
        KafkaSettings(commit_interval_ms=-1)


class _RecordingSource:
    """What the worker's commit step sees of the source."""

    def __init__(self, due: bool) -> None:
        self.due = due
        self.done: list[dict[tuple[str, int], int]] = []
        self.commits: list[bool] = []  # asynchronous flag of each commit

    def mark_done(self, offsets: dict[tuple[str, int], int]) -> None:
        self.done.append(offsets)

    def commit_due(self) -> bool:
        return self.due

    def commit_pending(self, asynchronous: bool) -> None:
        self.commits.append(asynchronous)


def _worker_with(source: _RecordingSource, batches: int, finished: int) -> Worker:
    worker = object.__new__(Worker)  # only the commit step is exercised
    worker.metrics = Metrics()
    worker.source = source  # type: ignore[assignment]
    worker._fatal = None
    worker.stopping = threading.Event()
    worker._inflight = deque()
    for i in range(batches):
        future: Future[None] = Future()
        if i < finished:
            future.set_result(None)
        worker._inflight.append((future, Batch([], [], [], {("t", 0): 10 * (i + 1)}, 10)))
    return worker


def test_busy_worker_paces_commits_and_caught_up_worker_commits_at_once() -> None:
    busy = _RecordingSource(due=False)
    _worker_with(busy, batches=3, finished=2)._reap()
    assert busy.done == [{("t", 0): 20}] and busy.commits == []  # paced: not yet
    busy.due = True
    _worker_with(busy, batches=3, finished=2)._reap()
    assert busy.commits == [True]

    idle = _RecordingSource(due=False)
    _worker_with(idle, batches=2, finished=2)._reap()  # nothing left in flight
    assert idle.done == [{("t", 0): 20}] and idle.commits == [True]

    draining = _RecordingSource(due=False)
    _worker_with(draining, batches=1, finished=1)._reap(wait=True)  # revoke / shutdown
    assert draining.commits == [False]  # synchronous


class _IdleConsumer:
    """A consumer with nothing to give: counts the waits it was asked for."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def consume(self, num: int, timeout: float) -> list[Any]:
        self.waits.append(timeout)
        return []


def _idle_source() -> tuple[KafkaSource, _IdleConsumer]:
    src = object.__new__(KafkaSource)
    src.consumer = _IdleConsumer()  # type: ignore[assignment]
    src.assigned = {("t", 0)}
    return src, src.consumer  # type: ignore[return-value]


def test_poll_waits_the_whole_bound_in_short_slices() -> None:
    src, consumer = _idle_source()
    assert src.poll_batch(100, 1 << 20, 0.5) == []
    assert len(consumer.waits) == 10 and sum(consumer.waits) == pytest.approx(0.5)


def test_poll_returns_early_when_woken_with_nothing_read() -> None:
    src, consumer = _idle_source()
    calls = []

    def wake() -> bool:
        calls.append(1)
        return len(calls) >= 2  # a bulk finishes during the second slice

    assert src.poll_batch(100, 1 << 20, 0.5, wake=wake) == []
    assert len(consumer.waits) == 2
