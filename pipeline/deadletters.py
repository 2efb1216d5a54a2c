"""The dead-letter topic after the fact: what is in it, and putting it back.

The worker dead-letters a record with its original bytes and key and three headers
(`envoygeo.stage`, `envoygeo.error`, `envoygeo.source`, see `worker.dead_letter`). Once
the cause is fixed (a mapping conflict, an enrichment plugin's outage, a log format
now configured), the records belong back in the worker's source topic: `replay` copies
them there, unchanged, with an `envoygeo.replayed_from` header (the record's first
position, `topic/partition/offset`), and the worker indexes them like any other record
(new offsets, so new document ids: nothing of theirs was indexed before, which is why
they were dead-lettered).

Exactly once per record and stage: each stage replays through a consumer group of its
own (`<kafka.group_id>-replay-<stage>`), which commits only after Kafka acknowledged
the copies. A second replay of a stage starts where the last one stopped; one stage's
replay never moves another's position. A replay reads the topic up to where it ended
when the replay started, so records dead-lettered again meanwhile wait for the next one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from pipeline.config import KafkaSettings
from pipeline.kafka_log import kafka_logger
from pipeline.kafka_security import client_config
from pipeline.metrics import DEAD_LETTER_STAGES
from pipeline.sinks.kafka import KafkaTopicSink, OutRecord
from pipeline.sources.kafka import committed

# A stalled read (no record and no progress) is an error after this long.
STALL_S = 30.0
REPLAY_BATCH = 1000


class DeadLetterError(RuntimeError):
    """The topic cannot be read or written; the message says which and why."""


def raw_headers(msg: Message) -> dict[str, bytes]:
    """A consumed record's headers (the worker writes each once, as bytes)."""
    out: dict[str, bytes] = {}
    for k, v in cast(list[tuple[str, bytes | None]], msg.headers() or []):
        out[k] = v or b""
    return out


def headers_of(msg: Message) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in raw_headers(msg).items()}


def replay_group(k: KafkaSettings, stage: str) -> str:
    return f"{k.group_id}-replay-{stage}"


def _consumer(k: KafkaSettings, group: str) -> Consumer:
    conf = client_config(k, **{"group.id": group, "enable.auto.commit": False,
                                "auto.offset.reset": "earliest",
                                "enable.partition.eof": False})
    return Consumer(conf, logger=kafka_logger())


def _ranges(consumer: Consumer, k: KafkaSettings, from_committed: bool,
            ) -> dict[int, tuple[int, int]]:
    """Per partition, [start, end) to read: from the group's committed offset (or
    the oldest retained record) to the end as it is now."""
    topic = k.dead_letter_topic
    try:
        md = consumer.list_topics(topic, timeout=10)
    except KafkaException as exc:
        err = exc.args[0]
        why = err.str() if hasattr(err, "str") else str(err)
        raise DeadLetterError(f"Kafka {k.bootstrap_servers}: {why}") from None
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        why = meta.error.str() if meta is not None and meta.error is not None else "missing"
        raise DeadLetterError(f"dead-letter topic {topic!r}: {why} (kafka.dead_letter_topic)")
    tps = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
    # The group's position per partition; negative: none committed yet.
    done = ({c.partition: c.offset for c in committed(consumer, tps, timeout_s=10)}
            if from_committed else {})
    out: dict[int, tuple[int, int]] = {}
    for tp in tps:
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
        start = max(low, done.get(tp.partition, -1))
        if start < high:
            out[tp.partition] = (start, high)
    return out


def _read(consumer: Consumer, topic: str, ranges: dict[int, tuple[int, int]],
          ) -> Iterator[Message]:
    """Every record of `ranges`, in offset order per partition."""
    if not ranges:
        return
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in ranges.items()])
    left = {p: end for p, (_, end) in ranges.items()}
    last_progress = time.monotonic()
    while left:
        msg = consumer.poll(1.0)
        if msg is None:
            if time.monotonic() - last_progress > STALL_S:
                raise DeadLetterError(
                    f"reading {topic} stalled for {STALL_S:.0f} s before the end of "
                    f"partition(s) {', '.join(map(str, sorted(left)))}")
            continue
        if msg.error() is not None:
            raise DeadLetterError(f"reading {topic}: {msg.error().str()}")  # type: ignore[union-attr]
        p, off = msg.partition(), msg.offset()
        assert p is not None and off is not None
        end = left.get(p)
        if end is None or off >= end:
            continue
        last_progress = time.monotonic()
        yield msg
        if off + 1 >= end:
            del left[p]


