"""Reliability suite: the delivery contract (DESIGN.md) under crashes and outages.

Every test ends with the exact document count and no duplicates
(`assert_exactly_once`: each `req-<i>` exactly once, nothing else) and, where a
consumer group ran to the end, committed offsets == records produced. Document ids
are the Kafka position, so replays after a crash overwrite instead of adding.

Real services only, started by the repo's deploy/local/services scripts. Tests that
crash workers use the shared Kafka and Elasticsearch. Tests that stop a *service*
never stop the shared one: other sessions use it, and a concurrent run's fixtures
start a replacement on the port as soon as it closes (seen: a CI clone's node took
over 127.0.0.1:9200 during an outage test). They run private nodes instead, on free
ports with their own state (`PrivateService`): an Elasticsearch node for the outage and
SIGTERM tests, one with `thread_pool.write.queue_size=1` for the 429 test, and a KRaft
broker for the broker restart. Each starts once per module and is stopped at the end.

Longer variants are marked `soak`; pyproject's addopts deselect them (`-m 'not soak'`) so
the default run stays near five minutes. Run them with:
    pytest -m soak tests/integration/test_reliability.py
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    PrivateService,
    ProducerThread,
    access_records,
    assert_exactly_once,
    committed_offsets,
    committed_total,
    count_docs,
    create_topic,
    free_port,
    log_messages,
    produce,
    rss_kb,
    scrape_metric,
    setup_worker_env,
    start_worker,
    stop_worker,
    summary_records_in,
    wait_for_committed,
    wait_for_count,
    write_config,
)

RSS_BOUND_MB = 400


def make_env(tmp_path: Path, bootstrap: str, es_url: str, es: Elasticsearch,
             unique: Callable[[str], str]) -> dict[str, Any]:
    topic, index = unique("rel"), unique("egrel")
    create_topic(bootstrap, topic)

    def config(name: str = "worker.yaml", **extra: Any) -> Path:
        return write_config(tmp_path / name, bootstrap=bootstrap, es_url=es_url,
                            topic=topic, group=f"{topic}-group", index=index, extra=extra)

    cfg = config()
    setup_worker_env(cfg)
    return {"topic": topic, "index": index, "group": f"{topic}-group", "config": config,
            "cfg": cfg, "tmp": tmp_path, "bootstrap": bootstrap, "es": es}


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> dict[str, Any]:
    """The shared Kafka and Elasticsearch (never stopped by these tests)."""
    return make_env(tmp_path, kafka_bootstrap, es_url, es_client, unique)


@contextmanager
def private_node(kind: str, root: Path, **settings: str) -> Iterator[PrivateService]:
    node = PrivateService(kind, root, **settings)
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def outage_es(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateService]:
    """A private Elasticsearch node that tests may stop (the shared one stays up)."""
    with private_node("elasticsearch", tmp_path_factory.mktemp("es-outage")) as node:
        yield node


@pytest.fixture(scope="module")
def tiny_es(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateService]:
    """A private node whose write queue holds one task: concurrent bulks get 429."""
    with private_node("elasticsearch", tmp_path_factory.mktemp("es-429"),
                      ES_WRITE_QUEUE_SIZE="1", ES_PROCESSORS="1") as node:
        yield node


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateService]:
    """A private KRaft broker that a test may restart (the shared one stays up)."""
    with private_node("kafka", tmp_path_factory.mktemp("kafka")) as node:
        yield node


@pytest.fixture
def es_env(tmp_path: Path, kafka_bootstrap: str, outage_es: PrivateService,
           unique: Callable[[str], str]) -> Iterator[dict[str, Any]]:
    """Shared Kafka, private Elasticsearch (started if a previous test left it stopped)."""
    outage_es.start()
    es = Elasticsearch(outage_es.address, request_timeout=30)
    try:
        yield {**make_env(tmp_path, kafka_bootstrap, outage_es.address, es, unique),
               "node": outage_es}
    finally:
        es.close()


@pytest.fixture
def kafka_env(tmp_path: Path, es_url: str, es_client: Elasticsearch,
              private_kafka: PrivateService, unique: Callable[[str], str]) -> dict[str, Any]:
    """Private Kafka broker, shared Elasticsearch."""
    private_kafka.start()
    return {**make_env(tmp_path, private_kafka.address, es_url, es_client, unique),
            "node": private_kafka}


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def finish(env: dict[str, Any], producer: ProducerThread, workers: list[subprocess.Popen[bytes]],
           es: Elasticsearch | None = None, timeout_s: float = 180) -> int:
    """Wait for all produced records to be indexed and committed; stop the workers (exit 0)."""
    es = es or env["es"]
    n = producer.join()
    try:
        assert wait_for_count(es, env["index"], n, timeout_s=timeout_s, procs=workers) == n
        assert wait_for_committed(env["bootstrap"], env["group"], env["topic"], n,
                                  timeout_s=timeout_s) == n
    finally:
        codes = [stop_worker(w) for w in workers]
    assert codes == [0] * len(workers), f"worker exit codes {codes}"
    return n


def assigned_partitions(log_path: Path, topic: str) -> set[int]:
    """Every partition of `topic` this worker was ever assigned (from its log)."""
    parts: set[int] = set()
    for msg in log_messages(log_path):
        if msg.startswith("assigned "):
            parts.update(int(p) for p in re.findall(re.escape(topic) + r"\[(\d+)\]", msg))
    return parts


# -- 1. kill -9 at random points, repeatedly --


def _kill_loop(env: dict[str, Any], kills: int, n: int, rate: float, seed: int) -> None:
    rng = random.Random(seed)
    producer = ProducerThread(env["bootstrap"], env["topic"], n, rate).start()
    log = env["tmp"] / "worker.log"
    worker = start_worker(env["cfg"], log)
    killed_at: list[tuple[float, int]] = []
    t0 = time.monotonic()
    try:
        for _ in range(kills):
            # Random points: during the group join, mid-batch, between commits.
            time.sleep(rng.uniform(1.0, 12.0))
            assert worker.poll() is None, "worker exited on its own"
            killed_at.append((round(time.monotonic() - t0, 1), count_docs(env["es"], env["index"])
                              if env["es"].indices.exists(index=env["index"]) else 0))
            kill9(worker)
            worker = start_worker(env["cfg"], log)
    except BaseException:
        worker.kill()
        raise
    print(f"kill -9 at (s, docs indexed so far): {killed_at}")
    finish(env, producer, [worker])
    assert_exactly_once(env["es"], env["index"], n)
    assert committed_total(env["bootstrap"], env["group"], env["topic"]) == n
    print(f"kill loop: {kills} kills, {n} records, {time.monotonic() - t0:.1f}s")


def test_kill9_repeatedly_loses_and_duplicates_nothing(env: dict[str, Any]) -> None:
    _kill_loop(env, kills=3, n=15000, rate=700, seed=int(time.time()))


@pytest.mark.soak
def test_kill9_soak(env: dict[str, Any]) -> None:
    _kill_loop(env, kills=12, n=80000, rate=800, seed=int(time.time()))


# -- 2. two workers, one killed: the survivor takes over --


def test_survivor_takes_over_partitions_of_killed_member(env: dict[str, Any]) -> None:
    es, index, topic = env["es"], env["index"], env["topic"]
    n = 12000
    producer = ProducerThread(env["bootstrap"], topic, n, rate=600).start()
    log_a, log_b = env["tmp"] / "a.log", env["tmp"] / "b.log"
    a = start_worker(env["cfg"], log_a)
    b = start_worker(env["cfg"], log_b)
    t0 = time.monotonic()
    try:
        # Both members own partitions and records are flowing.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pa, pb = assigned_partitions(log_a, topic), assigned_partitions(log_b, topic)
            if pa and pb and wait_for_count(es, index, 1000, timeout_s=1) >= 1000:
                break
            time.sleep(0.5)
        assert pa and pb, f"both members should own partitions: a={pa} b={pb}"
        time.sleep(random.uniform(0.5, 3.0))
        kill9(a)
        killed = time.monotonic()
        # The survivor gets every partition after the dead member's session expires.
        deadline = time.monotonic() + 60
        while assigned_partitions(log_b, topic) != set(range(6)):
            assert time.monotonic() < deadline, f"survivor owns {assigned_partitions(log_b, topic)}"
            assert b.poll() is None
            time.sleep(0.5)
        takeover = time.monotonic() - killed
    except BaseException:
        a.kill()
        b.kill()
        raise
    finish(env, producer, [b])
    assert_exactly_once(es, index, n)
    print(f"takeover {takeover:.1f}s after kill -9 (session.timeout.ms 10000); "
          f"total {time.monotonic() - t0:.1f}s")


# -- 3. Elasticsearch down for 30+ s under load --


def http_status(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _es_outage(env: dict[str, Any], down_s: float, n: int, rate: float) -> None:
    es, index = env["es"], env["index"]
    port = free_port()
    cfg = env["config"]("outage.yaml", metrics={"port": port, "host": "127.0.0.1"})
    producer = ProducerThread(env["bootstrap"], env["topic"], n, rate).start()
    log = env["tmp"] / "worker.log"
    worker = start_worker(cfg, log)
    samples: list[int] = []
    try:
        assert wait_for_count(es, index, 2000, procs=[worker]) >= 2000
        before_stop = len(log_messages(log))
        env["node"].stop()
        stopped = time.monotonic()
        try:
            while time.monotonic() - stopped < down_s:
                assert worker.poll() is None, f"worker exited with {worker.returncode}"
                samples.append(rss_kb(worker.pid))
                time.sleep(0.5)
            # End of the outage: fetching paused, yet ready and alive: readiness means
            # "makes progress once the sink is back", so a fleet-wide Elasticsearch
            # outage does not take every pod out of service (PDB, metrics Service).
            paused_gauge = scrape_metric(port, "envoygeo_paused")
            ready, healthy = http_status(port, "/readyz"), http_status(port, "/healthz")
            during = log_messages(log)[before_stop:]
        finally:
            started = time.monotonic()
            env["node"].start()
            print(f"elasticsearch down {started - stopped:.1f}s, "
                  f"start took {time.monotonic() - started:.1f}s")
    except BaseException:
        worker.kill()
        raise
    finish(env, producer, [worker], timeout_s=240)
    assert_exactly_once(es, index, n)
    max_mb = max(samples) / 1024
    print(f"worker RSS while Elasticsearch was down: max {max_mb:.0f} MB, "
          f"first {samples[0] / 1024:.0f} MB, last {samples[-1] / 1024:.0f} MB "
          f"({len(samples)} samples); paused={paused_gauge} readyz={ready} healthz={healthy}")
    assert max_mb < RSS_BOUND_MB
    # Bounded, not growing: after a 5 s warm-up (in-flight batches and librdkafka's
    # queue full by then) RSS stays flat. A body kept per failed bulk attempt (the bug
    # pipeline/sinks/elasticsearch.py::_release fixes) grew it by ~0.7 MB/s.
    early, late = samples[10:20], samples[-10:]
    span_s = (len(samples) - 15) * 0.5
    rate = (sum(late) / len(late) - sum(early) / len(early)) / 1024 / span_s
    print(f"RSS growth during the outage after warm-up: {rate:+.3f} MB/s")
    assert rate < 0.15, f"worker memory grows {rate:.2f} MB/s while Elasticsearch is down"
    assert any("paused fetching" in m for m in during), "no pause while Elasticsearch was down"
    assert paused_gauge == 1 and ready == 200 and healthy == 200
    # The pause said during the outage is followed by its resume (once Elasticsearch
    # answers, possibly while its start-up is still being waited for here).
    said = log_messages(log)[before_stop:]
    paused_at = next(i for i, m in enumerate(said) if "paused fetching" in m)
    assert any("resumed fetching" in m for m in said[paused_at:]), said[paused_at:][:20]


def test_elasticsearch_down_30s_nothing_lost_memory_bounded(es_env: dict[str, Any]) -> None:
    _es_outage(es_env, down_s=32, n=40000, rate=800)


@pytest.mark.soak
def test_elasticsearch_down_soak(es_env: dict[str, Any]) -> None:
    _es_outage(es_env, down_s=150, n=150000, rate=800)


# -- 4. Elasticsearch rejecting with 429 --


@pytest.fixture
def tiny_env(tmp_path: Path, kafka_bootstrap: str, tiny_es: PrivateService,
             unique: Callable[[str], str]) -> Iterator[dict[str, Any]]:
    es = Elasticsearch(tiny_es.address, request_timeout=30)
    try:
        yield make_env(tmp_path, kafka_bootstrap, tiny_es.address, es, unique)
    finally:
        es.close()


def test_429_rejections_are_retried_nothing_lost(tiny_env: dict[str, Any]) -> None:
    env = tiny_env
    es = env["es"]
    port = free_port()
    cfg = env["config"]("tiny.yaml",
                        elasticsearch={"concurrency": 4, "retry_initial_backoff_ms": 50,
                                       "retry_max_backoff_ms": 1000},
                        kafka={"batch_max_records": 100},
                        worker={"max_inflight_batches": 8},
                        metrics={"port": port, "host": "127.0.0.1"})
    n = 12000
    produce(env["bootstrap"], env["topic"], access_records(n))
    log = env["tmp"] / "tiny.log"
    worker = start_worker(cfg, log)
    t0 = time.monotonic()
    try:
        assert wait_for_count(es, env["index"], n, timeout_s=240, procs=[worker]) == n
        assert wait_for_committed(env["bootstrap"], env["group"], env["topic"], n) == n
        partial = scrape_metric(port, "envoygeo_bulk_seconds_count", {"outcome": "partial"})
        errors = scrape_metric(port, "envoygeo_bulk_seconds_count", {"outcome": "error"})
    finally:
        code = stop_worker(worker)
    assert code == 0
    elapsed = time.monotonic() - t0
    retries = [m for m in log_messages(log) if "to retry" in m]
    retried_items = sum(int(m.split()[1]) for m in retries)
    print(f"429: {len(retries)} bulk retries covering {retried_items} item(s); "
          f"partial bulks {partial:.0f}, failed bulks {errors:.0f}; {n} records in {elapsed:.1f}s")
    assert retries and partial + errors > 0, "the node never pushed back: no 429 happened"
    assert any("429" in m or "per-item" in m for m in retries)
    assert_exactly_once(es, env["index"], n)


# -- SIGTERM while Elasticsearch is down: exit 0 within the grace, commit nothing unindexed --


def test_sigterm_while_elasticsearch_down_commits_only_indexed(es_env: dict[str, Any]) -> None:
    env = es_env
    topic, group, index, es, node = env["topic"], env["group"], env["index"], env["es"], env["node"]
    grace = 5
    cfg = env["config"]("sigterm.yaml", kafka={"batch_max_records": 500},
                        worker={"shutdown_grace_s": grace})
    n = 8000
    producer = ProducerThread(env["bootstrap"], topic, n, rate=800).start()
    log = env["tmp"] / "sigterm.log"
    worker = start_worker(cfg, log)
    try:
        try:
            assert wait_for_count(es, index, 1000, procs=[worker]) >= 1000
            node.stop()
            time.sleep(3)  # in-flight batches now retry against a dead node
            assert worker.poll() is None
            t0 = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(grace + 15)
            took = time.monotonic() - t0
        finally:
            node.start()
    except BaseException:
        worker.kill()
        raise
    print(f"SIGTERM with Elasticsearch down: exit {code} after {took:.1f}s (grace {grace}s)")
    assert code == 0
    assert took < grace + 10
    assert any("not indexed at shutdown" in m or "shutdown before batch" in m
               for m in log_messages(log)), "expected undelivered batches at shutdown"
    # The contract: every committed offset's records are in the index.
    committed = committed_offsets(env["bootstrap"], group, topic)
    es.indices.refresh(index=index)
    hits = es.search(index=index, size=10000, source=False, query={"match_all": {}})
    ids = {h["_id"] for h in hits["hits"]["hits"]}
    for p, off in committed.items():
        missing = [o for o in range(max(off, 0)) if f"{topic}-{p}-{o}" not in ids]
        assert not missing, f"partition {p} committed {off} but offsets {missing[:5]} unindexed"
    assert sum(max(o, 0) for o in committed.values()) < n  # something was left uncommitted
    # A new worker picks up from the committed offsets: nothing lost, nothing doubled.
    worker = start_worker(cfg, env["tmp"] / "sigterm-2.log")
    finish(env, producer, [worker])
    assert_exactly_once(es, index, n)


# -- SIGTERM while a revoke waits on a dead Elasticsearch --


class GroupMember:
    """A bare consumer-group member (the test's own) that joins to force a rebalance."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        import threading

        from confluent_kafka import Consumer

        self.assigned: set[int] = set()
        self._stop = threading.Event()
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 10000, "auto.offset.reset": "earliest"})
        self._consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_assign(self, consumer: Any, parts: list[Any]) -> None:
        self.assigned.update(tp.partition for tp in parts)
        consumer.pause(parts)  # takes nothing: it only holds partitions

    def _on_revoke(self, consumer: Any, parts: list[Any]) -> None:
        self.assigned.difference_update(tp.partition for tp in parts)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._consumer.poll(0.2)
        self._consumer.close()  # leaves the group without committing anything

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_sigterm_during_revoke_while_elasticsearch_down_exits_in_grace(
        es_env: dict[str, Any]) -> None:
    """A rolling deploy while Elasticsearch is down: a member joins, the worker must give
    partitions away but cannot flush them, then gets SIGTERM. It must still exit within
    its grace period (committing nothing unindexed), not hang in the revoke."""
    env = es_env
    topic, group, index, es, node = env["topic"], env["group"], env["index"], env["es"], env["node"]
    grace = 5
    cfg = env["config"]("revoke.yaml", kafka={"batch_max_records": 500},
                        worker={"shutdown_grace_s": grace})
    n = 8000
    producer = ProducerThread(env["bootstrap"], topic, n, rate=800).start()
    log = env["tmp"] / "revoke.log"
    worker = start_worker(cfg, log)
    member: GroupMember | None = None
    try:
        try:
            assert wait_for_count(es, index, 1000, procs=[worker]) >= 1000
            node.stop()
            time.sleep(3)  # in-flight batches now retry against a dead node
            member = GroupMember(env["bootstrap"], group, topic)
            deadline = time.monotonic() + 30
            while not any(m.startswith("revoking") for m in log_messages(log)):
                assert time.monotonic() < deadline, "the join never made the worker revoke"
                time.sleep(0.2)
            time.sleep(1)
            assert worker.poll() is None
            t0 = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            try:
                code: int | None = worker.wait(grace + 25)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - t0
        finally:
            node.start()
    except BaseException:
        worker.kill()
        raise
    finally:
        if member is not None:
            member.close()
    print(f"SIGTERM during a blocked revoke: exit {code} after {took:.1f}s (grace {grace}s)")
    if code is None:
        worker.wait(60)  # Elasticsearch is back: the revoke can finish now
    assert code == 0, "the worker hung in the revoke past its grace period"
    assert took < grace + 10
    # Nothing unindexed was committed; a new worker finishes the job exactly once.
    worker = start_worker(cfg, env["tmp"] / "revoke-2.log")
    finish(env, producer, [worker])
    assert_exactly_once(es, index, n)


