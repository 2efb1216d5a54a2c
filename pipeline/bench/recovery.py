"""`envoygeo bench recovery`: how long indexing stops after a crash, a join and a leave.

Against a running Kafka and Elasticsearch, with steady input (`--rate` records/s over a
6-partition topic) and real `envoygeo run` processes:

* **restart**: worker A indexing steadily, `kill -9`, restarted at once; the time from
  the restart (process spawn, so Python start-up is included) to its first indexed
  record. Repeated `--runs` times; all runs and the median are printed.
* **join / leave**: A running, worker B starts (join), then gets SIGTERM (leave). The
  longest stretch with no indexing progress at all, and the longest stretch in which
  some partition made none (its input keeps arriving throughout), in each phase; the
  same figure before the join is the steady-state baseline (commit pacing).

"Indexed" is read from the group's committed offsets, not from Elasticsearch: the
worker commits an offset only after everything below it is indexed, so a commit
moving is indexing progress (seen a few ms late, never early), and reading offsets
over one long-lived client puts no refresh/count load on the node being measured.

`--variant` (repeatable) measures the membership choices side by side:
classic-static (the default), classic-dynamic, consumer-static, consumer-dynamic.
"""

from __future__ import annotations

import calendar
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
import yaml

from pipeline.bench.core import corpus
from pipeline.bench.e2e import _config, _cpu_seconds, _delete_topics
from pipeline.bench.enrich_micro import default_geoip_path
from pipeline.config import KafkaSettings, load_settings
from pipeline.kafka_log import kafka_logger
from pipeline.setup import ensure_topics, install_templates
from pipeline.sinks.elasticsearch import make_client
from pipeline.sinks.kafka import produce_waiting
from pipeline.sources.kafka import CommittedOffsets

PARTITIONS = 6
VARIANTS = ("classic-static", "classic-dynamic", "consumer-static", "consumer-dynamic")


class SteadyInput:
    """Produces the corpus round and round at about `rate` records/s until stopped."""

    def __init__(self, bootstrap: str, topic: str, records: list[bytes], rate: float) -> None:
        from confluent_kafka import Producer

        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                                   "enable.idempotence": True}, logger=kafka_logger())
        self._topic, self._records, self._rate = topic, records, rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-input", daemon=True)
        self.produced = 0

    def start(self) -> SteadyInput:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0, i = time.monotonic(), 0
        while not self._stop.is_set():
            due = int((time.monotonic() - t0) * self._rate)
            while i < due:
                value = self._records[i % len(self._records)]
                produce_waiting(self._producer, self._topic, value, str(i).encode())
                i += 1
            self.produced = i
            self._producer.poll(0)
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._producer.flush(30)


@dataclass
class Stalls:
    total: float  # longest stretch with no partition committing
    partition: float  # longest stretch in which some partition committed nothing


def _stalls(samples: list[tuple[float, list[int]]]) -> Stalls:
    """Longest gaps between commit progress, overall and per partition, in a sampled
    window (the window's ends count as progress: a gap is measured inside it)."""
    if len(samples) < 2:
        return Stalls(0.0, 0.0)
    start, end = samples[0][0], samples[-1][0]
    last_total, last_part = start, [start] * PARTITIONS
    worst_total, worst_part = 0.0, 0.0
    prev = samples[0][1]
    for t, offs in samples[1:]:
        if sum(offs) > sum(prev):
            worst_total, last_total = max(worst_total, t - last_total), t
        for p in range(PARTITIONS):
            if offs[p] > prev[p]:
                worst_part, last_part[p] = max(worst_part, t - last_part[p]), t
        prev = offs
    worst_total = max(worst_total, end - last_total)
    worst_part = max(worst_part, *(end - t for t in last_part))
    return Stalls(worst_total, worst_part)


def _sample(progress: CommittedOffsets, seconds: float, procs: list[subprocess.Popen[bytes]],
            every_s: float = 0.05) -> list[tuple[float, list[int]]]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise click.ClickException(f"worker exited with {p.returncode} (see its log)")
        out.append((time.monotonic(), progress.per_partition(10)))
        time.sleep(every_s)
    return out


