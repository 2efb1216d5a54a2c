"""`CommittedOffsets` (benchmarks, tests) asks again while a group's coordinator is busy
(seen on a fresh broker: NOT_COORDINATOR for a brand-new group), and still raises what
is not about the coordinator or lasts past its timeout."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.sources.kafka import CommittedOffsets


class FakeConsumer:
    def __init__(self, errors: list[int]) -> None:
        self.errors, self.calls = errors, 0

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return [TopicPartition(tp.topic, tp.partition, 5 * tp.partition - 1) for tp in tps]


def offsets_with(consumer: Any) -> CommittedOffsets:
    offsets = CommittedOffsets.__new__(CommittedOffsets)
    offsets._consumer = consumer  # type: ignore[attr-defined]
    offsets._tps = [TopicPartition("t", p) for p in range(3)]  # type: ignore[attr-defined]
    return offsets


def test_busy_coordinator_is_asked_again() -> None:
    fake = FakeConsumer([KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS])
    assert offsets_with(fake).per_partition(timeout_s=5) == [0, 4, 9]
    assert fake.calls == 3


def test_other_errors_and_a_coordinator_busy_too_long_raise() -> None:
    with pytest.raises(KafkaException):
        offsets_with(FakeConsumer([KafkaError.GROUP_AUTHORIZATION_FAILED])).total(timeout_s=5)
    busy = FakeConsumer([KafkaError.NOT_COORDINATOR] * 1000)
    with pytest.raises(KafkaException):
        offsets_with(busy).total(timeout_s=0.5)
    assert 2 <= busy.calls < 10
