"""`envoygeo run` against the real Kafka and Elasticsearch: delivery, dead letters, garbage."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    access_records,
    assert_exactly_once,
    committed_total,
    count_docs,
    create_topic,
    log_messages,
    produce,
    read_topic,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_committed,
    wait_for_count,
    write_config,
)


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> dict[str, Any]:
    topic, index = unique("worker"), unique("egtest")
    create_topic(kafka_bootstrap, topic)

    def config(name: str = "worker.yaml", **extra: Any) -> Path:
        return write_config(tmp_path / name, bootstrap=kafka_bootstrap, es_url=es_url,
                            topic=topic, group=f"{topic}-group", index=index, extra=extra)

    cfg = config()
    setup_worker_env(cfg)
    return {"topic": topic, "index": index, "group": f"{topic}-group", "config": config,
            "cfg": cfg, "tmp": tmp_path, "bootstrap": kafka_bootstrap, "es": es_client}


def test_run_refuses_to_start_without_templates(tmp_path: Path, kafka_bootstrap: str,
                                                es_url: str, unique: Callable[[str], str]) -> None:
    import subprocess
    import sys

    cfg = write_config(tmp_path / "c.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic="t", group="g", index=unique("never-set-up"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "run `envoygeo setup` first" in proc.stderr


def test_every_record_indexed_once_then_replay_overwrites(env: dict[str, Any]) -> None:
    es, n = env["es"], 3000
    produce(env["bootstrap"], env["topic"], access_records(n))
    worker = start_worker(env["cfg"], env["tmp"] / "worker.log")
    try:
        assert wait_for_count(es, env["index"], n, procs=[worker]) == n
    finally:
        assert stop_worker(worker) == 0
    assert_exactly_once(es, env["index"], n)
    assert committed_total(env["bootstrap"], env["group"], env["topic"]) == n

    doc = es.search(index=env["index"], size=1, query={"term": {"http.request.id": "req-7"}})
    src = doc["hits"]["hits"][0]["_source"]
    assert src["source"]["ip"] == "89.160.20.112"
    assert src["kubernetes"]["pod_name"].startswith("istio-ingressgateway")
    assert src["envoygeo"]["rate"]["10s"] >= 1
    assert src["url"]["domain"] == "shop.example.com"

    # A new consumer group replays the whole topic: documents overwrite, none are added.
    replay = env["config"]("replay.yaml", kafka={"group_id": env["group"] + "-replay"})
    worker = start_worker(replay, env["tmp"] / "replay.log")
    try:
        assert wait_for_committed(env["bootstrap"], env["group"] + "-replay", env["topic"], n) == n
    finally:
        assert stop_worker(worker) == 0
    assert_exactly_once(es, env["index"], n)


def test_mapping_rejections_go_to_dead_letter_with_reasons(env: dict[str, Any]) -> None:
    es, index = env["es"], env["index"]
    # An index whose mapping disagrees with some documents: the SNI as a number. Only
    # the "bad" records carry an SNI (the Istio line's REQUESTED_SERVER_NAME).
    es.indices.create(index=index, mappings={"properties": {"tls": {"properties": {
        "client": {"properties": {"server_name": {"type": "long"}}}}}}})
    good = access_records(40)
    bad_lines = [v.replace(b' - -"', b' sni.example.com -"') for v in access_records(10, start=40)]
    assert all(b"sni.example.com" in v for v in bad_lines)
    produce(env["bootstrap"], env["topic"], good + bad_lines)
    worker = start_worker(env["cfg"], env["tmp"] / "worker.log")
    try:
        assert wait_for_count(es, index, 40, procs=[worker]) == 40
        dead = read_topic(env["bootstrap"], f"{env['topic']}-dlq", expect=10)
    finally:
        assert stop_worker(worker) == 0
    assert count_docs(es, index) == 40
    assert len(dead) == 10
    originals = {m.value() for m in dead}
    assert originals == set(bad_lines)  # the original bytes, untouched
    source = {(m.partition(), m.offset()): m.value()
              for m in read_topic(env["bootstrap"], env["topic"], expect=50)}
    for m in dead:
        headers = dict(m.headers())
        assert headers["envoygeo.stage"] == b"index"
        assert b"400" in headers["envoygeo.error"]
        assert b"parsing" in headers["envoygeo.error"] or b"number" in headers["envoygeo.error"]
        topic, partition, offset = headers["envoygeo.source"].decode().split("/")
        assert topic == env["topic"]
        assert source[(int(partition), int(offset))] == m.value()  # the exact position
    assert committed_total(env["bootstrap"], env["group"], env["topic"]) == 50


def test_garbage_never_crashes_and_is_kept(env: dict[str, Any]) -> None:
    es, index = env["es"], env["index"]
    rng = random.Random(7)
    garbage = [
        os.urandom(rng.randint(1, 300)) for _ in range(30)
    ] + [
        b'{"log": "[2026-01-01T00:00:00.000Z] \\"GET /x HTTP/1.1\\" 200',  # truncated JSON
        b'{"log": 12345}',
        b"\xff\xfe\xfa not utf-8 \xc3\x28",
        "caf\u00e9 latin-1".encode("latin-1"),
        b"A" * (1024 * 1024),  # a 1 MB line
        b"",
        b"{}",
        b"[]",
        b"null",
    ]
    good = access_records(20)
    produce(env["bootstrap"], env["topic"], garbage + good)
    total = len(garbage) + len(good)
    worker = start_worker(env["cfg"], env["tmp"] / "worker.log")
    try:
        assert wait_for_count(es, index, total, procs=[worker]) == total
    finally:
        assert stop_worker(worker) == 0
    failures = es.count(index=index, query={"term": {"tags": "_envoygeo_parse_failure"}})["count"]
    assert failures == len(garbage)
    assert committed_total(env["bootstrap"], env["group"], env["topic"]) == total
    big = es.search(index=index, size=1, query={"term": {"tags": "_envoygeo_parse_failure"}},
                    sort=[{"_doc": "asc"}], source=["error.message"])
    assert big["hits"]["hits"][0]["_source"]["error"]["message"]


def test_unparsed_can_be_dead_lettered_instead(env: dict[str, Any]) -> None:
    es, index = env["es"], env["index"]
    cfg = env["config"]("dlq.yaml", parse={"unparsed": "dead_letter"})
    produce(env["bootstrap"], env["topic"], [b"not an access log", *access_records(5)])
    worker = start_worker(cfg, env["tmp"] / "worker.log")
    try:
        assert wait_for_count(es, index, 5, procs=[worker]) == 5
        dead = read_topic(env["bootstrap"], f"{env['topic']}-dlq", expect=1)
    finally:
        assert stop_worker(worker) == 0
    assert [m.value() for m in dead] == [b"not an access log"]
    assert dict(dead[0].headers())["envoygeo.stage"] == b"parse"
    assert count_docs(es, index) == 5


def test_alerts_reach_topic_and_index_once(env: dict[str, Any]) -> None:
    es, index = env["es"], env["index"]
    cfg = env["config"]("alerts.yaml", rates={
        "windows": [10, 60], "alerts": [{"name": "burst", "window_s": 10, "threshold": 50}]})
    # One hot IP with 400 requests in 0.4 s and a quiet one: exactly one alert (one period).
    produce(env["bootstrap"], env["topic"],
            access_records(400, clients=("89.160.20.112",), base_ts=1_800_000_000.0)
            + access_records(5, start=400, clients=("81.2.69.142",), base_ts=1_800_000_000.0))
    worker = start_worker(cfg, env["tmp"] / "worker.log")
    try:
        assert wait_for_count(es, index, 405, procs=[worker]) == 405
        alerts = read_topic(env["bootstrap"], f"{env['topic']}-alerts", expect=1)
    finally:
        assert stop_worker(worker) == 0
    assert len(alerts) == 1
    body = orjson.loads(alerts[0].value())
    assert body["source"]["ip"] == "89.160.20.112"
    assert body["envoygeo"]["alert"]["count"] == 50
    assert count_docs(es, f"{index}-alerts") == 1


def test_metrics_health_and_readiness(env: dict[str, Any]) -> None:
    import time
    import urllib.request

    from pipeline.lab.stack import free_port
    from tests.mmdb_fixtures import write_city

    es, index = env["es"], env["index"]
    port = free_port()
    city = write_city(env["tmp"] / "city.mmdb")
    cfg = env["config"]("metrics.yaml", metrics={"port": port, "progress_interval_s": 0.5},
                        geoip={"city": str(city)})
    produce(env["bootstrap"], env["topic"],
            access_records(300, clients=("81.2.69.160", "175.16.199.10")))
    worker = start_worker(cfg, env["tmp"] / "worker.log")

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        assert wait_for_count(es, index, 300, procs=[worker]) == 300
        time.sleep(2.5)  # a progress tick and a statistics interval
        status, body = get("/metrics")
        health, _ = get("/healthz")
        ready, why = get("/readyz")
    finally:
        assert stop_worker(worker) == 0
    assert status == 200 and health == 200 and ready == 200, why
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
               if line and not line.startswith("#")}
    assert metrics["envoygeo_records_in_total"] == 300
    assert metrics["envoygeo_records_indexed_total"] == 300
    assert metrics['envoygeo_geoip_cache_lookups_total{result="hit"}'] >= 290
    assert metrics["envoygeo_rate_backend_seconds_count"] >= 1
    assert metrics['envoygeo_bulk_seconds_count{outcome="ok"}'] >= 1
    lags = [v for k, v in metrics.items() if k.startswith("envoygeo_consumer_lag{")]
    assert lags and all(v >= 0 for v in lags)
    # Which path wrote the documents, as the banner says; bytes both ways; the process.
    native = os.environ.get("ENVOYGEO_NATIVE", "1") != "0"
    processed = {path: metrics[f'envoygeo_records_processed_total{{path="{path}"}}']
                 for path in ("native", "python")}
    want = {"native": 300, "python": 0} if native else {"native": 0, "python": 300}
    assert processed == want, processed
    assert f'native="{str(native).lower()}"' in next(
        k for k in metrics if k.startswith("envoygeo_build_info{"))
    assert metrics["envoygeo_kafka_bytes_in_total"] > 300 * 100
    assert metrics["envoygeo_es_bytes_out_total"] > metrics["envoygeo_kafka_bytes_in_total"]
    assert metrics["process_cpu_seconds_total"] > 0
    build = [k for k in metrics if k.startswith("envoygeo_build_info{")]
    assert len(build) == 1 and 'version="' in build[0], build
    assert not [k for k in metrics if k.endswith("_created") or "_created{" in k]


def test_data_stream_mode_replays_without_duplicates(tmp_path: Path, kafka_bootstrap: str,
                                                     es_url: str, es_client: Elasticsearch,
                                                     unique: Callable[[str], str]) -> None:
    """Data streams take only `create`: a replayed record answers 409, counted as done."""
    topic, stream = unique("ds"), unique("egds")
    create_topic(kafka_bootstrap, topic)
    cfg = write_config(tmp_path / "ds.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-g", index=stream,
                       extra={"elasticsearch": {"data_stream": True}})
    setup_worker_env(cfg)
    produce(kafka_bootstrap, topic, access_records(200))
    for group in ("first", "replay"):
        run_cfg = write_config(tmp_path / f"{group}.yaml", bootstrap=kafka_bootstrap,
                               es_url=es_url, topic=topic, group=f"{topic}-{group}",
                               index=stream, extra={"elasticsearch": {"data_stream": True}})
        worker = start_worker(run_cfg, tmp_path / f"{group}.log")
        try:
            assert wait_for_committed(kafka_bootstrap, f"{topic}-{group}", topic, 200) == 200
        finally:
            assert stop_worker(worker) == 0
    backing = list(es_client.indices.get(index=stream).body)
    assert backing and all(name.startswith(".ds-") for name in backing)
    assert_exactly_once(es_client, stream, 200)
    assert "409" not in (tmp_path / "replay.log").read_text()  # not an error: already there


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler (its SigCgt mask, from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("delay_s", [0.0, 0.3, 1.0])
def test_sigterm_during_start_up_exits_cleanly(env: dict[str, Any], delay_s: float) -> None:
    """A stop requested while the worker is still starting (imports, template check,
    GeoIP, joining the group) is honoured once it can be, not by dying half-started.

    Timed from the moment the process catches SIGTERM at all (the first thing `run`
    does), so the test does not depend on how fast the machine starts Python; before
    that point a signal ends any Python program, and nothing has been consumed yet.
    """
    proc = start_worker(env["cfg"], env["tmp"] / f"early-{delay_s}.log")
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "worker never started"
        time.sleep(0.005)
    time.sleep(delay_s)
    assert stop_worker(proc) == 0
    if delay_s == 0.0:  # right at the start of `run`: the early path must have been taken
        assert any("during start-up" in m
                   for m in log_messages(env["tmp"] / f"early-{delay_s}.log"))
