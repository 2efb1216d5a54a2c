"""Recovery of the consumer group, against the real Kafka and Elasticsearch.

* kill -9 and an immediate restart: the restarted worker (same static member id, as a
  restarted pod has the same name) takes its partitions back at once; the bound here is
  far below the 45 s session timeout a dynamic member would wait out, and loose enough
  for a loaded CI machine (`envoygeo bench recovery` reports the real figure);
* a worker stopped with SIGTERM leaves the group, so the survivor gets its partitions
  at once (a static member does not leave on close by itself);
* two workers with the same static member id: the fenced one exits, saying so once;
* no broker: librdkafka's connection failures come out as a few JSON lines, not ~20/s.

The session timeout is set to 45 s (librdkafka's default, the old behaviour) wherever
the test's bound must be beaten by something other than a short session timeout.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    ROOT,
    ProducerThread,
    assert_exactly_once,
    committed_total,
    create_topic,
    free_port,
    log_messages,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_committed,
    wait_for_count,
    write_config,
)

RESTART_BOUND_S = 15.0  # far below the 45 s session timeout, robust on a loaded machine


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> dict[str, Any]:
    topic, index = unique("recov"), unique("egrecov")
    create_topic(kafka_bootstrap, topic)
    cfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                       topic=topic, group=f"{topic}-group", index=index,
                       extra={"kafka": {"session_timeout_ms": 45000}})
    setup_worker_env(cfg)
    return {"topic": topic, "index": index, "group": f"{topic}-group", "cfg": cfg,
            "tmp": tmp_path, "bootstrap": kafka_bootstrap, "es": es_client}


def _wait_committed_beyond(env: dict[str, Any], base: int, proc: subprocess.Popen[bytes],
                           timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        if committed_total(env["bootstrap"], env["group"], env["topic"]) > base:
            return time.monotonic() - t0
        time.sleep(0.1)
    return float("inf")


def _finish(env: dict[str, Any], producer: ProducerThread,
            workers: list[subprocess.Popen[bytes]]) -> int:
    n = producer.join()
    try:
        assert wait_for_count(env["es"], env["index"], n, procs=workers) == n
        assert wait_for_committed(env["bootstrap"], env["group"], env["topic"], n) == n
    finally:
        codes = [stop_worker(w) for w in workers]
    assert codes == [0] * len(workers)
    assert_exactly_once(env["es"], env["index"], n)
    return n


def test_kill9_restart_indexes_again_at_once_nothing_lost_or_duplicated(
        env: dict[str, Any]) -> None:
    producer = ProducerThread(env["bootstrap"], env["topic"], 9000, rate=400).start()
    log = env["tmp"] / "w.log"
    worker = start_worker(env["cfg"], log)
    try:
        assert wait_for_count(env["es"], env["index"], 1000, procs=[worker]) >= 1000
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        before = committed_total(env["bootstrap"], env["group"], env["topic"])
        worker = start_worker(env["cfg"], log)  # same log: same static member id
        took = _wait_committed_beyond(env, before, worker, 60)
    except BaseException:
        worker.kill()
        raise
    print(f"restart after kill -9 -> first indexed (committed) record: {took:.1f}s")
    assert took < RESTART_BOUND_S, f"first record indexed {took:.1f}s after the restart"
    _finish(env, producer, [worker])
    messages = log_messages(log)
    joining = [m for m in messages if m.startswith("waiting for partitions: joining group")]
    assert joining == [f"waiting for partitions: joining group {env['group']} "
                       "(static member id w, classic protocol)"] * 2  # once per start


def _owned(log: Path, topic: str) -> set[int]:
    """Partitions a worker owns now, replaying its assigned/revoking lines."""
    import re

    owned: set[int] = set()
    for m in log_messages(log):
        parts = {int(p) for p in re.findall(re.escape(topic) + r"\[(\d+)\]", m)}
        if m.startswith("assigned "):
            owned |= parts
        elif m.startswith(("revoking ", "lost ")):
            owned -= parts
    return owned


def test_sigterm_leaves_the_group_so_the_survivor_takes_over_at_once(
        env: dict[str, Any]) -> None:
    producer = ProducerThread(env["bootstrap"], env["topic"], 8000, rate=400).start()
    log_a, log_b = env["tmp"] / "a.log", env["tmp"] / "b.log"
    a = start_worker(env["cfg"], log_a)
    b = start_worker(env["cfg"], log_b)
    try:
        deadline = time.monotonic() + 60
        while not (_owned(log_a, env["topic"]) and _owned(log_b, env["topic"])):
            assert time.monotonic() < deadline, "both workers should own partitions"
            time.sleep(0.2)
        b.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        while _owned(log_a, env["topic"]) != set(range(6)):
            # Without a LeaveGroup, b's partitions would wait out its 45 s session.
            assert time.monotonic() - stopped < RESTART_BOUND_S, (
                f"survivor owns {_owned(log_a, env['topic'])}")
            time.sleep(0.1)
        took = time.monotonic() - stopped
        assert b.wait(60) == 0
    except BaseException:
        a.kill()
        b.kill()
        raise
    print(f"survivor owned every partition {took:.1f}s after SIGTERM of the other worker")
    _finish(env, producer, [a])
    for log in (log_a, log_b):  # two rebalances: no burst of refused-commit warnings
        messages = log_messages(log)
        assert not [m for m in messages if "commit" in m and "failed" in m]
        assert sum(" is rebalancing (" in m for m in messages) <= 2


def test_a_fenced_worker_exits_saying_so_once(env: dict[str, Any]) -> None:
    producer = ProducerThread(env["bootstrap"], env["topic"], 4000, rate=400).start()
    log_a, log_b = env["tmp"] / "a.log", env["tmp"] / "b.log"
    a = start_worker(env["cfg"], log_a, instance_id="same-host")
    try:
        assert wait_for_count(env["es"], env["index"], 200, procs=[a]) >= 200
        b = start_worker(env["cfg"], log_b, instance_id="same-host")
        code = a.wait(60)
    except BaseException:
        a.kill()
        raise
    assert code == 1
    errors = [rec for rec in map(orjson.loads, log_a.read_bytes().splitlines())
              if rec["log.level"] in ("error", "critical")]
    assert len(errors) == 1, errors
    assert errors[0]["message"].startswith(
        f"fenced: another worker joined group {env['group']} with the same static member "
        "id 'same-host'")
    _finish(env, producer, [b])  # b carries on: nothing lost, nothing duplicated


def test_no_broker_connection_failures_are_a_few_json_lines(
        tmp_path: Path, es_url: str, unique: Callable[[str], str]) -> None:
    port = free_port()  # nothing listens there
    topic = unique("nobroker")
    cfg = write_config(tmp_path / "w.yaml", bootstrap=f"127.0.0.1:{port}", es_url=es_url,
                       topic=topic, group=f"{topic}-g", index=unique("egnobroker"))
    # Templates only (`setup --no-topics`): there is no Kafka to create topics on.
    subprocess.run([sys.executable, "-m", "pipeline.cli", "setup", "--no-topics", "-c",
                    str(cfg)], check=True, capture_output=True, timeout=120, cwd=ROOT)
    log = tmp_path / "w.log"
    worker = start_worker(cfg, log)
    time.sleep(6)  # the imports take ~2-4 s of it; then ~20 failures/s unfiltered
    assert stop_worker(worker, timeout=60) == 0
    lines = log.read_bytes().splitlines()
    records = [orjson.loads(raw) for raw in lines]  # every line is JSON: no raw %3|... lines
    refused = [r for r in records if "Connection refused" in r["message"]]
    assert 1 <= len(refused) <= 4, [r["message"] for r in refused]
    assert all(r["log.logger"] == "envoygeo.kafka.librdkafka" for r in refused)
    assert refused[0]["log.level"] == "error" and refused[0]["kafka.facility"] == "FAIL"
    waiting = [r["message"] for r in records
               if r["message"].startswith("waiting for partitions")]
    assert waiting and len(waiting) == len(set(waiting))  # each state said once


def test_two_workers_killed_during_a_rebalance_are_back_at_once(env: dict[str, Any]) -> None:
    """Seen before static membership: two members killed while a rebalance was joining
    them, restarted, and no record indexed for 132 s (the new members' join waited out
    the dead members' sessions)."""
    producer = ProducerThread(env["bootstrap"], env["topic"], 8000, rate=400).start()
    log_a, log_b = env["tmp"] / "a.log", env["tmp"] / "b.log"
    workers = [start_worker(env["cfg"], log_a)]
    try:
        assert wait_for_count(env["es"], env["index"], 500, procs=workers) >= 500
        workers.append(start_worker(env["cfg"], log_b))
        deadline = time.monotonic() + 60
        while not any(m.startswith("waiting for partitions: joining")
                      for m in (log_messages(log_b) if log_b.exists() else [])):
            assert time.monotonic() < deadline, "the second worker never started joining"
            time.sleep(0.05)
        time.sleep(0.2)  # the join is under way: a is being asked to rejoin
        for w in workers:
            w.send_signal(signal.SIGKILL)
        for w in workers:
            w.wait(30)
        before = committed_total(env["bootstrap"], env["group"], env["topic"])
        workers = [start_worker(env["cfg"], log) for log in (log_a, log_b)]
        took = _wait_committed_beyond(env, before, workers[0], 60)
    except BaseException:
        for w in workers:
            w.kill()
        raise
    print(f"two workers killed during a rebalance, restarted -> first indexed record "
          f"{took:.1f}s")
    assert took < RESTART_BOUND_S
    _finish(env, producer, workers)
