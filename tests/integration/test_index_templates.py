"""The shipped templates on the real Elasticsearch: the access-log index keeps a synthetic
_source (issue 15: half the store) that still reads back as the worker wrote it, and the
alerts index, which `envoygeo policy` reads back, keeps the exact _source."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from elasticsearch import Elasticsearch

from pipeline.bench.core import corpus
from pipeline.bench.enrich_micro import default_geoip_path
from pipeline.config import Settings
from pipeline.enricher import Enricher
from pipeline.schema import index_templates
from pipeline.setup import install_templates


def _round_locations(doc: Any) -> Any:
    """geo_point reads back quantised from a synthetic _source (~1e-8 degrees)."""
    if isinstance(doc, dict):
        if set(doc) == {"lat", "lon"}:
            return {k: round(v, 6) for k, v in doc.items()}
        return {k: _round_locations(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_round_locations(v) for v in doc]
    return doc


def test_logs_source_is_synthetic_and_reads_back_as_written(
        es_url: str, unique: Callable[[str], str]) -> None:
    es = Elasticsearch(es_url, request_timeout=60)
    name = unique("tpl-logs")
    alerts = unique("tpl-alerts")
    settings = Settings.model_validate({"elasticsearch": {
        "hosts": [es_url], "index": name, "alerts_index": alerts},
        "geoip": {"city": default_geoip_path()}})
    records, _ = corpus(300, 100)
    docs = [r.document for r in Enricher.from_settings(settings).enrich_batch(records)[0]]
    assert len(docs) == 300 and all(d is not None for d in docs)
    written = [orjson.loads(d) for d in docs]  # type: ignore[arg-type]
    # The corpus has what synthetic _source could reshape: one-element arrays
    # (event.category), multi-element ones (related.ip) and GeoIP locations.
    assert all(d["event"]["category"] == ["web"] for d in written)
    assert sum(len(d.get("related", {}).get("ip", [])) > 1 for d in written) > 100
    assert sum("location" in d.get("source", {}).get("geo", {}) for d in written) > 100
    alert = {"@timestamp": "2026-11-29T01:13:00.665Z", "source": {"ip": "81.2.69.142",
             "geo": {"location": {"lat": -22.9068, "lon": -43.1729}}},
             "tags": ["b", "a"], "related": {"ip": ["81.2.69.142"]}}
    install_templates(es, settings)
    try:
        body = "".join(orjson.dumps({"index": {"_index": name, "_id": str(i)}}).decode()
                       + "\n" + d.decode() + "\n" for i, d in enumerate(docs))  # type: ignore[union-attr]
        result = es.bulk(operations=body, refresh=True)
        assert not result["errors"]
        es.index(index=alerts, id="a", document=alert, refresh=True)

        mode = es.indices.get_settings(index=name)[name]["settings"]["index"]["mapping"]
        assert mode == {"source": {"mode": "synthetic"}, "synthetic_source_keep": "arrays"}
        alerts_settings = es.indices.get_settings(index=alerts)[alerts]["settings"]["index"]
        assert "source" not in alerts_settings.get("mapping", {})

        got = {h["_id"]: h["_source"] for h in es.search(
            index=name, size=len(docs), query={"match_all": {}})["hits"]["hits"]}
        assert len(got) == len(docs)
        for i, doc in enumerate(written):
            assert _round_locations(got[str(i)]) == _round_locations(doc), i
        # The exact bytes' values, arrays in order (policy reads alerts back).
        assert es.get(index=alerts, id="a")["_source"] == alert
    finally:
        es.options(ignore_status=404).indices.delete(index=[name, alerts])
        for template in index_templates(name, alerts):
            es.options(ignore_status=404).indices.delete_index_template(name=template)

