"""`privacy.client_ip` truncate and hash through `envoygeo run` against the real Kafka and
Elasticsearch: no indexed document holds a full client address anywhere in its
_source, while GeoIP, per-address rates and alerts still work on the full address."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import Elasticsearch

from pipeline.report.query import fetch
from pipeline.report.render import render
from pipeline.schema import ECS_VERSION
from tests.integration.harness import (
    ISTIO_LINE,
    create_topic,
    fluent_bit_record,
    produce,
    read_topic,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_count,
    write_config,
)
from tests.mmdb_fixtures import expected, write_city

pytestmark = pytest.mark.integration

KEY = "integration-hmac-key-0123456789"
# Two clients in one /24 (counted apart: rates key on the full address), one IPv6; all
# in the test City database. The XFF entry is never the client (no trusted proxy) but
# is stored, so it must be masked too.
CLIENTS = ("81.2.69.160", "81.2.69.161", "2a02:cf40::1")
XFF = "198.51.100.77"
FULL = (*CLIENTS, XFF)
PER_CLIENT = 100


def _records(base_ts: float) -> list[bytes]:
    out = []
    for i in range(PER_CLIENT * len(CLIENTS)):
        client = CLIENTS[i % len(CLIENTS)]
        ts = base_ts + i * 0.001
        stamp = ts_text(ts)
        shown = f"[{client}]" if ":" in client else client
        line = ISTIO_LINE.format(ts=stamp, n=i, size=100, client=shown, port=40000 + i)
        line = line.replace('"-" "curl/8.5.0"', f'"{XFF}, {client}" "curl/8.5.0"')
        out.append(fluent_bit_record(line, ts))
    # Unparsed lines: indexed with event.original, which must be scrubbed.
    out.append(fluent_bit_record(f"garbage from {CLIENTS[0]}:5555 via {XFF}", base_ts))
    out.append(fluent_bit_record(f"more garbage [{CLIENTS[2]}]:443", base_ts))
    return out


def ts_text(ts: float) -> str:
    import time

    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
            + f".{int(ts * 1000) % 1000:03d}Z")


def _all_sources(es: Elasticsearch, index: str) -> list[dict[str, Any]]:
    es.indices.refresh(index=index)
    hits = es.search(index=index, size=1000, query={"match_all": {}})["hits"]["hits"]
    return [h["_source"] for h in hits]


@pytest.mark.parametrize("mode", ["truncate", "hash"])
def test_indexed_documents_hold_no_full_address(
        mode: str, tmp_path: Path, kafka_bootstrap: str, es_url: str,
        es_client: Elasticsearch, unique: Callable[[str], str]) -> None:
    topic, index = unique(f"privacy-{mode}"), unique(f"egprivacy-{mode}")
    create_topic(kafka_bootstrap, topic, partitions=1)
    key_file = tmp_path / "hash.key"
    key_file.write_text(KEY + "\n")
    privacy: dict[str, Any] = {"client_ip": mode}
    if mode == "hash":
        privacy["hash_key_file"] = str(key_file)
    cfg = write_config(
        tmp_path / "c.yaml", bootstrap=kafka_bootstrap, es_url=es_url, topic=topic,
        group=f"{topic}-group", index=index, extra={
            "privacy": privacy, "geoip": {"city": str(write_city(tmp_path / "city.mmdb"))},
            "rates": {"windows": [10, 60],
                      "alerts": [{"name": "burst", "window_s": 10, "threshold": 50}]}})
    setup_worker_env(cfg)
    import time

    records = _records(time.time() - 30)
    produce(kafka_bootstrap, topic, records, keyed=False)
    log = tmp_path / "worker.log"
    worker = start_worker(cfg, log)
    try:
        assert wait_for_count(es_client, index, len(records), procs=[worker]) == len(records)
        alerts = read_topic(kafka_bootstrap, f"{topic}-alerts", expect=len(CLIENTS))
    finally:
        assert stop_worker(worker) == 0

    docs = _all_sources(es_client, index)
    assert len(docs) == len(records)
    for doc in docs:  # the whole _source, every field, as Elasticsearch returns it
        text = orjson.dumps(doc).decode()
        leaked = [ip for ip in FULL if ip in text]
        assert leaked == [], f"{leaked} in {text}"
    parsed = [d for d in docs if d["event"]["dataset"] == "envoygeo.access"]
    unparsed = [d for d in docs if d["event"]["dataset"] == "envoygeo.unparsed"]
    assert len(parsed) == PER_CLIENT * len(CLIENTS) and len(unparsed) == 2
    assert all(d["ecs"]["version"] == ECS_VERSION for d in docs)
    # GeoIP on the full address: each document has its client's place (req-<n>: client
    # n % 3; .161 shares .160's network in the database).
    for d in parsed:
        client = CLIENTS[int(d["http"]["request"]["id"][4:]) % len(CLIENTS)]
        want = expected(client.replace(".161", ".160"))["geo"]
        got = dict(d["source"]["geo"])
        # The logs index keeps a synthetic _source: geo_point reads back quantised.
        assert got.pop("location") == {k: pytest.approx(v, abs=1e-6)
                                       for k, v in want.pop("location").items()}
        assert got == want
    # Rates per full address: 81.2.69.160 and .161 share a /24 but were counted apart.
    assert max(d["envoygeo"]["rate"]["60s"] for d in parsed) == PER_CLIENT
    # Which path wrote them: the compiled core unless switched off; the mode is said.
    started = [orjson.loads(line) for line in log.read_bytes().splitlines()
               if b"envoygeo worker started" in line]
    assert len(started) == 1 and started[0]["privacy"] == mode
    native = os.environ.get("ENVOYGEO_NATIVE", "1") != "0"
    assert (started[0]["native"] == "on") == native, started[0]
    assert KEY not in log.read_text()

    if mode == "truncate":
        # source.ip stays an `ip`: the dashboards' top-address aggregation works on it.
        es_client.indices.refresh(index=index)
        agg = es_client.search(index=index, size=0, aggs={"top": {"terms": {
            "field": "source.ip"}}})["aggregations"]["top"]["buckets"]
        assert {b["key"]: b["doc_count"] for b in agg} == {
            "81.2.69.0": 2 * PER_CLIENT, "2a02:cf40::": PER_CLIENT}
        cidr = es_client.count(index=index, query={"term": {"source.ip": "81.2.69.0/24"}})
        assert cidr["count"] == 2 * PER_CLIENT
    else:
        ids = {hmac.new(KEY.encode(), ip.encode(), hashlib.sha256).hexdigest()[:32]
               for ip in CLIENTS}
        assert {d["envoygeo"]["client_id"] for d in parsed} == ids
        assert all("ip" not in d["source"] for d in parsed)
        agg = es_client.search(index=index, size=0, aggs={"top": {"terms": {
            "field": "envoygeo.client_id"}}})["aggregations"]["top"]["buckets"]
        assert sorted(b["doc_count"] for b in agg) == [PER_CLIENT] * len(CLIENTS)

    # The report lists top clients: networks under truncate, pseudonyms under hash.
    client = "envoygeo.client_id" if mode == "hash" else "source.ip"
    report = fetch(es_client, index, f"{index}-alerts", "1h", 25, client)
    assert len(report.ips) == (len(CLIENTS) if mode == "hash" else 2)
    assert ("Client (pseudonym)" in render(report)) == (mode == "hash")

    # Alerts keep the full address: they are what enforcement blocks.
    assert sorted(orjson.loads(a.value())["source"]["ip"] for a in alerts) == sorted(CLIENTS)
