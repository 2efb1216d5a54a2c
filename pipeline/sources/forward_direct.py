"""`forward.mode: direct`: forward chunks enriched and indexed into Elasticsearch, no Kafka.

For small setups without Kafka. The same code as the worker does the work: the events
become the JSON Fluent Bit's kafka output writes (`relay_value`, what relay mode puts on
Kafka), `Enricher.enrich_bulk` (the compiled core when built) or `enrich_batch` turns
them into documents, and the worker's `ElasticsearchSink` indexes them, with its
retries and backoff while Elasticsearch is down or overloaded. A chunk's ack goes back
only once Elasticsearch acknowledged every document of it (and its dead letters and
alerts): until then nothing is acked, and the shipper resends.

Document ids, so that a resent chunk overwrites itself instead of duplicating:
`fwd-<chunk>-0-<i>`, the chunk id the shipper sent and the event's index in the chunk
(Fluent Bit's and Fluentd's chunk ids are random per chunk and kept across resends).
A chunk id that is long or has characters outside `[A-Za-z0-9+/=_.-]` is replaced by
its SHA-256. A frame sent without an ack request has no id of its own: its events get
`fwd-h<digest>-0-<i>`, the digest of the frame's tag and events, so a frame the
shipper writes again after a broken connection overwrites too; two frames with the
very same tag and events (times included) are then one set of documents.

Dead letters: the worker sends them to a Kafka topic; here there is none, so they go to
the Elasticsearch index `forward.dead_letter_index` (lines that cannot be parsed with
`parse.unparsed: dead_letter`, the events of a chunk an enrichment plugin failed on with
`plugins.on_error: dead_letter`, and documents Elasticsearch rejects for good, e.g. a
mapping conflict), with the original event, the stage and the reason. Alerts go to
`elasticsearch.alerts_index` (no alerts topic either).

Threads: enrichment runs on one thread of its own (the Enricher and its rate counting
keep per-batch state: one batch at a time, in arrival order) and bulk requests on
`elasticsearch.concurrency` threads, so the event loop keeps reading and answering.
Memory: at most `forward.max_inflight_chunks` chunks with an ack request wait at once
(one more is refused: no ack, connection closed, the shipper resends); frames without
an ack request cannot be refused (they would be lost), so past the same number their
connection stops being read until they are indexed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from pipeline.config import Settings
from pipeline.metrics import DEAD_LETTER_STAGES, unparsed_reason
from pipeline.plugins.runner import plugin_dead_letters
from pipeline.sinks.elasticsearch import (
    BulkItem,
    ElasticsearchSink,
    EncodedBulk,
    Rejection,
    SinkStopped,
)
from pipeline.sources.forward import Frame
from pipeline.sources.forward_server import (
    ForwardMetrics,
    ForwardServer,
    ServerOptions,
    _Connection,
    relay_value,
)

log = logging.getLogger("envoygeo.forward")

# A chunk id used as it is in document ids (Fluent Bit: base64 of 16 random bytes).
_PLAIN_CHUNK = re.compile(r"[A-Za-z0-9+/=_.-]{1,128}")


def chunk_key(frame: Frame, values: list[bytes]) -> str:
    """The per-frame part of its events' document ids (see the module docstring)."""
    chunk = frame.chunk
    if chunk is not None:
        text = chunk if isinstance(chunk, str) else repr(chunk)
        if _PLAIN_CHUNK.fullmatch(text):
            return f"fwd-{text}"
        return "fwd-s" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    digest = hashlib.blake2b(frame.tag.encode("utf-8", "surrogateescape"), digest_size=16)
    for value in values:
        digest.update(len(value).to_bytes(4, "big"))
        digest.update(value)
    return "fwd-h" + digest.hexdigest()


def document_ids(key: str, n: int) -> list[str]:
    """Event i's id: `<key>-0-<i>`, the form `Enricher.enrich_bulk` writes
    (`topic-partition-offset`) with the chunk key as the topic."""
    return [f"{key}-0-{i}" for i in range(n)]


