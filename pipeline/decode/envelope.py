"""Unwrap the transport envelope around an access-log line, detected per record.

A Kafka message value (or a file line) may be: Fluent Bit's kafka output JSON
(`log`/`message`, `kubernetes{...}`, `@timestamp` as an epoch double or `iso8601`/
`iso8601_ns` text), its `format msgpack` (the same record as a msgpack map), Fluentd
out_kafka2 JSON, a Docker json-file line, a CRI line (`<time> stdout F <line>`), or
the bare access-log line (text or Envoy JSON; also what Fluent Bit's `format raw`
sends). Nothing here raises: bad input becomes an `Envelope` with `error` set, so the
caller can still index or dead-letter it with its bytes.

Detection is per record and needs no configuration, with one ambiguity: `format raw`
of a line that is itself a collector record (JSON holding a `log`/`message` string or
a `kubernetes` object) reads as that record. `envelope: raw` (`ENVELOPE_RAW`) turns
detection off: every record is the access-log line itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgpack
import orjson

from pipeline.decode.timeparse import MIN_EPOCH, parse_epoch_or_iso, parse_iso8601

ENVELOPE_AUTO = "auto"
ENVELOPE_RAW = "raw"

# First bytes of a msgpack map (fixmap, map16, map32). 0x80-0x8f cannot start UTF-8
# text (continuation bytes); 0xde/0xdf can (Thaana, NKo), but then the next byte is a
# continuation byte, which as a map16/map32 length would mean 32768+ entries. So a
# record starting with one is Fluent Bit's `format msgpack`; one that fails to read as
# msgpack yet is UTF-8 text starting with 0xde/0xdf is read as text after all.
_MSGPACK_MAP_FIRST = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}

# <RFC3339Nano> <stream> <P|F> <line>  (the line may be empty)
_CRI = re.compile(r"(\d{4}-\d\d-\d\dT\S+) (stdout|stderr) ([FP])(?: (.*))?", re.DOTALL)

# Keys Docker's json-file driver writes; a record with only these is Docker's.
_DOCKER_KEYS = frozenset({"log", "stream", "time", "attrs"})
# Collector keys that are not part of a merged (Merge_Log) access-log object.
_COLLECTOR_KEYS = frozenset({"kubernetes", "@timestamp", "stream", "time", "tag", "_p",
                             "date", "timestamp", "log_processed", "docker", "host"})


@dataclass(slots=True)
class Envelope:
    kind: str  # fluent-bit | fluentd | docker | cri | bare | invalid
    payload: str | None  # the access-log line, None when there is none
    original: str  # the whole record as text, for event.original / dead letters
    stream: str | None = None
    timestamp: float | None = None  # collector's time, epoch seconds
    kubernetes: dict[str, Any] | None = None
    partial: bool = False  # CRI `P` / Docker line without newline: more follows
    tags: list[str] = field(default_factory=list)
    error: str | None = None


def _to_text(data: bytes | str) -> tuple[str, bool]:
    if isinstance(data, str):
        return data, True
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False


def _from_cri(line: str, kind: str, env: Envelope | None) -> Envelope | None:
    m = _CRI.fullmatch(line)
    if m is None:
        return None
    ts, stream, tag, payload = m.groups()
    payload = payload or ""
    if env is None:
        return Envelope(kind, payload, line, stream=stream, timestamp=parse_iso8601(ts),
                        partial=tag == "P")
    env.payload = payload
    env.stream = env.stream or stream
    env.partial = tag == "P"
    if env.timestamp is None:
        env.timestamp = parse_iso8601(ts)
    return env


def decode_envelope(data: bytes | str, mode: str = ENVELOPE_AUTO) -> Envelope:
    """Detect and unwrap one record (`mode` raw: the record is the line). Never raises."""
    try:
        if mode == ENVELOPE_RAW:
            return _raw(data)
        return _decode(data)
    except Exception as e:  # noqa: BLE001 - the contract is "never raises"
        text, _ = _to_text(data) if isinstance(data, bytes | str) else (repr(data), False)
        return Envelope("invalid", None, text, error=f"envelope decoder failed: {e!r}")


def _raw(data: bytes | str) -> Envelope:
    """`envelope: raw`: the record is the access-log line, whatever it looks like."""
    text, valid = _to_text(data)
    line = text.rstrip("\r\n")
    if not line or line.isspace():
        return Envelope("invalid", None, text, tags=_invalid_tags(valid), error="empty record")
    return Envelope("bare", line, line, tags=_invalid_tags(valid))


def _decode(data: bytes | str) -> Envelope:
    if type(data) is bytes and data and data[0] in _MSGPACK_MAP_FIRST:
        packed = _from_msgpack(data)
        if packed.error is None or data[0] < 0xDE or not _to_text(data)[1]:
            return packed
    text, valid = _to_text(data)
    line = text.rstrip("\r\n")
    if not line or line.isspace():
        return Envelope("invalid", None, text, tags=_invalid_tags(valid), error="empty record")
    env: Envelope | None = None
    first = line[0]
    if first == "{":
        env = _from_json(line)
    if env is None and first.isdigit():
        env = _from_cri(line, "cri", None)
    if env is None:
        return Envelope("bare", line, line, tags=_invalid_tags(valid))
    if not valid:
        env.tags.append("envelope_invalid_utf8")
    return env


def _invalid_tags(valid: bool) -> list[str]:
    return [] if valid else ["envelope_invalid_utf8"]


def _msgpack_default(value: Any) -> Any:
    """orjson's fallback for what msgpack holds and JSON has not (bin, ext, timestamps)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix()
    if isinstance(value, msgpack.ExtType):
        return {"ext": value.code, "data": value.data.hex()}
    raise TypeError(type(value).__name__)


