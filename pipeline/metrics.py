"""Prometheus metrics and the /healthz, /readyz endpoints of a worker.

One registry per worker (not the global one), so tests can run several workers in one
process without metric name clashes.
"""

from __future__ import annotations

import platform
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
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from pipeline import __version__

# `<name>_created` series double every counter's series count and no dashboard reads them.
disable_created_metrics()

# Why a record was not parsed, as a label: a small fixed set (the full reason is in the
# document's error.message). Matched by the reason's start; the reference reasons are
# LineError texts (decode/), envelope errors (decode/envelope.py) and process.py's.
UNPARSED_REASONS: tuple[tuple[str, str], ...] = (
    ("line does not match the ", "format_mismatch"),
    ("line matches no known format", "unknown_format"),
    ("invalid JSON access log", "invalid_json"),
    ("JSON access log is not an object", "invalid_json"),
    ("JSON object has none of the access-log fields", "not_an_access_log"),
    ("empty record", "empty_record"),
    ("no access-log payload", "no_payload"),
    ("envelope decoder failed", "bad_envelope"),
    ("malformed msgpack record", "bad_envelope"),
    ("parser error", "parser_bug"),
)
UNPARSED_REASON_LABELS = tuple(dict.fromkeys(label for _, label in UNPARSED_REASONS)) + ("other",)
# Where a dead letter came from (the `envoygeo.stage` header of the record).
DEAD_LETTER_STAGES = ("parse", "plugin", "index")


def unparsed_reason(error: str) -> str:
    """The label of an unparse reason: one of UNPARSED_REASON_LABELS."""
    for prefix, label in UNPARSED_REASONS:
        if error.startswith(prefix):
            return label
    return "other"


