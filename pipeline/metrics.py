"""Prometheus metrics and the /healthz, /readyz endpoints of a worker.

One registry per worker (not the global one), so tests can run several workers in one
process without metric name clashes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records_in = Counter("envoygeo_records_in", "Records read from Kafka.", registry=r)
        self.records_out = Counter(
            "envoygeo_records_indexed", "Documents Elasticsearch accepted.", registry=r
        )
        self.records_failed = Counter(
            "envoygeo_records_unparsed",
            "Records no access-log format matched, by reason.",
            ["reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "envoygeo_records_dead_lettered",
            "Records written to the dead-letter topic.",
            ["reason"],
            registry=r,
        )
        self.bulk_seconds = Histogram(
            "envoygeo_bulk_seconds",
            "Latency of one _bulk request.",
            ["outcome"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "envoygeo_batch_records",
            "Records per batch.",
            registry=r,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
        )
        self.consumer_lag = Gauge(
            "envoygeo_consumer_lag",
            "Consumer lag per partition (librdkafka statistics).",
            ["topic", "partition"],
            registry=r,
        )
        self.geoip_cache = Gauge(
            "envoygeo_geoip_cache_lookups", "GeoIP cache lookups so far.", ["result"], registry=r
        )
        self.geoip_reload_failures = Gauge(
            "envoygeo_geoip_reload_failures",
            "Replaced GeoIP files refused (corrupt); the old database stays in use.",
            registry=r,
        )
        self.rate_seconds = Histogram(
            "envoygeo_rate_backend_seconds",
            "Latency of one rate-backend batch call.",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.alerts = Counter(
            "envoygeo_alerts", "Per-IP rate alerts emitted.", ["rule"], registry=r
        )
        self.paused = Gauge(
            "envoygeo_paused", "1 while fetching is paused (backpressure).", registry=r
        )
        self.inflight = Gauge("envoygeo_inflight_batches", "Batches being indexed.", registry=r)

    def on_bulk(self, seconds: float, size: int, outcome: str) -> None:
        self.bulk_seconds.labels(outcome).observe(seconds)

    def on_stats(self, stats: dict[str, Any]) -> None:
        """librdkafka statistics -> lag per partition (the consumer's own view)."""
        for topic, tstats in stats.get("topics", {}).items():
            for pid, pstats in tstats.get("partitions", {}).items():
                lag = pstats.get("consumer_lag", -1)
                if pid != "-1" and lag >= 0:
                    self.consumer_lag.labels(topic, pid).set(lag)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusServer:
    """/metrics, /healthz (the loop is turning) and /readyz (the worker can deliver)."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        ready: Callable[[], tuple[bool, str]],
        stall_after_s: float = 60.0,
    ) -> None:
        self.heartbeat = time.monotonic()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    age = time.monotonic() - owner.heartbeat
                    ok = age < stall_after_s
                    self._send(200 if ok else 503, f"loop turned {age:.1f}s ago\n".encode())
                elif self.path == "/readyz":
                    ok, why = ready()
                    self._send(200 if ok else 503, (why + "\n").encode())
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not log lines
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="status-http", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