def _from_msgpack(data: bytes) -> Envelope:
    """Fluent Bit's kafka `format msgpack`: one map, read as its JSON form would be
    (one extra orjson round trip, Python path only: the compiled core reads msgpack).

    Malformed bytes (truncated, trailing data, a string that is not UTF-8, a map key
    that is not hashable) are an `invalid` envelope with the reason, for the dead
    letter; `original` is then the bytes as hex, since they are not text.
    """
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:  # noqa: BLE001 - any msgpack failure is a malformed record
        return Envelope("invalid", None, data.hex(), tags=["envelope_msgpack_malformed"],
                        error=f"malformed msgpack record: {e}")
    if type(obj) is not dict:
        return Envelope("invalid", None, data.hex(), tags=["envelope_msgpack_malformed"],
                        error="malformed msgpack record: not a map")
    # Read as its JSON form: what msgpack can hold and JSON cannot (bin, ext, Timestamp,
    # NaN, non-str keys) becomes what a document can carry, exactly as a JSON record's.
    original = orjson.dumps(obj, default=_msgpack_default,
                            option=orjson.OPT_NON_STR_KEYS).decode()
    env = _from_record(orjson.loads(original), original)
    if env is None:  # no line in it: the map itself is the access log, as JSON
        return Envelope("bare", original, original)
    return env


