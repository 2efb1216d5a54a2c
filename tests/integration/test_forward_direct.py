"""`envoygeo forward` in mode direct, as a process, into the real Elasticsearch, no Kafka
(issue 13 item 1, the second mode).

Peers: the bytes a real Fluent Bit 5.1.1 sent (tests/data/fluent-bit-5.1.1; with
`require_ack_response` the process must answer exactly the captured ack), the Python
`fluent-logger` (Message mode, no ack), and a client that resends unacknowledged
chunks as Fluent Bit does, across a kill -9. Elasticsearch is reached through a TCP
proxy of the test's own where an outage is needed, so the shared node never stops.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
from elasticsearch import Elasticsearch
from fluent import sender

from pipeline.sources.forward import unpacker
from tests.integration.harness import (
    ISTIO_LINE,
    ROOT,
    assert_exactly_once,
    count_docs,
    free_port,
    log_messages,
    request_id_counts,
    scrape_metric,
    wait_for_count,
)
from tests.integration.test_forward import (
    CAPTURE_IPS,
    CLIENT_IP,
    REPLAYED,
    ResendingClient,
    _url,
    capture,
    closed_by_server,
    expected_logs,
    replay,
    start_forward,
    stop,
)

pytestmark = pytest.mark.integration

CAPTURES = ROOT / "tests" / "data" / "fluent-bit-5.1.1"


def direct_config(path: Path, es_url: str, index: str, port: int, metrics_port: int,
                  parse: dict[str, Any] | None = None, es: dict[str, Any] | None = None,
                  rates: dict[str, Any] | None = None, **forward: Any) -> Path:
    """A direct-mode configuration: no kafka section at all (nothing needs it)."""
    path.write_text(yaml.safe_dump({
        "elasticsearch": {"hosts": [es_url], "index": index,
                          "alerts_index": f"{index}-alerts", **(es or {})},
        "metrics": {"host": "127.0.0.1"},
        "parse": parse or {},
        "rates": rates or {},
        "forward": {"host": "127.0.0.1", "port": port, "metrics_port": metrics_port,
                    "mode": "direct", "shutdown_grace_s": 20,
                    "dead_letter_index": f"{index}-dead", **forward},
    }))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "setup", "--no-topics", "-c",
                    str(path)], check=True, capture_output=True, timeout=120, cwd=ROOT)
    return path


def line(n: int, client: str = CLIENT_IP) -> str:
    ts = time.time()
    return ISTIO_LINE.format(ts=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts)),
                             n=n, size=100, client=client, port=40000 + n % 20000)


def test_captures_fluent_logger_and_bad_input_indexed_directly(
        tmp_path: Path, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> None:
    index = unique("envoygeo-logs-direct")
    port, mport = free_port(), free_port()
    cfg = direct_config(tmp_path / "direct.yaml", es_url, index, port, mport,
                        parse={"unparsed": "dead_letter"})
    fwd_log = tmp_path / "forward.log"
    fwd = start_forward(cfg, fwd_log, port, mport)
    try:
        # 1. Fluent Bit's own bytes; acks exactly as the capture server answered.
        for variant in REPLAYED:
            path = CAPTURES / f"forward-{variant}-conn1.server-sent.bin"
            want = path.read_bytes() if path.exists() else b""
            assert replay(port, capture(f"forward-{variant}-conn1.bin"), want) == want, variant
        assert scrape_metric(mport, "envoygeo_forward_chunks_acked_total") == 2
        # 2. Bad input: closed, counted, the server goes on.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\xc1 not msgpack")
            assert closed_by_server(s)
        # 3. fluent-logger (Message mode, no ack), with one line no format parses.
        lines = [line(i) for i in range(20)]
        client = sender.FluentSender("envoy", host="127.0.0.1", port=port)
        for text in [*lines, "this is not an access log"]:
            assert client.emit("access", {"log": text, "stream": "stdout"}), client.last_error
        client.close()
        # The ack and gzip-ack captures carry the same chunk id (one Fluent Bit chunk,
        # sent once plain, once gzipped): the second overwrites the first by id.
        total = 24 * (len(REPLAYED) - 1) + len(lines)
        assert wait_for_count(es_client, index, total, timeout_s=60, procs=[fwd]) == total
        assert wait_for_count(es_client, f"{index}-dead", 1, timeout_s=30) == 1
        assert scrape_metric(mport, "envoygeo_forward_events_indexed_total") == \
            24 * len(REPLAYED) + len(lines)
        assert scrape_metric(mport, "envoygeo_forward_events_dead_lettered_total",
                             {"stage": "parse"}) == 1
        assert scrape_metric(mport, "envoygeo_forward_bad_input_total",
                             {"reason": "malformed"}) == 1
    finally:
        assert stop(fwd) == 0
    messages = log_messages(fwd_log)
    assert any(f"stopped: {24 * len(REPLAYED) + len(lines)} event(s) indexed, "
               "1 dead-lettered, 1 unparsed, 0 alert(s), 2 chunk(s) acked" in m
               for m in messages), messages[-3:]
    assert any("malformed msgpack" in m for m in messages)

    time.sleep(0.5)
    assert count_docs(es_client, index) == total
    hits = es_client.search(index=index, size=total + 10,
                            source_includes=["source", "url"])["hits"]["hits"]
    indexed = Counter((h["_source"].get("source", {}).get("ip"),
                       h["_source"].get("url", {}).get("original")) for h in hits)
    expected: Counter[tuple[str | None, str | None]] = Counter()
    for ip, url in zip(CAPTURE_IPS, [_url(x) for x in expected_logs()], strict=True):
        expected[(ip, url)] += len(REPLAYED) - 1
    for i in range(len(lines)):
        expected[(CLIENT_IP, f"/api/items/{i}?page=1")] += 1
    assert indexed == expected
    ids = {h["_id"] for h in hits}
    assert "fwd-ofUIM6hKShPK5FrtqBdklA==-0-0" in ids  # the captured chunk id, event 0
    dead = es_client.search(index=f"{index}-dead")["hits"]["hits"][0]["_source"]
    assert dead["envoygeo"]["stage"] == "parse"
    assert "this is not an access log" in dead["event"]["original"]


def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(
        tmp_path: Path, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> None:
    """Killed once right after a whole chunk was sent (indexed or not, acked or not),
    once with a chunk half sent; the client resends what was not acked. The resent
    chunks overwrite their own documents: exactly one document per event."""
    index = unique("envoygeo-logs-direct")
    port, mport = free_port(), free_port()
    cfg = direct_config(tmp_path / "direct.yaml", es_url, index, port, mport)
    fwd_log = tmp_path / "forward.log"
    procs = [start_forward(cfg, fwd_log, port, mport)]
    chunks, per_chunk, after_sent, mid_frame = 30, 50, 8, 20

    def kill_and_restart() -> None:
        procs[-1].kill()
        assert procs[-1].wait(30) == -signal.SIGKILL
        procs.append(start_forward(cfg, fwd_log, port, mport))

    client = ResendingClient(port, {(after_sent, "sent"): kill_and_restart,
                                    (mid_frame, "mid"): kill_and_restart})
    frames = []
    try:
        for n in range(chunks):
            payload = b"".join(
                msgpack.packb([int(time.time()), {"log": line(n * per_chunk + i)}])
                for i in range(per_chunk))
            frames.append(msgpack.packb(["envoy", payload, {"chunk": f"chunk-{n}",
                                                            "size": per_chunk}]))
            client.send(n, frames[n], f"chunk-{n}")
        # Chunks indexed and acked, sent again (a shipper whose ack got lost does):
        # they overwrite their documents.
        for n in (0, after_sent, chunks - 1):
            client.send(n, frames[n], f"chunk-{n}")
        # A frame without an ack request, written twice: its id is its content's digest.
        extra = 5
        plain = msgpack.packb(["envoy", [[int(time.time()), {"log": line(10_000 + i)}]
                                         for i in range(extra)]])
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(plain)
        total = chunks * per_chunk + extra
        deadline = time.monotonic() + 30
        while scrape_metric(mport, "envoygeo_forward_events_indexed_total") < \
                3 * per_chunk + 2 * extra and time.monotonic() < deadline:
            time.sleep(0.2)  # this process's count: the resent chunks and both frames
    finally:
        if client.sock is not None:
            client.sock.close()
        assert stop(procs[-1]) == 0
    assert len(procs) == 3 and mid_frame in client.resent
    assert set(client.resent) <= {after_sent, mid_frame}
    counts = request_id_counts(es_client, index)
    assert sum(counts.values()) == total and set(counts.values()) == {1}
    assert set(counts) == {f"req-{i}" for i in range(chunks * per_chunk)} | {
        f"req-{10_000 + i}" for i in range(extra)}
    assert count_docs(es_client, index) == total


class Proxy:
    """A TCP proxy to Elasticsearch that the test can take down and bring back on the
    same port: an outage of the node as the forward process sees it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            # shutdown first: close() alone leaves the blocked accept() listening.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            a.close()
            b.close()


