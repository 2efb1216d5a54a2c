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
from pipeline.sources.kafka import KafkaSource, SecurityRefusals
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
    src.fatal = None
    src._waiting_for = None
    src._refused = SecurityRefusals(KafkaSettings())
    src._reopen_reason = None
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


# -- commits within the current generation --


class _CommitConsumer:
    """Records what would be sent to the coordinator."""

    def __init__(self) -> None:
        self.commits: list[list[Any]] = []

    def store_offsets(self, offsets: list[Any]) -> None:
        pass

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits.append(offsets)


def _committing_source() -> KafkaSource:
    src = object.__new__(KafkaSource)
    src.settings = KafkaSettings(group_id="g")
    src.consumer = _CommitConsumer()  # type: ignore[assignment]
    src.pending = {}
    src.assigned = {("t", 0), ("t", 1)}
    src.fatal = None
    src._last_commit_attempt = 0.0
    src._generation_gone = False
    src._refused_commits = 0
    src._refused_at = 0.0
    src._closing = False
    src._waiting_for = None
    src._waiting_long = False
    src._on_revoke = lambda parts: None
    src._refused = SecurityRefusals(src.settings)
    return src


def test_a_rebalance_refusing_commits_is_said_once_and_nothing_is_resent_meanwhile(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from confluent_kafka import KafkaError, TopicPartition

    now = [100.0]
    monkeypatch.setattr(kafka_mod.time, "monotonic", lambda: now[0])
    src = _committing_source()
    src.mark_done({("t", 0): 10, ("t", 1): 7})
    caplog.set_level("INFO", logger="pipeline.sources.kafka")
    for _ in range(37):  # the burst seen during a rebalance: 37 refusals in 1 ms
        src._committed(KafkaError(KafkaError.ILLEGAL_GENERATION),
                       [TopicPartition("t", 0, 10)])
    assert [r.message for r in caplog.records] == [
        "group g is rebalancing (ILLEGAL_GENERATION): offsets of 1 partition(s) kept and "
        "committed after the rebalance, by their owner; further refusals until then are "
        "not logged"]
    assert src.pending == {("t", 0): 10, ("t", 1): 7}  # kept, not forgotten
    src.commit_pending(asynchronous=True)
    assert src.consumer.commits == []  # not within the new generation yet: nothing sent
    src.commit_pending(asynchronous=False)  # the revoke callback's commit goes out
    assert len(src.consumer.commits) == 1
    # A rebalance callback: the new generation is in place, async commits resume.
    src._revoke(None, [])  # type: ignore[arg-type]
    assert caplog.records[-2].message == "rebalance done: 37 commit(s) had been refused meanwhile"
    src.commit_pending(asynchronous=True)
    assert len(src.consumer.commits) == 2


def test_revoked_partitions_pending_offsets_are_dropped() -> None:
    from confluent_kafka import TopicPartition

    src = _committing_source()
    src.mark_done({("t", 0): 10, ("t", 1): 7})
    src._revoke(None, [TopicPartition("t", 1)])  # type: ignore[arg-type]
    assert src.pending == {("t", 0): 10} and src.assigned == {("t", 0)}
    src.commit_pending(asynchronous=True)
    assert [(tp.partition, tp.offset) for tp in src.consumer.commits[0]] == [(0, 10)]


def test_waiting_for_partitions_is_logged_once_per_state(
        caplog: pytest.LogCaptureFixture) -> None:
    src = _committing_source()
    src.instance_id = "pod-7"
    caplog.set_level("INFO", logger="pipeline.sources.kafka")
    for _ in range(50):  # e.g. every poll while the group forms
        src._wait("joining group " + src.describe_membership())
    src._wait("rebalancing group g")
    lines = [r.message for r in caplog.records]
    assert lines == ["waiting for partitions: joining group g (static member id pod-7, "
                     "classic protocol)", "waiting for partitions: rebalancing group g"]


# -- consumer configuration per protocol and membership --


def test_classic_static_member_config() -> None:
    conf = kafka_mod.consumer_config(KafkaSettings(group_id="g"), "pod-1")
    assert conf["group.instance.id"] == "pod-1"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["session.timeout.ms"] == KafkaSettings().session_timeout_ms
    assert "group.protocol" not in conf


def test_consumer_protocol_leaves_broker_owned_settings_out() -> None:
    conf = kafka_mod.consumer_config(KafkaSettings(group_protocol="consumer"), None)
    assert conf["group.protocol"] == "consumer" and "group.instance.id" not in conf
    assert not set(kafka_mod.CLASSIC_ONLY) & conf.keys()
    with pytest.raises(kafka_mod.KafkaConfigError,
                       match=r"kafka.librdkafka: session.timeout.ms cannot be set with "
                             r"kafka.group_protocol: consumer"):
        kafka_mod.consumer_config(KafkaSettings(
            group_protocol="consumer", librdkafka={"session.timeout.ms": 6000}), None)


def test_librdkafka_accepts_each_protocols_config() -> None:
    """librdkafka itself takes both configurations (no broker needed to construct)."""
    from confluent_kafka import Consumer

    for protocol in ("classic", "consumer"):
        conf = kafka_mod.consumer_config(KafkaSettings(group_protocol=protocol), "pod-1")
        Consumer(conf).close()


def test_fenced_member_message_names_the_key() -> None:
    from confluent_kafka import KafkaError

    err = KafkaError(KafkaError.FENCED_INSTANCE_ID, "Fatal consumer error: fenced", fatal=True)
    msg = kafka_mod._fatal_message(err, KafkaSettings(group_id="g"), "host-a")
    assert msg.startswith("fenced: another worker joined group g with the same static "
                          "member id 'host-a'")
    assert "kafka.group_instance_id" in msg


# -- the default static member id --


def test_default_instance_id_is_the_host_then_a_free_slot(tmp_path: Any) -> None:
    from pipeline.sources.instance_id import default_instance_id

    first = default_instance_id("g", host="pod", lock_dir=tmp_path)
    second = default_instance_id("g", host="pod", lock_dir=tmp_path)
    other_group = default_instance_id("h", host="pod", lock_dir=tmp_path)
    assert (first.instance_id, second.instance_id, other_group.instance_id) == (
        "pod", "pod-1", "pod")
    first.release()  # the process died (the kernel drops its lock): a restart gets it back
    again = default_instance_id("g", host="pod", lock_dir=tmp_path)
    assert again.instance_id == "pod"
    for slot in (second, other_group, again):
        slot.release()


def test_async_commits_are_retried_if_no_rebalance_callback_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from confluent_kafka import KafkaError

    now = [100.0]
    monkeypatch.setattr(kafka_mod.time, "monotonic", lambda: now[0])
    src = _committing_source()
    src.mark_done({("t", 0): 10})
    src._committed(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), [])
    now[0] += kafka_mod.REBALANCE_HOLD_S - 0.1
    src.commit_pending(asynchronous=True)
    assert src.consumer.commits == []
    now[0] += 0.2  # this member's assignment did not change: no callback ever comes
    src.commit_pending(asynchronous=True)
    assert len(src.consumer.commits) == 1


