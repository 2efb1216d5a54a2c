"""`envoygeo bench e2e --profiles full,lean` against the real Kafka and Elasticsearch with
a tiny corpus: each run drains under both document profiles, the paired ratio is printed,
and the lean workers' documents are the lean ones (figures are the benchmark's
business)."""

from __future__ import annotations

import re

from click.testing import CliRunner

from pipeline.cli import main


def test_bench_e2e_drains_under_both_profiles(kafka_bootstrap: str, es_url: str) -> None:
    result = CliRunner().invoke(main, ["bench", "e2e", "-n", "20000", "--runs", "1",
                                       "--batch", "500", "--profiles", "full,lean",
                                       "--kafka", kafka_bootstrap, "--es", es_url])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for label in ("1 worker ", "2 workers ", "1 worker, lean ", "2 workers, lean "):
        assert re.search(rf"^{label}\s+[\d,]+ docs/s  ratio to ceiling \d+\.\d\d", out, re.M), \
            (label, out)
    assert re.search(r"^1 worker, lean / 1 worker: \d+\.\d\dx drain rate", out, re.M), out
    assert "run 1/1:" in result.stderr


def test_bench_e2e_refuses_an_unknown_profile() -> None:
    result = CliRunner().invoke(main, ["bench", "e2e", "--profiles", "full,tiny"])
    assert result.exit_code == 2
    assert "--profiles" in result.output and "full, lean" in result.output
