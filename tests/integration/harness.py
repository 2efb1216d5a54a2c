"""Helpers for worker tests: produce Fluent Bit-shaped records, run workers, read results.

The records are shaped exactly as Fluent Bit's kafka output writes them with
`format json` and `timestamp_key @timestamp` (epoch float), wrapping the container
runtime's line in `log`, with the kubernetes filter's metadata.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from elasticsearch import Elasticsearch

from pipeline.lab.shipper import DEFAULT_KUBERNETES
from pipeline.lab.shipper import fluent_bit_record as shipper_record
from pipeline.sinks.kafka import produce_waiting
from pipeline.sources.kafka import committed_total

ROOT = Path(__file__).resolve().parents[2]

# Istio default text format; the client address is what the PROXY protocol preserved.
ISTIO_LINE = (
    '[{ts}] "GET /api/items/{n}?page=1 HTTP/1.1" 200 - via_upstream - "-" 0 {size} 3 2 '
    '"-" "curl/8.5.0" "req-{n}" "shop.example.com" "10.0.7.12:8080" '
    "outbound|8080||shop.default.svc.cluster.local 10.0.7.1:51122 10.0.0.5:8080 "
    "{client}:{port} - -"
)


def fluent_bit_record(line: str, ts: float, pod: str = "istio-ingressgateway-7d9f-x2x") -> bytes:
    """The lab shipper's Fluent Bit record, for a given pod."""
    return shipper_record(line, ts, {**DEFAULT_KUBERNETES, "pod_name": pod})


def access_records(n: int, start: int = 0, clients: Sequence[str] = ("89.160.20.112",),
                   base_ts: float | None = None) -> list[bytes]:
    """n distinct records; `req-<i>` in each is its identity for duplicate checks."""
    base = base_ts if base_ts is not None else time.time() - 60
    out = []
    for i in range(start, start + n):
        ts = base + i * 0.001
        millis = int(ts * 1000) % 1000
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{millis:03d}Z"
        line = ISTIO_LINE.format(ts=stamp, n=i, size=100 + i % 50,
                                 client=clients[i % len(clients)], port=40000 + i % 20000)
        out.append(fluent_bit_record(line, ts))
    return out


def create_topic(bootstrap: str, topic: str, partitions: int = 6) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[
        topic
    ].result(timeout=30)


def produce(bootstrap: str, topic: str, values: Iterable[bytes], keyed: bool = True) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10,
                         "message.max.bytes": 4 * 1024 * 1024, "enable.idempotence": True})
    count = 0
    errors: list[str] = []

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for i, value in enumerate(values):
        produce_waiting(producer, topic, value, str(i).encode() if keyed else None,
                        on_delivery=report)
        count += 1
    assert producer.flush(60) == 0
    assert not errors, f"{len(errors)} record(s) not produced: {errors[:3]}"
    return count


def wait_for_committed(bootstrap: str, group: str, topic: str, expected: int,
                       timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    total = committed_total(bootstrap, group, topic)
    while total < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        total = committed_total(bootstrap, group, topic)
    return total


def read_topic(bootstrap: str, topic: str, expect: int, timeout_s: float = 30) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    msgs = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(msgs) < expect:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            msgs.append(msg)
    # A little longer, to catch anything beyond what was expected.
    end = time.monotonic() + 2
    while time.monotonic() < end:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            msgs.append(msg)
    consumer.close()
    return msgs


def write_config(path: Path, *, bootstrap: str, es_url: str, topic: str, group: str,
                 index: str, extra: dict[str, Any] | None = None) -> Path:
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap, "topics": [topic], "group_id": group,
            "dead_letter_topic": f"{topic}-dlq", "alerts_topic": f"{topic}-alerts",
            "batch_max_wait_ms": 200, "session_timeout_ms": 10000,
            "statistics_interval_ms": 1000,
        },
        "elasticsearch": {"hosts": [es_url], "index": index, "alerts_index": f"{index}-alerts",
                          "retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 2000},
        "metrics": {"port": 0, "progress_interval_s": 2},
        "worker": {"shutdown_grace_s": 20},
    }
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def setup_worker_env(config: Path) -> None:
    """`envoygeo setup` for real: templates + topics."""
    subprocess.run([sys.executable, "-m", "pipeline.cli", "setup", "-c", str(config)],
                   check=True, capture_output=True, timeout=120, cwd=ROOT)


