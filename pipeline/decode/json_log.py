"""JSON access logs: Istio's JSON encoding, Envoy `json_format`, custom key spellings.

Keys are resolved through aliases derived from the field table in `access_log`
(`user-agent` and `user_agent` both mean user_agent) plus an optional user mapping
whose values are canonical field names or Envoy commands (`"%REQ(USER-AGENT)%"`), so a
`json_format` block can be pasted as the mapping unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from pipeline.decode.access_log import (
    CANONICAL_NAMES,
    FIELDS_BY_NAME,
    AccessLog,
    LineError,
    default_json_aliases,
    field_for_command,
    to_str,
)


class JsonKeysError(ValueError):
    """A user-supplied JSON key mapping that cannot be used."""


def _target_for(value: str) -> str:
    v = value.strip()
    if v in CANONICAL_NAMES:
        return v
    if v.startswith("%") and v.endswith("%"):
        from pipeline.decode.envoy_format import Command, tokenize

        segs = tokenize(v)
        if len(segs) == 1 and isinstance(segs[0], Command):
            spec = field_for_command(segs[0].name, segs[0].argument)
            if spec is not None:
                return spec.name
            return ""  # a valid command with no canonical field: goes to `extra`
    raise JsonKeysError(
        f"{value!r} is neither a canonical field ({', '.join(sorted(CANONICAL_NAMES))}) "
        "nor a single Envoy command like %REQ(USER-AGENT)%")


def load_json_keys(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """User mapping from a dict, a JSON file path, inline JSON or `key=field,key=field`.

    Returns JSON key (lower-cased) -> canonical field; keys mapped to commands without
    a canonical field are dropped (they land in `extra` anyway).
    """
    if spec is None:
        return {}
    raw: Mapping[str, Any]
    if isinstance(spec, Mapping):
        raw = spec
    else:
        text = spec.strip()
        if not text.startswith("{") and Path(text).is_file():
            text = Path(text).read_text(encoding="utf-8").strip()
        if text.startswith("{"):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise JsonKeysError(f"JSON key mapping is not valid JSON: {e}") from e
        else:
            pairs = [p for p in text.split(",") if p.strip()]
            raw = {}
            for p in pairs:
                key, sep, val = p.partition("=")
                if not sep:
                    raise JsonKeysError(f"expected key=field in {p!r}")
                raw[key.strip()] = val.strip()  # type: ignore[index]
    out: dict[str, str] = {}
    for key, val in _flatten(raw, ""):
        if not isinstance(val, str):
            raise JsonKeysError(f"mapping for {key!r} must be a string")
        target = _target_for(val)
        if target:
            out[key.lower()] = target
    return out


def _flatten(obj: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """Nested json_format blocks become dotted keys: {"http": {"ua": x}} -> "http.ua"."""
    out: list[tuple[str, Any]] = []
    for key, val in obj.items():
        name = f"{prefix}{key}"
        if isinstance(val, Mapping):
            out.extend(_flatten(val, name + "."))
        else:
            out.append((name, val))
    return out


class JsonLogParser:
    """Parser for one-object-per-line JSON access logs."""

    __slots__ = ("name", "_aliases", "_convert")

    def __init__(self, user_keys: Mapping[str, str] | None = None, name: str = "json") -> None:
        self.name = name
        aliases = default_json_aliases()
        aliases.update(user_keys or {})
        self._aliases = aliases
        # Text fields that already hold a str need no conversion call (hot loop).
        self._convert = {n: (None if f.convert is to_str else f.convert)
                         for n, f in FIELDS_BY_NAME.items()}

    def parse(self, line: str | bytes) -> AccessLog | LineError:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            return LineError(f"invalid JSON access log: {e}")
        if not isinstance(obj, dict):
            return LineError("JSON access log is not an object")
        return self.parse_object(obj)

    def parse_object(self, obj: Mapping[str, Any]) -> AccessLog | LineError:
        # Hot path: one dict lookup per key (exact spelling first, lower-cased second).
        aliases = self._aliases
        convert = self._convert
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in obj.items():
            target = aliases.get(key)
            if target is None:
                target = aliases.get(key.lower())
            if target is None:
                if type(value) is dict and self._nested(key, value, kw):
                    continue
                if value is not None and value != "-":
                    extra[key] = value
                continue
            if value is None or value == "-" or value == "" or target in kw:
                continue
            conv = convert[target]
            if conv is None and type(value) is str:
                kw[target] = value
                continue
            converted = (conv or to_str)(value)
            if converted is None:
                extra[key] = value
            else:
                kw[target] = converted
        if not kw:
            return LineError("JSON object has none of the access-log fields")
        return AccessLog(**kw, extra=extra, log_format=self.name)

    def _nested(self, prefix: str, obj: dict[str, Any], kw: dict[str, Any]) -> bool:
        """Fields of a nested json_format object under dotted aliases ("http.ua").

        True when at least one was recognised (the object then stays out of `extra`).
        """
        found = False
        for key, value in _flatten(obj, prefix + "."):
            target = self._aliases.get(key) or self._aliases.get(key.lower())
            if target is None or value is None or value == "-" or target in kw:
                continue
            conv = self._convert[target]
            converted = value if conv is None and type(value) is str else (conv or to_str)(value)
            if converted is not None:
                kw[target] = converted
                found = True
        return found

