"""`envoygeo bench forward`: events/s one `envoygeo forward` process relays to Kafka, acked.

The load is what Fluent Bit sends with `Require_ack_response On`: chunks of Fluent Bit
records (`[EventTime, {time, stream, _p, log}]`, the access-log lines of the Fluent Bit
5.1.1 capture) as PackedForward, or CompressedPackedForward with `--gzip`, on several
connections, each waiting for a chunk's ack before sending the next. A rate counts only
acked events (Kafka has every record). CPU per event is the forward process's own CPU
(all its threads, from /proc) over the events acked meanwhile; the load generator runs
in this process and is not counted. Medians of `--runs`.
"""

from __future__ import annotations

import gzip
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import click
import msgpack
import orjson
import yaml

from pipeline.kafka_log import kafka_logger

ROOT = Path(__file__).resolve().parents[2]
_LINES = ROOT / "tests" / "data" / "fluent-bit-5.1.1" / "expected-records.jsonl"
_FALLBACK = ('[2026-11-29T01:13:00.665Z] "GET /hello.txt?q=v1 HTTP/1.1" 200 - 0 20 3 2 '
             '"127.0.0.5" "geo-test/1.0" "75527e13-e0d8-46a1-ba18-e18fec389f58" '
             '"127.0.0.1:18000" "127.0.0.1:18020"')


def _lines() -> list[str]:
    if not _LINES.exists():
        return [_FALLBACK]
    lines = [orjson.loads(raw)["log"] for raw in _LINES.read_bytes().splitlines()]
    return [line for line in lines if len(line) < 2000]


def chunk_payload(events: int, compress: bool) -> tuple[bytes, int]:
    """The entries of one chunk (gzipped with `compress`) and their uncompressed size."""
    lines = _lines()
    now = int(time.time())
    entries = b"".join(msgpack.packb([
        msgpack.ExtType(0, now.to_bytes(4, "big") + (i * 1000).to_bytes(4, "big")),
        {"time": "2026-11-29T01:13:00.667000123Z", "stream": "stdout", "_p": "F",
         "log": lines[i % len(lines)]}]) for i in range(events))
    return (gzip.compress(entries) if compress else entries), len(entries)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, connections: int, seconds: float, events: int,
         compress: bool) -> int:
    """Events acked in `seconds` by `connections` senders, each waiting for its acks."""
    payload, _ = chunk_payload(events, compress)
    option: dict[str, Any] = {"size": events}
    if compress:
        option["compressed"] = "gzip"
    acked = [0] * connections
    errors: list[str] = []

    def sender(c: int) -> None:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                u = msgpack.Unpacker(raw=False)
                end = time.monotonic() + seconds
                n = 0
                while time.monotonic() < end:
                    chunk = f"{c}-{n}"
                    s.sendall(msgpack.packb(["bench.forward", payload,
                                             {**option, "chunk": chunk}]))
                    while True:
                        data = s.recv(4096)
                        if not data:
                            raise ConnectionError("the server closed the connection")
                        u.feed(data)
                        if any(reply.get("ack") == chunk for reply in u):
                            break
                    n += 1
                    acked[c] += events
        except Exception as exc:  # reported, not hidden behind a low rate
            errors.append(f"connection {c}: {exc!r}")

    threads = [threading.Thread(target=sender, args=(c,)) for c in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise click.ClickException(f"load failed: {errors[0]}")
    return sum(acked)


def _wait_ready(proc: subprocess.Popen[bytes], metrics_port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"envoygeo forward exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise click.ClickException("envoygeo forward did not become ready in 60 s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@click.command("forward")
@click.option("--bootstrap", default="127.0.0.1:9092", show_default=True,
              help="Kafka brokers (a topic is created for the run and deleted after).")
@click.option("--connections", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("--chunk-events", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(0.5))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--partitions", default=3, show_default=True, type=click.IntRange(1))
def command(bootstrap: str, connections: int, chunk_events: int, seconds: float, runs: int,
            partitions: int) -> None:
    """Events/s one `envoygeo forward` relays to Kafka with acks, and its CPU per event,
    for PackedForward and CompressedPackedForward (gzip) chunks.

    \b
    Example:
      envoygeo bench forward --connections 4 --seconds 10 --runs 3
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"envoygeo-bench-forward-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=kafka_logger())
    admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                  replication_factor=1)])[topic].result(30)
    port, metrics_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, log = Path(tmp) / "forward.yaml", Path(tmp) / "forward.log"
        cfg.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": bootstrap, "topics": [topic]},
            "metrics": {"host": "127.0.0.1"},
            "forward": {"host": "127.0.0.1", "port": port, "metrics_port": metrics_port}}))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "forward", "-c", str(cfg),
                 "--log-level", "WARNING"], stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, metrics_port, log)
            rows = []
            for compress in (False, True):
                payload, raw = chunk_payload(chunk_events, compress)
                rates, cpus = [], []
                for _ in range(runs):
                    cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
                    events = load(port, connections, seconds, chunk_events, compress)
                    elapsed, cpu = time.monotonic() - t0, _cpu_s(proc.pid) - cpu0
                    rates.append(events / elapsed)
                    cpus.append(cpu / max(events, 1) * 1e6)
                rows.append({
                    "mode": "CompressedPackedForward" if compress else "PackedForward",
                    "events_per_s": round(statistics.median(rates)),
                    "cpu_us_per_event": round(statistics.median(cpus), 2),
                    "events_per_cpu_s": round(1e6 / statistics.median(cpus)),
                    "bytes_per_event": round(raw / chunk_events),
                    "chunk_bytes_on_wire": len(payload),
                    "runs": [round(r) for r in rates]})
        finally:
            proc.terminate()
            proc.wait(60)
            admin.delete_topics([topic])
    click.echo(f"envoygeo forward: {connections} connection(s), {chunk_events} events per "
               f"chunk, each acked before the next, {runs} run(s) of {seconds:g} s, medians; "
               f"CPU is the forward process's (all threads), load average "
               f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s)")
    for row in rows:
        click.echo(f"  {row['mode']:<24} {row['events_per_s']:>8,} events/s  "
                   f"{row['cpu_us_per_event']:>6} us CPU/event  "
                   f"({row['events_per_cpu_s']:,} events per CPU-second; "
                   f"{row['bytes_per_event']} B/event, {row['chunk_bytes_on_wire']:,} B/chunk)")
    click.echo(orjson.dumps(rows).decode())
