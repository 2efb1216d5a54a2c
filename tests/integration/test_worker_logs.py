"""What a real worker writes to its log while the sink merely keeps it waiting, against the
real Kafka and Elasticsearch: backpressure pauses are DEBUG (not the "cannot keep up or
is down" warning of every pause), progress lines give the rate of their own interval,
and the Elasticsearch client's per-request lines are DEBUG."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    ROOT,
    access_records,
    create_topic,
    produce,
    setup_worker_env,
    stop_worker,
    wait_for_count,
    write_config,
)


def _entries(log_path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in log_path.read_bytes().splitlines():
        entry = orjson.loads(raw)  # every line JSON: librdkafka's and the client's too
        assert isinstance(entry, dict), raw
        out.append(entry)
    return out


def test_backpressure_pauses_are_not_warnings(tmp_path: Path, kafka_bootstrap: str,
                                              es_url: str, es_client: Elasticsearch,
                                              unique: Callable[[str], str]) -> None:
    topic, index = unique("wlogs"), unique("egtest")
    create_topic(kafka_bootstrap, topic)
    # One batch in flight and a 1 ms wait for it: nearly every batch pauses fetching
    # while its bulk request is out (tens of ms), the momentary backpressure that used
    # to log "paused fetching: the sink cannot keep up or is down" each time.
    cfg = write_config(tmp_path / "w.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-group", index=index, extra={
                           "worker": {"max_inflight_batches": 1, "backpressure_wait_s": 0.001},
                           "kafka": {"batch_max_records": 200},
                           "metrics": {"progress_interval_s": 0.1}})
    setup_worker_env(cfg)
    n = 3000
    produce(kafka_bootstrap, topic, access_records(n))
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "-c", str(cfg), "--log-level", "DEBUG"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert wait_for_count(es_client, index, n, procs=[proc]) == n
    finally:
        assert stop_worker(proc) == 0
    entries = _entries(log_path)

    pauses = [e for e in entries if str(e["message"]).startswith("paused fetching")]
    assert any(e["log.level"] == "debug" for e in pauses), "no backpressure pause happened"
    assert [e for e in pauses if e["log.level"] != "debug"] == []
    resumes = [e for e in entries if str(e["message"]).startswith("resumed fetching")]
    assert resumes and all(e["log.level"] == "debug" for e in resumes)

    progress = [e for e in entries if str(e["message"]).startswith("progress: ")]
    assert progress and all(" rec/s over the last " in str(e["message"]) for e in progress)
    assert all("records_per_s" in e and "records_per_s_average" in e for e in progress)
    # Progress goes on while paused, and says so (it used to stop until the resume).
    assert any(str(e["message"]).endswith(", paused") for e in progress), progress
    summary = [e for e in entries if str(e["message"]).startswith("summary: ")]
    assert len(summary) == 1 and " rec/s average over " in str(summary[0]["message"])

    client = [e for e in entries if str(e["log.logger"]).startswith("elastic_transport")]
    bulk = [e for e in client if "/_bulk" in str(e["message"])]
    assert bulk, "the client's request lines should be there at DEBUG"
    assert all(e["log.level"] == "debug" for e in bulk), bulk[:3]