def start_worker(config: Path, log_path: Path,
                 instance_id: str | None = None) -> subprocess.Popen[bytes]:
    """A worker process; its static member id is `instance_id`, by default the log's
    name: each worker of a test gets its own, and a worker restarted onto the same log
    (kill -9, then start again) rejoins as the same member, as a restarted pod does."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    env = {**os.environ, "ENVOYGEO_KAFKA__GROUP_INSTANCE_ID": instance_id or log_path.stem}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "-c", str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
    )


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler yet (its SigCgt mask, from /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM, once the worker handles it: a worker restarted just before a test ends
    (everything already indexed and committed) may still be importing, and a SIGTERM
    then kills it (-15) before `run` installs its handler."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not catches_sigterm(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def count_docs(es: Elasticsearch, index: str) -> int:
    es.indices.refresh(index=index, ignore_unavailable=True)
    return int(es.count(index=index, ignore_unavailable=True)["count"])


def wait_for_count(es: Elasticsearch, index: str, expected: int, timeout_s: float = 120,
                   procs: Sequence[subprocess.Popen[bytes]] = ()) -> int:
    deadline = time.monotonic() + timeout_s
    count = -1
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"worker exited early with {p.returncode}"
        try:
            count = count_docs(es, index)
        except Exception:  # index not created yet, or the node restarting
            count = -1
        if count >= expected:
            return count
        time.sleep(0.5)
    return count


def request_id_counts(es: Elasticsearch, index: str) -> dict[str, int]:
    """Exact count per http.request.id (composite aggregation, paged)."""
    es.indices.refresh(index=index)
    counts: dict[str, int] = {}
    after: dict[str, Any] | None = None
    while True:
        comp: dict[str, Any] = {"size": 5000,
                                "sources": [{"id": {"terms": {"field": "http.request.id"}}}]}
        if after:
            comp["after"] = after
        resp = es.search(index=index, size=0, aggs={"ids": {"composite": comp}})
        agg = resp["aggregations"]["ids"]
        for bucket in agg["buckets"]:
            counts[bucket["key"]["id"]] = bucket["doc_count"]
        after = agg.get("after_key")
        if not agg["buckets"] or after is None:
            return counts


def assert_exactly_once(es: Elasticsearch, index: str, n: int, start: int = 0) -> None:
    """Every req-<i> for i in [start, start+n) indexed exactly once, nothing else."""
    counts = request_id_counts(es, index)
    expected = {f"req-{i}" for i in range(start, start + n)}
    missing = expected - counts.keys()
    dupes = {k: v for k, v in counts.items() if v != 1}
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}"
    assert not dupes, f"duplicates: {list(dupes.items())[:5]}"
    assert count_docs(es, index) == n


# -- reliability helpers (tests/integration/test_reliability.py) --


class ProducerThread:
    """Produces access_records(n) in chunks at about `rate` records/s, in the background.

    A broker restart in the middle is fine: the idempotent producer retries, and
    `join()` waits for every acknowledgement before it reports.
    """

    def __init__(self, bootstrap: str, topic: str, n: int, rate: float, chunk: int = 200,
                 start: int = 0) -> None:
        import threading

        self.n, self.rate, self.chunk, self.start_at = n, rate, chunk, start
        self.produced = 0  # handed to the client (acknowledged only after join())
        self.errors: list[str] = []
        self.done = threading.Event()
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10,
                                   "enable.idempotence": True, "acks": "all",
                                   "delivery.timeout.ms": 300000,
                                   "message.max.bytes": 4 * 1024 * 1024})
        self._topic = topic
        self._thread = threading.Thread(target=self._run, name="test-producer", daemon=True)

    def start(self) -> ProducerThread:
        self._thread.start()
        return self

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def _run(self) -> None:
        t0 = time.monotonic()
        i = self.start_at
        end = self.start_at + self.n
        while i < end:
            values = access_records(min(self.chunk, end - i), start=i)
            for value in values:
                produce_waiting(self._producer, self._topic, value, str(i).encode(),
                                on_delivery=self._report)
                i += 1
            self.produced = i - self.start_at
            self._producer.poll(0)
            ahead = (i - self.start_at) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        self.done.set()

    def join(self, timeout: float = 300) -> int:
        """Wait for the thread and every acknowledgement; returns the count produced."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "producer thread did not finish"
        assert self._producer.flush(timeout) == 0, "records still unacknowledged"
        assert not self.errors, f"{len(self.errors)} record(s) not produced: {self.errors[:3]}"
        return self.produced


def rss_kb(pid: int) -> int:
    """VmRSS of a live process in kB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` (with these labels) on a worker's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    want = [f'{k}="{v}"' for k, v in (labels or {}).items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base = metric.split("{", 1)[0]
        if base == name and all(w in metric for w in want):
            total += float(value)
    return total


def service(name: str, command: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """deploy/local/services/<name>.sh <command>, checked."""
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "local" / "services" / f"{name}.sh"),
                           command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    assert proc.returncode == 0, f"{name}.sh {command} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def started_line(log_path: Path) -> dict[str, Any]:
    """The worker's one "envoygeo worker started" JSON log line (what it runs with)."""
    lines = [orjson.loads(x) for x in log_path.read_bytes().splitlines() if x.startswith(b"{")]
    (start,) = [x for x in lines if x.get("message") == "envoygeo worker started"]
    return dict(start)


