"""`envoygeo forward` as a process, on the real Kafka, read by a real worker into the real
Elasticsearch (issue 13, relay mode).

Peers: the bytes a real Fluent Bit 5.1.1 sent (tests/data/fluent-bit-5.1.1, replayed
over TCP; with `require_ack_response` it must get back exactly the ack it got from the
capture server) and the Python `fluent-logger` (PyPI; Message mode, integer and
EventTime times; it has no ack option). Then `envoygeo run` consumes the topic and the
documents carry the client IP of each line.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
import yaml
from elasticsearch import Elasticsearch
from fluent import asyncsender, sender

from pipeline import native
from pipeline.sources.forward import unpacker
from tests.integration.harness import (
    ISTIO_LINE,
    ROOT,
    create_topic,
    free_port,
    log_messages,
    read_topic,
    scrape_metric,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_count,
    write_config,
)

pytestmark = pytest.mark.integration

CAPTURES = ROOT / "tests" / "data" / "fluent-bit-5.1.1"
REPLAYED = ("default", "ack", "gzip-ack", "time-int")
# source.ip of the 24 captured records, in order (what the worker derives from each line:
# the Envoy-seen downstream address; the default Envoy format logs none).
CAPTURE_IPS = [
    None, "127.0.0.5", "127.0.0.5", None, "127.0.0.6", "127.0.0.6", None, "81.2.69.142",
    "81.2.69.142", None, "2001:4860:4860::8888", "2001:4860:4860::8888", None,
    "89.160.20.112", "89.160.20.112", None, None, None, "89.160.20.112", "89.160.20.112",
    "175.16.199.5", None, "127.0.0.9", "127.0.0.9",
]
CLIENT_IP = "81.2.69.160"  # the Python client's lines


def relayed(value: bytes) -> dict[str, Any]:
    """A relayed Kafka value as a dict: Fluent Bit's `format msgpack` record where the
    compiled relay took the chunk (a map's first byte is never `{`), else its JSON."""
    if value[:1] == b"{":
        return orjson.loads(value)  # type: ignore[no-any-return]
    record = msgpack.unpackb(value, raw=False)
    assert isinstance(record, dict)
    return record


def capture(name: str) -> bytes:
    return (CAPTURES / name).read_bytes()


def expected_logs() -> list[str]:
    return [json.loads(line)["log"] for line in (CAPTURES / "expected-records.jsonl").open()]


def start_forward(cfg: Path, log_path: Path, port: int, metrics_port: int,
                  timeout_s: float = 60) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "forward", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"forward exited with {proc.returncode}: " \
                                    f"{log_path.read_text()}"
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz",
                                        timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"forward not ready: {log_path.read_text()}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def replay(port: int, data: bytes, expect_reply: bytes, timeout: float = 30) -> bytes:
    """Send a captured connection byte for byte; read what the server answers until it
    has said what the capture server said (or closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(expect_reply):
            part = s.recv(4096)
            if not part:
                break
            got += part
        return got


def closed_by_server(s: socket.socket) -> bool:
    """The server closed the connection without sending anything (a reset counts: it
    closed with our unread bytes still arriving)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def forward_config(path: Path, kafka: str, topic: str, port: int, metrics_port: int,
                   es_url: str = "http://127.0.0.1:9200", **forward: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka, "topics": [topic]},
        "elasticsearch": {"hosts": [es_url]},
        "metrics": {"host": "127.0.0.1"},
        "forward": {"host": "127.0.0.1", "port": port, "metrics_port": metrics_port,
                    "shutdown_grace_s": 20, **forward},
    }))
    return path


@pytest.fixture
def forward_topic(kafka_bootstrap: str, unique: Callable[[str], str]) -> Iterator[str]:
    topic = unique("fwd")
    create_topic(kafka_bootstrap, topic, partitions=3)
    yield topic


