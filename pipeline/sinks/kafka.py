"""Kafka side outputs: the dead-letter topic and the alerts topic.

`send()` returns only when Kafka has acknowledged every record (acks=all, idempotent
producer), because the worker commits source offsets right after: a dead-letter write
that did not land must keep the source records uncommitted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Producer

from pipeline.config import KafkaSettings
from pipeline.kafka_log import LibrdkafkaLogger, kafka_logger, worker_side_logger
from pipeline.kafka_security import client_config
from pipeline.sinks.elasticsearch import SinkStopped

log = logging.getLogger(__name__)


def produce_waiting(producer: Producer, topic: str, value: bytes, key: bytes | None = None,
                    headers: list[tuple[str, bytes]] | None = None,
                    on_delivery: Any = None, wait_s: float = 0.2) -> None:
    """Produce one record, waiting while librdkafka's local queue is full.

    `produce()` raises BufferError instead of blocking; serving delivery reports with
    `poll()` frees room. Every producer in the project goes through here.
    """
    while True:
        try:
            producer.produce(topic, value=value, key=key,
                             headers=headers,  # type: ignore[arg-type]  # list invariance
                             on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(wait_s)


@dataclass(slots=True)
class OutRecord:
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class KafkaTopicSink:
    @classmethod
    def for_worker(cls, k: KafkaSettings) -> KafkaTopicSink:
        """The worker's dead-letter/alerts producer: the consumer's brokers and
        security settings; refused handshakes are the consumer's to report."""
        conf = client_config(k)
        return cls(conf.pop("bootstrap.servers"), extra=conf, logger=worker_side_logger())

    def __init__(
        self, bootstrap: str, extra: Mapping[str, Any] | None = None, retry_backoff_s: float = 1.0,
        logger: LibrdkafkaLogger | None = None,
    ) -> None:
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "compression.type": "lz4",
            # Large originals (1 MB lines) must still fit in a dead-letter record.
            "message.max.bytes": 8 * 1024 * 1024,
            "delivery.timeout.ms": 30000,
        }
        conf.update(extra or {})
        self._producer = Producer(conf, logger=logger or kafka_logger())
        self._retry_backoff_s = retry_backoff_s
        self._lock = threading.Lock()  # send() is called from the bulk threads

    def send(
        self, topic: str, records: Sequence[OutRecord], stop: threading.Event | None = None
    ) -> None:
        """Produce all records and wait for every acknowledgement; retry the failed ones."""
        pending = list(records)
        while pending:
            acked = [False] * len(pending)
            errors: list[str] = []

            def report(
                err: KafkaError | None,
                index: int,
                acked: list[bool] = acked,
                errors: list[str] = errors,
            ) -> None:
                if err is None:
                    acked[index] = True
                else:
                    errors.append(str(err))

            with self._lock:
                for i, rec in enumerate(pending):
                    self._produce(topic, rec, i, report)
                self._producer.flush(60)
            # Unacknowledged (error or still in flight after the timeout) counts as failed:
            # sending again can only duplicate a side-output record, never lose one.
            pending = [rec for rec, ok in zip(pending, acked, strict=True) if not ok]
            if not pending:
                return
            log.warning(
                "kafka %s: %d record(s) not acknowledged (%s); retrying",
                topic,
                len(pending),
                errors[0] if errors else "timeout",
            )
            if stop is not None:
                if stop.wait(self._retry_backoff_s):
                    raise SinkStopped(f"{len(pending)} record(s) not in {topic} at shutdown")
            else:
                time.sleep(self._retry_backoff_s)

    def _produce(self, topic: str, rec: OutRecord, index: int, report: Any) -> None:
        produce_waiting(self._producer, topic, rec.value, rec.key, rec.headers,
                        lambda err, msg, i=index: report(err, i), wait_s=0.5)

    def close(self) -> None:
        self._producer.flush(30)
