"""`envoygeo dead-letters show|replay` against the real Kafka, Elasticsearch and worker:
a plugin's outage dead-letters batches, `show` counts them, the fix (the plugin
disabled) and `replay` put them back, the worker indexes each exactly once, and a
second replay copies nothing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    ISTIO_LINE,
    cli,
    free_port,
    produce,
    read_topic,
    scrape_metric,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_count,
    write_config,
)
from tests.integration.test_plugins_worker import install_flaky_plugin

pytestmark = pytest.mark.integration


def test_dead_letters_shown_and_replayed_once(
        tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    install_flaky_plugin(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}:{os.environ.get('PYTHONPATH', '')}")
    topic, index, mport = unique("dlq"), unique("egdlq"), free_port()
    cfg = write_config(tmp_path / "broken.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-g", index=index,
                       extra={"plugins": {"enabled": ["flaky"], "on_error": "dead_letter"},
                              "parse": {"unparsed": "dead_letter"},
                              "metrics": {"port": mport}})
    setup_worker_env(cfg)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    poison = [ISTIO_LINE.format(ts=ts, n=i, size=10, port=5000 + i, client="192.0.2.66")
              .encode() for i in range(10)]
    garbage = [f"not an access log {i}".encode() for i in range(3)]
    produce(kafka_bootstrap, topic, poison + garbage)
    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                if scrape_metric(mport, "envoygeo_records_dead_lettered_total") >= 13:
                    break
            except OSError:
                pass  # its metrics server is not listening yet
            time.sleep(0.5)
        assert scrape_metric(mport, "envoygeo_records_dead_lettered_total",
                             {"stage": "plugin"}) == 10
        assert scrape_metric(mport, "envoygeo_records_dead_lettered_total",
                             {"stage": "parse"}) == 3
    finally:
        assert stop_worker(worker) == 0

    shown = cli("dead-letters", "show", "-c", str(cfg))
    assert shown.returncode == 0, shown.stderr
    assert f"{topic}-dlq: 13 dead letter(s) — plugin 10, parse 3" in shown.stdout
    assert ("10  plugin enrichment plugin flaky failed: RuntimeError: poison client in "
            "the batch") in shown.stdout
    only_parse = cli("dead-letters", "show", "-c", str(cfg), "--stage", "parse")
    assert f"{topic}-dlq: 3 dead letter(s) — parse 3" in only_parse.stdout

    dry = cli("dead-letters", "replay", "-c", str(cfg), "--stage", "plugin", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"plugin: would replay 10 dead letter(s) from {topic}-dlq to {topic}" in dry.stdout

    # The fix: the plugin taken out of the configuration.
    fixed = yaml.safe_load(cfg.read_text())
    fixed["plugins"] = {"enabled": []}
    cfg_fixed = tmp_path / "fixed.yaml"
    cfg_fixed.write_text(yaml.safe_dump(fixed))
    done = cli("dead-letters", "replay", "-c", str(cfg_fixed), "--stage", "plugin")
    assert done.returncode == 0, done.stderr
    assert (f"plugin: replayed 10 dead letter(s) from {topic}-dlq to {topic} "
            "(3 of other stages passed over)") in done.stdout
    again = cli("dead-letters", "replay", "-c", str(cfg_fixed), "--stage", "plugin")
    assert "plugin: replayed 0 dead letter(s)" in again.stdout  # its position moved

    source = read_topic(kafka_bootstrap, topic, expect=23)
    replayed = [m for m in source if dict(m.headers() or []).get("envoygeo.replayed_from")]
    assert len(source) == 23 and len(replayed) == 10
    assert sorted(m.value() for m in replayed) == sorted(poison)  # as they came
    first = {f"{topic}/{m.partition()}/{m.offset()}".encode() for m in source
             if m.value() in poison and not m.headers()}
    assert len(first) == 10  # each replayed copy names its original's position
    assert {dict(m.headers())["envoygeo.replayed_from"] for m in replayed} == first

    worker = start_worker(cfg_fixed, tmp_path / "worker.log")
    try:
        assert wait_for_count(es_client, index, 10, procs=[worker]) == 10
        time.sleep(2)  # nothing more comes
    finally:
        assert stop_worker(worker) == 0
    es_client.indices.refresh(index=index)
    assert es_client.count(index=index, query={"term": {"source.ip": "192.0.2.66"}})[
        "count"] == 10
    assert es_client.count(index=index)["count"] == 10

    missing = write_config(tmp_path / "missing.yaml", bootstrap=kafka_bootstrap,
                           es_url=es_url, topic=unique("nodlq"), group="g", index=index)
    out = cli("dead-letters", "show", "-c", str(missing))
    assert out.returncode == 1 and "dead-letter topic" in out.stderr, out.stderr
