"""`document.profile: lean` plus `document.omit` in the real worker, real Kafka and
Elasticsearch: the documents leave out exactly those fields, keep every field the
dashboards aggregate on, and the dashboards' main aggregations still answer."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import Elasticsearch

from pipeline import native
from pipeline.bench.index import queries
from pipeline.schema import LEAN_OMIT
from tests.integration.harness import (
    ISTIO_LINE,
    produce,
    setup_worker_env,
    start_worker,
    started_line,
    stop_worker,
    wait_for_count,
    write_config,
)

pytestmark = pytest.mark.integration


def names(doc: dict[str, Any], prefix: str = "") -> set[str]:
    out = {prefix + k for k in doc}
    for k, v in doc.items():
        if isinstance(v, dict):
            out |= names(v, prefix + k + ".")
    return out


def test_worker_writes_lean_documents(tmp_path: Path, kafka_bootstrap: str, es_url: str,
                                      es_client: Elasticsearch,
                                      unique: Callable[[str], str]) -> None:
    topic, index = unique("lean"), unique("eglean")
    cfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-g", index=index,
                       extra={"document": {"profile": "lean", "omit": ["user_agent"]}})
    setup_worker_env(cfg)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    lines = [ISTIO_LINE.format(ts=ts, n=i, size=10 + i, client=f"198.51.100.{i % 7 + 1}",
                               port=4000 + i).encode() for i in range(80)]
    # Fluent Bit's envelope with the kubernetes metadata lean leaves out (but the
    # namespace), and one line no format matches (its event.original must stay).
    lines[:20] = [orjson.dumps({"log": x.decode(), "stream": "stdout", "kubernetes": {
        "pod_name": "gw-1", "namespace_name": "istio-system", "host": "node-1",
        "labels": {"app": "gw"}}}) for x in lines[:20]]
    lines.append(b"this is not an access log line")
    produce(kafka_bootstrap, topic, lines)
    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        assert wait_for_count(es_client, index, len(lines), procs=[worker]) == len(lines)
    finally:
        assert stop_worker(worker) == 0
    es_client.indices.refresh(index=index)
    hits = es_client.search(index=index, size=200)["hits"]["hits"]
    assert len(hits) == len(lines)
    for hit in hits:
        doc = hit["_source"]
        present = names(doc)
        for gone in (*LEAN_OMIT, "user_agent"):
            assert gone not in present, (gone, doc)
        assert "@timestamp" in doc and "kind" in doc["event"]
        if "envoygeo_parse_failure" in str(doc.get("tags")):
            assert doc["event"]["original"] == "this is not an access log line"
            continue
        assert doc["source"]["ip"].startswith("198.51.100.")
        assert doc["url"]["domain"] == "shop.example.com" and doc["url"]["path"]
        assert doc["http"]["response"]["status_code"] == 200
        assert doc["envoygeo"]["rate"] and doc["envoygeo"]["ip_source"]
    k8s = [h["_source"]["kubernetes"] for h in hits if "kubernetes" in h["_source"]]
    assert k8s == [{"namespace_name": "istio-system"}] * 20
    live = es_client.indices.get_mapping(index=index)[index]["mappings"]
    for name, search in queries(live, True).items():
        if search is None:
            continue
        answer = es_client.search(index=index, **search)
        assert answer["hits"]["total"]["value"] > 0, name
    start = started_line(tmp_path / "worker.log")
    assert start["document"] == {"profile": "lean", "omitted": [*LEAN_OMIT, "user_agent"]}
    assert (start["native"] == "on") == native.available()
