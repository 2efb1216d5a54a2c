"""`envoygeo run` reads what a real Fluent Bit 5.1.1 wrote to Kafka, in every `out_kafka`
format, from the real Kafka into the real Elasticsearch.

The values are the captured bytes of tests/data/fluent-bit-5.1.1/kafka-records.jsonl
(7 variants x 24 records: `format json` with double, iso8601 and iso8601_ns
timestamps, with message keys, `format msgpack`, `format raw`), produced as they
were captured (value and key) into one single-partition topic, with malformed
msgpack records among them. No envelope is configured: each record's is detected.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    count_docs,
    create_topic,
    log_messages,
    read_topic,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_committed,
    wait_for_count,
    write_config,
)

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "fluent-bit-5.1.1"
MALFORMED = [b"\x85\xaa@timestamp\xcb", b"\x82\xa3log\xa2ab\xc1", b"\x81\xa3log\xa2\xff\xfe"]


def captured() -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in (CAPTURES / "kafka-records.jsonl").read_bytes().splitlines()]


def reference_docs() -> list[dict[str, Any]]:
    """Each expected line alone (a bare record), through the Python reference."""
    from pipeline.clientip import ClientIpResolver
    from pipeline.decode.parser import make_parser
    from pipeline.process import RecordProcessor
    proc = RecordProcessor(make_parser("auto"), ClientIpResolver())
    lines = [orjson.loads(x)["log"]
             for x in (CAPTURES / "expected-records.jsonl").read_bytes().splitlines()]
    docs = [proc.process(line.encode()) for line in lines]
    assert proc.failed == 0 and len(docs) == 24
    return [d for d in docs if d is not None]


@pytest.mark.integration
def test_every_captured_format_indexed_and_malformed_msgpack_dead_lettered(
        tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> None:
    topic, index = unique("fbformats"), unique("egfbformats")
    create_topic(kafka_bootstrap, topic, partitions=1)
    cfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-group", index=index,
                       extra={"parse": {"unparsed": "dead_letter"}})
    setup_worker_env(cfg)
    records = captured()
    # The malformed records go after each variant's record n=16 (the long joined line).
    values: list[tuple[bytes, bytes | None, str, int]] = []  # value, key, variant, n
    for i, rec in enumerate(records):
        key = None if rec["key"] is None else base64.b64decode(rec["key"])
        values.append((base64.b64decode(rec["value_b64"]), key, rec["variant"], i % 24 + 1))
        if i % 24 == 15 and rec["variant"] == "msgpack":
            values += [(bad, None, "malformed", 0) for bad in MALFORMED]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True,
                         "message.max.bytes": 4 * 1024 * 1024})
    for value, key, _, _ in values:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0
    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        assert wait_for_count(es_client, index, len(records), procs=[worker]) == len(records)
        assert wait_for_committed(kafka_bootstrap, f"{topic}-group", topic,
                                  len(values)) == len(values)
        dead = read_topic(kafka_bootstrap, f"{topic}-dlq", expect=len(MALFORMED))
    finally:
        assert stop_worker(worker) == 0
    assert count_docs(es_client, index) == len(records)
    assert sorted(m.value() for m in dead) == sorted(MALFORMED)
    assert all(dict(m.headers())["envoygeo.stage"] == b"parse" for m in dead)
    summary = [m for m in log_messages(tmp_path / "worker.log") if m.startswith("summary: ")]
    counted = re.search(r"(\d+) indexed, (\d+) dead-lettered, (\d+) unparsed", summary[-1])
    assert counted is not None
    assert counted.groups() == (str(len(records)), str(len(MALFORMED)), str(len(MALFORMED)))

    hits = es_client.search(index=index, size=500, sort=["_doc"])["hits"]["hits"]
    by_id = {h["_id"]: h["_source"] for h in hits}
    refs = reference_docs()
    for offset, (_, _, variant, n) in enumerate(values):
        if variant == "malformed":
            continue
        doc, ref = by_id[f"{topic}-0-{offset}"], refs[n - 1]
        where = f"{variant} n={n}"
        assert doc.get("source", {}).get("ip") == ref.get("source", {}).get("ip"), where
        for field in ("url", "http", "user_agent", "destination"):  # none for the TCP line
            assert doc.get(field) == ref.get(field), (where, field)
        # @timestamp is the request's start as the line logs it (Envoy: milliseconds),
        # the same whatever precision the envelope's own time had.
        assert (doc["@timestamp"], doc["envoygeo"]["timestamp_source"]) == \
            (ref["@timestamp"], "log"), where
        assert doc["envoygeo"]["envelope"] == ("bare" if variant == "raw" else "fluent-bit")
    clients = {d["source"]["ip"] for d in by_id.values() if "source" in d}
    assert "127.0.0.5" in clients
    paths = {d["url"]["path"] for d in by_id.values() if "url" in d}
    assert "/café/日本" in paths  # the non-ASCII line, from escaped JSON, msgpack and raw
