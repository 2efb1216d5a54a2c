"""The bundled enrichment plugins in a real worker: `envoygeo setup` maps their fields in
the index template, the worker (compiled core on) reads the real Kafka topic, and the
documents in the real Elasticsearch carry `envoygeo.ip_lists` and the `user_agent.*`
fields, searchable as the template maps them; the plugin-error counter is exported."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from pipeline import native
from tests.integration.harness import (
    ISTIO_LINE,
    free_port,
    produce,
    read_topic,
    scrape_metric,
    setup_worker_env,
    start_worker,
    started_line,
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
    start = started_line(tmp_path / "worker.log")
    assert start["plugins"] == ["ip_lists", "user_agent"]
    assert (start["native"] == "on") == native.available()  # the compiled path spliced them


FLAKY_PLUGIN = '''
from pipeline import EnricherPlugin, Field, PluginBatch


class Flaky(EnricherPlugin):
    """Marks every record, but fails any batch that holds the poison client."""

    fields = (Field("flaky.state", "keyword", "Set by the flaky test plugin."),)

    def enrich(self, batch: PluginBatch) -> list[dict[str, str] | None]:
        if "192.0.2.66" in batch.client_ip:
            raise RuntimeError("poison client in the batch")
        return [{"flaky.state": "ok"} for _ in batch.client_ip]
'''


def install_flaky_plugin(site: Path) -> None:
    """A third-party plugin installed the way pip leaves one (a module and a dist-info
    with its `envoygeo.enrichers` entry point) in a directory put on PYTHONPATH."""
    site.mkdir()
    (site / "flaky_plugin.py").write_text(FLAKY_PLUGIN)
    dist = site / "flaky_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[envoygeo.enrichers]\nflaky = flaky_plugin:Flaky\n")


@pytest.mark.parametrize("on_error", ["index", "dead_letter"])
def test_a_failing_third_party_plugin_in_the_real_worker(
        on_error: str, tmp_path: Path, kafka_bootstrap: str, es_url: str,
        es_client: Elasticsearch, unique: Callable[[str], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry-point plugin that fails some batches: the worker keeps running; with
    `plugins.on_error: index` every record is indexed (the failed batches' tagged, without
    the plugin's field), with `dead_letter` the failed batches go whole to the real
    dead-letter topic (stage plugin, the plugin's error) and nothing else is lost."""
    install_flaky_plugin(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}:{os.environ.get('PYTHONPATH', '')}")
    topic, index, mport = unique("flaky"), unique("egflaky"), free_port()
    cfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-g", index=index,
                       extra={"plugins": {"enabled": ["flaky"], "on_error": on_error},
                              "metrics": {"port": mport}})
    setup_worker_env(cfg)  # maps flaky.state: the plugin's field joined the field table
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())

    def lines(start: int, n: int, poison_every: int = 0) -> list[bytes]:
        return [ISTIO_LINE.format(ts=ts, n=i, size=10, port=4000 + i, client=(
            "192.0.2.66" if poison_every and i % poison_every == 0 else "198.51.100.4"))
            .encode() for i in range(start, start + n)]

    produce(kafka_bootstrap, topic, lines(0, 40))
    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        assert wait_for_count(es_client, index, 40, procs=[worker]) == 40
        produce(kafka_bootstrap, topic, lines(40, 20, poison_every=4))  # 5 poison records
        if on_error == "index":
            assert wait_for_count(es_client, index, 60, procs=[worker]) == 60
            dead: list[object] = []
        else:
            # The 20 may come in one batch or several: wait until every record is
            # either indexed or dead-lettered, then read what the topic holds.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and worker.poll() is None:
                es_client.indices.refresh(index=index)
                done = int(es_client.count(index=index)["count"]) + scrape_metric(
                    mport, "envoygeo_records_dead_lettered_total", {"stage": "plugin"})
                if done >= 60:
                    break
                time.sleep(0.5)
            dead = read_topic(kafka_bootstrap, f"{topic}-dlq", expect=max(5, int(
                scrape_metric(mport, "envoygeo_records_dead_lettered_total",
                              {"stage": "plugin"}))))
        errors = scrape_metric(mport, "envoygeo_plugin_errors_total", {"plugin": "flaky"})
        plugin_dead = scrape_metric(mport, "envoygeo_records_dead_lettered_total",
                                    {"stage": "plugin"})
        assert worker.poll() is None  # still running
    finally:
        assert stop_worker(worker) == 0
    es_client.indices.refresh(index=index)

    def count(query: dict[str, object]) -> int:
        return int(es_client.count(index=index, query=query)["count"])

    poison = {"term": {"source.ip": "192.0.2.66"}}
    tagged = {"term": {"tags": "envoygeo_plugin_failed"}}
    marked = {"term": {"flaky.state": "ok"}}
    assert errors >= 1
    if on_error == "index":
        assert count(poison) == 5 and count({"bool": {"filter": [poison, tagged]}}) == 5
        assert count(tagged) + count(marked) == 60 and count(marked) >= 40
        assert plugin_dead == 0
    else:
        headers = [dict(m.headers()) for m in dead]  # type: ignore[attr-defined]
        assert {h["envoygeo.stage"] for h in headers} == {b"plugin"}
        assert {h["envoygeo.error"] for h in headers} == {
            b"enrichment plugin flaky failed: RuntimeError: poison client in the batch"}
        sources = [h["envoygeo.source"] for h in headers]
        assert len(set(sources)) == len(sources)  # each record dead-lettered once
        poisoned = [m for m in dead if b"192.0.2.66" in m.value()]  # type: ignore[attr-defined]
        assert len(poisoned) == 5 and count(poison) == 0  # every poison record dead
        assert count(tagged) == 0 and count(marked) == 60 - len(dead)  # the rest enriched
        assert plugin_dead == len(dead) and count({"match_all": {}}) == 60 - len(dead)