def _spawn(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115


def _wait_progress(progress: CommittedOffsets, proc: subprocess.Popen[bytes], timeout_s: float,
                   since: int | None = None) -> float:
    """Seconds until the committed total exceeds `since` (default: its current value)."""
    t0 = time.monotonic()
    base = sum(progress.per_partition(10)) if since is None else since
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise click.ClickException(f"worker exited with {proc.returncode} (see its log)")
        if sum(progress.per_partition(10)) > base:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise click.ClickException(f"no indexing progress within {timeout_s:.0f}s")


def _assigned_at(log: Path, after_wall: float) -> float | None:
    """Wall-clock time of the first `assigned <partitions>` line logged after a moment."""
    for raw in log.read_bytes().splitlines():
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        msg = str(rec.get("message", "")) if isinstance(rec, dict) else ""
        if msg.startswith("assigned ") and msg != "assigned nothing":
            stamp = rec["@timestamp"]  # 2026-01-02T03:04:05.678Z
            wall = (calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
                    + int(stamp[20:23]) / 1000)
            if wall >= after_wall:
                return wall
    return None


def _worker_config(base: Path, path: Path, variant: str, instance: str,
                   session_timeout_ms: int | None) -> Path:
    protocol, membership = variant.split("-")
    cfg = yaml.safe_load(base.read_text())
    kafka: dict[str, Any] = cfg["kafka"]
    kafka.update({"group_protocol": protocol, "static_membership": membership == "static",
                  "batch_max_wait_ms": 200})
    if membership == "static":
        kafka["group_instance_id"] = instance
    if session_timeout_ms and protocol == "classic":
        kafka["session_timeout_ms"] = session_timeout_ms
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_variant(variant: str, runs: int, rate: float, bootstrap: str, es_url: str,
                 geoip: str | None, records: list[bytes], work: Path,
                 session_timeout_ms: int | None, restart_timeout_s: float,
                 keep: bool) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    topic = index = group = f"bench-recovery-{variant}-{run_id}"
    base = _config(work / f"{variant}.yaml", bootstrap, es_url, topic, index, group, geoip,
                   500, 2)
    settings = load_settings(base)
    with make_client(settings.elasticsearch) as es:
        install_templates(es, settings)
    ensure_topics(settings)
    cfg_a = _worker_config(base, work / f"{variant}-a.yaml", variant, "bench-a",
                           session_timeout_ms)
    cfg_b = _worker_config(base, work / f"{variant}-b.yaml", variant, "bench-b",
                           session_timeout_ms)
    log_a, log_b = work / f"{variant}-a.log", work / f"{variant}-b.log"
    steady = SteadyInput(bootstrap, topic, records, rate).start()
    progress = CommittedOffsets(bootstrap, group, topic, PARTITIONS)
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"restart": [], "assigned": [], "restart_cpu": []}
    try:
        a = _spawn(cfg_a, log_a)
        procs.append(a)
        _wait_progress(progress, a, 120)
        for r in range(runs):
            time.sleep(3)  # steady indexing, then the crash
            _wait_progress(progress, a, 30)
            a.kill()
            a.wait(30)
            before = sum(progress.per_partition(10))
            t_wall = time.time()
            a = _spawn(cfg_a, log_a)
            procs[0] = a
            try:
                waited = _wait_progress(progress, a, restart_timeout_s, since=before)
            except click.ClickException as exc:
                # e.g. KIP-848 refuses a static id a dead member still holds: that is a
                # result to print, and the join/leave phases can still be measured.
                out["failed"] = f"restart {r + 1}: {exc.message}"
                click.echo(f"  {variant} {out['failed']}", err=True)
                a.kill()
                a.wait(30)
                a = _spawn(cfg_a, log_a)
                procs[0] = a
                _wait_progress(progress, a, 300)
                break
            out["restart"].append(waited)
            out["restart_cpu"].append(_cpu_seconds([a.pid]))
            assigned = _assigned_at(log_a, t_wall)
            out["assigned"].append(assigned - t_wall if assigned else float("nan"))
            click.echo(f"  {variant} restart {r + 1}/{runs}: first indexed {waited:.2f}s "
                       f"after the restart (partitions assigned after "
                       f"{out['assigned'][-1]:.2f}s)", err=True)
        # Join and leave, with the baseline just before.
        time.sleep(2)
        out["baseline"] = _stalls(_sample(progress, 8, [a]))
        cpu0, n0, t0 = _cpu_seconds([a.pid]), sum(progress.per_partition(10)), time.monotonic()
        b = _spawn(cfg_b, log_b)
        procs.append(b)
        out["join"] = _stalls(_sample(progress, 15, [a, b]))
        cpu_b = _cpu_seconds([b.pid])
        b.terminate()
        leave = _sample(progress, 12, [a])
        if b.wait(60) != 0:
            raise click.ClickException(f"worker B exited with {b.returncode} on SIGTERM")
        out["leave"] = _stalls(leave)
        cpu1, n1 = _cpu_seconds([a.pid]), sum(progress.per_partition(10))
        if cpu0 is not None and cpu1 is not None and cpu_b is not None and n1 > n0:
            out["cpu_us"] = (cpu1 - cpu0 + cpu_b) / (n1 - n0) * 1e6
            out["rate"] = (n1 - n0) / (time.monotonic() - t0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        steady.stop()
        progress.close()
        if not keep:
            with make_client(settings.elasticsearch) as es:
                for name in (index, f"{index}-alerts"):
                    es.options(ignore_status=404).indices.delete(index=name)
            _delete_topics(settings.kafka, [topic, f"{topic}-dlq", f"{topic}-alerts"])
    return out


@click.command()
@click.option("--runs", default=5, show_default=True, help="kill -9 / restart cycles.")
@click.option("--rate", default=500.0, show_default=True, help="Steady input, records/s.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(VARIANTS),
              help="Group protocol and membership to measure (repeatable). Default: the "
                   "configured defaults (kafka.group_protocol, kafka.static_membership).")
@click.option("--session-timeout-ms", type=int, default=None,
              help="Classic protocol's session.timeout.ms (default: kafka.session_timeout_ms).")
@click.option("--restart-timeout", default=120.0, show_default=True,
              help="Give up on a restart after this many seconds.")
@click.option("--kafka", "bootstrap", default="127.0.0.1:9092", show_default=True)
@click.option("--es", "es_url", default="http://127.0.0.1:9200", show_default=True)
@click.option("--geoip", "geoip_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--keep", is_flag=True, help="Keep the benchmark indices and topics.")
def command(runs: int, rate: float, variants: tuple[str, ...], session_timeout_ms: int | None,
            restart_timeout: float, bootstrap: str, es_url: str, geoip_path: str | None,
            keep: bool) -> None:
    """Restart after kill -9 -> first indexed record; join/leave indexing stalls."""
    defaults = KafkaSettings()
    if not variants:
        variants = (f"{defaults.group_protocol}-"
                    f"{'static' if defaults.static_membership else 'dynamic'}",)
    geoip_path = geoip_path or default_geoip_path()
    records, _ = corpus(20_000, 5_000)
    work = Path(tempfile.mkdtemp(prefix="envoygeo-bench-recovery-"))
    click.echo(f"steady input {rate:.0f} records/s over {PARTITIONS} partitions; Kafka "
               f"{bootstrap}, Elasticsearch {es_url}; worker logs in {work}", err=True)
    results = {}
    for variant in variants:
        results[variant] = _run_variant(variant, runs, rate, bootstrap, es_url, geoip_path,
                                        records, work, session_timeout_ms, restart_timeout,
                                        keep)
    session = session_timeout_ms or defaults.session_timeout_ms
    click.echo("(indexing progress read from the group's committed offsets; classic "
               f"session.timeout.ms {session})")
    for variant, r in results.items():
        restart = r["restart"]
        if restart:
            click.echo(f"{variant}: restart after kill -9 -> first indexed record: median "
                       f"{statistics.median(restart):.2f}s of {len(restart)} ("
                       + ", ".join(f"{x:.2f}" for x in restart) + "); partitions assigned "
                       "after " + ", ".join(f"{x:.2f}" for x in r["assigned"]) + " s")
        if "failed" in r:
            click.echo(f"{variant}: restart after kill -9 FAILED: {r['failed']}")
        cpu = [c for c in r["restart_cpu"] if c is not None]
        if cpu:
            click.echo(f"{variant}: restarted worker's CPU until its first indexed record "
                       f"(start-up included): median {statistics.median(cpu):.2f}s")
        for phase in ("baseline", "join", "leave"):
            s = r[phase]
            click.echo(f"{variant}: {phase:<8} longest stretch with no indexing progress "
                       f"{s.total:.2f}s; longest for one partition {s.partition:.2f}s")
        if "cpu_us" in r:
            click.echo(f"{variant}: worker CPU per record over join+leave "
                       f"{r['cpu_us']:.0f} us at {r['rate']:.0f} records/s")
