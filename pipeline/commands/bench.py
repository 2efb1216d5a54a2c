"""`envoygeo bench ...`: benchmark commands that print figures (never timed tests)."""

from __future__ import annotations

import importlib

import click

# name -> ("module:attribute", one-line help). Each benchmark lives in pipeline/bench/.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "parse": ("pipeline.bench.parse:command", "Lines/s of each access-log preset on one core."),
    "enrich": (
        "pipeline.bench.enrich_micro:command",
        "GeoIP lookups/s, rate backends events/s and bytes per IP.",
    ),
    "e2e": ("pipeline.bench.e2e:command", "Worker drain rate vs the Elasticsearch bulk ceiling."),
    "core": ("pipeline.bench.core:command", "Whole enrichment on one core vs a geoip2 baseline."),
}


class _LazyBench(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(BENCHMARKS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = BENCHMARKS.get(cmd_name)
        if spec is None:
            return None
        module_name, _, attr = spec[0].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Benchmarks"):
            formatter.write_dl([(n, BENCHMARKS[n][1]) for n in self.list_commands(ctx)])


@click.group(cls=_LazyBench)
def bench() -> None:
    """Benchmarks. Each prints medians over several runs; the machine is shared and noisy."""
