"""The parsed access-log record and the ONE table that maps Envoy commands and JSON
keys to its canonical fields.

Every decoder (text formats compiled from an Envoy format string, JSON logs with any
key spelling) ends in the same `AccessLog`, so the client-IP resolver and the
document builder never care which format a line came in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.decode.timeparse import parse_epoch_or_iso


@dataclass(slots=True)
class AccessLog:
    """One access-log line. Absent values (`-`, null) are None."""

    start_time: float | None = None  # epoch seconds, UTC
    method: str | None = None
    path: str | None = None  # original, including the query string
    protocol: str | None = None
    response_code: int | None = None
    response_flags: str | None = None
    response_code_details: str | None = None
    connection_termination_details: str | None = None
    upstream_transport_failure_reason: str | None = None
    bytes_received: int | None = None
    bytes_sent: int | None = None
    duration_ms: int | None = None
    upstream_service_time: int | None = None
    x_forwarded_for: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    authority: str | None = None
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    upstream_local_address: str | None = None
    downstream_local_address: str | None = None
    downstream_remote_address: str | None = None
    downstream_direct_remote_address: str | None = None
    requested_server_name: str | None = None
    route_name: str | None = None
    # Anything logged that has no canonical field (dynamic metadata, other headers...).
    extra: dict[str, Any] = field(default_factory=dict)
    # Which format produced it ("envoy", "istio", "json", "custom", ...).
    log_format: str | None = None


def to_int(value: Any) -> int | None:
    """Integers arrive as ints (json_format), numeric strings (text, Istio JSON) or junk."""
    if type(value) is int:
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        try:
            return int(float(value))
        except ValueError:
            return None
    if isinstance(value, float):
        return int(value)
    return None


def to_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return None if value == "-" or value == "" else value
    return str(value)


def to_time(value: Any) -> float | None:
    return parse_epoch_or_iso(value)


Converter = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one canonical field is found: Envoy commands that produce it and JSON keys."""

    name: str
    convert: Converter
    # Envoy commands as (COMMAND, argument or None). Header arguments are matched
    # case-insensitively; REQUEST_HEADER/RESPONSE_HEADER/RESPONSE_TRAILER are folded
    # into REQ/RESP/TRAILER before lookup.
    commands: tuple[tuple[str, str | None], ...]
    # JSON keys seen in Istio JSON, Envoy json_format examples and custom formats.
    json_keys: tuple[str, ...]