def test_fluent_bit_captures_and_fluent_logger_reach_elasticsearch(
        tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
        forward_topic: str, unique: Callable[[str], str]) -> None:
    topic, index = forward_topic, unique("egfwd")
    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, topic, port, mport,
                         tag_header=True)
    fwd_log = tmp_path / "forward.log"
    fwd = start_forward(cfg, fwd_log, port, mport)
    try:
        # 1. Fluent Bit's own bytes; with acks it must hear exactly what it heard then.
        for variant in REPLAYED:
            path = CAPTURES / f"forward-{variant}-conn1.server-sent.bin"
            want = path.read_bytes() if path.exists() else b""
            reply = replay(port, capture(f"forward-{variant}-conn1.bin"), want)
            assert reply == want, variant
        assert scrape_metric(mport, "envoygeo_forward_chunks_acked_total") == 2
        # Fluentd's UDP heartbeat on the same port is answered with 0x00.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(10)
            udp.sendto(b"\x00", ("127.0.0.1", port))
            assert udp.recvfrom(16)[0] == b"\x00"
        # 2. Bad input: a clear refusal, a counter, and the server keeps serving.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\xc1 not msgpack")
            assert closed_by_server(s)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(capture("forward-ack-conn1.bin")[:5000])  # and goes away mid-frame
        # 3. The Python fluent-logger: Message mode, integer times and EventTime.
        now = time.time()
        lines = [ISTIO_LINE.format(ts=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now)),
                                   n=i, size=100, client=CLIENT_IP, port=41000 + i)
                 for i in range(30)]
        plain = sender.FluentSender("envoy", host="127.0.0.1", port=port)
        nano = sender.FluentSender("envoy", host="127.0.0.1", port=port,
                                   nanosecond_precision=True)
        background = asyncsender.FluentSender("envoy", host="127.0.0.1", port=port)
        for i, line in enumerate(lines):
            client = (plain, nano, background)[i % 3]
            assert client.emit("access", {"log": line, "stream": "stdout"}), client.last_error
        for client in (plain, nano, background):
            client.close()
        total = 24 * len(REPLAYED) + len(lines)
        records = read_topic(kafka_bootstrap, topic, total)
        assert len(records) == total
        for bad in ("malformed", "disconnect_mid_frame"):
            assert scrape_metric(mport, "envoygeo_forward_bad_input_total",
                                 {"reason": bad}) == 1
        assert scrape_metric(mport, "envoygeo_forward_events_relayed_total") == total
    finally:
        assert stop(fwd) == 0
    messages = log_messages(fwd_log)
    assert any(f"stopped: {total} event(s) relayed, 2 chunk(s) acked" in m for m in messages)
    assert any("malformed msgpack" in m for m in messages)
    assert any("disconnected mid-frame" in m for m in messages)

    # Every record is a Fluent Bit kafka record the worker reads (msgpack where the
    # compiled relay took the chunk, JSON otherwise), tag in a header.
    values = [relayed(r.value()) for r in records]
    # Fluent Bit's frames (Forward mode, its default, and CompressedPackedForward with
    # `compress gzip`) are relayed as msgpack by the compiled core when it is built; the
    # Python client's Message-mode events, and everything without the core, as JSON.
    capture_forms = Counter(r.value()[:1] == b"{" for r, v in zip(records, values, strict=True)
                            if v["log"] in set(expected_logs()))
    assert capture_forms == {not native.available(): len(REPLAYED) * len(CAPTURE_IPS)}
    assert all(r.value()[:1] == b"{" for r, v in zip(records, values, strict=True)
               if v["log"] in lines)
    logs = Counter(v["log"] for v in values)
    assert all(logs[line] == len(REPLAYED) for line in expected_logs())
    assert all(logs[line] == 1 for line in lines)
    assert all(list(v)[0] == "@timestamp" for v in values)
    headers = {dict(r.headers())["fluent.tag"] for r in records}
    assert headers == {b"envoy.access", capture("forward-default-conn1.bin")[3:156]}

    # 4. The real worker indexes them, each with its client IP.
    wcfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                        topic=topic, group=f"{topic}-group", index=index)
    setup_worker_env(wcfg)
    worker = start_worker(wcfg, tmp_path / "worker.log")
    try:
        assert wait_for_count(es_client, index, total, procs=[worker]) == total
    finally:
        assert stop_worker(worker) == 0
    hits = es_client.search(index=index, size=total + 10,
                            source_includes=["source", "url"])["hits"]["hits"]
    assert len(hits) == total
    indexed = Counter((h["_source"].get("source", {}).get("ip"),
                       h["_source"].get("url", {}).get("original")) for h in hits)
    expected: Counter[tuple[str | None, str | None]] = Counter()
    urls = [_url(line) for line in expected_logs()]
    for ip, url in zip(CAPTURE_IPS, urls, strict=True):
        expected[(ip, url)] += len(REPLAYED)
    for i in range(len(lines)):
        expected[(CLIENT_IP, f"/api/items/{i}?page=1")] += 1
    assert indexed == expected