def _ready(mport: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_elasticsearch_outage_holds_the_ack_until_it_is_back(
        tmp_path: Path, es_url: str, es_client: Elasticsearch,
        unique: Callable[[str], str]) -> None:
    """While Elasticsearch does not answer the chunk is not acked, /readyz says why and
    the gauge is 0; once it is back the same chunk is indexed and acked."""
    index = unique("envoygeo-logs-direct")
    host, _, es_port = es_url.removeprefix("http://").partition(":")
    proxy = Proxy((host, int(es_port or 9200)))
    proxy.up()
    port, mport = free_port(), free_port()
    cfg = direct_config(tmp_path / "direct.yaml", f"http://127.0.0.1:{proxy.port}", index,
                        port, mport, es={"retry_initial_backoff_ms": 100,
                                         "retry_max_backoff_ms": 500,
                                         "request_timeout_s": 3})
    fwd = start_forward(cfg, tmp_path / "forward.log", port, mport)

    def chunk(n: int) -> bytes:
        payload = b"".join(msgpack.packb([int(time.time()), {"log": line(n * 10 + i)}])
                           for i in range(10))
        return msgpack.packb(["envoy", payload, {"chunk": f"c{n}", "size": 10}])

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            u = unpacker(1 << 16)
            s.sendall(chunk(0))
            u.feed(s.recv(100))
            assert list(u) == [{"ack": "c0"}]
            proxy.down()
            s.sendall(chunk(1))
            s.settimeout(4)
            with pytest.raises(TimeoutError):
                s.recv(100)  # no ack while Elasticsearch is away
            status, body = _ready(mport)
            assert status == 503 and "Elasticsearch is not accepting writes" in body, body
            assert scrape_metric(mport, "envoygeo_forward_elasticsearch_writable") == 0
            assert scrape_metric(mport, "envoygeo_forward_inflight_chunks") == 1
            proxy.up()
            s.settimeout(30)
            u.feed(s.recv(100))
            assert list(u) == [{"ack": "c1"}]
        assert _ready(mport)[0] == 200
        assert scrape_metric(mport, "envoygeo_forward_elasticsearch_writable") == 1
    finally:
        assert stop(fwd) == 0
        proxy.down()
    assert_exactly_once(es_client, index, 20)


def test_direct_mode_refuses_kafka_only_keys_and_starts_without_kafka(
        tmp_path: Path, es_url: str, unique: Callable[[str], str]) -> None:
    index = unique("envoygeo-logs-direct")
    cfg = direct_config(tmp_path / "direct.yaml", es_url, index, free_port(), free_port())
    bad = yaml.safe_load(cfg.read_text())
    bad["forward"]["topic"] = "envoy-access-logs"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "forward", "-c",
                          str(tmp_path / "bad.yaml")], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "forward: topic is the Kafka topic of mode relay" in out.stderr
    # Kafka pointed at nothing: direct mode never asks it.
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "check-config", "-c",
                          str(cfg), "--connect", "--timeout", "3"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT,
                         env={**os.environ,
                              "ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kafka          skipped  forward.mode is direct (no Kafka)" in out.stdout


def test_bench_forward_direct_reports_acked_rates(es_url: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "forward-direct",
                           "--es-url", es_url, "--seconds", "1", "--runs", "1",
                           "--connections", "2", "--chunk-events", "200"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert [r["mode"] for r in rows] == ["PackedForward", "CompressedPackedForward"]
    for row in rows:
        assert row["events_per_s"] > 0 and row["cpu_us_per_event"] > 0
    assert "documents in envoygeo-logs-bench-direct-" in proc.stderr


def test_rates_in_redis_and_alerts_as_the_worker_does_them(
        tmp_path: Path, es_url: str, es_client: Elasticsearch, redis_url: str,
        unique: Callable[[str], str]) -> None:
    """rates.backend redis: each document carries its client's counts, and a client
    over a rule's threshold gets its alert in the alerts index (no alerts topic)."""
    import redis

    index, prefix = unique("envoygeo-logs-direct"), unique("egdirect")
    port, mport = free_port(), free_port()
    cfg = direct_config(tmp_path / "direct.yaml", es_url, index, port, mport, rates={
        "backend": "redis", "redis_url": redis_url, "key_prefix": prefix,
        "alerts": [{"name": "burst", "window_s": 60, "threshold": 10}]})
    fwd = start_forward(cfg, tmp_path / "forward.log", port, mport)
    try:
        payload = b"".join(msgpack.packb([int(time.time()), {"log": line(i)}])
                           for i in range(15))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(msgpack.packb(["envoy", payload, {"chunk": "r0", "size": 15}]))
            u = unpacker(1 << 16)
            u.feed(s.recv(100))
            assert list(u) == [{"ack": "r0"}]
        assert scrape_metric(mport, "envoygeo_forward_alerts_total") == 1
    finally:
        assert stop(fwd) == 0
    assert count_docs(es_client, index) == 15
    hits = es_client.search(index=index, size=20, sort=[{"http.request.id": "asc"}],
                            source_includes=["envoygeo.rate", "http.request.id"])
    rates = {h["_source"]["http"]["request"]["id"]: h["_source"]["envoygeo"]["rate"]["60s"]
             for h in hits["hits"]["hits"]}
    assert sorted(rates.values()) == list(range(1, 16))
    assert wait_for_count(es_client, f"{index}-alerts", 1, timeout_s=30) == 1
    alert = es_client.search(index=f"{index}-alerts")["hits"]["hits"][0]["_source"]
    assert alert["rule"]["name"] == "burst"
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(f"{prefix}*"))  # counted in Redis, not in memory
    finally:
        client.close()
