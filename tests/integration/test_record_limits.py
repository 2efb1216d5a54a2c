"""`envoygeo run` against the real Kafka and Elasticsearch: no document without a
time, and no record costs more than the configured limits (issue 12, item 3).

* An unparsed record with no envelope time is indexed with `@timestamp` = its Kafka
  record timestamp and `envoygeo.timestamp_source: kafka`, so time-filtered views
  (the report, the "unparsed" panel) see it.
* A 30 KB user agent is indexed cut to `limits.max_field_bytes`, tagged and named;
  a 100 KB line is cut to `limits.max_line_bytes` (it then no longer parses), tagged,
  and its `event.original` is the cut line.

Run once with the compiled core and once with it switched off (ENVOYGEO_NATIVE=0),
since the worker takes a different path (`enrich_bulk` vs `enrich_batch`) for each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from elasticsearch import Elasticsearch

from pipeline.document import iso_timestamp
from tests.integration.harness import (
    ISTIO_LINE,
    create_topic,
    fluent_bit_record,
    log_messages,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_count,
    write_config,
)

pytestmark = pytest.mark.integration

MAX_LINE, MAX_FIELD = 65536, 8192


@pytest.mark.parametrize("native", ["1", "0"])
def test_kafka_time_and_limits_end_to_end(tmp_path: Path, kafka_bootstrap: str, es_url: str,
                                          es_client: Elasticsearch,
                                          unique: Callable[[str], str],
                                          monkeypatch: pytest.MonkeyPatch, native: str) -> None:
    monkeypatch.setenv("ENVOYGEO_NATIVE", native)
    topic, index = unique("limits"), unique("eglimits")
    create_topic(kafka_bootstrap, topic, partitions=1)
    cfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-group", index=index,
                       extra={"limits": {"max_line_bytes": MAX_LINE,
                                         "max_field_bytes": MAX_FIELD}})
    setup_worker_env(cfg)

    # A Kafka time well away from now, so it cannot be mistaken for ingest time.
    kafka_ms = (int(time.time()) - 7200) * 1000 + 123
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".250Z"
    agent = "Mozilla/5.0 " + "x" * 30_000
    line = ISTIO_LINE.format(ts=stamp, n=1, size=100, client="89.160.20.112", port=40001)
    assert '"curl/8.5.0"' in line
    records = {
        "unparsed": b"no access log here and no time either",
        "huge_agent": fluent_bit_record(line.replace('"curl/8.5.0"', f'"{agent}"'), now),
        "huge_line": b"A" * 100_000,
    }
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 1_000_000})
    for key, value in records.items():
        producer.produce(topic, value, key.encode(), timestamp=kafka_ms)
    assert producer.flush(30) == 0

    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        assert wait_for_count(es_client, index, 3, procs=[worker]) == 3
    finally:
        assert stop_worker(worker) == 0

    hits = es_client.search(index=index, size=10)["hits"]["hits"]
    docs = {}
    for h in hits:
        src = h["_source"]
        original = src.get("event", {}).get("original", "")
        key = ("huge_line" if original.startswith("AAAA") else
               "unparsed" if original.startswith("no access log") else "huge_agent")
        docs[key] = src
    assert set(docs) == set(records)

    unparsed = docs["unparsed"]
    assert unparsed["@timestamp"] == iso_timestamp(kafka_ms / 1000)
    assert unparsed["envoygeo"]["timestamp_source"] == "kafka"
    assert "_envoygeo_parse_failure" in unparsed["tags"]
    # ... and a time-filtered query finds it.
    window = {"range": {"@timestamp": {"gte": kafka_ms - 1000, "lte": kafka_ms + 1000,
                                       "format": "epoch_millis"}}}
    assert es_client.count(index=index, query=window)["count"] == 2  # + the huge line

    agent_doc = docs["huge_agent"]
    assert agent_doc["user_agent"]["original"] == agent[:MAX_FIELD]
    assert agent_doc["envoygeo"]["truncated"] == ["user_agent"]
    assert "envoygeo_field_truncated" in agent_doc["tags"]
    assert agent_doc["envoygeo"]["timestamp_source"] == "log"
    assert agent_doc["@timestamp"] == stamp
    assert agent_doc["source"]["ip"] == "89.160.20.112"  # the rest of the line still counts

    big = docs["huge_line"]
    assert big["event"]["original"] == "A" * MAX_LINE
    assert {"envoygeo_line_truncated", "_envoygeo_parse_failure"} <= set(big["tags"])
    assert big["envoygeo"]["timestamp_source"] == "kafka"

    # The operator reads it in the summary too, never silently.
    summary = [m for m in log_messages(tmp_path / "worker.log") if m.startswith("summary:")]
    assert summary and "1 lines cut to limits.max_line_bytes, 1 with fields cut" in summary[-1]