def _url(line: str) -> str | None:
    """The request target of a text or JSON access-log line."""
    if line.startswith("{"):
        return json.loads(line).get("path")
    if '"' not in line:
        return None
    request = line.split('"', 2)[1]
    parts = request.split(" ")
    return parts[1] if len(parts) == 3 and parts[1] != "-" else None  # "- - -": TCP


def _handshake(port: int, key: str) -> tuple[list[Any], socket.socket]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    u = unpacker(1 << 20)
    u.feed(s.recv(4096))
    helo = next(u)
    assert helo[0] == "HELO"
    nonce = helo[1]["nonce"]
    salt = b"\xfe\xff" * 8  # like Fluent Bit's: not UTF-8
    digest = hashlib.sha512(salt + b"test-client" + nonce + key.encode()).hexdigest()
    s.sendall(msgpack.packb(["PING", "test-client", salt, digest, "", ""]))
    u.feed(s.recv(4096))
    return next(u), s


def test_shared_key_handshake_on_the_real_process(
        tmp_path: Path, kafka_bootstrap: str, forward_topic: str) -> None:
    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, forward_topic, port, mport,
                         shared_key="s3cret-key", self_hostname="envoygeo-test")
    fwd_log = tmp_path / "forward.log"
    fwd = start_forward(cfg, fwd_log, port, mport)
    try:
        pong, s = _handshake(port, "wrong-key")
        assert pong[:4] == ["PONG", False, "shared_key mismatch", "envoygeo-test"]
        assert closed_by_server(s)  # refused
        s.close()
        # Without the handshake: the captured Fluent Bit stream is refused too.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.recv(4096)  # HELO
            try:
                raw.sendall(capture("forward-ack-conn1.bin"))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before it had all of it
            assert closed_by_server(raw)
        pong, s = _handshake(port, "s3cret-key")
        assert pong[:4] == ["PONG", True, "", "envoygeo-test"]
        s.sendall(capture("forward-gzip-ack-conn1.bin"))
        ack = b""
        while len(ack) < 30:
            part = s.recv(100)
            assert part, "closed without an ack"
            ack += part
        assert ack == capture("forward-gzip-ack-conn1.server-sent.bin")
        # a record over Kafka's 1 MB limit: dropped and counted, the rest acked
        s.sendall(msgpack.packb(["big", [[1, {"log": "x" * 1_500_000}],
                                         [2, {"log": "small"}]], {"chunk": "big-1"}]))
        ack = b""
        while len(ack) < len(msgpack.packb({"ack": "big-1"})):
            part = s.recv(100)
            assert part, "closed without an ack"
            ack += part
        assert msgpack.unpackb(ack) == {"ack": "big-1"}
        s.close()
        assert scrape_metric(mport, "envoygeo_forward_events_too_large_total") == 1
        assert scrape_metric(mport, "envoygeo_forward_bad_input_total",
                             {"reason": "auth_failed"}) == 1
        assert scrape_metric(mport, "envoygeo_forward_bad_input_total",
                             {"reason": "handshake"}) == 1
    finally:
        assert stop(fwd) == 0
    records = read_topic(kafka_bootstrap, forward_topic, 25, timeout_s=15)
    assert len(records) == 25
    assert all(r.headers() is None for r in records)  # forward.tag_header is off by default
    assert "small" in {relayed(r.value())["log"] for r in records}
    messages = log_messages(fwd_log)
    assert any("sent a wrong shared key" in m for m in messages)
    assert any("dropped 1 event(s) of a chunk larger than Kafka takes" in m for m in messages)


