"""librdkafka's own log lines, through the product's Python logging.

Every confluent_kafka client the product creates gets `logger=kafka_logger()`, so
librdkafka's lines come out in the same JSON format as everything else (no raw
`%3|...|FAIL|rdkafka#producer-1|` lines on stderr), with librdkafka's syslog level
mapped by confluent_kafka (3 -> ERROR, 4 -> WARNING, 5/6 -> INFO, 7 -> DEBUG).

Why the repeat filter: with its broker down a consumer retries the connection every
~50 ms and librdkafka logs each failure (~20 lines/s, measured against a closed port).
A line is logged the first time it appears (a state change: a new failure, or the
same one again after a quiet spell, i.e. after the connection had recovered); an
identical line repeating is logged again only after a back-off that doubles from
`first_repeat_s` to `max_repeat_s`, saying how many were suppressed meanwhile.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.kafka_security import classify

# Parts of a librdkafka line that change between otherwise identical repeats.
_VARIABLE = re.compile(r"\s*\((?:after \d+ms[^)]*|\d+ identical error\(s\) suppressed)\)")
_THREAD = re.compile(r"^\[thrd:[^\]]*\]:\s*")


@dataclass(slots=True)
class _Repeat:
    last_seen: float
    last_logged: float
    window: float
    suppressed: int = 0


class LibrdkafkaLogger:
    """The `logger` argument of confluent_kafka clients (anything with `.log()`).

    confluent_kafka calls `log(level, "%s [%s] %s", facility, client_name, text)`,
    from whichever thread serves the client (poll/consume/flush), hence the lock.
    """

    def __init__(self, logger: logging.Logger | None = None, *, first_repeat_s: float = 10.0,
                 max_repeat_s: float = 300.0, quiet_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 reported: frozenset[str] | set[str] = frozenset(),
                 security_reported: bool = False) -> None:
        """`reported`: facilities the client's owner reports itself (e.g. FATAL, which
        the consumer's error callback turns into one line with the remedy); their
        librdkafka lines go to DEBUG instead of saying the same thing twice.
        `security_reported`: the same for refused handshakes and credentials
        (`pipeline.kafka_security.classify`), which the worker reports as one line
        naming the cause before it exits."""
        self._logger = logger or logging.getLogger("envoygeo.kafka.librdkafka")
        self._reported = frozenset(reported)
        self._security_reported = security_reported
        self._first, self._max, self._quiet = first_repeat_s, max_repeat_s, quiet_s
        self._clock = clock
        self._repeats: dict[tuple[str, str], _Repeat] = {}
        self._lock = threading.Lock()

    def log(self, level: int, fmt: str, *args: object) -> None:
        if len(args) != 3 or not self._logger.isEnabledFor(level):
            if self._logger.isEnabledFor(level):
                self._logger.log(level, fmt, *args)
            return
        facility, client, raw = (str(a) for a in args)
        if facility in self._reported or (
                self._security_reported and level >= logging.WARNING
                and classify(None, raw) is not None):
            level = logging.DEBUG
            if not self._logger.isEnabledFor(level):
                return
        text = _THREAD.sub("", raw)
        note = self._note_repeat(client, text) if level >= logging.WARNING else ""
        if note is None:
            return  # an identical line inside its back-off window
        self._logger.log(level, "%s%s", text, note, extra={"fields": {
            "kafka.client": client, "kafka.facility": facility}})

    def _note_repeat(self, client: str, text: str) -> str | None:
        """"" to log as is, a suffix to log a repeat with, None to suppress it."""
        key = (client, _VARIABLE.sub("", text))
        now = self._clock()
        with self._lock:
            rep = self._repeats.get(key)
            if rep is None or now - rep.last_seen >= self._quiet:
                if len(self._repeats) > 1000:  # distinct lines are few; never grow unbounded
                    self._repeats.clear()
                self._repeats[key] = _Repeat(now, now, self._first)
                return ""
            rep.last_seen = now
            if now - rep.last_logged < rep.window:
                rep.suppressed += 1
                return None
            rep.window = min(rep.window * 2, self._max)
            note = (f" (repeated {rep.suppressed} more time(s) in the last "
                    f"{now - rep.last_logged:.0f}s; next report in {rep.window:.0f}s "
                    "at the earliest)")
            rep.last_logged, rep.suppressed = now, 0
            return note


_shared: LibrdkafkaLogger | None = None


def kafka_logger() -> LibrdkafkaLogger:
    """The process-wide adapter (one repeat filter for all clients of the process)."""
    global _shared
    if _shared is None:
        _shared = LibrdkafkaLogger()
    return _shared


_worker_side: LibrdkafkaLogger | None = None


def worker_side_logger() -> LibrdkafkaLogger:
    """The adapter of the worker's producers: its consumer reports refused handshakes
    and credentials (one line, then the worker exits), so theirs go to DEBUG."""
    global _worker_side
    if _worker_side is None:
        _worker_side = LibrdkafkaLogger(security_reported=True)
    return _worker_side
