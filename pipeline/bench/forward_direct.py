"""`envoygeo bench forward-direct`: events/s one `envoygeo forward` in mode direct enriches
and indexes into Elasticsearch, acked.

The load is `envoygeo bench forward`'s (the same chunks of Fluent Bit records, the same
senders waiting for each ack), so the two are comparable; only the forward process's
mode differs. A rate counts acked events only (Elasticsearch has every document). CPU
per event is the forward process's own (all threads, from /proc); Elasticsearch's CPU
is not in it (on this machine it shares the cores, so the rate is lower than on a
separate node). Each run indexes into a fresh index (the load's chunk ids repeat),
deleted afterwards with its template unless `--keep`. Medians of `--runs`. The lines
are the Fluent Bit capture's mix: about a third are JSON access logs, which take the
Python path (the compiled core reads text formats), and they cost most of the CPU.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.bench.forward import Frames, _cpu_s, _free_port, _wait_ready, load

ROOT = Path(__file__).resolve().parents[2]


@click.command("forward-direct")
@click.option("--es-url", default="http://127.0.0.1:9200", show_default=True,
              help="Elasticsearch (an index is created for the run and deleted after).")
@click.option("--connections", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("--chunk-events", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(0.5))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--keep", is_flag=True, help="Keep the run's index and template.")
def command(es_url: str, connections: int, chunk_events: int, seconds: float, runs: int,
            keep: bool) -> None:
    """Events/s one `envoygeo forward` (forward.mode: direct) enriches and indexes into
    Elasticsearch with acks, CPU per event, PackedForward and gzip; medians.

    \b
    Example:
      envoygeo bench forward-direct --runs 3 --seconds 10
    Compare with `envoygeo bench forward` (relay mode, the same load).
    """
    from elasticsearch import Elasticsearch

    index = f"envoygeo-logs-bench-direct-{uuid.uuid4().hex[:8]}"
    port, mport = _free_port(), _free_port()
    work = Path(tempfile.mkdtemp(prefix="envoygeo-bench-direct-"))
    cfg = work / "direct.yaml"
    cfg.write_text(yaml.safe_dump({
        "elasticsearch": {"hosts": [es_url], "index": index},
        "metrics": {"host": "127.0.0.1"},
        "forward": {"host": "127.0.0.1", "port": port, "metrics_port": mport,
                    "mode": "direct", "shutdown_grace_s": 30},
    }))
    setup = subprocess.run([sys.executable, "-m", "pipeline.cli", "setup", "--no-topics",
                            "-c", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    if setup.returncode != 0:
        raise click.ClickException(f"envoygeo setup failed: {setup.stderr.strip()}")
    log = work / "forward.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "forward", "-c", str(cfg)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            cwd=ROOT)
    rows: list[dict[str, Any]] = []
    es = Elasticsearch(es_url, request_timeout=60)
    try:
        _wait_ready(proc, mport, log)
        load(port, connections, 1.0, chunk_events, "PackedForward")  # warm-up: caches
        for mode in ("PackedForward", "CompressedPackedForward"):
            rates, cpus = [], []
            for _ in range(runs):
                # The load's chunk ids restart each run: a fresh index keeps every run
                # to creating documents (an overwrite costs Elasticsearch more).
                es.indices.delete(index=index, ignore_unavailable=True)
                cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
                acked = load(port, connections, seconds, chunk_events, mode)
                wall, cpu = time.monotonic() - t0, _cpu_s(proc.pid) - cpu0
                rates.append(acked / wall)
                cpus.append(cpu / max(acked, 1) * 1e6)
            rate, cpu_us = statistics.median(rates), statistics.median(cpus)
            wire = Frames(mode, chunk_events).frame("0-0")
            rows.append({"mode": mode, "events_per_s": round(rate),
                         "cpu_us_per_event": round(cpu_us, 2),
                         "events_per_cpu_s": round(1e6 / cpu_us) if cpu_us else None,
                         "chunk_bytes_on_wire": len(wire), "runs": runs})
            click.echo(f"{mode:<24} {rate:>10,.0f} events/s acked   {cpu_us:6.2f} µs CPU "
                       f"per event   ({runs} runs, median)", err=True)
        native = next((line for line in log.read_text().splitlines()
                       if "native core" in line), "")
        path = "native core on" if "native core on" in native else "Python path"
        click.echo(f"forward process: {path}; {connections} connections, "
                   f"{chunk_events}-event chunks", err=True)
        es.indices.refresh(index=index)
        click.echo(f"documents in {index}: {es.count(index=index)['count']}", err=True)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        if not keep:
            es.indices.delete(index=index, ignore_unavailable=True)
            es.options(ignore_status=404).indices.delete_index_template(name=index)
        es.close()
    click.echo(json.dumps(rows))