# THE table. Order matters only for documentation.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("start_time", to_time, (("START_TIME", None), ("START_TIME_LOCAL", None)),
              ("start_time", "timestamp", "time", "@timestamp", "starttime")),
    FieldSpec("method", to_str, (("REQ", ":method"),), ("method", ":method", "http_method")),
    FieldSpec("path", to_str,
              (("REQ", "x-envoy-original-path?:path"), ("REQ", ":path"),
               ("REQ", ":path?x-envoy-original-path")),
              ("path", ":path", "x-envoy-origin-path", "x-envoy-original-path", "request_path",
               "uri")),
    FieldSpec("protocol", to_str, (("PROTOCOL", None),), ("protocol", "http_version")),
    FieldSpec("response_code", to_int, (("RESPONSE_CODE", None),),
              ("response_code", "status", "status_code", "responsecode", "code")),
    FieldSpec("response_flags", to_str, (("RESPONSE_FLAGS", None),),
              ("response_flags", "flags")),
    FieldSpec("response_code_details", to_str, (("RESPONSE_CODE_DETAILS", None),),
              ("response_code_details",)),
    FieldSpec("connection_termination_details", to_str,
              (("CONNECTION_TERMINATION_DETAILS", None),), ("connection_termination_details",)),
    FieldSpec("upstream_transport_failure_reason", to_str,
              (("UPSTREAM_TRANSPORT_FAILURE_REASON", None),),
              ("upstream_transport_failure_reason",)),
    FieldSpec("bytes_received", to_int, (("BYTES_RECEIVED", None),),
              ("bytes_received", "request_bytes")),
    FieldSpec("bytes_sent", to_int, (("BYTES_SENT", None),), ("bytes_sent", "response_bytes")),
    FieldSpec("duration_ms", to_int, (("DURATION", None),),
              ("duration", "duration_ms", "request_time")),
    FieldSpec("upstream_service_time", to_int, (("RESP", "x-envoy-upstream-service-time"),),
              ("upstream_service_time", "x-envoy-upstream-service-time")),
    FieldSpec("x_forwarded_for", to_str, (("REQ", "x-forwarded-for"),),
              ("x_forwarded_for", "x-forwarded-for", "xff", "forwarded_for")),
    FieldSpec("user_agent", to_str, (("REQ", "user-agent"),),
              ("user_agent", "user-agent", "useragent", "http_user_agent")),
    FieldSpec("request_id", to_str, (("REQ", "x-request-id"),),
              ("request_id", "x-request-id", "x_request_id", "requestid")),
    FieldSpec("authority", to_str,
              (("REQ", ":authority"), ("REQ", "x-envoy-original-host?:authority"),
               ("REQ", "host"), ("REQ", ":authority?host")),
              ("authority", ":authority", "host", "x-envoy-original-host")),
    FieldSpec("upstream_host", to_str, (("UPSTREAM_HOST", None), ("UPSTREAM_REMOTE_ADDRESS", None)),
              ("upstream_host",)),
    FieldSpec("upstream_cluster", to_str,
              (("UPSTREAM_CLUSTER", None), ("UPSTREAM_CLUSTER_RAW", None)),
              ("upstream_cluster", "cluster")),
    FieldSpec("upstream_local_address", to_str, (("UPSTREAM_LOCAL_ADDRESS", None),),
              ("upstream_local_address",)),
    FieldSpec("downstream_local_address", to_str,
              (("DOWNSTREAM_LOCAL_ADDRESS", None),
               ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", None)),
              ("downstream_local_address",)),
    FieldSpec("downstream_remote_address", to_str,
              (("DOWNSTREAM_REMOTE_ADDRESS", None),
               ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None)),
              ("downstream_remote_address", "client_ip", "remote_address", "remote_addr")),
    FieldSpec("downstream_direct_remote_address", to_str,
              (("DOWNSTREAM_DIRECT_REMOTE_ADDRESS", None),
               ("DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT", None)),
              ("downstream_direct_remote_address",)),
    FieldSpec("requested_server_name", to_str, (("REQUESTED_SERVER_NAME", None),),
              ("requested_server_name", "sni")),
    FieldSpec("route_name", to_str, (("ROUTE_NAME", None),), ("route_name", "route")),
)

FIELDS_BY_NAME: dict[str, FieldSpec] = {f.name: f for f in FIELDS}
CANONICAL_NAMES: frozenset[str] = frozenset(FIELDS_BY_NAME)

# Header-style commands whose long and short spellings mean the same thing.
COMMAND_SYNONYMS: dict[str, str] = {
    "REQUEST_HEADER": "REQ",
    "RESPONSE_HEADER": "RESP",
    "RESPONSE_TRAILER": "TRAILER",
}

_BY_COMMAND: dict[tuple[str, str | None], FieldSpec] = {
    cmd: f for f in FIELDS for cmd in f.commands
}


def field_for_command(command: str, argument: str | None) -> FieldSpec | None:
    """The canonical field an Envoy command fills, if any."""
    command = COMMAND_SYNONYMS.get(command, command)
    if command in ("REQ", "RESP", "TRAILER"):
        return _BY_COMMAND.get((command, argument.lower() if argument else None))
    # Elsewhere the argument only changes the rendering (START_TIME(<strftime>)).
    return _BY_COMMAND.get((command, None))


def default_json_aliases() -> dict[str, str]:
    """JSON key (lower-cased) -> canonical field name, from the table."""
    return {key.lower(): f.name for f in FIELDS for key in f.json_keys}


class LineError:
    """Why a line could not be parsed. Returned, not raised: failures are data here."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"LineError({self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LineError) and other.reason == self.reason

    def __hash__(self) -> int:
        return hash(self.reason)
