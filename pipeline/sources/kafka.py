"""Kafka source: a consumer-group member with manual offset storage.

Auto-commit and auto offset store are off: the worker stores and commits an offset only
after every record below it is indexed or dead-lettered (DESIGN.md, delivery contract).
Assignment is cooperative-sticky, so a rebalance moves only the partitions that must
move and the others keep flowing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from pipeline.config import KafkaSettings

log = logging.getLogger(__name__)

Partitions = list[TopicPartition]


class KafkaSource:
    def __init__(
        self,
        settings: KafkaSettings,
        on_revoke: Callable[[Partitions], None],
        on_assign: Callable[[Partitions], None] | None = None,
        on_stats: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        conf: dict[str, Any] = {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": settings.auto_offset_reset,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": settings.session_timeout_ms,
            # Members of a classic group learn of a rebalance from a heartbeat reply, and
            # a cooperative rebalance takes two rounds: at librdkafka's default (3 s) a
            # second worker joining left half the partitions unowned for ~3 s (measured
            # in `bench e2e`). One heartbeat a second per member is nothing to a broker.
            "heartbeat.interval.ms": 1000,
            # Fetch sizes follow the batch bound so one fetch fills a batch.
            "fetch.max.bytes": max(settings.batch_max_bytes, 1024 * 1024),
            "max.partition.fetch.bytes": max(settings.batch_max_bytes // 2, 1024 * 1024),
            # Bounds the pre-fetch queue, so memory stays flat while the sink is down.
            "queued.max.messages.kbytes": max(2 * settings.batch_max_bytes // 1024, 4096),
        }
        if settings.statistics_interval_ms and on_stats is not None:
            conf["statistics.interval.ms"] = settings.statistics_interval_ms
            conf["stats_cb"] = lambda raw: on_stats(orjson.loads(raw))
        conf["on_commit"] = self._committed
        conf.update(settings.librdkafka)
        self._on_revoke = on_revoke
        # Done offsets not yet confirmed committed (see commit_pending).
        self.pending: dict[tuple[str, int], int] = {}
        self._last_commit_attempt = 0.0
        self._on_assign = on_assign
        self.assigned: set[tuple[str, int]] = set()
        self.paused = False
        self.consumer = Consumer(conf, logger=log)
        topics = [settings.topic_pattern] if settings.topic_pattern else settings.topics
        self.consumer.subscribe(
            topics, on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost
        )

    # -- rebalance callbacks (run inside poll/consume, on the worker thread) --

    def _assign(self, consumer: Consumer, partitions: Partitions) -> None:
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        log.info("assigned %s", _names(partitions))
        if self.paused and partitions:
            # New partitions must obey the current backpressure state.
            consumer.pause(partitions)
        if self._on_assign:
            self._on_assign(partitions)

    def _revoke(self, consumer: Consumer, partitions: Partitions) -> None:
        log.info("revoking %s: flushing and committing first", _names(partitions))
        self._on_revoke(partitions)
        self._forget(partitions)

    def _lost(self, consumer: Consumer, partitions: Partitions) -> None:
        # Lost (session expired): another member may already own them, so committing
        # would be wrong; the replays this causes overwrite by document id.
        log.warning("lost %s (session expired); not committing them", _names(partitions))
        self._forget(partitions)

    def _forget(self, partitions: Partitions) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.discard(key)
            self.pending.pop(key, None)  # the new owner commits from here on

    # -- fetching --

    def poll_batch(self, max_records: int, max_bytes: int, timeout_s: float,
                   wake: Callable[[], bool] | None = None) -> list[Message]:
        """Up to max_records / max_bytes, waiting at most timeout_s; errors are logged.

        The wait is cut into short slices. While nothing has arrived, `wake()` is asked
        between slices: the worker returns early when a bulk has finished, so its offsets
        are committed within ~50 ms instead of after the whole wait (at the end of a
        backlog that delay was the last commit's latency).
        """
        batch: list[Message] = []
        size = 0
        remaining = max_records
        slices = max(4, math.ceil(timeout_s / 0.05))  # a slow trickle still meets the bound
        for _ in range(slices):
            msgs = self.consumer.consume(remaining, timeout_s / slices)
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err)
                    continue
                batch.append(msg)
                size += len(msg.value() or b"")
            remaining = max_records - len(batch)
            if remaining <= 0 or size >= max_bytes or (msgs and len(msgs) < remaining):
                break
            if not batch and wake is not None and wake():
                break
        if batch and any((m.topic(), m.partition()) not in self.assigned for m in batch):
            # A revoke ran inside consume(): records of partitions we no longer own belong
            # to their new owner, which will read them from the committed offset.
            batch = [m for m in batch if (m.topic(), m.partition()) in self.assigned]
        return batch

    def pause(self) -> None:
        if not self.paused:
            self.consumer.pause(self._assigned_partitions())
            self.paused = True
            log.warning("paused fetching: the sink cannot keep up or is down")

    def resume(self) -> None:
        if self.paused:
            self.consumer.resume(self._assigned_partitions())
            self.paused = False
            log.info("resumed fetching")

    def serve(self, timeout_s: float) -> None:
        """Serve callbacks (rebalances, stats) without taking records while paused."""
        for msg in self.consumer.consume(1, timeout_s):
            # Paused partitions deliver nothing; anything here arrived before the pause
            # and must not be skipped, so seek back to it.
            if msg.error() is None:
                self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    def _assigned_partitions(self) -> Partitions:
        return [TopicPartition(t, p) for t, p in sorted(self.assigned)]

    # -- offsets --

    def mark_done(self, offsets: dict[tuple[str, int], int]) -> None:
        """Record that everything below these offsets is indexed or dead-lettered."""
        pending = self.pending
        for key, off in offsets.items():
            if off > pending.get(key, -1):
                pending[key] = off

    def commit_pending(self, asynchronous: bool) -> None:
        """Store and commit the done offsets not yet known to be committed.

        An offset leaves `pending` only when Kafka confirms it (the commit call for a
        synchronous commit, `_committed` for an asynchronous one), so a commit lost in
        a rebalance or a broker hiccup is sent again on a later call instead of being
        forgotten, even if no new record ever arrives for that partition.
        """
        self._last_commit_attempt = time.monotonic()
        tps = [TopicPartition(t, p, off) for (t, p), off in self.pending.items()
               if (t, p) in self.assigned]
        if not tps:
            return
        try:
            self.consumer.store_offsets(offsets=tps)
            if asynchronous:
                self.consumer.commit(offsets=tps, asynchronous=True)
            else:
                self._confirm(self.consumer.commit(offsets=tps, asynchronous=False) or [])
        except Exception as exc:  # e.g. during a rebalance: retried on a later call
            log.warning("commit of %s failed (will retry): %s", _names(tps), exc)

    def commit_due(self) -> bool:
        """Something is pending and the last attempt is `commit_interval_ms` old.

        The same interval paces new commits and retries of unconfirmed ones: every
        commit is a write to `__consumer_offsets` (measured at ~4 ms of broker CPU for
        six partitions), so committing after each 2000-record batch cost the broker
        ~2 us per record.
        """
        return bool(self.pending) and (
            time.monotonic() - self._last_commit_attempt
            >= self.settings.commit_interval_ms / 1000.0)

    def _committed(self, err: KafkaError | None, partitions: Partitions) -> None:
        # librdkafka's commit callback, served inside poll/consume on this thread.
        if err is not None:
            log.warning("commit failed (will retry): %s", err)
            return
        self._confirm(partitions)

    def _confirm(self, partitions: Partitions) -> None:
        pending = self.pending
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.error is None and key in pending and tp.offset >= pending[key]:
                del pending[key]

    def close(self) -> None:
        self.consumer.close()


class CommittedOffsets:
    """A group's committed offsets on a topic, read as often as needed over one client
    (for tests and benchmarks: building a client per reading is what costs, on both
    sides of the connection, and a benchmark's own load is measured with the rest)."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int = 6) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]

    def total(self, timeout_s: float = 30) -> int:
        """How many records the group has finished (the topic started at offset 0)."""
        tps = self._consumer.committed(self._tps, timeout=timeout_s)
        return sum(tp.offset for tp in tps if tp.offset >= 0)

    def close(self) -> None:
        self._consumer.close()


def committed_total(bootstrap: str, group: str, topic: str, partitions: int = 6,
                    timeout_s: float = 30) -> int:
    """One reading of `CommittedOffsets.total`."""
    offsets = CommittedOffsets(bootstrap, group, topic, partitions)
    try:
        return offsets.total(timeout_s)
    finally:
        offsets.close()


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
