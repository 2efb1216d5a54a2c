"""Timestamp parsing shared by the envelope and access-log decoders.

Collectors and Envoy disagree on precision (Docker and CRI write nanoseconds, Envoy
milliseconds, Fluent Bit an epoch float), so everything is normalised to epoch
seconds as a float in UTC. `datetime.fromisoformat` only takes up to 6 fractional
digits, hence the trimming.
"""

from __future__ import annotations

from datetime import UTC, datetime


def parse_iso8601(text: str) -> float | None:
    """Epoch seconds for an RFC 3339 / ISO 8601 string, or None when it is not one."""
    s = text.strip()
    if not s:
        return None
    dot = s.find(".", 10)
    if dot != -1:
        # Trim the fraction to microseconds; keep whatever zone suffix follows.
        end = dot + 1
        n = len(s)
        while end < n and s[end].isdigit():
            end += 1
        if end - dot - 1 > 6:
            s = s[: dot + 7] + s[end:]
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ts = dt.timestamp()
    return ts if MIN_EPOCH <= ts < MAX_EPOCH else None


# Instants a document can carry: 1970-01-01 up to the end of year 9999 (what
# `datetime` and Elasticsearch's default date format can write). Anything else is a
# corrupt or hostile value and is treated as unknown rather than crashing the writer.
MIN_EPOCH = 0.0
MAX_EPOCH = 253_402_300_800.0


def parse_epoch_or_iso(value: object) -> float | None:
    """Epoch seconds from a number (seconds; milliseconds if implausibly large) or a
    string; None when it is neither or lies outside MIN_EPOCH..MAX_EPOCH."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        v = float(value)
        if v > 1e11:
            v /= 1000.0
        return v if MIN_EPOCH <= v < MAX_EPOCH else None
    if isinstance(value, str):
        try:
            return parse_epoch_or_iso(float(value))
        except ValueError:
            return parse_iso8601(value)
    return None
