"""The sink's metrics against the real Elasticsearch: item errors by the status the node
really answers, bytes out equal to the bodies sent, retries (requests and items) counted
as the sink backs off from a refused connection, and what the log says meanwhile."""

from __future__ import annotations

import io
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from elasticsearch import Elasticsearch
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import ElasticsearchSettings
from pipeline.logs import setup_logging
from pipeline.metrics import Metrics
from pipeline.sinks.elasticsearch import BulkItem, ElasticsearchSink, SinkStopped, encode_items


def samples(m: Metrics) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture
def indices(es_client: Elasticsearch) -> Iterator[tuple[str, str]]:
    """An index with a typed field and a write-blocked one (unique names)."""
    run = uuid.uuid4().hex[:8]
    typed, blocked = f"envoygeo-metrics-{run}", f"envoygeo-metrics-{run}-ro"
    es_client.indices.create(index=typed, mappings={"properties": {"n": {"type": "long"}}})
    es_client.indices.create(index=blocked, settings={"index.blocks.write": True})
    yield typed, blocked
    es_client.indices.delete(index=[typed, blocked], ignore_unavailable=True)


def test_item_errors_by_real_status_and_bytes_out(es_url: str,
                                                  indices: tuple[str, str]) -> None:
    typed, blocked = indices
    m = Metrics()
    sink = ElasticsearchSink(ElasticsearchSettings(hosts=[es_url]), observer=m)
    items = [BulkItem(typed, f"ok{i}", b'{"n":%d}' % i, b"raw", f"t/0/{i}") for i in range(3)]
    items.append(BulkItem(typed, "bad", b'{"n":"not a number"}', b"raw", "t/0/3"))
    items.append(BulkItem(blocked, "ro", b'{"n":4}', b"raw", "t/0/4"))
    try:
        rejected = sink.write(items)
    finally:
        sink.close()
    assert sorted(r.status for r in rejected) == [400, 403], rejected
    s = samples(m)
    assert s['envoygeo_es_item_errors_total{status="400"}'] == 1
    assert s['envoygeo_es_item_errors_total{status="403"}'] == 1
    assert len([k for k in s if k.startswith("envoygeo_es_item_errors_total{")]) == 2
    # Rejections are not retried: one request, its exact body.
    assert s["envoygeo_es_retries_total"] == 0 and s["envoygeo_es_item_retries_total"] == 0
    assert s["envoygeo_es_bytes_out_total"] == len(encode_items(items).body)
    assert s['envoygeo_bulk_seconds_count{outcome="ok"}'] == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_retries_counted_while_the_node_refuses_connections() -> None:
    """...and logged as an operator can read it: the sink's warning at attempts 1, 2,
    4, 8, ... with the cause, none of the client's per-failure node-pool warnings."""
    stream = io.StringIO()
    setup_logging("INFO")
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    m = Metrics()
    settings = ElasticsearchSettings(hosts=[f"http://127.0.0.1:{_closed_port()}"],
                                     retry_initial_backoff_ms=50, retry_max_backoff_ms=100)
    sink = ElasticsearchSink(settings, observer=m)
    items = [BulkItem("envoygeo-never", f"id{i}", b'{"n":1}', b"raw", f"t/0/{i}")
             for i in range(2)]
    stop = threading.Event()
    timer = threading.Timer(1.5, stop.set)
    timer.start()
    try:
        with pytest.raises(SinkStopped):
            sink.write(items, stop)
    finally:
        timer.cancel()
        sink.close()
        setup_logging("INFO")
    s: dict[str, Any] = samples(m)
    attempts = s['envoygeo_bulk_seconds_count{outcome="error"}']
    assert attempts >= 3, s  # 1.5 s of 50-100 ms backoffs
    # Every failed request was followed by a retry (the last one cut by the stop).
    assert s["envoygeo_es_retries_total"] == attempts
    assert s["envoygeo_es_item_retries_total"] == 2 * attempts
    assert s["envoygeo_es_bytes_out_total"] == attempts * len(encode_items(items).body)
    assert not sink.writable.is_set() and "ConnectionError" in sink.last_error
    entries = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert not [e for e in entries if str(e["log.logger"]).startswith("elastic_transport")]
    warned = [e["message"] for e in entries if "to retry" in e["message"]]
    assert all(e["log.level"] == "warning" for e in entries), entries
    powers = [a for a in (1, 2, 4, 8, 16, 32, 64) if a <= attempts]
    assert [int(str(w).split("(attempt ")[1].split(")")[0]) for w in warned] == powers, warned
    assert all("ConnectionError" in str(w) for w in warned)
