"""The parse benchmark runs (tiny sizes): a smoke test, never a timing assertion."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.bench.parse import command, generate
from pipeline.decode.access_log import AccessLog
from pipeline.decode.parser import make_parser

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", ["envoy", "istio", "istio-legacy", "json", "mix"])
def test_generated_lines_parse(kind: str) -> None:
    parser = make_parser("auto" if kind == "mix" else kind)
    assert all(type(parser.parse(x)) is AccessLog for x in generate(kind, 300))


def test_bench_command_prints_every_figure() -> None:
    result = CliRunner().invoke(command, ["--lines", "300", "--runs", "1"])
    assert result.exit_code == 0, result.output
    for label in ("envoy", "istio-legacy", "json", "auto (random mix of 4)",
                  "envelope+parse+clientip", "ECS document"):
        assert label in result.output