def test_a_long_wait_gets_one_more_line_with_the_likely_reason(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(kafka_mod.time, "monotonic", lambda: now[0])
    src = _committing_source()
    src.instance_id = None
    caplog.set_level("INFO", logger="pipeline.sources.kafka")
    src._wait("joining group g (dynamic member, classic protocol)")
    for _ in range(100):  # every poll for 30 s
        now[0] += 0.3
        src._still_waiting()
    long = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert long == [
        "still waiting for partitions after 15s: joining group g (dynamic member, classic "
        "protocol); a member that died without leaving holds its partitions until its "
        "session expires (kafka.session_timeout_ms, 10000 ms); with "
        "kafka.static_membership a restarted worker takes them back at once"]


class _FakeConsumer:
    """Stands in for confluent_kafka.Consumer: records its life, returns nothing."""

    made: list[_FakeConsumer] = []

    def __init__(self, conf: dict[str, Any], logger: Any = None) -> None:
        self.conf, self.closed, self.topics = conf, False, None
        _FakeConsumer.made.append(self)

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.topics = topics

    def consume(self, n: int, timeout: float) -> list[Any]:
        return []

    def close(self) -> None:
        self.closed = True


def _fenced() -> Any:
    from confluent_kafka import KafkaError

    return KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by "
                      "other consumer with same group.instance.id", fatal=True)


def test_a_static_member_fenced_by_itself_after_an_outage_reopens(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """After a broker restart a static member's session expires, it rejoins under a new
    member id, and a late commit of the old one is answered FENCED_INSTANCE_ID, which
    librdkafka makes fatal (seen in 1 of 4 real broker restarts): the source reopens its
    consumer with the same id instead of ending the worker. Without an outage just
    before, or after SELF_FENCE_REOPENS reopens, fenced is a real duplicate: fatal."""
    from confluent_kafka import TopicPartition

    now = [1000.0]
    monkeypatch.setattr(kafka_mod.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kafka_mod, "Consumer", _FakeConsumer)
    _FakeConsumer.made = []
    src = KafkaSource(KafkaSettings(group_instance_id="w1", topics=["t"]), on_revoke=list)
    first = _FakeConsumer.made[-1]
    src.assigned = {("t", 0)}

    src._lost(first, [TopicPartition("t", 0)])  # the session expired: Kafka was away
    now[0] += 5
    src._error(_fenced())
    assert src.fatal is None
    assert src.poll_batch(10, 1 << 20, 0.01) == []
    assert first.closed and len(_FakeConsumer.made) == 2
    second = _FakeConsumer.made[-1]
    assert second.topics == ["t"] and second.conf["group.instance.id"] == "w1"
    said = [r.getMessage() for r in caplog.records if "reopening the consumer" in r.getMessage()]
    assert len(said) == 1 and "'w1'" in said[0]

    # Long after the outage, a fence is another worker with the same id: fatal, one line.
    now[0] += kafka_mod.SELF_FENCE_AFTER_DISRUPTION_S + 1
    src._error(_fenced())
    with pytest.raises(kafka_mod.KafkaFatalError, match="fenced: another worker"):
        src.poll_batch(10, 1 << 20, 0.01)


def test_self_fence_reopens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(kafka_mod.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kafka_mod, "Consumer", _FakeConsumer)
    _FakeConsumer.made = []
    src = KafkaSource(KafkaSettings(group_instance_id="w1", topics=["t"]), on_revoke=list)
    for _ in range(kafka_mod.SELF_FENCE_REOPENS):
        src._disrupted_at = now[0]
        now[0] += 1
        src._error(_fenced())
        src.poll_batch(10, 1 << 20, 0.01)
    assert len(_FakeConsumer.made) == 1 + kafka_mod.SELF_FENCE_REOPENS
    src._disrupted_at = now[0]
    src._error(_fenced())
    with pytest.raises(kafka_mod.KafkaFatalError):
        src.poll_batch(10, 1 << 20, 0.01)