def test_a_missing_topic_is_refused_at_start(tmp_path: Path, kafka_bootstrap: str,
                                             unique: Callable[[str], str]) -> None:
    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, unique("nosuch"), port,
                         mport)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "forward", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 3
    assert "envoygeo setup" in proc.stderr


class ResendingClient:
    """What Fluent Bit does with Require_ack_response: send a chunk, wait for its ack,
    and on any failure (connection refused or lost, no ack) reconnect and send the
    same chunk again. `hooks[n]` runs once, after half of chunk n was sent ("mid") or
    after all of it ("sent")."""

    def __init__(self, port: int, hooks: dict[tuple[int, str], Callable[[], None]]) -> None:
        self.port = port
        self.hooks = hooks
        self.sock: socket.socket | None = None
        self.resent: list[int] = []

    def _hook(self, n: int, when: str) -> None:
        hook = self.hooks.pop((n, when), None)
        if hook is not None:
            hook()

    def send(self, n: int, frame: bytes, chunk: str, deadline_s: float = 90) -> None:
        deadline = time.monotonic() + deadline_s
        half = len(frame) // 2
        while True:
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                self.sock.sendall(frame[:half])
                self._hook(n, "mid")
                self.sock.sendall(frame[half:])
                self._hook(n, "sent")
                u = unpacker(1 << 16)
                while True:
                    data = self.sock.recv(4096)
                    if not data:
                        raise ConnectionError("closed before the ack")
                    u.feed(data)
                    got = list(u)
                    if got:
                        assert got == [{"ack": chunk}]
                        return
            except OSError:
                if self.sock is not None:
                    self.sock.close()
                self.sock = None
                if n not in self.resent:
                    self.resent.append(n)
                assert time.monotonic() < deadline, f"chunk {n} never acked"
                time.sleep(0.2)


def test_kill_9_mid_stream_loses_nothing_and_duplicates_only_resent_chunks(
        tmp_path: Path, kafka_bootstrap: str, forward_topic: str) -> None:
    """Killed once right after a whole chunk was sent (Kafka may or may not have it, the
    ack may or may not have gone out: either way), once with a chunk half sent (never
    acked, so resent)."""
    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, forward_topic, port, mport)
    fwd_log = tmp_path / "forward.log"
    procs = [start_forward(cfg, fwd_log, port, mport)]
    chunks, per_chunk, after_sent, mid_frame = 30, 50, 8, 20

    def kill_and_restart() -> None:
        procs[-1].kill()  # SIGKILL: no drain, whatever was in flight is not acked
        assert procs[-1].wait(30) == -signal.SIGKILL
        procs.append(start_forward(cfg, fwd_log, port, mport))

    client = ResendingClient(port, {(after_sent, "sent"): kill_and_restart,
                                    (mid_frame, "mid"): kill_and_restart})
    try:
        for n in range(chunks):
            payload = b"".join(msgpack.packb([1795914780 + n, {"log": f"req-{n}-{i}"}])
                               for i in range(per_chunk))
            chunk = f"chunk-{n}"
            client.send(n, msgpack.packb(["app", payload, {"chunk": chunk,
                                                           "size": per_chunk}]), chunk)
    finally:
        if client.sock is not None:
            client.sock.close()
        assert stop(procs[-1]) == 0
    assert len(procs) == 3 and mid_frame in client.resent
    assert set(client.resent) <= {after_sent, mid_frame}
    seen = Counter(relayed(r.value())["log"]
                   for r in read_topic(kafka_bootstrap, forward_topic, chunks * per_chunk))
    ids = [f"req-{n}-{i}" for n in range(chunks) for i in range(per_chunk)]
    assert all(seen[i] >= 1 for i in ids), "an acked or resent event is missing"
    assert set(seen) == set(ids)
    duplicated = {int(i.split("-")[1]) for i, c in seen.items() if c > 1}
    assert duplicated <= set(client.resent)  # only chunks the client sent twice


