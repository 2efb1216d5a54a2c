"""librdkafka's log lines through Python logging: format, levels, repeat back-off."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from pipeline.kafka_log import LibrdkafkaLogger

FAIL = ("[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 "
        "failed: Connection refused (after {ms}ms in state CONNECT)")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _adapter(now: list[float]) -> tuple[LibrdkafkaLogger, _Capture]:
    logger = logging.getLogger(f"test.librdkafka.{time.monotonic_ns()}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    cap = _Capture()
    logger.addHandler(cap)
    return LibrdkafkaLogger(logger, first_repeat_s=10, max_repeat_s=40, quiet_s=30,
                            clock=lambda: now[0]), cap


def test_a_repeating_failure_is_logged_once_then_with_a_doubling_back_off() -> None:
    now = [0.0]
    adapter, cap = _adapter(now)
    for i in range(20 * 60):  # 20 lines/s for a minute, as a consumer with no broker logs
        now[0] = i * 0.05
        adapter.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1",
                    FAIL.format(ms=i % 3))
    messages = [r.getMessage() for r in cap.records]
    # At 0 s, then after 10 s, 20 s more (the window doubles), then 40 s (the cap).
    assert len(messages) == 3, messages
    assert messages[0] == FAIL.format(ms=0).split("]: ", 1)[1]  # thread prefix dropped
    assert "(repeated 199 more time(s) in the last 10s" in messages[1]
    assert "(repeated 399 more time(s) in the last 20s" in messages[2]
    assert cap.records[0].levelno == logging.ERROR
    assert cap.records[0].fields == {"kafka.client": "rdkafka#consumer-1",  # type: ignore[attr-defined]
                                     "kafka.facility": "FAIL"}


def test_a_new_failure_or_the_same_after_a_quiet_spell_is_a_state_change() -> None:
    now = [0.0]
    adapter, cap = _adapter(now)
    log = adapter.log
    log(logging.ERROR, "%s [%s] %s", "FAIL", "c-1", FAIL.format(ms=0))
    now[0] = 1
    log(logging.ERROR, "%s [%s] %s", "FAIL", "c-1", "b:9092/1: Disconnected")  # new: logged
    now[0] = 2
    log(logging.ERROR, "%s [%s] %s", "FAIL", "c-2", FAIL.format(ms=0))  # other client: logged
    now[0] = 3
    log(logging.ERROR, "%s [%s] %s", "FAIL", "c-1", FAIL.format(ms=5))  # repeat: suppressed
    now[0] = 40  # 37 s without it: the connection had recovered; failing again is news
    log(logging.ERROR, "%s [%s] %s", "FAIL", "c-1", FAIL.format(ms=0))
    assert len(cap.records) == 4
    log(logging.INFO, "%s [%s] %s", "CONFWARN", "c-1", "note")  # below WARNING: never filtered
    log(logging.INFO, "%s [%s] %s", "CONFWARN", "c-1", "note")
    assert len(cap.records) == 6


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_a_real_consumer_with_no_broker_logs_a_few_lines_not_twenty_a_second() -> None:
    from confluent_kafka import Consumer

    logger = logging.getLogger("test.librdkafka.real")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    cap = _Capture()
    logger.addHandler(cap)
    raw = _Capture()  # the same lines without the filter, to show what it saves
    unfiltered = logging.getLogger("test.librdkafka.raw")
    unfiltered.setLevel(logging.DEBUG)
    unfiltered.propagate = False
    unfiltered.addHandler(raw)
    port = _closed_port()
    consumers = [Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "g"},
                          logger=lg) for lg in (LibrdkafkaLogger(logger), unfiltered)]
    for c in consumers:
        c.subscribe(["t"])
    end = time.monotonic() + 3
    while time.monotonic() < end:
        for c in consumers:
            c.poll(0.1)
    for c in consumers:
        c.close()
    failures = [r for r in cap.records if r.levelno >= logging.WARNING]
    assert len(raw.records) >= 20, "the unfiltered consumer should have flooded"
    assert 1 <= len(failures) <= 3, [r.getMessage() for r in failures]
    assert "Connection refused" in failures[0].getMessage()


@pytest.mark.parametrize("args", [(), ("only", "two")])
def test_other_call_shapes_pass_through(args: tuple[str, ...]) -> None:
    now = [0.0]
    adapter, cap = _adapter(now)
    adapter.log(logging.WARNING, "x" + " %s" * len(args), *args)
    assert len(cap.records) == 1
