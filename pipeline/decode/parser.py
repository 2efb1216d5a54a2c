"""Choosing the access-log parser: a preset, JSON, a custom format string, or `auto`.

`auto` costs one character test for JSON and, for text, usually one regex: the preset
that matched the previous line is tried first, because a stream almost always carries
one format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from pipeline.decode.access_log import AccessLog, LineError
from pipeline.decode.envoy_format import CompiledFormat, FormatError, compile_format
from pipeline.decode.json_log import JsonLogParser
from pipeline.decode.presets import TEXT_PRESETS

FORMAT_NAMES: tuple[str, ...] = ("auto", *TEXT_PRESETS, "json")


class LineParser(Protocol):
    name: str

    def parse(self, line: str) -> AccessLog | LineError: ...


class AutoParser:
    """JSON if the line starts with `{`, else the text presets, last winner first."""

    __slots__ = ("name", "_json", "_text", "_last")

    def __init__(self, json_keys: Mapping[str, str] | None = None,
                 extra_formats: tuple[CompiledFormat, ...] = ()) -> None:
        self.name = "auto"
        self._json = JsonLogParser(json_keys)
        self._text: list[CompiledFormat] = [
            *extra_formats, *(compile_format(f, n) for n, f in TEXT_PRESETS.items())]
        self._last = self._text[0]

    def parse(self, line: str) -> AccessLog | LineError:
        s = line.lstrip()
        if s.startswith("{"):
            return self._json.parse(s)
        # Strict patterns of every preset first (each fails in one pass), then the
        # lenient ones: a line another preset matches never pays for backtracking.
        text = line.rstrip("\r\n")
        last = self._last
        m = last.match(text, lenient=False)
        if m is not None:
            return last.build(m)
        for fmt in self._text:
            if fmt is not last:
                m = fmt.match(text, lenient=False)
                if m is not None:
                    self._last = fmt
                    return fmt.build(m)
        for fmt in self._text:
            m = fmt.match_lenient(text)
            if m is not None:
                self._last = fmt
                return fmt.build(m)
        names = ", ".join(f.name for f in self._text)
        return LineError(f"line matches no known format (tried json, {names})")


def make_parser(log_format: str = "auto",
                json_keys: Mapping[str, str] | None = None) -> LineParser:
    """Parser for `--log-format`: a name from FORMAT_NAMES or an Envoy format string.

    Raises FormatError (with the position) for a format string Envoy would reject.
    """
    if log_format == "auto":
        return AutoParser(json_keys)
    if log_format == "json":
        return JsonLogParser(json_keys)
    preset = TEXT_PRESETS.get(log_format)
    if preset is not None:
        return compile_format(preset, log_format)
    compiled = compile_format(log_format, "custom")
    if not compiled.commands():
        # Almost always a misspelt preset name ("istio_legacy"), not a real format.
        raise FormatError(f"format has no %COMMAND% operators; presets are: "
                          f"{', '.join(FORMAT_NAMES)}", 0, log_format)
    return compiled