class DirectMetrics(ForwardMetrics):
    """The forward metrics plus what direct mode does instead of relaying."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.events_indexed = Counter(
            "envoygeo_forward_events_indexed",
            "Events Elasticsearch acknowledged (direct mode).", registry=r)
        self.events_dead_lettered = Counter(
            "envoygeo_forward_events_dead_lettered",
            "Events written to forward.dead_letter_index (direct mode), by stage: parse "
            "(parse.unparsed: dead_letter), plugin (a plugin failed on the chunk, "
            "plugins.on_error: dead_letter), index (rejected by Elasticsearch).",
            ["stage"], registry=r)
        self.events_unparsed = Counter(
            "envoygeo_forward_events_unparsed",
            "Events whose line no format matched (direct mode), by reason.", ["reason"],
            registry=r)
        self.alerts = Counter("envoygeo_forward_alerts",
                              "Alerts raised and indexed (direct mode).", registry=r)
        self.elasticsearch_up = Gauge(
            "envoygeo_forward_elasticsearch_writable",
            "1 while the last bulk request got through (direct mode).", registry=r)
        for stage in DEAD_LETTER_STAGES:
            self.events_dead_lettered.labels(stage)
        for reason in ("elasticsearch_error", "enrich_error"):
            self.chunks_refused.labels(reason)


@dataclass(slots=True)
class _Prepared:
    items: list[BulkItem] | EncodedBulk
    dead: list[BulkItem]
    alerts: list[dict[str, Any]]
    values: list[bytes]
    key: str
    unparsed: list[str] = field(default_factory=list)
    plugin_dead: int = 0  # of `dead`, the events dead-lettered because a plugin failed


class DirectServer(ForwardServer):
    """The forward server whose chunks are indexed here instead of produced to Kafka."""

    def __init__(self, options: ServerOptions, settings: Settings,
                 make_enricher: Callable[[], Any], sink: ElasticsearchSink,
                 metrics: DirectMetrics | None = None) -> None:
        """`make_enricher` runs on the enrichment thread: the compiled core is bound to
        the thread that built it. What it raises is raised here."""
        super().__init__(options, None, metrics or DirectMetrics())  # type: ignore[arg-type]
        self.dm: DirectMetrics = self.metrics  # type: ignore[assignment]
        self.settings = settings
        self.sink = sink
        # Frames are decoded into (time, record) entries: no relay fast path here.
        self.relay_values = None
        self.indexed = self.dead_lettered = self.unparsed = self.alerts = 0
        self.abort = threading.Event()  # the drain's grace ran out: stop retrying
        self._enrich_pool = ThreadPoolExecutor(1, "enrich")
        self._bulk_pool = ThreadPoolExecutor(settings.elasticsearch.concurrency, "bulk")
        try:
            self.enricher = self._enrich_pool.submit(make_enricher).result()
        except BaseException:
            self._enrich_pool.shutdown(wait=False)
            self._bulk_pool.shutdown(wait=False)
            raise
        self._head = sink.action_head(settings.elasticsearch.index)
        # Read at each scrape: the sink knows while a bulk request is being retried.
        self.dm.elasticsearch_up.set_function(lambda: 1.0 if sink.writable.is_set() else 0.0)
        self._unacked_pending = 0  # frames without an ack request being indexed
        self._paused: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def elasticsearch_ok(self) -> bool:
        return self.sink.writable.is_set()

    def relay(self, conn: _Connection, frame: Frame) -> bool:
        """Index a frame's events (off the loop); False when refused (nothing done)."""
        m = self.metrics
        m.events_in.labels(frame.mode).inc(len(frame.entries))
        if self.draining:
            return self._refuse(conn, frame, "draining", "the server is shutting down")
        acked = frame.chunk is not None
        if acked and self.inflight >= self.options.max_inflight_chunks:
            return self._refuse(conn, frame, "inflight_limit",
                                f"{self.inflight} chunks already wait for Elasticsearch "
                                f"(forward.max_inflight_chunks)")
        self.inflight += 1
        m.inflight.set(self.inflight)
        self._idle.clear()
        if not acked:
            self._unacked_pending += 1
            if self._unacked_pending >= self.options.max_inflight_chunks:
                conn.stop_reading()  # bounded memory: resumed when frames finish
                self._paused.add(conn)
        task = asyncio.get_running_loop().create_task(self._index(conn, frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _index(self, conn: _Connection, frame: Frame) -> None:
        loop = asyncio.get_running_loop()
        ok = False
        stage = "enrich_error"
        try:
            prepared = await loop.run_in_executor(self._enrich_pool, self._prepare, frame)
            stage = "elasticsearch_error"
            await loop.run_in_executor(self._bulk_pool, self._deliver, prepared)
            ok = True
        except SinkStopped as exc:
            self._not_indexed(conn, frame, stage,
                              f"shutdown before Elasticsearch took it ({exc})")
        except BaseException as exc:  # pyo3 panics are BaseExceptions: no ack, not a crash
            if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                raise
            # The rate backend down, a cluster refusing us, a bug: no ack, resent.
            self._not_indexed(conn, frame, stage, f"{type(exc).__name__}: {exc}")
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            if frame.chunk is None:
                self._unacked_pending -= 1
                if self._unacked_pending < self.options.max_inflight_chunks:
                    for paused in self._paused:
                        if paused.transport is not None and not paused.closing \
                                and not self.draining:
                            paused.transport.resume_reading()
                    self._paused.clear()
            if self.inflight == 0:
                self._idle.set()
        if ok and frame.chunk is not None:
            conn.write(self._ack(frame.chunk))
            self.metrics.chunks_acked.inc()
            self.acked += 1

    @staticmethod
    def _ack(chunk: Any) -> bytes:
        from pipeline.sources.forward import ack

        return ack(chunk)

    def _not_indexed(self, conn: _Connection, frame: Frame, reason: str, why: str) -> None:
        self.metrics.chunks_refused.labels(reason).inc()
        self.metrics.events_failed.inc(len(frame.entries))
        if frame.chunk is None:
            log.error("%s: %d event(s) of a frame sent without an ack request were not "
                      "indexed (%s); they are lost (the client cannot resend: use "
                      "require_ack_response)", conn.peer, len(frame.entries), why,
                      extra={"fields": {"forward.refused": reason}})
            return
        log.error("%s: a chunk of %d event(s) was not indexed (%s); no ack, closing the "
                  "connection so the client resends it", conn.peer, len(frame.entries), why,
                  extra={"fields": {"forward.refused": reason}})
        conn.close()

    # -- on the enrichment thread --

    def _prepare(self, frame: Frame) -> _Prepared:
        """Hot path: the worker's enrichment of one chunk, into a `_bulk` body."""
        values = [relay_value(t, r) for t, r in frame.entries]
        key = chunk_key(frame, values)
        n = len(values)
        cfg = self.settings
        drop = cfg.parse.unparsed == "dead_letter"
        ready = self.enricher.enrich_bulk(values, [key] * n, [0] * n, list(range(n)),
                                          self._head, drop) \
            if n and hasattr(self.enricher, "enrich_bulk") else None
        index = cfg.elasticsearch.index
        items: list[BulkItem] | EncodedBulk
        if ready is not None:
            errors, alerts = ready.errors, ready.alerts
            kept = ready.kept
            items = EncodedBulk(ready.body, ready.ends,
                                lambda j: BulkItem(index, f"{key}-0-{kept[j]}", b"",
                                                   values[kept[j]]))
        else:
            results, alerts = self.enricher.enrich_batch(values) if n else ([], [])
            errors = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
            skip = {i for i, _ in errors} if drop else set()
            ids = document_ids(key, n)
            items = [BulkItem(index, ids[i], res.document, values[i])
                     for i, res in enumerate(results)
                     if res.document is not None and i not in skip]
        dead: list[BulkItem] = []
        reasons = []
        for i, error in errors:
            reasons.append(unparsed_reason(error))
            if drop:
                dead.append(self._dead_letter(key, i, values[i], "parse", error))
        plugin_out = plugin_dead_letters(self.enricher, cfg, n, errors) if n else None
        plugin_dead = []
        if plugin_out is not None:
            # As the worker does: the chunk a plugin failed on is indexed not at all.
            failure, indexes = plugin_out
            items = []
            plugin_dead = [self._dead_letter(key, i, values[i], "plugin", failure)
                           for i in indexes]
        return _Prepared(items, dead + plugin_dead, alerts, values, key, reasons,
                         len(plugin_dead))

    def _dead_letter(self, key: str, i: int, value: bytes, stage: str,
                     error: str) -> BulkItem:
        """A dead letter as a document: what the worker puts in its headers, the
        event as relay mode would have put it on Kafka."""
        doc = orjson.dumps({
            "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "envoygeo": {"stage": stage, "error": error[:4096], "source": f"{key}/{i}"},
            "event": {"original": value.decode("utf-8", "replace")},
        })
        return BulkItem(self.options_dead_letter_index, f"{key}-0-{i}", doc, value)

    @property
    def options_dead_letter_index(self) -> str:
        return self.settings.forward.dead_letter_index

    # -- on a bulk thread --

    def _deliver(self, p: _Prepared) -> None:
        """Index the documents, then dead letters and alerts; raises (no ack) on
        shutdown or a refusal retrying cannot fix."""
        rejected: list[Rejection] = self.sink.write(p.items, self.abort)
        dead = p.dead + [self._dead_letter(p.key, int(r.item.doc_id.rsplit("-", 1)[1]),
                                           r.item.original, "index",
                                           f"{r.status} {r.reason}") for r in rejected]
        if dead:
            for r in self.sink.write(dead, self.abort):
                # The dead-letter index refusing its own documents: nowhere left to
                # put them, so the chunk is not acked (the shipper resends).
                raise RuntimeError(f"{self.options_dead_letter_index} rejected a dead "
                                   f"letter: {r.status} {r.reason}")
        if p.alerts:
            self._index_alerts(p.alerts)
        m = self.dm
        indexed = len(p.items) - len(rejected)
        m.events_indexed.inc(indexed)
        for reason in p.unparsed:
            m.events_unparsed.labels(reason).inc()
        if len(p.dead) > p.plugin_dead:
            m.events_dead_lettered.labels("parse").inc(len(p.dead) - p.plugin_dead)
        if p.plugin_dead:
            m.events_dead_lettered.labels("plugin").inc(p.plugin_dead)
        if rejected:
            m.events_dead_lettered.labels("index").inc(len(rejected))
        self.indexed += indexed
        self.dead_lettered += len(dead)
        self.unparsed += len(p.unparsed)

    def _index_alerts(self, alerts: list[dict[str, Any]]) -> None:
        index = self.settings.elasticsearch.alerts_index
        items = []
        for alert in alerts:
            # `_id` is the (rule, ip, period) key: a re-emitted alert overwrites itself.
            source = orjson.dumps({k: v for k, v in alert.items() if k != "_id"})
            items.append(BulkItem(index, alert["_id"], source, source, alert["_id"]))
        for r in self.sink.write(items, self.abort):
            log.error("alert document rejected: %s %s", r.status, r.reason)
        self.dm.alerts.inc(len(alerts))
        self.alerts += len(alerts)

    async def drain(self, grace_s: float) -> bool:
        """SIGTERM: as relay mode; past the grace, bulk retries stop (no ack)."""
        finished = await super().drain(grace_s)
        self.abort.set()
        for conn in list(self._paused):
            conn.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        return finished

    def close(self) -> None:
        """Close the enricher on its own thread and drop it there: the compiled core's
        objects must be freed by the thread that made them."""

        def drop() -> None:
            close = getattr(self.enricher, "close", None)
            if close is not None:
                close()
            self.enricher = None

        self._enrich_pool.submit(drop)
        self._enrich_pool.shutdown(wait=True, cancel_futures=False)
        self._bulk_pool.shutdown(wait=False, cancel_futures=True)
        self.sink.close()


def serve_direct_status(server: DirectServer, host: str, port: int) -> Any:
    """/metrics, /healthz, /readyz: ready while listening and Elasticsearch takes writes
    (while it does not, chunks wait unacked and the shipper's retries pile up)."""
    from pipeline.metrics import StatusServer

    def ready() -> tuple[bool, str]:
        if server.draining:
            return False, "draining"
        if not server.serving:
            return False, "not listening"
        if not server.sink.writable.is_set():
            return False, f"Elasticsearch is not accepting writes: {server.sink.last_error}"
        return True, (f"listening on {server.port}, indexing into "
                      f"{server.settings.elasticsearch.index}")

    status = StatusServer(server.metrics, host, port, ready)  # type: ignore[arg-type]
    status.start()
    return status
