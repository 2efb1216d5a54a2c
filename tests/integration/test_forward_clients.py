"""`envoygeo forward` driven by independent implementations of the forward protocol:
- the Go `fluent-logger-golang` v1.10.2 (tests/clients/go, built here from the Go module
  proxy; Message mode, one acked frame a record), with `RequestAck` in its sync and
  async modes, in relay mode (records read back from the real Kafka) and in direct mode
  (documents counted in the real Elasticsearch), and across a `kill -9` of the forward
  process while the client keeps sending;
- Java `fluency-fluentd` 2.7.3 (tests/clients/java, built with Maven from Maven Central;
  PackedForward chunks) in ack response mode, over plain TCP and over TLS verified
  against the repo's test CA, in both modes.
The Python `fluent-logger` and the Fluent Bit captures are in test_forward.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from tests.integration.harness import ROOT, free_port, read_topic, scrape_metric, wait_for_count
from tests.integration.test_forward import (
    forward_config,
    forward_topic,  # noqa: F401 - fixture
    pki,  # noqa: F401 - fixture
    relayed,
    start_forward,
    stop,
)
from tests.integration.test_forward_direct import direct_config

pytestmark = pytest.mark.integration

GO_CLIENT = ROOT / "tests" / "clients" / "go"
JAVA_CLIENT = ROOT / "tests" / "clients" / "java"
CACHE = Path(os.environ.get("ENVOYGEO_TOOLS", Path.home() / ".cache" / "envoygeo"))


@pytest.fixture(scope="module")
def go_client() -> Path:
    """The Go client, built with the module versions go.sum pins."""
    go = shutil.which("go")
    assert go is not None, "the Go toolchain is needed for this test (Go is on CI machines)"
    out = CACHE / "bin" / "fluentclient-go"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([go, "build", "-mod=mod", "-o", str(out), "."], cwd=GO_CLIENT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out


def run_client(client: Path, port: int, events: int, prefix: str, *extra: str,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(client), "-port", str(port), "-events", str(events),
                           "-prefix", prefix, *extra], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_go_client_with_acks_relays_every_event_once(
        tmp_path: Path, go_client: Path, kafka_bootstrap: str, forward_topic: str,  # noqa: F811
        mode: str) -> None:
    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, forward_topic, port, mport)
    fwd = start_forward(cfg, tmp_path / "forward.log", port, mport)
    n = 500
    try:
        done = run_client(go_client, port, n, f"go-{mode}", *(["-async"] if mode == "async"
                                                              else []))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"posted {n}"
        assert scrape_metric(mport, "envoygeo_forward_chunks_acked_total") >= n
        assert scrape_metric(mport, "envoygeo_forward_events_relayed_total") == n
    finally:
        assert stop(fwd) == 0
    events = [relayed(r.value()) for r in read_topic(kafka_bootstrap, forward_topic, n)]
    assert Counter(e["log"] for e in events) == Counter(f"go-{mode}-{i}" for i in range(n))
    assert all(type(e["@timestamp"]) is float and e["n"] == int(e["log"].rsplit("-", 1)[1])
               for e in events)


def test_go_client_survives_a_kill_9_of_the_relay_and_nothing_is_lost(
        tmp_path: Path, go_client: Path, kafka_bootstrap: str,
        forward_topic: str) -> None:  # noqa: F811
    """The forward process is killed (-9) while the client posts with RequestAck and
    restarted; the client retries what was not acked, so every event reaches Kafka, and
    an event twice only where its ack was lost with the process."""
    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, forward_topic, port, mport)
    log = tmp_path / "forward.log"
    fwd = start_forward(cfg, log, port, mport)
    n = 1500
    client = subprocess.Popen([str(go_client), "-port", str(port), "-events", str(n),
                               "-prefix", "kill", "-retries", "200"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while scrape_metric(mport, "envoygeo_forward_events_relayed_total") < n // 4:
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.05)
        fwd.kill()
        assert fwd.wait(30) == -signal.SIGKILL
        fwd = start_forward(cfg, log, port, mport)
        out, err = client.communicate(timeout=180)
        assert client.returncode == 0, err
        assert out.strip() == f"posted {n}"
    finally:
        if client.poll() is None:
            client.kill()
        assert stop(fwd) == 0
    seen = Counter(relayed(r.value())["log"]
                   for r in read_topic(kafka_bootstrap, forward_topic, n))
    assert set(seen) == {f"kill-{i}" for i in range(n)}  # nothing lost
    # Each Post is one acked Message frame: at most the one in flight at the kill can
    # have reached Kafka without its ack reaching the client.
    assert sum(c - 1 for c in seen.values()) <= 1, {k: c for k, c in seen.items() if c > 1}


def direct_mode_indexes_every_event(
        tmp_path: Path, es_url: str, es_client: Elasticsearch, index: str, n: int,
        prefix: str, send: Callable[[int], subprocess.CompletedProcess[str]]) -> None:
    """`send(port)` runs a client posting `prefix-0..n-1` to a direct-mode forward
    process: every event is acked after Elasticsearch took it, and indexed once."""
    port, mport = free_port(), free_port()
    cfg = direct_config(tmp_path / "forward.yaml", es_url, index, port, mport)
    fwd = start_forward(cfg, tmp_path / "forward.log", port, mport)
    try:
        done = send(port)
        assert done.returncode == 0, done.stderr
        assert scrape_metric(mport, "envoygeo_forward_events_indexed_total") == n
    finally:
        assert stop(fwd) == 0
    assert wait_for_count(es_client, index, n) == n
    hits = es_client.search(index=index, size=n + 10, source_includes=["event.original"])
    assert {h["_source"]["event"]["original"] for h in hits["hits"]["hits"]} == {
        f"{prefix}-{i}" for i in range(n)}


def test_go_client_in_direct_mode_indexes_every_event(
        tmp_path: Path, go_client: Path, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> None:
    direct_mode_indexes_every_event(
        tmp_path, es_url, es_client, unique("egfwdgo"), 300, "direct",
        lambda port: run_client(go_client, port, 300, "direct", "-async"))


@pytest.fixture(scope="module")
def java_client() -> list[str]:
    """The Java client's command, its jar built by Maven (dependencies from Maven Central,
    cached in ~/.m2)."""
    mvn, java = shutil.which("mvn"), shutil.which("java")
    assert mvn is not None and java is not None, "Maven and a JDK are needed (on CI machines)"
    proc = subprocess.run([mvn, "-q", "-B", "package"], cwd=JAVA_CLIENT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [java, "-jar", str(JAVA_CLIENT / "target" / "fluentclient-java.jar")]


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_java_fluency_packed_forward_with_acks_is_relayed_once(
        tmp_path: Path, java_client: list[str], kafka_bootstrap: str,
        forward_topic: str, pki: Path, tls: bool) -> None:  # noqa: F811
    port, mport = free_port(), free_port()
    extra = {"tls_cert_file": str(pki / "server.pem"),
             "tls_key_file": str(pki / "server.key")} if tls else {}
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, forward_topic, port, mport,
                         **extra)
    fwd = start_forward(cfg, tmp_path / "forward.log", port, mport)
    n = 3000
    try:
        done = subprocess.run([*java_client, "-port", str(port), "-events", str(n), "-prefix",
                               "java", "-ack", *(["-ca", str(pki / "ca.pem")] if tls else [])],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(f"posted {n}")
        # fluency sends PackedForward chunks, each acked after Kafka had all of it
        assert scrape_metric(mport, "envoygeo_forward_events_received_total",
                             {"mode": "PackedForward"}) == n
        assert scrape_metric(mport, "envoygeo_forward_events_relayed_total") == n
        assert 1 <= scrape_metric(mport, "envoygeo_forward_chunks_acked_total") < n
    finally:
        assert stop(fwd) == 0
    events = [relayed(r.value()) for r in read_topic(kafka_bootstrap, forward_topic, n)]
    assert Counter(e["log"] for e in events) == Counter(f"java-{i}" for i in range(n))


def test_java_fluency_in_direct_mode_indexes_every_event(
        tmp_path: Path, java_client: list[str], es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> None:
    direct_mode_indexes_every_event(
        tmp_path, es_url, es_client, unique("egfwdjava"), 500, "jdirect",
        lambda port: subprocess.run([*java_client, "-port", str(port), "-events", "500",
                                     "-prefix", "jdirect", "-ack"],
                                    capture_output=True, text=True, timeout=180))