@dataclass
class Summary:
    """What `show` found."""

    total: int = 0
    by_stage: Counter[str] = field(default_factory=Counter)
    by_error: Counter[tuple[str, str]] = field(default_factory=Counter)
    samples: list[tuple[str, str, str, bytes]] = field(default_factory=list)


def summarise(k: KafkaSettings, stages: Sequence[str] = (), samples: int = 5) -> Summary:
    """Every record the dead-letter topic retains, counted by stage and error."""
    out = Summary()
    consumer = _consumer(k, f"{k.group_id}-dead-letters-show")  # never commits
    try:
        topic = k.dead_letter_topic
        for msg in _read(consumer, topic, _ranges(consumer, k, from_committed=False)):
            h = headers_of(msg)
            stage = h.get("envoygeo.stage", "?")
            if stages and stage not in stages:
                continue
            error = h.get("envoygeo.error", "")
            out.total += 1
            out.by_stage[stage] += 1
            out.by_error[(stage, error)] += 1
            if len(out.samples) < samples:
                out.samples.append((h.get("envoygeo.source", "?"), stage, error,
                                    msg.value() or b""))
    finally:
        consumer.close()
    return out


@dataclass
class Replayed:
    stage: str
    replayed: int = 0
    skipped: int = 0  # other stages' records passed over on the way


def replay(k: KafkaSettings, stages: Sequence[str], to_topic: str, dry_run: bool = False,
           progress: Callable[[Replayed], None] | None = None) -> list[Replayed]:
    """Copy each stage's dead letters not yet replayed into `to_topic` (see the module
    docstring); with `dry_run`, count them and write and commit nothing."""
    unknown = [s for s in stages if s not in DEAD_LETTER_STAGES]
    if unknown:
        raise DeadLetterError(f"unknown stage {unknown[0]!r} (stages: "
                              f"{', '.join(DEAD_LETTER_STAGES)})")
    sink = None if dry_run else KafkaTopicSink.for_worker(k)
    results = []
    try:
        for stage in stages:
            results.append(_replay_stage(k, stage, to_topic, sink, progress))
    finally:
        if sink is not None:
            sink.close()
    return results


def _replay_stage(k: KafkaSettings, stage: str, to_topic: str, sink: KafkaTopicSink | None,
                  progress: Callable[[Replayed], None] | None) -> Replayed:
    done = Replayed(stage)
    consumer = _consumer(k, replay_group(k, stage))
    topic = k.dead_letter_topic
    pending: list[OutRecord] = []
    positions: dict[int, int] = {}

    def flush() -> None:
        if sink is not None:
            if pending:
                sink.send(to_topic, pending)  # returns once Kafka acknowledged each
            if positions:
                consumer.commit(offsets=[TopicPartition(topic, p, o)
                                         for p, o in positions.items()], asynchronous=False)
        done.replayed += len(pending)
        pending.clear()
        if progress is not None:
            progress(done)

    try:
        for msg in _read(consumer, topic, _ranges(consumer, k, from_committed=True)):
            positions[msg.partition()] = msg.offset() + 1  # type: ignore[index,operator]
            h = raw_headers(msg)
            if h.get("envoygeo.stage") != stage.encode():
                done.skipped += 1
                continue
            source = h.get("envoygeo.source", b"?")
            pending.append(OutRecord(msg.value() or b"", msg.key(),
                                     [("envoygeo.replayed_from", source)]))
            if len(pending) >= REPLAY_BATCH:
                flush()
        flush()
    finally:
        consumer.close()
    return done


def describe(value: bytes, width: int = 160) -> str:
    """A record's value for a terminal: one line, cut."""
    text = value.decode("utf-8", "replace").replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 1] + "…"

