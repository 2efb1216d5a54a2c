"""End to end, all real: HAProxy (PROXY v1/v2) -> Envoy 1.40 -> Fluent Bit-shaped records
-> Kafka -> `envoygeo run` -> Elasticsearch. Documents must carry the address each client
had at HAProxy (never HAProxy's own), with the place the test database gives it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from elasticsearch import Elasticsearch

from pipeline.lab.demo import DemoPlan, run_demo
from tests.mmdb_fixtures import PLACES, expected, write_city


def test_haproxy_envoy_kafka_worker_elasticsearch(
    tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
    unique: Callable[[str], str],
) -> None:
    # Clients the test database knows (IPv4 and IPv6), plus one it does not.
    known = list(PLACES)
    city_db = write_city(tmp_path / "city.mmdb")
    index, topic = unique("e2e"), unique("e2e-topic")
    plan = DemoPlan(requests=120, burst=60, alert_threshold=50, pace_per_s=400,
                    clients=(*known, "8.8.8.8"), hot_client=known[0])

    outcome = run_demo(plan, bootstrap=kafka_bootstrap, es_url=es_url, topic=topic, index=index,
                       geoip_city=str(city_db), workdir=tmp_path / "run", say=lambda m: None)

    assert outcome["worker_exit"] == 0
    assert outcome["sent"] == outcome["shipped"] == outcome["indexed"] == 180
    es_client.indices.refresh(index=index)
    by_ip = es_client.search(index=index, size=0, aggs={"ip": {"terms": {"field": "source.ip",
                                                                         "size": 50}}})
    seen = {b["key"] for b in by_ip["aggregations"]["ip"]["buckets"]}
    assert seen <= {*known, "8.8.8.8"}, f"unexpected client addresses: {seen}"
    assert "127.0.0.1" not in seen and "::1" not in seen  # HAProxy's own address never wins
    for ip in seen & set(known):
        hit = es_client.search(index=index, size=1, query={"term": {"source.ip": ip}})
        src = hit["hits"]["hits"][0]["_source"]
        want = expected(ip)["geo"]
        geo = src["source"]["geo"]
        for key in ("country_iso_code", "country_name", "city_name", "region_iso_code",
                    "continent_code", "timezone", "postal_code"):
            assert geo[key] == want[key], (ip, key)
        assert geo["location"]["lat"] == pytest_approx(want["location"]["lat"])
        assert src["envoygeo"]["ip_source"] == "proxy_protocol"
        assert "127.0.0.1" in src["related"]["ip"]  # the balancer is kept, as related only
    unknown = es_client.search(index=index, size=1, query={"term": {"source.ip": "8.8.8.8"}})
    if unknown["hits"]["hits"]:
        assert "geo" not in unknown["hits"]["hits"][0]["_source"]["source"]
    alerts = es_client.search(index=f"{index}-alerts", size=10)["hits"]["hits"]
    assert [a["_source"]["source"]["ip"] for a in alerts] == [known[0]]


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, abs=1e-4)
