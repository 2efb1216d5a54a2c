"""Commit pacing of the Kafka source (no broker: only the decision is under test)."""

from __future__ import annotations

import pytest

from pipeline.config import KafkaSettings
from pipeline.sources import kafka as kafka_mod
from pipeline.sources.kafka import KafkaSource


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