class Metrics:
    """The worker's metrics. Counters are exposed with `_total` (prometheus_client adds
    it); every label has a small fixed value set, listed in the README."""

    def __init__(self, native: bool = False) -> None:
        r = self.registry = CollectorRegistry()
        # CPU, memory, open files of the process; Python version; GC passes.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Info("envoygeo_build", "Version of the running worker.", registry=r)
        self.set_build_info(native)
        self.records_in = Counter("envoygeo_records_in", "Records read from Kafka.", registry=r)
        self.bytes_in = Counter(
            "envoygeo_kafka_bytes_in", "Bytes of the Kafka record values read.", registry=r
        )
        self.records_processed = Counter(
            "envoygeo_records_processed",
            "Records enriched, by path: native (the compiled core) or python.",
            ["path"],
            registry=r,
        )
        self.records_out = Counter(
            "envoygeo_records_indexed", "Documents Elasticsearch accepted.", registry=r
        )
        self.records_failed = Counter(
            "envoygeo_records_unparsed",
            "Records no access-log format matched, by reason (fixed set; see README).",
            ["reason"],
            registry=r,
        )
        self.records_truncated = Counter(
            "envoygeo_records_truncated",
            "Records cut to limits.max_line_bytes (what=line) or with fields cut to "
            "limits.max_field_bytes (what=field).",
            ["what"],
            registry=r,
        )
        self.no_envoy_address = Counter(
            "envoygeo_records_without_envoy_address",
            "Parsed lines holding no address Envoy saw (see client_ip.envoy_use_remote_address).",
            registry=r,
        )
        self.dead_lettered = Counter(
            "envoygeo_records_dead_lettered",
            "Records written to the dead-letter topic, by the stage that gave up on them.",
            ["stage"],
            registry=r,
        )
        self.bulk_seconds = Histogram(
            "envoygeo_bulk_seconds",
            "Latency of one _bulk request, by outcome (ok, partial: some items to retry, "
            "error: the request failed).",
            ["outcome"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.bytes_out = Counter(
            "envoygeo_es_bytes_out", "Bytes of _bulk request bodies sent, retries included.",
            registry=r,
        )
        self.es_item_errors = Counter(
            "envoygeo_es_item_errors",
            "Bulk items Elasticsearch answered with an error, by HTTP status (429/5xx are "
            "retried; other 4xx are dead-lettered).",
            ["status"],
            registry=r,
        )
        # Retries twice over: requests (how often the sink backed off and tried again,
        # what to alert on) and the items in them (the work redone; a failed request
        # resends all its items, a partial one only those answered 429/5xx).
        self.es_retries = Counter(
            "envoygeo_es_retries",
            "Bulk requests sent again after a failed request or 429/5xx item statuses.",
            registry=r,
        )
        self.es_item_retries = Counter(
            "envoygeo_es_item_retries",
            "Bulk items sent again (after a 429/5xx item status or a failed request).",
            registry=r,
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
        self.geoip_cache = Counter(
            "envoygeo_geoip_cache_lookups",
            "GeoIP cache lookups, by result (hit, miss).",
            ["result"],
            registry=r,
        )
        self.geoip_reload_failures = Counter(
            "envoygeo_geoip_reload_failures",
            "Replaced GeoIP files refused (corrupt); the old database stays in use.",
            registry=r,
        )
        self.plugin_errors = Counter(
            "envoygeo_plugin_errors",
            "Batches an enrichment plugin failed on (raised, or returned undeclared "
            "fields), by plugin; their records are indexed tagged envoygeo_plugin_failed.",
            ["plugin"], registry=r)
        self.rate_seconds = Histogram(
            "envoygeo_rate_backend_seconds",
            "Latency of one rate-backend batch call.",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.rates_unavailable = Gauge(
            "envoygeo_rate_backend_unavailable",
            "1 while the Redis rate backend does not answer (fetching paused, the batch "
            "being counted is retried).", registry=r)
        self.rates_retries = Counter(
            "envoygeo_rate_backend_retries",
            "Rate-backend calls sent again after Redis did not answer.", registry=r)
        self.alerts = Counter(
            "envoygeo_alerts", "Per-IP rate alerts emitted, by rule.", ["rule"], registry=r
        )
        self.paused = Gauge(
            "envoygeo_paused", "1 while fetching is paused (backpressure).", registry=r
        )
        self.inflight = Gauge("envoygeo_inflight_batches", "Batches being indexed.", registry=r)
        # Every fixed-label child exists from the start (at 0), so rate() has a series
        # before the first event and dashboards show 0, not "no data".
        for path in ("native", "python"):
            self.records_processed.labels(path)
        for reason in UNPARSED_REASON_LABELS:
            self.records_failed.labels(reason)
        for what in ("line", "field"):
            self.records_truncated.labels(what)
        for stage in DEAD_LETTER_STAGES:
            self.dead_lettered.labels(stage)
        for result in ("hit", "miss"):
            self.geoip_cache.labels(result)
        self._seen: dict[tuple[MetricWrapperBase, str], int] = {}

    def set_build_info(self, native: bool) -> None:
        """`native`: the compiled core enriches (the worker sets it from its enricher)."""
        self.build_info.info({
            "version": __version__,
            "native": "true" if native else "false",
            "python": platform.python_version(),
        })

    def catch_up(self, counter: MetricWrapperBase, total: int, label: str = "") -> None:
        """Advance a counter to a cumulative total counted elsewhere (the enricher, the
        GeoIP reader): only the growth since the last call is added, so the series
        stays a counter (monotonic) however often this is called."""
        key = (counter, label)
        last = self._seen.get(key, 0)
        if total > last:
            child = counter.labels(label) if label else counter
            child.inc(total - last)  # type: ignore[attr-defined]
            self._seen[key] = total

    # -- the Elasticsearch sink's observer (sinks.elasticsearch.BulkObserver) --

    def on_bulk(self, seconds: float, docs: int, outcome: str, nbytes: int = 0) -> None:
        self.bulk_seconds.labels(outcome).observe(seconds)
        self.bytes_out.inc(nbytes)

    def on_item_errors(self, statuses: list[int]) -> None:
        for status in statuses:
            self.es_item_errors.labels(str(status)).inc()

    def on_retry(self, items: int) -> None:
        self.es_retries.inc()
        self.es_item_retries.inc(items)

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
