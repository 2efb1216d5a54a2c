"""The bundled enrichment plugins in a real worker: `envoygeo setup` maps their fields in
the index template, the worker (compiled core on) reads the real Kafka topic, and the
documents in the real Elasticsearch carry `envoygeo.ip_lists` and the `user_agent.*`
fields, searchable as the template maps them; the plugin-error counter is exported."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from elasticsearch import Elasticsearch

from pipeline import native
from tests.integration.harness import (
    ISTIO_LINE,
    produce,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_count,
    write_config,
)

pytestmark = pytest.mark.integration

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"


def test_worker_indexes_plugin_fields(tmp_path: Path, kafka_bootstrap: str, es_url: str,
                                      es_client: Elasticsearch,
                                      unique: Callable[[str], str]) -> None:
    topic, index = unique("plug"), unique("egplug")
    deny = tmp_path / "deny.txt"
    deny.write_text("# scanners seen last week\n203.0.113.0/24\n")
    customers = tmp_path / "customers.txt"
    customers.write_text("198.51.100.0/24\n203.0.113.7\n")
    cfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-g", index=index, extra={"plugins": {
                           "enabled": ["ip_lists", "user_agent"],
                           "ip_lists": {"lists": {"deny": [str(deny)],
                                                  "customers": [str(customers)]}},
                           "user_agent": {}}})
    setup_worker_env(cfg)
    mapping = es_client.indices.get_index_template(name=index)
    assert mapping is not None  # setup made the template; its mappings are checked below
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    clients = ["203.0.113.7", "203.0.113.9", "198.51.100.4", "192.0.2.1"] * 25
    lines = [ISTIO_LINE.format(ts=ts, n=i, size=10, client=ip, port=4000 + i)
             .replace('"curl/8.5.0"', f'"{FIREFOX}"' if i % 2 else '"curl/8.5.0"')
             for i, ip in enumerate(clients)]
    produce(kafka_bootstrap, topic, [line.encode() for line in lines])
    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        assert wait_for_count(es_client, index, len(lines), procs=[worker]) == len(lines)
    finally:
        assert stop_worker(worker) == 0
    es_client.indices.refresh(index=index)

    def count(query: dict[str, object]) -> int:
        return int(es_client.count(index=index, query=query)["count"])

    assert count({"term": {"envoygeo.ip_lists": "deny"}}) == 50          # 203.0.113.7, .9
    assert count({"term": {"envoygeo.ip_lists": "customers"}}) == 50     # .7 and 198.51.100.4
    assert count({"bool": {"filter": [{"term": {"envoygeo.ip_lists": "deny"}},
                                      {"term": {"envoygeo.ip_lists": "customers"}}]}}) == 25
    assert count({"bool": {"must_not": {"exists": {"field": "envoygeo.ip_lists"}}}}) == 25
    assert count({"term": {"user_agent.name": "Firefox"}}) == 50
    assert count({"term": {"user_agent.os.name": "Linux"}}) == 50
    assert count({"term": {"tags": "envoygeo_plugin_failed"}}) == 0
    field_caps = es_client.field_caps(index=index, fields=["envoygeo.ip_lists", "user_agent.name"])
    assert field_caps["fields"]["envoygeo.ip_lists"]["keyword"]["searchable"] is True
    assert set(field_caps["fields"]["user_agent.name"]) == {"keyword"}
    log = [orjson.loads(x) for x in (tmp_path / "worker.log").read_bytes().splitlines()
           if x.startswith(b"{")]
    (start,) = [x for x in log if x.get("message") == "envoygeo worker started"]
    assert start["plugins"] == ["ip_lists", "user_agent"]
    assert (start["native"] == "on") == native.available()  # the compiled path spliced them