def test_bench_forward_reports_acked_rates(kafka_bootstrap: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "forward",
                           "--bootstrap", kafka_bootstrap, "--seconds", "1", "--runs", "1",
                           "--connections", "2", "--chunk-events", "200"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.splitlines()[-1])
    paths = ["native", "python"] if native.available() else ["python"]
    modes = ("Forward", "PackedForward", "CompressedPackedForward")
    assert [(r["path"], r["mode"]) for r in rows] == [(p, m) for p in paths for m in modes]
    assert [r["value_format"] for r in rows] == [
        "msgpack" if p == "native" else "json" for p in paths for _ in modes]
    assert proc.stdout.count("worker on ") == len(paths)
    for row in rows:
        assert row["events_per_s"] > 0 and row["cpu_us_per_event"] > 0
        assert row["chunk_bytes_on_wire"] > 0 and row["bytes_per_event"] > 100


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's test PKI (deploy/local/tls/certs): CA, localhost server, clients."""
    out = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", str(ROOT / "deploy" / "local" / "tls" / "certs"), str(out)],
                   check=True, capture_output=True, timeout=120)
    return out


def test_tls_and_client_certificates(tmp_path: Path, kafka_bootstrap: str, forward_topic: str,
                                     pki: Path) -> None:
    import ssl

    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, forward_topic, port, mport,
                         tls_cert_file=str(pki / "server.pem"),
                         tls_key_file=str(pki / "server.key"),
                         tls_ca_file=str(pki / "ca.pem"))
    fwd_log = tmp_path / "forward.log"
    fwd = start_forward(cfg, fwd_log, port, mport)

    def context(cert: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if cert:
            ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
        return ctx

    try:
        # a client with a certificate from the CA: Fluent Bit's bytes, acked over TLS
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context("client").wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(capture("forward-gzip-ack-conn1.bin"))
            reply = b""
            while len(reply) < 30:
                part = s.recv(100)
                assert part, "closed without an ack"
                reply += part
            assert reply == capture("forward-gzip-ack-conn1.server-sent.bin")
        # no client certificate, or one from another CA: the handshake fails
        for cert in (None, "other-client"):
            try:  # TLS 1.3: the client learns of the refusal at its first read
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                        context(cert).wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(capture("forward-ack-conn1.bin"))
                    assert s.recv(100) == b"", cert
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                pass
        # plain TCP to the TLS port: nothing relayed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(capture("forward-ack-conn1.bin"))
            assert closed_by_server(s)
        assert scrape_metric(mport, "envoygeo_forward_events_relayed_total") == 24
        for _ in range(50):
            if scrape_metric(mport, "envoygeo_forward_bad_input_total", {"reason": "tls"}) == 3:
                break
            time.sleep(0.1)
        assert scrape_metric(mport, "envoygeo_forward_bad_input_total", {"reason": "tls"}) == 3
    finally:
        assert stop(fwd) == 0
    assert len(read_topic(kafka_bootstrap, forward_topic, 24, timeout_s=10)) == 24
    failures = [m for m in log_messages(fwd_log) if "TLS handshake failed" in m]
    assert len(failures) == 3
    assert any("CERTIFICATE_REQUIRED" in m or "certificate" in m.lower() for m in failures)
    assert any("WRONG_VERSION_NUMBER" in m or "wrong version" in m for m in failures)


def test_a_tls_key_that_does_not_load_is_a_configuration_error(
        tmp_path: Path, kafka_bootstrap: str, pki: Path) -> None:
    cfg = forward_config(tmp_path / "forward.yaml", kafka_bootstrap, "unused", free_port(),
                         free_port(), tls_cert_file=str(pki / "server.pem"),
                         tls_key_file=str(pki / "client.key"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "forward", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "forward.tls_cert_file/tls_key_file" in proc.stderr
