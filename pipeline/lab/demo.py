"""`envoygeo demo`: the whole chain on one machine, ending in a summary a person can read.

clients (posed by HAProxy `set-src`) -> HAProxy (PROXY v1 / v2) -> Envoy 1.40 (proxy_protocol
listener filter, JSON access log) -> a Fluent Bit stand-in -> Kafka -> `envoygeo run`
(a real worker process) -> Elasticsearch -> summary from Elasticsearch aggregations.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.lab.shipper import FileShipper
from pipeline.lab.stack import ProxyStack

# Public addresses and what DB-IP City Lite says of them (checked when this was written;
# the summary shows what the database in use says).
CLIENTS: tuple[str, ...] = (
    "81.2.69.142",
    "89.160.20.112",
    "8.8.8.8",
    "1.1.1.1",
    "202.12.27.33",
    "200.160.2.3",
    "196.25.1.200",
    "5.255.255.5",
    "91.198.174.192",
    "2a00:1450:4001:81a::200e",
    "2001:4860:4860::8888",
    "41.203.64.1",
    "62.210.0.1",
    "14.139.0.1",
    "190.220.0.1",
    "203.0.178.1",
)
HOT_CLIENT = "185.60.216.35"  # bursts past the alert threshold
PATHS = ("/", "/api/items", "/api/items/42", "/login", "/static/app.js", "/api/cart?add=7")


@dataclass
class DemoPlan:
    requests: int = 600
    burst: int = 150  # requests from HOT_CLIENT, back to back
    alert_threshold: int = 100
    pace_per_s: float = 60.0  # ordinary traffic; the burst is not paced
    clients: tuple[str, ...] = CLIENTS
    hot_client: str = HOT_CLIENT
    seed: int = 42
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def traffic(self) -> list[tuple[str, str, int, bool]]:
        """(client, path, PROXY version, paced) per request.

        Ordinary clients are Zipf-like (weight 1/sqrt(rank)) and paced, so that none of
        them reaches the threshold in 10 s; the hot client's burst lands in the middle,
        back to back, and is the one the alert must catch.
        """
        rng = random.Random(self.seed)
        weights = [1 / (k + 1) ** 0.5 for k in range(len(self.clients))]
        plan = [
            (c, rng.choice(PATHS), rng.choice((1, 2)), True)
            for c in rng.choices(self.clients, weights, k=self.requests)
        ]
        middle = len(plan) // 2
        plan[middle:middle] = [(self.hot_client, "/login", 2, False)] * self.burst
        return plan


def demo_config(
    path: Path,
    *,
    bootstrap: str,
    es_url: str,
    topic: str,
    index: str,
    geoip_city: str | None,
    threshold: int,
    metrics_port: int = 0,
) -> Path:
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [topic],
            "group_id": f"{topic}-demo",
            "dead_letter_topic": f"{topic}-dead-letter",
            "alerts_topic": f"{topic}-alerts",
            "batch_max_wait_ms": 200,
        },
        "elasticsearch": {"hosts": [es_url], "index": index, "alerts_index": f"{index}-alerts"},
        "geoip": {"city": geoip_city},
        "rates": {
            "windows": [10, 60, 300],
            "alerts": [{"name": "burst-10s", "window_s": 10, "threshold": threshold}],
        },
        "metrics": {"port": metrics_port, "progress_interval_s": 5},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_demo(
    plan: DemoPlan,
    *,
    bootstrap: str,
    es_url: str,
    topic: str,
    index: str,
    geoip_city: str | None,
    workdir: Path | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chain end to end; returns what was sent and what Elasticsearch holds."""
    from elasticsearch import Elasticsearch

    from pipeline.config import load_settings
    from pipeline.kafka_security import client_config
    from pipeline.setup import ensure_topics, install_templates
    from pipeline.sinks.elasticsearch import make_client

    workdir = workdir or Path(tempfile.mkdtemp(prefix="envoygeo-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = demo_config(
        workdir / "envoygeo.yaml",
        bootstrap=bootstrap,
        es_url=es_url,
        topic=topic,
        index=index,
        geoip_city=geoip_city,
        threshold=plan.alert_threshold,
    )
    settings = load_settings(config)
    es: Elasticsearch = make_client(settings.elasticsearch)
    say(f"[1/5] envoygeo setup: templates for {index}*, topics {topic} (+ dead-letter, alerts)")
    for name in (index, f"{index}-alerts"):
        es.options(ignore_status=404).indices.delete(index=name)  # a fresh demo each run
    install_templates(es, settings)
    ensure_topics(settings)

    say("[2/5] starting the worker: envoygeo run")
    log = open(workdir / "worker.log", "wb")  # noqa: SIM115 - handed to the child
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    traffic = plan.traffic()
    try:
        with ProxyStack(workdir / "lab") as stack:
            say(
                f"[3/5] HAProxy :{stack.v1_port} (PROXY v1) / :{stack.v2_port} (PROXY v2) -> "
                f"Envoy 1.40; sending {len(traffic)} requests from "
                f"{len({c for c, *_ in traffic})} clients"
            )
            shipper = FileShipper(stack.access_log, bootstrap, topic,
                                  conf=client_config(settings.kafka)).start()
            interval, next_at = 1.0 / plan.pace_per_s, time.monotonic()
            for client, path, version, paced in traffic:
                if paced:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))
                sep = "&" if "?" in path else "?"
                status = stack.request(client, f"{path}{sep}demo={plan.run_id}", version)
                if status != 200:
                    raise RuntimeError(f"request via HAProxy answered {status}")
            _wait(lambda: _lines(stack.access_log) >= len(traffic), 30, "Envoy access log")
            shipped = shipper.stop()
        say(
            f"[4/5] shipped {shipped} Envoy log lines to Kafka as Fluent Bit would; "
            "waiting for Elasticsearch"
        )
        _wait(
            lambda: worker.poll() is None and _count(es, index) >= shipped,
            180,
            "documents in Elasticsearch",
            worker,
        )
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        log.close()
    say(f"[5/5] worker stopped (exit {worker.returncode}); summary from Elasticsearch:")
    es.indices.refresh(index=f"{index}*")
    return {
        "sent": len(traffic),
        "shipped": shipped,
        "indexed": _count(es, index),
        "worker_exit": worker.returncode,
        "workdir": str(workdir),
    }


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _count(es: Any, index: str) -> int:
    try:
        es.indices.refresh(index=index)
        return int(es.count(index=index)["count"])
    except Exception:  # not created yet
        return 0


def _wait(
    cond: Callable[[], bool],
    timeout_s: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({proc.returncode}) before {what} were in")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.3)