def log_messages(log_path: Path) -> list[str]:
    """The `message` of each JSON log line of a worker (plain lines as they are)."""
    out = []
    for raw in log_path.read_bytes().splitlines():
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out.append(raw.decode("utf-8", "replace"))
            continue
        out.append(str(rec.get("message", rec)) if isinstance(rec, dict) else str(rec))
    return out


def committed_offsets(bootstrap: str, group: str, topic: str,
                      partitions: int = 6) -> dict[int, int]:
    """The group's committed offset per partition (-1001 when none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in tps}


def summary_records_in(log_path: Path) -> int | None:
    """`records_in` of a worker's final summary line (None if it never wrote one)."""
    found = None
    for raw in log_path.read_bytes().splitlines():
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and str(rec.get("message", "")).startswith("summary:"):
            found = int(rec["records_in"])
    return found


class PrivateService:
    """A node of our own, started with the repo's own deploy/local/services scripts.

    Tests that stop and start a service must not do that to the shared one: other
    sessions (and a concurrent CI clone, whose fixtures start a replacement as soon as
    the port closes) use it. A private node gets free ports and its own state.

    Elasticsearch: elasticsearch.sh with ES_PORT / ES_TRANSPORT_PORT / ES_STATE_DIR.
    Kafka: kafka.sh keeps its state under <repo>/.local, so it runs from a copy of the
    scripts in `root` (the Maven jars are shared through ~/.cache/envoygeo).
    """

    def __init__(self, kind: str, root: Path, **settings: str) -> None:
        self.kind, self.root = kind, root
        self.port, self.aux_port = free_port(), free_port()
        if kind == "elasticsearch":
            self.env = {"ES_PORT": str(self.port), "ES_TRANSPORT_PORT": str(self.aux_port),
                        "ES_STATE_DIR": str(root / "es"), "ES_HEAP": "512m",
                        "ES_HEAP_MIN": "256m", **settings}
            self.script = ROOT / "deploy" / "local" / "services" / "elasticsearch.sh"
            self.address = f"http://127.0.0.1:{self.port}"
        elif kind == "kafka":
            import shutil

            for rel in ("deploy/local/services/common.sh", "deploy/local/services/kafka.sh",
                        "deploy/local/kafka/pom.xml", "deploy/local/kafka/server.properties.in",
                        "deploy/local/kafka/log4j2.properties"):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / rel, root / rel)
            self.env = {"KAFKA_PORT": str(self.port), "KAFKA_CONTROLLER_PORT": str(self.aux_port),
                        "KAFKA_HEAP": "384m", **settings}
            self.script = root / "deploy" / "local" / "services" / "kafka.sh"
            self.address = f"127.0.0.1:{self.port}"
        else:
            raise ValueError(kind)

    def run(self, command: str, timeout: float = 300) -> str:
        proc = subprocess.run(["bash", str(self.script), command], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **self.env})
        assert proc.returncode == 0, (
            f"{self.kind}.sh {command} ({self.address}) failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout + proc.stderr

    def start(self) -> None:
        self.run("start")

    def stop(self) -> None:
        self.run("stop")


def cli(*args: str, env: dict[str, str] | None = None,
        captured: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`envoygeo ARGS` as a user runs it; its stdout + stderr also go to `captured`
    (the secret-leak checks read every output of their module)."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})
    if captured is not None:
        captured.append(proc.stdout + proc.stderr)
    return proc


def run_refused(config: Path, expected_line: str, exit_within_s: float,
                captured: list[str] | None = None) -> float:
    """`envoygeo run` with a configuration a service refuses: it must exit 3 within
    `exit_within_s`, with exactly one `envoygeo:` line matching `expected_line` (a regex)
    and no traceback. Returns how long it took."""
    import re

    started = time.monotonic()
    proc = cli("run", "-c", str(config), "--plain-logs", captured=captured)
    took = time.monotonic() - started
    print(f"{config.stem}: run exit {proc.returncode} after {took:.2f}s")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert took < exit_within_s
    errors = [line for line in proc.stderr.splitlines() if line.startswith("envoygeo:")]
    assert len(errors) == 1 and re.fullmatch("envoygeo: " + expected_line, errors[0]), \
        proc.stderr
    assert "Traceback" not in proc.stderr
    return took