# -- graceful rebalances (join, leave): drained and committed first, nothing replayed --


def test_graceful_rebalances_replay_nothing(env: dict[str, Any]) -> None:
    es, index, topic = env["es"], env["index"], env["topic"]
    n = 15000
    producer = ProducerThread(env["bootstrap"], topic, n, rate=700).start()
    logs = [env["tmp"] / f"{name}.log" for name in "abc"]
    a = start_worker(env["cfg"], logs[0])
    workers = [a]
    try:
        assert wait_for_count(es, index, 2000, procs=workers) >= 2000
        workers.append(start_worker(env["cfg"], logs[1]))  # a revokes with batches in flight
        deadline = time.monotonic() + 60
        while not assigned_partitions(logs[1], topic):
            assert time.monotonic() < deadline, "b never got partitions"
            time.sleep(0.5)
        time.sleep(2)
        workers.append(start_worker(env["cfg"], logs[2]))
        while not assigned_partitions(logs[2], topic):
            assert time.monotonic() < deadline, "c never got partitions"
            time.sleep(0.5)
        time.sleep(2)
        assert stop_worker(a) == 0  # leaves: revokes everything, drained and committed
    except BaseException:
        for w in workers:
            w.kill()
        raise
    finish(env, producer, workers[1:])
    assert_exactly_once(es, index, n)
    read = [summary_records_in(path) for path in logs]
    print(f"records read per worker: {read} (sum {sum(r or 0 for r in read)}, produced {n})")
    # Every rebalance here was cooperative and graceful, so no record was read twice.
    assert sum(r or 0 for r in read) == n


# -- 5. the Kafka broker restarted under load --


def test_kafka_broker_restart_worker_recovers(kafka_env: dict[str, Any]) -> None:
    env = kafka_env
    es, index, broker = env["es"], env["index"], env["node"]
    n = 20000
    producer = ProducerThread(env["bootstrap"], env["topic"], n, rate=700).start()
    log = env["tmp"] / "worker.log"
    worker = start_worker(env["cfg"], log)
    try:
        assert wait_for_count(es, index, 2000, procs=[worker]) >= 2000
        t0 = time.monotonic()
        try:
            broker.stop()
            stopped = time.monotonic()
            time.sleep(5)
        finally:
            broker.start()
        print(f"kafka stop took {stopped - t0:.1f}s, down {time.monotonic() - stopped:.1f}s")
        assert worker.poll() is None, "worker died with the broker"
    except BaseException:
        worker.kill()
        raise
    finish(env, producer, [worker], timeout_s=240)
    assert_exactly_once(es, index, n)
    print(f"recovered and caught up {time.monotonic() - t0:.1f}s after the stop began")