def _from_json(line: str) -> Envelope | None:
    """Collector JSON, or None when the object is the access log itself (or not JSON)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    return _from_record(obj, line)


def _from_record(obj: dict[Any, Any], line: str) -> Envelope | None:
    """A collector record (from JSON or msgpack); `line`: its text, for the original."""
    # Hot path (every Kafka record): exact type checks, each key read once.
    payload = obj.get("log")
    if type(payload) is not str:
        payload = obj.get("message")
    kube = obj.get("kubernetes")
    if type(kube) is not dict:
        kube = None
    stamp = obj.get("@timestamp")
    if stamp is None:
        stamp = obj.get("time", obj.get("timestamp"))
    if type(payload) is str:
        if "@timestamp" in obj:
            kind = "fluent-bit"
        elif kube is None and obj.keys() <= _DOCKER_KEYS:
            kind = "docker"
        else:
            kind = "fluentd"
        stream = obj.get("stream")
        if type(stream) is not str:
            stream = None
        # Fluent Bit's epoch float needs no parsing (see parse_epoch_or_iso).
        ts = (stamp if type(stamp) is float and MIN_EPOCH <= stamp <= 1e11
              else parse_epoch_or_iso(stamp))
        env = Envelope(kind, None, line, stream=stream, timestamp=ts, kubernetes=kube)
        inner = payload.rstrip("\r\n")
        # A collector tailing raw container files without a CRI parser forwards the CRI
        # line itself; unwrap it so the access log is reached either way.
        if inner[:1].isdigit() and _from_cri(inner, kind, env) is not None:
            return env
        env.payload = inner
        if kind == "docker" and payload and not payload.endswith("\n"):
            env.partial = True  # json-file splits long lines; only the last has "\n"
        return env
    processed = obj.get("log_processed")
    if kube is not None or isinstance(processed, dict):
        # Fluent Bit's Merge_Log: the access-log JSON was lifted into the record.
        body = processed if isinstance(processed, dict) else {
            k: v for k, v in obj.items() if k not in _COLLECTOR_KEYS}
        return Envelope("fluent-bit", orjson.dumps(body).decode(), line,
                        timestamp=parse_epoch_or_iso(stamp), kubernetes=kube,
                        tags=["envelope_merged_log"])
    return None  # an Envoy JSON access log on its own


class PartialJoiner:
    """Joins partial records (CRI `P`, Docker lines without newline) of one stream.

    Keyed by pod/container and stream so interleaved containers don't mix. Memory is
    bounded: a run of partials over `max_bytes` is emitted as is, tagged.
    """

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self._pending: dict[tuple[Any, ...], tuple[Envelope, list[str], int]] = {}

    @property
    def pending(self) -> bool:
        """Whether some partial line is being held back."""
        return bool(self._pending)

    @staticmethod
    def _key(env: Envelope) -> tuple[Any, ...]:
        k = env.kubernetes or {}
        return (k.get("namespace_name"), k.get("pod_name"), k.get("container_name"),
                env.stream)

    def feed(self, env: Envelope) -> Envelope | None:
        """The completed record, or None while a partial is being held back."""
        if env.error is not None or (not env.partial and not self._pending):
            return env  # the common case: a whole line, nothing waiting anywhere
        key = self._key(env)
        pending = self._pending.get(key)
        if pending is None and not env.partial:
            return env  # the common case: a whole line, nothing waiting
        if pending is None:
            pending = (env, [], 0)
        first, parts, size = pending
        parts.append(env.payload or "")
        size += len(env.payload or "")
        if env.partial and size <= self.max_bytes:
            self._pending[key] = (first, parts, size)
            return None
        self._pending.pop(key, None)
        joined = _joined(first, parts)
        if env.partial:
            joined.tags.append("envelope_partial_too_long")
        return joined

    def flush(self) -> list[Envelope]:
        """Whatever partials are still waiting (end of input), tagged as incomplete."""
        out = []
        for first, parts, _ in self._pending.values():
            env = _joined(first, parts)
            env.tags.append("envelope_partial_incomplete")
            out.append(env)
        self._pending.clear()
        return out


def _joined(first: Envelope, parts: list[str]) -> Envelope:
    payload = "".join(parts)
    original = payload if len(parts) > 1 else first.original
    env = Envelope(first.kind, payload, original, stream=first.stream,
                   timestamp=first.timestamp, kubernetes=first.kubernetes, partial=False,
                   tags=list(first.tags))
    if len(parts) > 1:
        env.tags.append("envelope_joined_partials")
    return env
