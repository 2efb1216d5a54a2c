"""One record through the core stages: envelope -> access-log parser -> client IP ->
document. Shared by `envoygeo enrich`, the benchmarks and (later) the Kafka worker, so
the order of stages and the failure handling live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.clientip import ClientIpResolver
from pipeline.decode.access_log import AccessLog
from pipeline.decode.envelope import ENVELOPE_AUTO, Envelope, PartialJoiner, decode_envelope
from pipeline.decode.envoy_format import _CANONICAL_ORDER
from pipeline.decode.parser import LineParser
from pipeline.document import build_document, build_failure_document

MAX_LINE_BYTES = 64 * 1024
MAX_FIELD_BYTES = 8 * 1024
# AccessLog's text fields, in constructor order: the order `envoygeo.truncated` lists
# them in (the native core walks its slots in the same order).
_TEXT_FIELDS = tuple(n for n in _CANONICAL_ORDER
                     if AccessLog.__dataclass_fields__[n].type == "str | None")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one record may cost (`limits` in the configuration).

    max_line_bytes: the access-log line (and `event.original`) is cut to this many
        UTF-8 bytes before it is parsed: a runaway line costs a bounded parse and a
        bounded document, and is still indexed (tagged) rather than lost.
    max_field_bytes: each text value parsed from the line (user agent, path, XFF,
        any extra) is cut to this many bytes, so a 30 KB header is an 8 KiB field.
    """

    max_line_bytes: int = MAX_LINE_BYTES
    max_field_bytes: int = MAX_FIELD_BYTES

    def __post_init__(self) -> None:
        if self.max_field_bytes < 1 or self.max_line_bytes < self.max_field_bytes:
            raise ValueError("limits: need 1 <= max_field_bytes <= max_line_bytes")


def cut_utf8(text: str, limit: int) -> str | None:
    """`text` cut to at most `limit` UTF-8 bytes at a character boundary; None if it fits.

    The first test is on characters (at most 4 bytes each), so a short value costs one
    length comparison.
    """
    if len(text) * 4 <= limit:
        return None
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return None
    return data[:limit].decode("utf-8", "ignore")


def cut_fields(log: AccessLog, limit: int) -> list[str]:
    """Cut every text field of `log` (extras included) to `limit` bytes, in place;
    returns the names of the fields that were cut."""
    names: list[str] = []
    for name in _TEXT_FIELDS:
        value = getattr(log, name)
        if value is not None and (cut := cut_utf8(value, limit)) is not None:
            setattr(log, name, cut)
            names.append(name)
    for key, value in log.extra.items():
        if isinstance(value, str) and (cut := cut_utf8(value, limit)) is not None:
            log.extra[key] = cut
            names.append(key)
    return names


class Processed(NamedTuple):
    """A document plus what the later stages (GeoIP, rates) key on."""

    doc: dict[str, Any]
    ip: str | None  # the resolved client address, None when unknown or unparsed
    ts: float | None  # event time, epoch seconds
    error: str | None  # why the record could not be parsed


class RecordProcessor:
    """Stateful only for partial-line joining; counts outcomes for summaries."""

    def __init__(self, parser: LineParser, resolver: ClientIpResolver,
                 limits: Limits | None = None, envelope: str = ENVELOPE_AUTO) -> None:
        self.parser = parser
        self.envelope = envelope  # `parse.envelope`: auto (detected per record) | raw
        self.resolver = resolver
        self.limits = limits or Limits()
        self.joiner = PartialJoiner()
        self.parsed = 0
        self.failed = 0
        self.lines_truncated = 0  # records whose line was cut to max_line_bytes
        self.fields_truncated = 0  # records with at least one field cut to max_field_bytes
        # `event.ingested` of the batch being processed: the `@timestamp` of a record
        # with no other time (set by the Enricher per batch; None: now).
        self.ingested: str | None = None

    def process(self, data: bytes | str) -> dict[str, Any] | None:
        """The document for this record, or None while a partial line is held back."""
        out = self.process_record(data)
        return None if out is None else out.doc

    def process_record(self, data: bytes | str, kafka_ts: float | None = None
                       ) -> Processed | None:
        """As `process`, with the client IP and event time the enrichment stages need.

        `kafka_ts`: the Kafka record's timestamp (epoch seconds), the `@timestamp` of a
        record whose line and envelope carry no time."""
        env = self.joiner.feed(decode_envelope(data, self.envelope))
        if env is None:
            return None
        return self.record(env, kafka_ts)

    def flush(self) -> list[dict[str, Any]]:
        """Documents for partial lines still waiting at end of input."""
        return [r.doc for r in self.flush_records()]

    def flush_records(self) -> list[Processed]:
        return [self.record(env) for env in self.joiner.flush()]

    def document(self, env: Envelope) -> dict[str, Any]:
        return self.record(env).doc

    def record(self, env: Envelope, kafka_ts: float | None = None) -> Processed:
        payload = env.payload
        if env.error is not None or payload is None:
            # `event.original` (the line, else the whole record), bounded like a line.
            original = cut_utf8(payload if payload is not None else env.original,
                                self.limits.max_line_bytes)
            return self._failure(env, env.error or "no access-log payload", kafka_ts,
                                 original)
        line_cut = False
        if (cut := cut_utf8(payload, self.limits.max_line_bytes)) is not None:
            payload = env.payload = cut
            line_cut = True
            self.lines_truncated += 1
        try:
            log = self.parser.parse(payload)
        except Exception as e:  # noqa: BLE001 - a parser bug must not stop the stream
            return self._failure(env, f"parser error: {e!r}", kafka_ts, None, line_cut)
        if type(log) is not AccessLog:
            return self._failure(env, log.reason, kafka_ts, None, line_cut)  # type: ignore[union-attr]
        self.parsed += 1
        limit = self.limits.max_field_bytes
        truncated = cut_fields(log, limit) if len(payload) * 4 > limit else None
        if truncated:
            self.fields_truncated += 1
        cip = self.resolver.resolve(log)
        ts = log.start_time if log.start_time is not None else env.timestamp
        return Processed(build_document(env, log, cip, kafka_ts, self.ingested, truncated,
                                        line_cut, self.resolver.mask), cip.ip, ts, None)

    def _failure(self, env: Envelope, reason: str, kafka_ts: float | None,
                 original: str | None, line_cut: bool = False) -> Processed:
        self.failed += 1
        if original is not None:
            line_cut = True
            self.lines_truncated += 1
        return Processed(build_failure_document(env, reason, kafka_ts, self.ingested, original,
                                                line_cut, self.resolver.mask),
                         None, env.timestamp, reason)
