"""`envoygeo bench e2e`: the worker draining Kafka into Elasticsearch vs the bulk ceiling.

In one run, against the same Elasticsearch and with the same bulk settings:

* **ceiling**: the corpus enriched beforehand, then only indexed (`_bulk`, same
  batch size and concurrency as the worker), no Kafka, no enrichment on the clock;
  measured before and after each run's workers, and the run's ceiling is their mean;
* **1 worker** and **2 workers** (`envoygeo run` processes, one consumer group)
  draining the corpus, already in a 6-partition topic, into a fresh index.

A ceiling pass is timed once its index exists. A drain is timed by the consumer
group's committed offsets (the worker commits only what
is indexed): from the first commit to the commit of the last record, so process
start-up and group joining are not counted against the worker, and the measurement
adds no refresh/count load on Elasticsearch (one long-lived client reads the offsets).
The node is warmed up (untimed ceiling passes until two agree within 10%) before
anything is timed, and each phase's index is deleted as soon as it is measured, so no
phase pays for the previous one's background segment merges.
Rates are medians of `--runs`; each ratio is the median of the per-run ratios.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import click
import yaml

from pipeline.bench.core import corpus
from pipeline.bench.enrich_micro import default_geoip_path
from pipeline.config import KafkaSettings, load_settings
from pipeline.enricher import Enricher
from pipeline.kafka_log import kafka_logger
from pipeline.kafka_security import client_config
from pipeline.omit import PROFILES
from pipeline.setup import ensure_topics, install_templates
from pipeline.sinks.elasticsearch import BulkItem, ElasticsearchSink, make_client
from pipeline.sinks.kafka import produce_waiting
from pipeline.sources.kafka import CommittedOffsets


def _config(path: Path, bootstrap: str, es_url: str, topic: str, index: str, group: str,
            geoip: str | None, batch: int, concurrency: int, profile: str = "full") -> Path:
    path.write_text(yaml.safe_dump({
        "document": {"profile": profile},
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": group,
                  "dead_letter_topic": f"{topic}-dlq", "alerts_topic": f"{topic}-alerts",
                  "batch_max_records": batch, "topic_partitions": 6},
        "elasticsearch": {"hosts": [es_url], "index": index, "alerts_index": f"{index}-alerts",
                          "bulk_max_docs": batch, "concurrency": concurrency},
        "geoip": {"city": geoip},
        "metrics": {"port": 0, "progress_interval_s": 30},
    }))
    return path


def _produce(kafka: KafkaSettings, topic: str, records: list[bytes]) -> None:
    from confluent_kafka import Producer

    producer = Producer(client_config(kafka, **{"linger.ms": 50, "compression.type": "lz4",
                                                "enable.idempotence": True}),
                        logger=kafka_logger())
    for i, value in enumerate(records):
        produce_waiting(producer, topic, value, str(i).encode(), wait_s=0.1)
    if producer.flush(120):
        raise click.ClickException("could not load the corpus into Kafka")


def _delete_topics(kafka: KafkaSettings, topics: list[str]) -> None:
    """The run's topics go too: a broker's per-request costs grow with its partitions."""
    from confluent_kafka.admin import AdminClient

    # alive until the futures end
    admin = AdminClient(client_config(kafka), logger=kafka_logger())
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        try:
            future.result()
        except Exception as exc:  # best effort: say so, do not fail the figures
            click.echo(f"could not delete a benchmark topic: {exc}", err=True)
    admin.poll(0)  # hand librdkafka's queued log lines to the logger (served by poll only)


def _cpu_seconds(pids: list[int]) -> float | None:
    """User+system CPU of local processes so far (Linux /proc); None where unavailable
    (no processes to read, or no /proc)."""
    if not pids:
        return None
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _per_doc(before: float | None, after: float | None, docs: int) -> float | None:
    """CPU microseconds per document between two readings."""
    if before is None or after is None or docs <= 0:
        return None
    return (after - before) / docs * 1e6


def _local_es_pids(es: Any, es_url: str) -> list[int]:
    """The Elasticsearch node's process, when it runs on this machine (for its CPU);
    empty otherwise."""
    if urlparse(es_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return []
    try:
        nodes = es.nodes.info(node_id="_local", metric="process")["nodes"]
        pid = int(next(iter(nodes.values()))["process"]["id"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except Exception:  # no such API, no /proc: the figure is left out
        return []
    return [pid] if b"elasticsearch" in cmdline else []


class _Drain(NamedTuple):
    rate: float  # records per second
    worker_cpu: float | None  # CPU us per record, all worker processes
    es_cpu: float | None  # CPU us per record, the Elasticsearch node


def _drain_rate(kafka: KafkaSettings, group: str, topic: str, n: int,
                procs: list[subprocess.Popen[bytes]], timeout_s: float,
                es_pids: list[int]) -> _Drain:
    """Records per second from the first committed offset to the n-th, and the CPU the
    workers and Elasticsearch spent per record over the same span (start-up excluded)."""
    first_t, first_c = None, 0
    first_cpu: tuple[float | None, float | None] = (None, None)
    worker_pids = [p.pid for p in procs]
    deadline = time.monotonic() + timeout_s
    offsets = CommittedOffsets(kafka.bootstrap_servers, group, topic, conf=client_config(kafka))
    try:
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise click.ClickException(f"worker exited with {p.returncode}")
            c = offsets.total(timeout_s=10)
            now = time.monotonic()
            cpu = (_cpu_seconds(worker_pids), _cpu_seconds(es_pids))
            if c and first_t is None:
                first_t, first_c, first_cpu = now, c, cpu
            if c >= n and first_t is not None:
                return _Drain((c - first_c) / max(now - first_t, 1e-6),
                              _per_doc(first_cpu[0], cpu[0], c - first_c),
                              _per_doc(first_cpu[1], cpu[1], c - first_c))
            time.sleep(0.2)
    finally:
        offsets.close()
    raise click.ClickException(f"{group}: not drained within {timeout_s:.0f}s")


def _ceiling(settings: Any, docs: list[bytes], index: str, batch: int, concurrency: int,
             topic: str, es_pids: list[int] | None = None) -> tuple[float, float, float | None]:
    """Pre-built documents through the worker's own sink: bulk only. Returns docs/s and
    the CPU microseconds per document of the client and of Elasticsearch.

    The index is created before the clock starts: creating it (template, shard start)
    takes a noticeable part of a few-second pass, and the worker's drain is timed from
    its first commit, after its own index exists. Ids have the worker's form (`topic-
    partition-offset`), so Elasticsearch stores and looks up the same kind of ids.
    """
    sink = ElasticsearchSink(settings.elasticsearch.model_copy(update={"index": index}))
    sink.client.indices.create(index=index)
    items = [BulkItem(index, f"{topic}-{i % 6}-{i // 6}", d) for i, d in enumerate(docs)]
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    stop = threading.Event()
    es_pids = es_pids or []
    t0, cpu0, es0 = time.perf_counter(), time.process_time(), _cpu_seconds(es_pids)
    with ThreadPoolExecutor(concurrency) as pool:
        rejected = sum(len(r) for r in pool.map(lambda c: sink.write(c, stop), chunks))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    es_cpu = _per_doc(es0, _cpu_seconds(es_pids), len(items))
    if rejected:
        raise click.ClickException(f"ceiling run: {rejected} documents rejected")
    sink.close()
    return len(items) / elapsed, cpu / len(items) * 1e6, es_cpu


@click.command()
@click.option("--events", "-n", default=100_000, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--batch", default=2000, show_default=True, help="Records per batch / bulk.")
@click.option("--concurrency", default=2, show_default=True, help="Bulk requests in flight.")
@click.option("--kafka", "bootstrap", default="127.0.0.1:9092", show_default=True)
@click.option("--es", "es_url", default="http://127.0.0.1:9200", show_default=True)
@click.option("--geoip", "geoip_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--keep", is_flag=True, help="Keep the benchmark indices and topics.")
@click.option("--profiles", default="full", show_default=True,
              help="Document profiles the workers write, comma-separated (full, lean): "
                   "each run drains under each, so their ratio is paired by run.")
def command(events: int, runs: int, batch: int, concurrency: int, bootstrap: str, es_url: str,
            geoip_path: str | None, keep: bool, profiles: str) -> None:
    """Worker drain rate (1 and 2 workers) vs the Elasticsearch bulk ceiling, same run;
    with --profiles full,lean, each run drains under both document profiles."""
    chosen = [p for p in profiles.split(",") if p]
    if not chosen or any(p not in PROFILES for p in chosen):
        raise click.BadParameter(f"a comma-separated list of {', '.join(PROFILES)}",
                                 param_hint="--profiles")

    def label_of(workers: int, profile: str) -> str:
        label = f"{workers} worker{'s' if workers > 1 else ''}"
        return label if profile == "full" else f"{label}, {profile}"

    labels = [label_of(w, p) for p in chosen for w in (1, 2)]
    geoip_path = geoip_path or default_geoip_path()
    run_id = uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix="envoygeo-bench-e2e-"))
    topic, prefix = f"bench-e2e-{run_id}", f"bench-e2e-{run_id}"
    cfg_path = _config(work / "base.yaml", bootstrap, es_url, topic, f"{prefix}-w",
                       f"{prefix}-g", geoip_path, batch, concurrency)
    settings = load_settings(cfg_path)
    es = make_client(settings.elasticsearch)
    es_pids = _local_es_pids(es, es_url)
    click.echo(f"corpus: {events:,} Fluent Bit records; batch {batch}, bulk concurrency "
               f"{concurrency}; Kafka {bootstrap}, Elasticsearch {es_url}", err=True)
    records, _ = corpus(events, max(events // 4, 1000))
    docs = [r.document for r in Enricher.from_settings(settings).enrich_batch(records)[0]
            if r.document is not None]
    # Templates for every index this run creates: prefix-w1-*, prefix-w2-*, prefix-ceil-*.
    install_templates(es, settings.model_copy(update={"elasticsearch": settings.elasticsearch
                                                      .model_copy(update={"index": prefix})}))
    ensure_topics(settings)
    _produce(settings.kafka, topic, records)
    results: dict[str, list[float]] = {k: [] for k in ("ceiling", *labels)}
    ratios: dict[str, list[float]] = {k: [] for k in labels}
    # CPU microseconds per document: the ceiling's client, the workers (all processes).
    cpu: dict[str, list[float]] = {k: [] for k in ("ceiling", *labels)}
    # The same for the Elasticsearch node, when it runs here: what every side pays alike.
    es_cpu: dict[str, list[float]] = {k: [] for k in ("ceiling", *labels)}
    created: list[str] = []

    def drop(index: str) -> None:
        # Each phase's index goes as soon as it is measured: its segment merges would
        # otherwise run in the background of the next phase and tax whichever it is.
        es.options(ignore_status=404).indices.delete(index=index)

    try:
        # A freshly started node keeps speeding up for several passes (JIT, caches);
        # warm it until two passes agree within 10%, so that later phases are not
        # measured against a node that is still getting faster.
        warm: list[float] = []
        for w in range(6):
            created.append(f"{prefix}-warmup-{w}")
            warm.append(_ceiling(settings, docs, created[-1], batch, concurrency, topic)[0])
            drop(created[-1])
            if len(warm) >= 2 and abs(warm[-1] - warm[-2]) <= 0.1 * warm[-2]:
                break
        click.echo("warm-up ceilings: " + ", ".join(f"{r:,.0f}/s" for r in warm), err=True)
        def ceiling_pass(label: str) -> float:
            created.append(f"{prefix}-ceil-{label}")
            rate, client_cpu, node_cpu = _ceiling(settings, docs, created[-1], batch,
                                                  concurrency, topic, es_pids)
            cpu["ceiling"].append(client_cpu)
            if node_cpu is not None:
                es_cpu["ceiling"].append(node_cpu)
            if not keep:
                drop(created[-1])
            return rate

        # The node still drifts (usually faster) from run to run, so each run's workers
        # are held against the mean of the ceilings measured just before and just after.
        before = ceiling_pass("0")
        for r in range(runs):
            worker_rates: dict[str, float] = {}
            for profile, workers in ((p, w) for p in chosen for w in (1, 2)):
                index = f"{prefix}-w{workers}-{profile}-{r}"
                group = f"{prefix}-g{workers}-{profile}-{r}"
                created.append(index)
                cfg = _config(work / f"{index}.yaml", bootstrap, es_url, topic, index, group,
                              geoip_path, batch, concurrency, profile)
                procs = [subprocess.Popen(
                    [sys.executable, "-m", "pipeline.cli", "run", "-c", str(cfg)],
                    stdout=subprocess.DEVNULL, stderr=open(work / f"{index}-{i}.log", "wb"))
                    for i in range(workers)]
                label = label_of(workers, profile)
                try:
                    drain = _drain_rate(settings.kafka, group, topic, len(records), procs, 600,
                                        es_pids)
                    worker_rates[label] = drain.rate
                    if drain.worker_cpu is not None:
                        cpu[label].append(drain.worker_cpu)
                    if drain.es_cpu is not None:
                        es_cpu[label].append(drain.es_cpu)
                finally:
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.wait(60)
                if not keep:
                    drop(index)
            after = ceiling_pass(str(r + 1))
            ceiling = (before + after) / 2
            before = after
            results["ceiling"].append(ceiling)
            for k, v in worker_rates.items():
                results[k].append(v)
                ratios[k].append(v / ceiling)
            line = ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in results.items())
            click.echo(f"run {r + 1}/{runs}: {line}", err=True)
    finally:
        if not keep:
            for index in created:
                drop(index)
            _delete_topics(settings.kafka, [topic, f"{topic}-dlq", f"{topic}-alerts"])
    med = {k: statistics.median(v) for k, v in results.items()}
    click.echo(f"elasticsearch bulk ceiling   {med['ceiling']:>10,.0f} docs/s  (pre-built, "
               f"median of {runs})")
    for k in labels:
        click.echo(f"{k:<28} {med[k]:>10,.0f} docs/s  ratio to ceiling "
                   f"{statistics.median(ratios[k]):.2f}  (median of the per-run ratios: "
                   + ", ".join(f"{x:.2f}" for x in ratios[k]) + ")")
    for profile in chosen:
        if profile != "full" and "full" in chosen:
            for w in (1, 2):
                full, other = results[label_of(w, "full")], results[label_of(w, profile)]
                # A drain too short to time (all committed at once) reads 0/s: no ratio.
                paired = [b / a for a, b in zip(full, other, strict=True) if a > 0]
                if not paired:
                    continue
                click.echo(f"{label_of(w, profile)} / {label_of(w, 'full')}: "
                           f"{statistics.median(paired):.2f}x drain rate (median of the "
                           "per-run ratios: " + ", ".join(f"{x:.2f}" for x in paired) + ")")
    # Less noisy than the rates on a shared machine: what each side costs per document
    # (the ceiling's client, the workers), and what Elasticsearch itself costs.
    for title, per_doc in (("CPU per document, client or workers (median)", cpu),
                           ("Elasticsearch CPU per document (median)", es_cpu)):
        if all(per_doc.values()):
            click.echo(f"{title}: " + ", ".join(
                f"{k} {statistics.median(v):.1f} us" for k, v in per_doc.items()))
