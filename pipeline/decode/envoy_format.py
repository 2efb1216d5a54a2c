"""Compile an Envoy access-log format string into a parser for the lines it writes.

The format string is tokenised the way Envoy does (`%COMMAND%`, `%COMMAND(arg)%`,
`%COMMAND(arg):N%`, `%%`, everything else literal) and rejected at start-up with a
`FormatError` carrying the position when Envoy would reject it too (the integration
tests hold every verdict against `envoy --mode validate`).

Each format becomes two anchored regexes. The strict one gives every value a pattern
that cannot cross the literal after it (numbers, addresses and flags get tight
patterns), so a line matches in one pass or fails fast, which is what makes `auto`
cheap. The lenient one, tried only when the strict one fails, lets quoted free text
(a user agent with a raw `"`) run non-greedily up to its closing delimiter; its cost
is bounded by refusing lines with many more quotes than the format has.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NoReturn

from pipeline.decode.access_log import (
    COMMAND_SYNONYMS,
    AccessLog,
    LineError,
    field_for_command,
    to_str,
)
from pipeline.decode.timeparse import parse_iso8601


class FormatError(ValueError):
    """A format string Envoy would refuse. `position` is a 0-based offset into it."""

    def __init__(self, message: str, position: int, fmt: str) -> None:
        self.position = position
        self.format = fmt
        self.reason = message
        # Show the format on one line with a caret under the offending '%'.
        shown = fmt.replace("\n", "\\n")
        column = len(fmt[:position].replace("\n", "\\n"))
        super().__init__(f"{message} at position {position}:\n  {shown}\n  {' ' * column}^")


# --- the command vocabulary -------------------------------------------------------

# Commands that take a parenthesised argument, and whether it is required.
ARG_REQUIRED = frozenset({
    "REQ", "RESP", "TRAILER", "REQUEST_HEADER", "RESPONSE_HEADER", "RESPONSE_TRAILER",
    "DYNAMIC_METADATA", "CLUSTER_METADATA", "UPSTREAM_METADATA", "METADATA",
    "FILTER_STATE", "UPSTREAM_FILTER_STATE", "ENVIRONMENT", "QUERY_PARAM", "CEL",
    "COMMON_DURATION", "STREAM_INFO_REQ",
})
_ARG_OPTIONAL = frozenset({
    "START_TIME", "EMIT_TIME", "START_TIME_LOCAL", "EMIT_TIME_LOCAL", "GRPC_STATUS", "PATH",
    "RESPONSE_CODE_DETAILS", "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT", "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_PEER_CERT_V_START", "DOWNSTREAM_PEER_CERT_V_END",
    "UPSTREAM_PEER_CERT_V_START", "UPSTREAM_PEER_CERT_V_END",
})
# Commands whose argument is a fixed vocabulary (checked per ':'-separated part).
_ARG_CHOICES: dict[str, frozenset[str]] = {
    "GRPC_STATUS": frozenset({"CAMEL_STRING", "SNAKE_STRING", "NUMBER"}),
    "PATH": frozenset({"WQ", "NQ", "ORIG", "PATH", "ORIG_OR_PATH"}),
    "METADATA": frozenset({"DYNAMIC", "CLUSTER", "ROUTE", "UPSTREAM_HOST", "LISTENER",
                           "VIRTUAL_HOST", "LISTENER_FILTER_CHAIN"}),
}
# Only these accept the `:N` truncation suffix.
_MAX_LENGTH_OK = frozenset({
    "REQ", "RESP", "TRAILER", "REQUEST_HEADER", "RESPONSE_HEADER", "RESPONSE_TRAILER",
    "DYNAMIC_METADATA", "METADATA", "FILTER_STATE", "UPSTREAM_FILTER_STATE", "ENVIRONMENT",
    "QUERY_PARAM", "QUERY_PARAMS", "CEL", "PATH", "STREAM_INFO_REQ",
})
# Integer-valued commands ("-" when unknown).
_NUMERIC = frozenset({
    "BYTES_RECEIVED", "BYTES_SENT", "BYTES_RETRANSMITTED", "PACKETS_RETRANSMITTED",
    "DURATION", "REQUEST_DURATION", "REQUEST_TX_DURATION", "RESPONSE_DURATION",
    "RESPONSE_TX_DURATION", "DOWNSTREAM_HANDSHAKE_DURATION", "ROUNDTRIP_DURATION",
    "UPSTREAM_CONNECTION_POOL_READY_DURATION", "COMMON_DURATION",
    "RESPONSE_CODE", "UPSTREAM_REQUEST_ATTEMPT_COUNT", "GRPC_STATUS_NUMBER",
    "UPSTREAM_WIRE_BYTES_SENT", "UPSTREAM_WIRE_BYTES_RECEIVED",
    "UPSTREAM_HEADER_BYTES_SENT", "UPSTREAM_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_WIRE_BYTES_SENT", "DOWNSTREAM_WIRE_BYTES_RECEIVED",
    "DOWNSTREAM_HEADER_BYTES_SENT", "DOWNSTREAM_HEADER_BYTES_RECEIVED",
    "REQUEST_HEADERS_BYTES", "RESPONSE_HEADERS_BYTES", "RESPONSE_TRAILERS_BYTES",
    "DOWNSTREAM_LOCAL_PORT", "DOWNSTREAM_REMOTE_PORT", "DOWNSTREAM_DIRECT_REMOTE_PORT",
    "UPSTREAM_LOCAL_PORT", "UPSTREAM_REMOTE_PORT", "CONNECTION_ID",
    "UPSTREAM_CONNECTION_ID", "DOWNSTREAM_CX_RTT", "DOWNSTREAM_DIRECT_LOCAL_PORT",
    "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED", "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
    "UPSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED", "UPSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
    "ROUTE_RESOLUTION_COUNT", "ROUTE_RESOLUTION_TIME_US",
})
# Single-token values (never contain a space).
_TOKEN = frozenset({
    "PROTOCOL", "UPSTREAM_PROTOCOL", "RESPONSE_FLAGS", "RESPONSE_FLAGS_LONG",
    "RESPONSE_CODE_DETAILS", "UPSTREAM_HOST", "UPSTREAM_HOST_NAME",
    "UPSTREAM_HOST_NAME_WITHOUT_PORT", "UPSTREAM_CLUSTER", "UPSTREAM_CLUSTER_RAW",
    "UPSTREAM_LOCAL_ADDRESS", "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "UPSTREAM_REMOTE_ADDRESS", "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
    "REQUESTED_SERVER_NAME", "HOSTNAME", "STREAM_ID", "UNIQUE_ID", "TRACE_ID",
    "ACCESS_LOG_TYPE", "DOWNSTREAM_TLS_VERSION", "DOWNSTREAM_TLS_CIPHER",
    "DOWNSTREAM_TLS_SESSION_ID", "UPSTREAM_TLS_VERSION", "UPSTREAM_TLS_CIPHER",
    "UPSTREAM_TLS_SESSION_ID", "GRPC_STATUS", "CUSTOM_FLAGS",
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS", "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_ENDPOINT_ID", "DOWNSTREAM_LOCAL_ADDRESS_ENDPOINT_ID",
    "UPSTREAM_REMOTE_ADDRESS_ENDPOINT_ID", "DOWNSTREAM_DETECTED_CLOSE_TYPE",
    "UPSTREAM_DETECTED_CLOSE_TYPE", "DOWNSTREAM_TLS_GROUP", "UPSTREAM_TLS_GROUP",
    "FILTER_CHAIN_NAME", "SPAN_ID", "UPSTREAM_SERVER_NAME", "UPSTREAM_HOSTS_ATTEMPTED",
    "UPSTREAM_HOSTS_ATTEMPTED_WITHOUT_PORT", "UPSTREAM_HOST_NAMES_ATTEMPTED",
    "UPSTREAM_HOST_NAMES_ATTEMPTED_WITHOUT_PORT", "UPSTREAM_CONNECTION_IDS_ATTEMPTED",
})
# Free-text commands without their own category above.
_TEXT = frozenset({
    "START_TIME", "EMIT_TIME", "PATH", "ROUTE_NAME", "VIRTUAL_CLUSTER_NAME",
    "CONNECTION_TERMINATION_DETAILS", "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "DOWNSTREAM_TRANSPORT_FAILURE_REASON", "LOCAL_REPLY_BODY",
    "DOWNSTREAM_PEER_URI_SAN", "DOWNSTREAM_PEER_DNS_SAN", "DOWNSTREAM_PEER_IP_SAN",
    "DOWNSTREAM_PEER_EMAIL_SAN", "DOWNSTREAM_PEER_OTHERNAME_SAN",
    "DOWNSTREAM_LOCAL_URI_SAN", "DOWNSTREAM_LOCAL_DNS_SAN", "DOWNSTREAM_LOCAL_IP_SAN",
    "DOWNSTREAM_LOCAL_EMAIL_SAN", "DOWNSTREAM_LOCAL_OTHERNAME_SAN",
    "DOWNSTREAM_LOCAL_SUBJECT", "DOWNSTREAM_PEER_SUBJECT", "DOWNSTREAM_PEER_ISSUER",
    "DOWNSTREAM_PEER_FINGERPRINT_256", "DOWNSTREAM_PEER_FINGERPRINT_1",
    "DOWNSTREAM_PEER_SERIAL", "DOWNSTREAM_PEER_CERT", "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_256",
    "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_1", "DOWNSTREAM_PEER_CHAIN_SERIALS",
    "DOWNSTREAM_PEER_CERT_V_START", "DOWNSTREAM_PEER_CERT_V_END",
    "UPSTREAM_PEER_URI_SAN", "UPSTREAM_PEER_DNS_SAN", "UPSTREAM_PEER_IP_SAN",
    "UPSTREAM_PEER_SUBJECT", "UPSTREAM_PEER_ISSUER", "UPSTREAM_PEER_CERT",
    "UPSTREAM_PEER_CERT_V_START", "UPSTREAM_PEER_CERT_V_END",
    "UPSTREAM_LOCAL_URI_SAN", "UPSTREAM_LOCAL_DNS_SAN", "UPSTREAM_LOCAL_IP_SAN",
    "DOWNSTREAM_LOCAL_CLOSE_REASON", "UPSTREAM_LOCAL_CLOSE_REASON",
    "DOWNSTREAM_PEER_ISSUER_FINGERPRINT_256", "DOWNSTREAM_PEER_ISSUER_SERIAL", "QUERY_PARAMS",
    "START_TIME_LOCAL", "EMIT_TIME_LOCAL",
}) | ARG_REQUIRED
KNOWN_COMMANDS: frozenset[str] = _NUMERIC | _TOKEN | _TEXT | _ARG_OPTIONAL

_TIME_COMMANDS = frozenset({"START_TIME", "EMIT_TIME", "START_TIME_LOCAL", "EMIT_TIME_LOCAL"})
_NUM_RE = r"(\d+|-)"
_TOKEN_RE = r"(\S+)"
_TEXT_RE = r"(.*?)"
# Envoy's default START_TIME rendering, e.g. 2026-11-29T01:13:00.665Z.
_TIME_RE = r"(\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:?\d\d)?|-)"

# Header values that never contain a space (method, path, authority, ids, numbers).
_HEADER_COMMANDS = frozenset({"REQ", "RESP", "REQUEST_HEADER", "RESPONSE_HEADER"})
_TOKEN_HEADERS = frozenset({
    ":method", ":path", "x-envoy-original-path?:path", ":path?x-envoy-original-path",
    ":authority", "x-envoy-original-host?:authority", "host", ":scheme",
    "x-forwarded-proto", "x-request-id", "x-envoy-upstream-service-time", "content-length",
    "x-b3-traceid", "x-b3-spanid", "traceparent",
})
_LENIENT_MAX_CHARS = 16384
_LENIENT_EXTRA_QUOTES = 8

_COMMAND_AT = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::(\d+))?%")


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # as written, e.g. REQUEST_HEADER
    argument: str | None
    max_length: int | None
    position: int

    @property
    def key(self) -> str:
        """Stable spelling used for `AccessLog.extra` keys and rendering tables."""
        canonical = COMMAND_SYNONYMS.get(self.name, self.name)
        return canonical if self.argument is None else f"{canonical}({self.argument})"


Segment = str | Command


def tokenize(fmt: str) -> list[Segment]:
    """Split a format string into literals and validated commands (Envoy's rules)."""
    out: list[Segment] = []
    literal: list[str] = []
    i = 0
    n = len(fmt)
    while i < n:
        pct = fmt.find("%", i)
        if pct == -1:
            literal.append(fmt[i:])
            break
        literal.append(fmt[i:pct])
        if fmt.startswith("%%", pct):
            literal.append("%")  # Envoy's escape for a literal percent sign
            i = pct + 2
            continue
        m = _COMMAND_AT.match(fmt, pct)
        if m is None:
            _explain_bad_command(fmt, pct)
        name, arg, max_len = m.group(1), m.group(2), m.group(3)
        _validate(fmt, pct, name, arg, max_len)
        if literal:
            text = "".join(literal)
            if text:
                out.append(text)
            literal = []
        out.append(Command(name, arg, int(max_len) if max_len else None, pct))
        i = m.end()
    tail = "".join(literal)
    if tail:
        out.append(tail)
    return out


def _explain_bad_command(fmt: str, pos: int) -> NoReturn:
    """Say precisely why the command at `pos` is malformed (Envoy only says where)."""
    rest = fmt[pos + 1:]
    if "%" not in rest:
        raise FormatError("unterminated '%' (no closing '%' for this command)", pos, fmt)
    m = re.match(r"[A-Z0-9_]*", rest)
    name = m.group(0) if m else ""
    after = rest[len(name):]
    if not name:
        raise FormatError("expected a command name (A-Z, 0-9, _) after '%'", pos, fmt)
    if after.startswith("("):
        close = after.find(")")
        if close == -1:
            raise FormatError(f"unterminated '(' in %{name}(...)%", pos, fmt)
        shown = f"%{name}{after[:close + 1]}"
        after = after[close + 1:]
        if after.startswith(":"):
            raise FormatError(f"bad max length in {shown}{after[:after.find('%') + 1]}: "
                              "':N' must be a decimal number", pos, fmt)
        raise FormatError(f"{shown} must be followed by '%' or ':N%' "
                          f"(found {after[:1]!r})", pos, fmt)
    if after.startswith(":"):
        raise FormatError(f"bad max length in %{name}{after[:after.find('%') + 1]}: "
                          "':N' must be a decimal number", pos, fmt)
    raise FormatError(f"command %{name} must be closed by '%' (found {after[:1]!r})", pos, fmt)


def _validate(fmt: str, pos: int, name: str, arg: str | None, max_len: str | None) -> None:
    if name not in KNOWN_COMMANDS:
        raise FormatError(f"unknown command %{name}%", pos, fmt)
    if arg is None and name in ARG_REQUIRED:
        raise FormatError(f"%{name}% needs an argument, e.g. %{name}(...)%", pos, fmt)
    if arg is not None and name not in ARG_REQUIRED and name not in _ARG_OPTIONAL:
        raise FormatError(f"%{name}% takes no argument", pos, fmt)
    if max_len is not None and name not in _MAX_LENGTH_OK:
        raise FormatError(f"%{name}% does not support a ':N' max length", pos, fmt)
    canonical = COMMAND_SYNONYMS.get(name, name)
    if arg is not None and canonical in ("REQ", "RESP", "TRAILER"):
        parts = arg.split("?")
        if len(parts) > 2:
            raise FormatError(f"more than one alternative header in %{name}({arg})%", pos, fmt)
    if arg is not None and name in ("DYNAMIC_METADATA", "CLUSTER_METADATA") and not arg:
        raise FormatError(f"%{name}()% needs a namespace", pos, fmt)
    if name == "COMMON_DURATION" and arg is not None and len(arg.split(":")) not in (2, 3):
        raise FormatError(f"%COMMON_DURATION({arg})% needs START:END or START:END:PRECISION",
                          pos, fmt)
    allowed = _ARG_CHOICES.get(name)
    if arg is not None and allowed is not None:
        bad = [p for p in (arg.split(":") if name != "METADATA" else arg.split(":")[:1])
               if p not in allowed]
        if bad:
            raise FormatError(f"%{name}({arg})%: unsupported option {bad[0]!r}"
                              f" (allowed: {', '.join(sorted(allowed))})", pos, fmt)


# --- converters ---------------------------------------------------------------------

_second_cache: dict[str, int] = {}


def envoy_time(value: str) -> float | None:
    """Envoy's default START_TIME (`%Y-%m-%dT%H:%M:%E3SZ`) to epoch seconds.

    Hot path: every line has one. Lines of the same second share the 19-char prefix,
    so the calendar work is cached per second and only the fraction is parsed.
    """
    if len(value) == 24 and value[19] == "." and value[23] == "Z":
        prefix = value[:19]
        base = _second_cache.get(prefix)
        if base is None:
            try:
                base = calendar.timegm(datetime.strptime(prefix, "%Y-%m-%dT%H:%M:%S").timetuple())
            except ValueError:
                return None
            if len(_second_cache) > 4096:
                _second_cache.clear()
            _second_cache[prefix] = base
        frac = value[20:23]
        if frac.isdigit():
            return base + int(frac) / 1000.0
    return parse_iso8601(value)


_ENVOY_FRACTION = re.compile(r"%E?(\d)?[fS]")


_STRFTIME_PATTERNS = {
    "Y": r"\d{4}", "m": r"\d\d", "d": r"\d\d", "H": r"\d\d", "M": r"\d\d", "S": r"\d\d",
    "y": r"\d\d", "j": r"\d{3}", "I": r"\d\d", "e": r"[ \d]\d", "p": r"[AP]M",
    "z": r"[+-]\d{4}", "Z": r"[A-Za-z]+", "s": r"\d+", "f": r"\d+", "F": r"\d{4}-\d\d-\d\d",
    "T": r"\d\d:\d\d:\d\d", "a": r"[A-Za-z]{3}", "A": r"[A-Za-z]+", "b": r"[A-Za-z]{3}",
    "B": r"[A-Za-z]+", "%": "%",
}


def strftime_regex(fmt: str) -> str:
    """A regex for what Envoy's START_TIME(<fmt>) writes, so spaces in it parse."""
    out: list[str] = []
    i, n = 0, len(fmt)
    while i < n:
        c = fmt[i]
        if c != "%" or i + 1 >= n:
            out.append(re.escape(c))
            i += 1
            continue
        j = i + 1
        while j < n and (fmt[j].isdigit() or fmt[j] == "E"):
            j += 1  # Envoy's %3f, %E3S
        if j >= n:
            out.append(re.escape(fmt[i:]))
            break
        directive = fmt[j]
        if directive == "S" and j > i + 1:
            out.append(r"\d\d\.\d+")
        else:
            out.append(_STRFTIME_PATTERNS.get(directive, r"\S+?"))
        i = j + 1
    return "".join(out)


def strftime_time(fmt: str) -> Callable[[str], float | None]:
    """Converter for %START_TIME(<fmt>)%: best effort via strptime, then ISO, else None."""
    if fmt == "%s":
        return lambda v: float(v) if v.isdigit() else None
    # Envoy's %f/%3f/%6f/%9f and %E3S are not strptime's; map them onto %f / %S.%f.
    py_fmt = re.sub(r"%E\dS", "%S.%f", re.sub(r"%\d?f", "%f", fmt))

    def convert(value: str) -> float | None:
        try:
            dt = datetime.strptime(value, py_fmt)
        except ValueError:
            return parse_iso8601(value)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()

    return convert


def _converter_for(cmd: Command, canonical: bool, field_convert: Callable[[Any], Any] | None
                   ) -> Callable[[str], Any] | None:
    """None means "keep the text as is" (the common case, no call in the hot loop)."""
    if cmd.name in _TIME_COMMANDS:
        return envoy_time if cmd.argument is None else strftime_time(cmd.argument)
    if cmd.name in _NUMERIC:
        return int  # the pattern admits only digits (or "-", skipped before)
    if canonical and field_convert is not None and field_convert is not to_str:
        return field_convert
    return None


def _pattern_for(cmd: Command, next_char: str | None, strict: bool) -> str:
    """Regex for one command's value.

    `next_char` is the first character of the literal that follows (None: another
    command or the end). The strict pattern cannot cross that character, so a line
    either matches in one pass or fails fast; the lenient one (`.*?`) is the fallback
    for values that contain the delimiter (an unescaped quote inside a user agent).
    """
    if cmd.name in _TIME_COMMANDS:
        return _TIME_RE if cmd.argument is None else f"({strftime_regex(cmd.argument)}|-)"
    if cmd.name in _NUMERIC:
        return _NUM_RE
    # RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES) keeps the spaces Envoy otherwise replaces.
    token = cmd.name in _TOKEN and not (cmd.name == "RESPONSE_CODE_DETAILS"
                                        and cmd.argument == "ALLOW_WHITESPACES")
    if token or (cmd.name in _HEADER_COMMANDS and cmd.argument is not None
                              and cmd.argument.lower() in _TOKEN_HEADERS):
        if next_char is not None and not next_char.isspace():
            return f"([^\\s{re.escape(next_char)}]+)"
        return _TOKEN_RE
    if next_char is not None and (strict or next_char.isspace()):
        # Space-delimited free text stays strict even in the lenient pattern: two
        # non-greedy fields split by spaces make a failing match polynomial.
        return f"([^{re.escape(next_char)}]*)"
    if next_char is None and strict:
        return "(.*)"
    return _TEXT_RE


# --- the compiled parser ------------------------------------------------------------

# AccessLog's canonical fields in constructor order (everything before extra/log_format).
_CANONICAL_ORDER: tuple[str, ...] = tuple(f.name for f in dataclass_fields(AccessLog))[:-2]
assert [f.name for f in dataclass_fields(AccessLog)][-2:] == ["extra", "log_format"]
# Envoy writes "-" for an absent value; an empty capture is absent too. Used as
# `map(_ABSENT.get, groups, groups)`: None for those, the value itself otherwise, in C.
_ABSENT: dict[str | None, None] = {"-": None, "": None}


def _strip_line_end(fmt: str) -> str:
    """Envoy formats end in a newline (real or the two characters \\n); lines don't."""
    while True:
        if fmt.endswith("\n"):
            fmt = fmt[:-1]
        elif fmt.endswith("\\n"):
            fmt = fmt[:-2]
        elif fmt.endswith("\r"):
            fmt = fmt[:-1]
        else:
            return fmt


class CompiledFormat:
    """Parser for the lines of one format string. Build with `compile_format`."""

    __slots__ = ("name", "source", "segments", "_strict", "_lenient", "_fields", "_quotes",
                 "_pick", "_converts", "_extras")

    def __init__(self, fmt: str, name: str = "custom") -> None:
        self.name = name
        self.source = fmt
        self.segments = tokenize(_strip_line_end(fmt))
        strict: list[str] = []
        lenient: list[str] = []
        # (group index, target key, converter or None for plain text, is canonical)
        fields: list[tuple[int, str, Callable[[str], Any] | None, bool]] = []
        group = 0
        for pos, seg in enumerate(self.segments):
            if isinstance(seg, str):
                strict.append(re.escape(seg))
                lenient.append(re.escape(seg))
                continue
            following = self.segments[pos + 1] if pos + 1 < len(self.segments) else None
            next_char = following[0] if isinstance(following, str) else None
            spec = field_for_command(seg.name, seg.argument)
            target = spec.name if spec is not None else seg.key
            conv = _converter_for(seg, spec is not None, spec.convert if spec else None)
            strict.append(_pattern_for(seg, next_char, True))
            lenient.append(_pattern_for(seg, next_char, False))
            fields.append((group, target, conv, spec is not None))
            group += 1
        if not self.segments:
            raise FormatError("empty format string", 0, fmt)
        self._strict = re.compile("".join(strict), re.DOTALL).fullmatch
        lenient_rx = "".join(lenient)
        self._lenient = (re.compile(lenient_rx, re.DOTALL).fullmatch
                         if lenient_rx != "".join(strict) else None)
        self._fields = tuple(fields)
        self._quotes = sum(seg.count('"') for seg in self.segments if isinstance(seg, str))
        self._plan_fast_build(fields)

    def _plan_fast_build(
            self, fields: list[tuple[int, str, Callable[[str], Any] | None, bool]]) -> None:
        """Precompute `build`'s fast path, or leave `_pick` None when it cannot apply.

        The fast path picks all canonical values with one C-level `itemgetter` call
        in AccessLog constructor order (index `len(groups)` stands for "not in this
        format" and reads the None appended to the values), then runs only the few
        converters. It needs each canonical field to come from one command: with two
        (a field logged twice) the first present value wins, which `_build_general`
        implements.
        """
        canonical = [(idx, target, conv) for idx, target, conv, canon in fields if canon]
        targets = [target for _, target, _ in canonical]
        if len(set(targets)) != len(targets):
            self._pick = None
            return
        absent = len(fields)
        where = {target: idx for idx, target, _ in canonical}
        order = [where.get(name, absent) for name in _CANONICAL_ORDER]
        self._pick = itemgetter(*order)
        self._converts = tuple((_CANONICAL_ORDER.index(target), conv)
                               for _, target, conv in canonical if conv is not None)
        self._extras = tuple((idx, target, conv)
                             for idx, target, conv, canon in fields if not canon)

    def match(self, line: str, lenient: bool = True) -> re.Match[str] | None:
        """Strict pattern first; the lenient one only when asked and different."""
        m = self._strict(line)
        if m is None and lenient:
            m = self.match_lenient(line)
        return m

    def match_lenient(self, line: str) -> re.Match[str] | None:
        """The backtracking pattern, only for lines that can plausibly need it.

        Its cost grows polynomially with the delimiters in a line that matches
        nothing, and a client controls its headers; a few stray quotes are what real
        values carry, so lines with many more quotes than the format are refused.
        """
        if self._lenient is None or len(line) > _LENIENT_MAX_CHARS:
            return None
        if line.count('"') > self._quotes + _LENIENT_EXTRA_QUOTES:
            return None
        return self._lenient(line)

    def parse(self, line: str) -> AccessLog | LineError:
        m = self.match(line.rstrip("\r\n"))
        if m is None:
            return LineError(f"line does not match the {self.name} format")
        return self.build(m)

    def build(self, m: re.Match[str]) -> AccessLog:
        """The AccessLog for a match of this format.

        Hot path (every line): absent markers become None and the canonical values are
        put in constructor order by two C calls, so Python-level work is only the
        handful of converters (time, integers) and any non-canonical extras. Anything
        unusual (a field logged twice, a value a converter rejects, which adds a
        `<field>_raw` extra in field order) takes `_build_general`, the reference.
        """
        pick = self._pick
        if pick is None:
            return self._build_general(m)
        groups = m.groups()
        values = list(map(_ABSENT.get, groups, groups))
        values.append(None)  # what `pick` reads for fields this format does not log
        args = list(pick(values))
        for pos, conv in self._converts:
            raw = args[pos]
            if raw is not None:
                value = conv(raw)
                if value is None:
                    return self._build_general(m)
                args[pos] = value
        extra: dict[str, Any] = {}
        for idx, target, xconv in self._extras:
            raw = values[idx]
            if raw is not None:
                if xconv is None:
                    extra[target] = raw
                else:
                    value = xconv(raw)
                    if value is not None:
                        extra[target] = value
        # Positional in constructor order (`_pick` made `args` so): mypy cannot see a
        # list's length.
        return AccessLog(*args, extra, self.name)  # type: ignore[call-arg]

    def _build_general(self, m: re.Match[str]) -> AccessLog:
        # A flat loop over precomputed (group, target, converter) tuples into one
        # kwargs dict; text values need no call at all (converter None).
        groups = m.groups()
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for idx, target, conv, canonical in self._fields:
            raw = groups[idx]
            if raw == "-" or not raw:
                continue
            if conv is None:
                value: Any = raw
            else:
                value = conv(raw)
                if value is None:
                    if canonical:
                        # Unconvertible value in a typed field: keep it visible.
                        extra[target + "_raw"] = raw
                    continue
            if canonical:
                if target not in kw:
                    kw[target] = value
            else:
                extra[target] = value
        return AccessLog(**kw, extra=extra, log_format=self.name)

    def render(self, values: Mapping[str, str | None]) -> str:
        """Write a line the way Envoy would, from `Command.key` -> text (None -> '-').

        Used to generate test and benchmark lines from any format string.
        """
        out: list[str] = []
        for seg in self.segments:
            if isinstance(seg, str):
                out.append(seg)
            else:
                v = values.get(seg.key)
                out.append("-" if v is None or v == "" else v)
        return "".join(out)

    def commands(self) -> list[Command]:
        return [s for s in self.segments if isinstance(s, Command)]


def compile_format(fmt: str, name: str = "custom") -> CompiledFormat:
    """Compile an Envoy format string; raises FormatError if Envoy would reject it."""
    return CompiledFormat(fmt, name)
