"""Kafka source: a consumer-group member with manual offset storage.

Auto-commit and auto offset store are off: the worker stores and commits an offset only
after every record below it is indexed or dead-lettered (DESIGN.md, delivery contract).
Assignment is cooperative-sticky, so a rebalance moves only the partitions that must
move and the others keep flowing.
"""

from __future__ import annotations

import logging
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
            # Fetch sizes follow the batch bound so one fetch fills a batch.
            "fetch.max.bytes": max(settings.batch_max_bytes, 1024 * 1024),
            "max.partition.fetch.bytes": max(settings.batch_max_bytes // 2, 1024 * 1024),
            # Bounds the pre-fetch queue, so memory stays flat while the sink is down.
            "queued.max.messages.kbytes": max(2 * settings.batch_max_bytes // 1024, 4096),
        }
        if settings.statistics_interval_ms and on_stats is not None:
            conf["statistics.interval.ms"] = settings.statistics_interval_ms
            conf["stats_cb"] = lambda raw: on_stats(orjson.loads(raw))
        conf.update(settings.librdkafka)
        self._on_revoke = on_revoke
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
        self.assigned.difference_update((tp.topic, tp.partition) for tp in partitions)

    def _lost(self, consumer: Consumer, partitions: Partitions) -> None:
        # Lost (session expired): another member may already own them, so committing
        # would be wrong; the replays this causes overwrite by document id.
        log.warning("lost %s (session expired); not committing them", _names(partitions))
        self.assigned.difference_update((tp.topic, tp.partition) for tp in partitions)

    # -- fetching --

    def poll_batch(self, max_records: int, max_bytes: int, timeout_s: float) -> list[Message]:
        """Up to max_records / max_bytes, waiting at most timeout_s; errors are logged."""
        batch: list[Message] = []
        size = 0
        remaining = max_records
        deadline_parts = 4  # a few consume() calls so a slow trickle still meets the time bound
        for _ in range(deadline_parts):
            msgs = self.consumer.consume(remaining, timeout_s / deadline_parts)
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

    def commit(self, offsets: dict[tuple[str, int], int], asynchronous: bool) -> None:
        """Store and commit the next offset to read for each partition we still own."""
        tps = [
            TopicPartition(t, p, off) for (t, p), off in offsets.items() if (t, p) in self.assigned
        ]
        if not tps:
            return
        self.consumer.store_offsets(offsets=tps)
        try:
            self.consumer.commit(offsets=tps, asynchronous=asynchronous)
        except Exception as exc:  # e.g. during a rebalance: the next commit covers it
            log.warning("commit of %s failed: %s", _names(tps), exc)

    def close(self) -> None:
        self.consumer.close()


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
