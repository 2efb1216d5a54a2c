"""`envoygeo bench index` against the real Elasticsearch, with a tiny corpus: it indexes
under every candidate mapping, force-merges, runs the dashboards' searches and prints a
row of numbers per mapping (the figures themselves are the benchmark's business)."""

from __future__ import annotations

import re

from click.testing import CliRunner
from elasticsearch import Elasticsearch

from pipeline.bench.index import BASELINE, LEAN_DOCS
from pipeline.cli import main

NUMBER = re.compile(r"^[\d,]+(\.\d+)?$")


def _bench_indices(es: Elasticsearch) -> set[str]:
    return set(es.indices.get(index="bench-index-*", allow_no_indices=True,
                              ignore_unavailable=True).body)


def test_bench_index_prints_a_row_of_numbers_per_mapping(es_url: str) -> None:
    es = Elasticsearch(es_url, request_timeout=30)
    before = _bench_indices(es)  # another run's (a benchmark on a shared node) stay theirs
    result = CliRunner().invoke(main, ["bench", "index", "-n", "2000", "--rounds", "1",
                                       "--es", es_url])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("mapping"))
    rows = {line.split()[0]: line.split()[1:] for line in lines[head + 1:]
            if line and not line.startswith("ES CPU")}
    assert set(rows) == {"envoygeo", "envoygeo-plain", "dynamic", BASELINE, "optimised",
                         LEAN_DOCS}
    for name, cells in rows.items():
        cpu, rate, store, countries, ips, geotile, over_time, cpu_x, store_x = cells
        for cell in (cpu, rate, store, countries, ips, over_time, cpu_x, store_x):
            assert NUMBER.match(cell), (name, cells)
        # Dynamic mapping makes no geo_point of {lat, lon}: the map's grid cannot run.
        assert (geotile == "n/a") if name == "dynamic" else NUMBER.match(geotile), name
        assert float(cpu) > 0 and float(store) > 0, name
    assert rows[BASELINE][-2:] == ["1.00", "1.00"]
    # The lean candidate indexed the lean documents: fewer bytes stored per document.
    assert float(rows[LEAN_DOCS][2]) < 0.9 * float(rows["envoygeo"][2])
    assert f"{LEAN_DOCS}: the same records with document.profile lean" in result.stderr
    assert "round 1/1 optimised:" in result.stderr
    # Every index this run made is gone.
    assert _bench_indices(es) <= before
