"""The compiled fast path (`native/`, Rust): when it applies and how it is configured.

Python remains the reference implementation of every stage. The native core runs the
common case of each one for a whole batch (Fluent Bit/Fluentd/bare envelopes, text
formats whose strict pattern can be scanned left to right, the client-IP policy, the
ECS document, memory rate counters) and hands every other record back by index, so
behaviour never depends on which path ran: the differential tests hold both to
byte-identical documents. What it cannot reproduce exactly it refuses up front (a
format it cannot scan, a JSON parser) or per record (non-ASCII lines, ISO collector
timestamps, unparsable lines, ...), and `ENVOYGEO_NATIVE=0` turns it off.

The format plan is derived from the same compiler output the Python parser runs
(`CompiledFormat`), so there is one definition of what a format means.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from pipeline.clientip import _V4_TABLE, _V6_TABLE, ClientIpResolver
from pipeline.decode.access_log import to_int
from pipeline.decode.envelope import ENVELOPE_AUTO, ENVELOPE_RAW
from pipeline.decode.envoy_format import (
    _CANONICAL_ORDER,
    _NUM_RE,
    _TIME_RE,
    _TOKEN_RE,
    CompiledFormat,
    _pattern_for,
    envoy_time,
)
from pipeline.decode.parser import AutoParser, LineParser
from pipeline.process import Limits
from pipeline.schema import ECS_VERSION

try:
    from pipeline import _native  # type: ignore[attr-defined]  # compiled, no stubs
except ImportError:  # built without a Rust toolchain: everything runs in Python
    _native = None  # type: ignore[assignment]

Plan = list[tuple[str, str | None, int | None, str | None, str | None]]

# Canonical fields whose values are integers; the rest are text (start_time: time).
_INT_FIELDS = frozenset({"response_code", "bytes_received", "bytes_sent", "duration_ms",
                         "upstream_service_time"})
# Characters Envoy's default START_TIME can contain: a literal starting with one of
# these after %START_TIME% would make the end of the value ambiguous for a scanner.
_TIME_CHARS = frozenset("0123456789-:.TZ+")


def available() -> bool:
    """Built, and not switched off with ENVOYGEO_NATIVE=0."""
    return _native is not None and os.environ.get("ENVOYGEO_NATIVE", "1") != "0"


def _field_kind(pattern: str, next_char: str | None, last: bool) -> tuple[str, str | None] | None:
    """The scanner kind equivalent to one strict value pattern, or None."""
    if pattern == _TIME_RE:
        if next_char is None and not last or next_char in _TIME_CHARS:
            return None
        return "time", None
    if pattern == _NUM_RE:
        if next_char is None and not last or (next_char or "").isdigit():
            return None
        return "num", None
    if pattern == _TOKEN_RE:
        return ("token_ws", None) if last or (next_char or "x").isspace() else None
    if pattern == "(.*)":
        return ("text_end", None) if last else None
    if next_char is not None and len(next_char.encode()) == 1:
        esc = re.escape(next_char)
        if pattern == f"([^\\s{esc}]+)":
            return "token_excl", next_char
        if pattern == f"([^{esc}]*)":
            return "text_excl", next_char
    return None


def format_plan(fmt: CompiledFormat) -> Plan | None:
    """The scanner plan for one compiled format, or None when it cannot be scanned."""
    if fmt._pick is None:  # a field logged twice: the general build decides
        return None
    plan: Plan = []
    segments = fmt.segments
    fields = iter(fmt._fields)
    for pos, seg in enumerate(segments):
        if isinstance(seg, str):
            if not seg.isascii():
                return None
            plan.append(("lit", seg, None, None, None))
            continue
        following = segments[pos + 1] if pos + 1 < len(segments) else None
        next_char = following[0] if isinstance(following, str) else None
        kind = _field_kind(_pattern_for(seg, next_char, True), next_char, following is None)
        if kind is None:
            return None
        _, target, conv, canonical = next(fields)
        if conv is None:
            conv_name = "str"
        elif conv is int:
            conv_name = "int"
        elif conv is to_int:
            conv_name = "to_int"
        elif conv is envoy_time and canonical:
            conv_name = "time"
        else:
            return None  # strftime times, float extras: Python renders those
        slot = _CANONICAL_ORDER.index(target) if canonical else None
        if canonical:
            expected = ("time" if target == "start_time" else
                        "int" if target in _INT_FIELDS else "str")
            if expected != ("int" if conv_name == "to_int" else conv_name):
                return None
        plan.append((kind[0], kind[1], slot, None if canonical else target, conv_name))
    return plan


def parser_formats(parser: LineParser) -> list[CompiledFormat] | None:
    """The text formats a parser tries, in its order; None for parsers it can't take.

    `auto` tries the format that matched last first; each path keeps its own "last",
    so a line that strictly matched two formats could be read by a different one on
    each path (no preset line does; both readings are valid parses of that line).
    """
    if isinstance(parser, AutoParser):
        return list(parser._text)
    if isinstance(parser, CompiledFormat):
        return [parser]
    return None  # JSON logs: the Python path


def _table(table: tuple[Sequence[int], Sequence[str]]) -> tuple[list[int], list[str]]:
    return list(table[0]), list(table[1])


def build_core(parser: LineParser, resolver: ClientIpResolver, geo_lookup: Any,
               geo_cache_size: int, windows: tuple[int, ...],
               limits: Limits | None = None, envelope: str = ENVELOPE_AUTO,
               ) -> tuple[Any, str]:
    """(native Core, "") or (None, why not)."""
    limits = limits or Limits()
    if not available():
        return None, ("switched off (ENVOYGEO_NATIVE=0)" if _native is not None
                      else "not built (no Rust toolchain at install)")
    formats = parser_formats(parser)
    if formats is None:
        return None, f"parser {parser.name!r} is not a text format"
    plans = []
    for fmt in formats:
        plan = format_plan(fmt)
        if plan is None:
            return None, f"format {fmt.name!r} cannot be scanned left to right"
        plans.append((fmt.name, plan))
    core = _native.Core(
        plans,
        list(resolver._ranges),
        resolver.policy.trusted_hops,
        _table(_V4_TABLE),
        _table(_V6_TABLE),
        geo_lookup,
        geo_cache_size,
        [f"{w}s" for w in windows],
        ECS_VERSION,
        resolver.policy.envoy_use_remote_address,
        limits.max_line_bytes,
        limits.max_field_bytes,
        list(_CANONICAL_ORDER),
        _privacy(resolver),
    )
    core.set_raw_envelope(envelope == ENVELOPE_RAW)
    return core, ""


def _privacy(resolver: ClientIpResolver) -> tuple[str, int, int, bytes | None, list[str]] | None:
    """The resolver's `PrivacyPolicy` for the core; None when addresses are kept."""
    p = resolver.privacy
    if p.client_ip == "keep":
        return None
    return (p.client_ip, p.truncate_ipv4_prefix, p.truncate_ipv6_prefix, p.hash_key,
            list(p.extra_fields))
