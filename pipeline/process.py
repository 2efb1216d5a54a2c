"""One record through the core stages: envelope -> access-log parser -> client IP ->
document. Shared by `envoygeo enrich`, the benchmarks and (later) the Kafka worker, so
the order of stages and the failure handling live in one place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pipeline.clientip import ClientIpResolver
from pipeline.decode.access_log import AccessLog
from pipeline.decode.envelope import Envelope, PartialJoiner, decode_envelope
from pipeline.decode.parser import LineParser
from pipeline.document import build_document, build_failure_document


class Processed(NamedTuple):
    """A document plus what the later stages (GeoIP, rates) key on."""

    doc: dict[str, Any]
    ip: str | None  # the resolved client address, None when unknown or unparsed
    ts: float | None  # event time, epoch seconds
    error: str | None  # why the record could not be parsed


class RecordProcessor:
    """Stateful only for partial-line joining; counts outcomes for summaries."""

    def __init__(self, parser: LineParser, resolver: ClientIpResolver) -> None:
        self.parser = parser
        self.resolver = resolver
        self.joiner = PartialJoiner()
        self.parsed = 0
        self.failed = 0

    def process(self, data: bytes | str) -> dict[str, Any] | None:
        """The document for this record, or None while a partial line is held back."""
        out = self.process_record(data)
        return None if out is None else out.doc

    def process_record(self, data: bytes | str) -> Processed | None:
        """As `process`, with the client IP and event time the enrichment stages need."""
        env = self.joiner.feed(decode_envelope(data))
        if env is None:
            return None
        return self.record(env)

    def flush(self) -> list[dict[str, Any]]:
        """Documents for partial lines still waiting at end of input."""
        return [r.doc for r in self.flush_records()]

    def flush_records(self) -> list[Processed]:
        return [self.record(env) for env in self.joiner.flush()]

    def document(self, env: Envelope) -> dict[str, Any]:
        return self.record(env).doc

    def record(self, env: Envelope) -> Processed:
        if env.error is not None or env.payload is None:
            return self._failure(env, env.error or "no access-log payload")
        try:
            log = self.parser.parse(env.payload)
        except Exception as e:  # noqa: BLE001 - a parser bug must not stop the stream
            return self._failure(env, f"parser error: {e!r}")
        if type(log) is not AccessLog:
            return self._failure(env, log.reason)  # type: ignore[union-attr]
        self.parsed += 1
        cip = self.resolver.resolve(log)
        ts = log.start_time if log.start_time is not None else env.timestamp
        return Processed(build_document(env, log, cip), cip.ip, ts, None)

    def _failure(self, env: Envelope, reason: str) -> Processed:
        self.failed += 1
        return Processed(build_failure_document(env, reason), None, env.timestamp, reason)
