"""The local Elasticsearch node (deploy/local/services/elasticsearch.sh) works with the
official Python client: product check, composable templates, _bulk per-item errors and
the aggregations envoygeo's dashboards rely on (terms, date_histogram, geotile_grid).

The node is assembled from Maven Central jars (server + transport-netty4), so these tests
also pin down that nothing we depend on lives in a module the assembly lacks.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local" / "services" / "elasticsearch.sh"
ES_URL = os.environ.get("ENVOYGEO_TEST_ES", "http://127.0.0.1:9200")


def _script(*args: str) -> str:
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(f"elasticsearch.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def es() -> Iterator[Elasticsearch]:
    # `start` is idempotent: it returns at once when the node already answers.
    line = _script("start")
    assert line.startswith("elasticsearch http://"), line
    client = Elasticsearch(ES_URL, request_timeout=60)
    yield client
    client.close()


@pytest.fixture
def name() -> str:
    return f"envoygeo-estest-{uuid.uuid4().hex[:10]}"


def test_info_reports_version_and_passes_product_check(es: Elasticsearch) -> None:
    resp = es.info()  # raises UnsupportedProductError if the product header were missing
    assert resp.meta.headers.get("x-elastic-product") == "Elasticsearch"
    assert resp["version"]["number"] == _script("version")
    assert resp["version"]["number"].split(".")[0] == "9"
    assert resp["tagline"] == "You Know, for Search"
    assert es.ping()
    modules = {
        m["name"]
        for node in es.nodes.info(metric="plugins")["nodes"].values()
        for m in node["modules"]
    }
    assert {"transport-netty4", "rest-root"} <= modules


# Five good documents; the sixth has an address that is not an IP.
DOCS = [
    {"@timestamp": "2026-03-01T10:05:00Z", "client.ip": "192.0.2.1", "country": "FR",
     "location": {"lat": 48.8566, "lon": 2.3522}, "bytes": 100},
    {"@timestamp": "2026-03-01T10:40:00Z", "client.ip": "2001:db8::1", "country": "FR",
     "location": {"lat": 48.86, "lon": 2.34}, "bytes": 200},
    {"@timestamp": "2026-03-01T11:15:00Z", "client.ip": "198.51.100.7", "country": "DE",
     "location": "52.52,13.405", "bytes": 300},
    {"@timestamp": "2026-03-01T11:59:59Z", "client.ip": "203.0.113.9", "country": "US",
     "location": {"lat": 40.7128, "lon": -74.006}, "bytes": 400},
    {"@timestamp": "2026-03-01T13:00:00Z", "client.ip": "192.0.2.55", "country": "AU",
     "location": [151.2093, -33.8688], "bytes": 500},
    {"@timestamp": "2026-03-01T13:30:00Z", "client.ip": "999.1.1.1", "country": "FR",
     "location": {"lat": 48.8566, "lon": 2.3522}, "bytes": 600},
]


def test_templates_bulk_errors_and_aggregations(es: Elasticsearch, name: str) -> None:
    component, template, index = f"{name}-mappings", f"{name}-template", f"{name}-000001"
    es.cluster.put_component_template(name=component, template={
        "mappings": {
            "dynamic": "strict",
            "properties": {
                "@timestamp": {"type": "date"},
                "client": {"properties": {"ip": {"type": "ip"}}},
                "country": {"type": "keyword"},
                "location": {"type": "geo_point"},
                "bytes": {"type": "long"},
            },
        },
    })
    es.indices.put_index_template(
        name=template,
        index_patterns=[f"{name}-*"],
        composed_of=[component],
        priority=500,
        template={"settings": {"number_of_shards": 1, "number_of_replicas": 0}},
    )
    try:
        ops: list[dict[str, object]] = []
        for i, doc in enumerate(DOCS):
            ops += [{"index": {"_index": index, "_id": str(i)}}, doc]
        resp = es.bulk(operations=ops, refresh="wait_for")

        # Exactly the bad address fails, with a 400 for that item only.
        assert resp["errors"] is True
        items = [item["index"] for item in resp["items"]]
        assert [it["status"] for it in items] == [201, 201, 201, 201, 201, 400]
        error = items[5]["error"]
        assert error["type"] in ("document_parsing_exception", "mapper_parsing_exception")
        assert "client.ip" in error["reason"]
        assert "999.1.1.1" in error["caused_by"]["reason"]

        # The index took its mappings and settings from the composable template.
        mapping = es.indices.get_mapping(index=index)[index]["mappings"]["properties"]
        assert mapping["client"]["properties"]["ip"]["type"] == "ip"
        assert mapping["location"]["type"] == "geo_point"
        settings = es.indices.get_settings(index=index)[index]["settings"]["index"]
        assert settings["number_of_replicas"] == "0"
        assert es.count(index=index)["count"] == 5

        # ip fields answer CIDR queries.
        in_net = es.search(index=index, query={"term": {"client.ip": "192.0.2.0/24"}}, size=10)
        assert sorted(h["_id"] for h in in_net["hits"]["hits"]) == ["0", "4"]

        aggs = es.search(index=index, size=0, aggs={
            "countries": {"terms": {"field": "country"}},
            "per_hour": {"date_histogram": {"field": "@timestamp", "fixed_interval": "1h"},
                         "aggs": {"bytes": {"sum": {"field": "bytes"}}}},
            "tiles": {"geotile_grid": {"field": "location", "precision": 6}},
        })["aggregations"]

        assert [(b["key"], b["doc_count"]) for b in aggs["countries"]["buckets"]] == [
            ("FR", 2), ("AU", 1), ("DE", 1), ("US", 1),
        ]
        assert [
            (b["key_as_string"], b["doc_count"], b["bytes"]["value"])
            for b in aggs["per_hour"]["buckets"]
        ] == [
            ("2026-03-01T10:00:00.000Z", 2, 300.0),
            ("2026-03-01T11:00:00.000Z", 2, 700.0),
            ("2026-03-01T12:00:00.000Z", 0, 0.0),
            ("2026-03-01T13:00:00.000Z", 1, 500.0),
        ]
        # Web-mercator tiles z/x/y at zoom 6: Paris (2 docs), Berlin, New York, Sydney.
        assert sorted((b["key"], b["doc_count"]) for b in aggs["tiles"]["buckets"]) == [
            ("6/18/24", 1), ("6/32/22", 2), ("6/34/20", 1), ("6/58/38", 1),
        ]
    finally:
        es.indices.delete(index=index, ignore_unavailable=True)
        es.indices.delete_index_template(name=template)
        es.cluster.delete_component_template(name=component)


def test_strict_template_rejects_unknown_field_per_item(es: Elasticsearch, name: str) -> None:
    """A second kind of per-item error: a field the strict mapping does not know."""
    es.indices.create(index=name, mappings={
        "dynamic": "strict", "properties": {"country": {"type": "keyword"}},
    }, settings={"number_of_replicas": 0})
    try:
        resp = es.bulk(operations=[
            {"index": {"_index": name}}, {"country": "FR"},
            {"index": {"_index": name}}, {"country": "DE", "surprise": 1},
        ], refresh="wait_for")
        statuses = [item["index"]["status"] for item in resp["items"]]
        assert statuses == [201, 400]
        assert resp["items"][1]["index"]["error"]["type"] == "strict_dynamic_mapping_exception"
    finally:
        es.indices.delete(index=name)


def test_best_compression_codec_stores_and_reads_back(es: Elasticsearch, name: str) -> None:
    """index.codec=best_compression is zstd through native code (the system libzstd the
    start script links); without it the first flush fails and the shard turns red."""
    es.indices.create(index=name, settings={
        "index.codec": "best_compression", "number_of_shards": 1, "number_of_replicas": 0,
    })
    try:
        docs = [{"country": c, "n": i} for i, c in enumerate(["FR", "DE", "US"] * 50)]
        ops: list[dict[str, object]] = []
        for i, doc in enumerate(docs):
            ops += [{"index": {"_index": name, "_id": str(i)}}, doc]
        assert es.bulk(operations=ops)["errors"] is False
        flushed = es.indices.flush(index=name)
        assert flushed["_shards"]["failed"] == 0
        es.indices.forcemerge(index=name, max_num_segments=1)
        es.indices.refresh(index=name)
        assert es.cluster.health(index=name)["status"] == "green"
        assert es.get(index=name, id="149")["_source"] == {"country": "US", "n": 149}
        assert es.count(index=name)["count"] == 150
    finally:
        es.indices.delete(index=name)
