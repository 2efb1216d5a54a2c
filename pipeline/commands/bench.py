"""`envoygeo bench ...`: benchmark commands that print figures (never timed tests)."""

from __future__ import annotations

import click

from pipeline.cli import LazyGroup

# name -> ("module:attribute", one-line help). Each benchmark lives in pipeline/bench/.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "parse": ("pipeline.bench.parse:command", "Lines/s of each access-log preset on one core."),
    "enrich": (
        "pipeline.bench.enrich_micro:command",
        "GeoIP lookups/s, rate backends events/s and bytes per IP.",
    ),
    "e2e": ("pipeline.bench.e2e:command", "Worker drain rate vs the Elasticsearch bulk ceiling."),
    "core": ("pipeline.bench.core:command", "Whole enrichment on one core vs a geoip2 baseline."),
    "index": (
        "pipeline.bench.index:command",
        "Elasticsearch CPU, store and query time per document under each mapping.",
    ),
    "forward": (
        "pipeline.bench.forward:command",
        "Events/s one envoygeo forward relays to Kafka with acks, CPU per event.",
    ),
    "forward-direct": (
        "pipeline.bench.forward_direct:command",
        "Events/s one envoygeo forward in mode direct indexes with acks, CPU per event.",
    ),
    "recovery": (
        "pipeline.bench.recovery:command",
        "Restart after kill -9 -> first indexed record; join/leave indexing stalls.",
    ),
}


class _LazyBench(LazyGroup):
    registry = BENCHMARKS
    section = "Benchmarks"


@click.group(cls=_LazyBench)
def bench() -> None:
    """Benchmarks. Each prints medians over several runs; the machine is shared and noisy."""
