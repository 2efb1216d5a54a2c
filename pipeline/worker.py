"""The worker loop: Kafka -> enrich -> Elasticsearch, committing only what is safe.

Shape, and why:

* The main thread owns the consumer (librdkafka callbacks, rebalances, commits all
  happen there) and does the CPU work of enrichment.
* Bulk requests run on a small thread pool (`elasticsearch.concurrency`), so the next
  batch is enriched while the previous one is being indexed: the worker's rate then
  approaches the Elasticsearch bulk ceiling instead of ceiling + enrichment time.
* Batches are committed strictly in the order they were read: a batch's offsets are
  committed only when it and every batch before it are done (indexed or dead-lettered),
  at most every `kafka.commit_interval_ms` while busy (at once when caught up, before
  a rebalance and at exit).
* Backpressure: with `max_inflight_batches` batches unfinished (Elasticsearch slow or
  down), fetching pauses but polling continues, so the group membership stays alive and
  memory stays bounded by the in-flight batches plus librdkafka's bounded queue.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson
from confluent_kafka import Message, TopicPartition

from pipeline.config import Settings
from pipeline.enricher import Enriched
from pipeline.metrics import Metrics, StatusServer, unparsed_reason
from pipeline.plugins.runner import plugin_dead_letters
from pipeline.sinks.elasticsearch import (
    BulkItem,
    ElasticsearchSink,
    EncodedBulk,
    SinkStopped,
)
from pipeline.sinks.kafka import KafkaTopicSink, OutRecord
from pipeline.sources.kafka import KafkaFatalError, KafkaSource, record_times

log = logging.getLogger("envoygeo.worker")
# A bulk request out this long while fetching is paused is worth a warning: the usual
# backpressure pause lasts as long as one bulk request (tens to hundreds of ms).
STALL_WARN_S = 10.0
# Back-off between calls to a Redis rate backend that does not answer: short at first
# (a restart or failover takes seconds), capped so a fleet does not hammer it.
REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S = 0.5, 5.0


class RatesStopped(Exception):
    """Stopping while the rate backend was unavailable: the batch being counted is
    neither indexed nor committed (read again at the next start)."""


class BatchEnricher(Protocol):
    def enrich_batch(self, values: Sequence[bytes],
                     kafka_ts: Sequence[float | None] | None = None,
                     ) -> tuple[list[Enriched], list[dict[str, Any]]]:
        """One Enriched per value, in order, plus the alerts this batch raised;
        `kafka_ts`: each record's Kafka timestamp (`@timestamp`'s fallback)."""
        ...


@dataclass(slots=True)
class Batch:
    items: list[BulkItem] | EncodedBulk
    dead_letters: list[OutRecord]
    alerts: list[dict[str, Any]]
    offsets: dict[tuple[str, int], int]  # next offset to read, per partition
    records: int


@dataclass
class Progress:
    records_in: int = 0
    indexed: int = 0
    dead_lettered: int = 0
    unparsed: int = 0
    alerts: int = 0
    started: float = field(default_factory=time.monotonic)
    # Where the previous progress line stood: its rate is over the last interval, so a
    # drop shows at once rather than diluted into the lifetime average.
    last_at: float = field(default_factory=time.monotonic)
    last_in: int = 0


def document_id(topic: str, partition: int, offset: int) -> str:
    """Deterministic per Kafka position: a replayed record overwrites its own document."""
    return f"{topic}-{partition}-{offset}"


def source_position(doc_id: str) -> str:
    """`topic/partition/offset` of a `document_id` (topics may contain `-`)."""
    topic, partition, offset = doc_id.rsplit("-", 2)
    return f"{topic}/{partition}/{offset}"


def dead_letter(msg: Message, stage: str, reason: str) -> OutRecord:
    headers = [
        ("envoygeo.stage", stage.encode()),
        ("envoygeo.error", reason.encode("utf-8", "replace")[:4096]),
        ("envoygeo.source", f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
    ]
    return OutRecord(value=msg.value() or b"", key=msg.key(), headers=headers)


@dataclass(slots=True)
class _Describe:
    """Item j of a batch's encoded body as a BulkItem (for a rejection's dead letter)."""

    index: str
    kept: list[int]
    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    values: list[bytes]

    def __call__(self, j: int) -> BulkItem:
        # No `position`: the dead letter derives it from the id (`source_position`), as
        # for the BulkItems of the Python path.
        i = self.kept[j]
        doc_id = document_id(self.topics[i], self.partitions[i], self.offsets[i])
        return BulkItem(self.index, doc_id, b"", self.values[i])


class Worker:
    def __init__(
        self,
        settings: Settings,
        enricher: BatchEnricher,
        sink: ElasticsearchSink | None = None,
        side: KafkaTopicSink | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.enricher = enricher
        self.metrics = metrics or Metrics()
        self.metrics.set_build_info(getattr(enricher, "native_status", None) == "on")
        self.sink = sink or ElasticsearchSink(settings.elasticsearch, observer=self.metrics)
        self.side = side or KafkaTopicSink.for_worker(settings.kafka)
        self.stopping = threading.Event()  # stop fetching, drain, commit
        self.abort = threading.Event()  # grace period over: give up on unfinished batches
        self.progress = Progress()
        self._inflight: deque[tuple[Future[None], Batch]] = deque()
        self._pool = ThreadPoolExecutor(settings.elasticsearch.concurrency, "bulk")
        self._fatal: BaseException | None = None
        self._fatal_said = False  # its one line is logged already
        self._grace_timer: threading.Timer | None = None
        self.source: KafkaSource | None = None
        self.status: StatusServer | None = None
        self._bulk_head = self.sink.action_head(settings.elasticsearch.index)
        self._paused_since, self._pause_said = 0.0, False
        self._redis_down_since: float | None = None
        self._next_progress = 0.0
        self._redis_error = ""
        rates = getattr(enricher, "rates", None)
        if rates is not None and hasattr(rates, "outage"):  # Redis: outages waited out here
            rates.outage = self

    # -- lifecycle --

    def install_signal_handlers(self) -> None:
        def handle(signum: int, frame: Any) -> None:
            self.stop(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def stop(self, why: str) -> None:
        """Stop fetching, flush, commit and exit within the grace period."""
        log.info("%s: stopping (grace %.0fs)", why, self.settings.worker.shutdown_grace_s)
        self.stopping.set()
        # The grace period starts now, not when the loop gets to _shutdown(): the main
        # thread may be blocked in a revoke callback draining batches that a dead
        # Elasticsearch will not take, and only `abort` can release it.
        self._start_grace_timer()

    def run(self) -> int:
        """Run until stopped; returns the process exit status."""
        cfg = self.settings
        self.source = KafkaSource(
            cfg.kafka, on_revoke=self._on_revoke, on_stats=self.metrics.on_stats
        )
        if cfg.metrics.port:
            self.status = StatusServer(
                self.metrics, cfg.metrics.host, cfg.metrics.port, self._ready
            )
            self.status.start()
        log.info(
            "envoygeo worker started",
            extra={
                "fields": {
                    "kafka": cfg.kafka.bootstrap_servers,
                    "topics": cfg.kafka.topic_pattern or cfg.kafka.topics,
                    "group": cfg.kafka.group_id,
                    "group_instance_id": self.source.instance_id,
                    "index": cfg.elasticsearch.index,
                    "metrics_port": self.status.port if self.status else None,
                    "native": getattr(self.enricher, "native_status", "n/a"),
                    "privacy": cfg.privacy.client_ip,
                    "plugins": cfg.plugins.enabled,
                    # What documents leave out (document.profile / omit): an operator
                    # looking for a field learns here that it is not written.
                    "document": {"profile": cfg.document.profile,
                                 "omitted": list(cfg.document.paths())},
                }
            },
        )
        self._next_progress = time.monotonic() + cfg.metrics.progress_interval_s
        try:
            while not self.stopping.is_set():
                if self.status:
                    self.status.beat()
                self._reap()
                if self._fatal is not None:
                    break
                # Here, not after fetching: while paused the loop never gets that far, and
                # a progress line ("0 rec/s ..., paused") is what an outage should show.
                self._progress_due()
                if len(self._inflight) >= cfg.worker.max_inflight_batches:
                    # Usually the oldest bulk is about to finish: wait for it first.
                    # Pausing costs a refetch on resume (librdkafka drops the paused
                    # partitions' prefetched records), so it is kept for a sink that
                    # really stalls; group heartbeats go on in librdkafka's thread.
                    if not wait([self._inflight[0][0]], cfg.worker.backpressure_wait_s).done:
                        self._pause()
                        self.source.serve(0.2)
                    continue
                if self.source.paused:
                    self._resume()
                msgs = self.source.poll_batch(
                    cfg.kafka.batch_max_records,
                    cfg.kafka.batch_max_bytes,
                    cfg.kafka.batch_max_wait_ms / 1000.0,
                    wake=self._oldest_done,
                )
                if msgs:
                    self._submit(self._prepare(msgs))
        except RatesStopped as exc:
            log.warning("%s", exc)
        except KafkaFatalError as exc:
            # One clear line (e.g. fenced by another worker with the same static member
            # id), no traceback: the consumer cannot go on, the process exits 1.
            log.error("%s", exc)
            return 1
        except Exception as exc:
            refused = _redis_refusal(exc, self.settings)
            if refused is None:
                raise
            # The shared rate backend is gone or refuses us (restarted with another
            # password, user deleted): one line, exit 1, so the orchestrator restarts
            # the worker; nothing after the last delivered batch is committed.
            log.error("%s; stopping (records after the last committed offset are read "
                      "again at the next start)", refused)
            return 1
        finally:
            self._shutdown()
        if self._fatal is not None:
            if not self._fatal_said:
                log.error("stopped on an unexpected error: %r", self._fatal)
            return 1
        return 0

    def _pause(self) -> None:
        """Stop fetching while the oldest bulk request is still out; say so only when
        it is news to an operator: Elasticsearch refuses writes, or fetching has been
        paused for STALL_WARN_S with the oldest batch still undelivered. A short pause
        while a slow bulk finishes is ordinary backpressure (counted by envoygeo_paused,
        logged at DEBUG)."""
        assert self.source is not None
        now = time.monotonic()
        if not self.source.paused:
            self.source.pause()
            self.metrics.paused.set(1)
            self._paused_since, self._pause_said = now, False
            log.debug("paused fetching: %d batch(es) being indexed", len(self._inflight))
        if self._pause_said:
            return
        if not self.sink.writable.is_set():
            log.warning("paused fetching: Elasticsearch is not accepting writes (%s); "
                        "resuming when it does", self.sink.last_error)
            self._pause_said = True
        elif now - self._paused_since >= STALL_WARN_S:
            # The oldest batch has been out longer still (backpressure_wait_s before the
            # pause); delivering it includes its dead letters and alerts to Kafka.
            log.warning("paused fetching for %.0fs: the oldest batch is still being "
                        "delivered (Elasticsearch slow or overloaded, or the dead-letter "
                        "or alerts topic not taking records)", now - self._paused_since)
            self._pause_said = True

    def _resume(self) -> None:
        assert self.source is not None
        self.source.resume()
        self.metrics.paused.set(0)
        paused_for = time.monotonic() - self._paused_since
        if self._pause_said:
            log.info("resumed fetching after %.1fs paused", paused_for)
        else:
            log.debug("resumed fetching after %.1fs paused", paused_for)

    # -- the Redis rate backend's outages (RedisRates.outage), on the main thread,
    # -- inside _prepare: the batch being counted waits in hand --

    def redis_unavailable(self, exc: BaseException, attempt: int) -> None:
        """Redis did not answer while counting a batch: pause fetching (said once), keep
        the loop's duties (heartbeat, Kafka callbacks, committing what finished before
        this batch) for the back-off, then let the backend send the batch again. The
        batch is held, not dropped: its offsets are not committed until it is indexed."""
        from pipeline.service_errors import describe_redis_error

        assert self.source is not None
        now = time.monotonic()
        self._redis_error = describe_redis_error(exc, self.settings.rates).rstrip(".")
        if self._redis_down_since is None:
            self._redis_down_since = now
            self.source.pause()  # never paused here: the loop resumes before it polls
            self.metrics.paused.set(1)
            self.metrics.rates_unavailable.set(1)
            log.warning("paused fetching: %s; retrying the batch (not committed) every "
                        "%.1f-%.0fs until Redis answers", self._redis_error,
                        REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
        self.metrics.rates_retries.inc()
        ceiling = min(REDIS_RETRY_MAX_S, REDIS_RETRY_INITIAL_S * 2 ** min(attempt, 10))
        until = now + random.uniform(ceiling / 2, ceiling)
        while True:
            if self.stopping.is_set() or self._fatal is not None:
                raise RatesStopped(
                    f"stopping while Redis is unavailable ({self._redis_error}): the batch "
                    f"being counted is not indexed; it and the records after it are read "
                    f"again at the next start")
            left = until - time.monotonic()
            if left <= 0:
                return
            if self.status:
                self.status.beat()
            self.source.serve(min(0.2, left))
            self._reap()
            self._progress_due()

    def redis_recovered(self) -> None:
        """The batch went through: resume fetching, saying for how long it was paused."""
        if self._redis_down_since is None:
            return
        down = time.monotonic() - self._redis_down_since
        self._redis_down_since, self._redis_error = None, ""
        self.metrics.rates_unavailable.set(0)
        if self.source is not None and self.source.paused:
            self.source.resume()
            self.metrics.paused.set(0)
        log.info("resumed fetching: Redis answers again after %.1fs paused", down)

    def _progress_due(self) -> None:
        """The progress line, every metrics.progress_interval_s (also while waiting for
        Redis: "0 rec/s ..., paused" is what an outage should show)."""
        if time.monotonic() >= self._next_progress:
            self._publish_enricher_stats()
            self._log_progress()
            self._next_progress = (time.monotonic()
                                   + self.settings.metrics.progress_interval_s)

    def _start_grace_timer(self) -> None:
        """Set `abort` once shutdown_grace_s have passed (idempotent)."""
        if self._grace_timer is None:
            timer = threading.Timer(self.settings.worker.shutdown_grace_s, self.abort.set)
            timer.daemon = True
            timer.start()
            self._grace_timer = timer

    def _shutdown(self) -> None:
        self._start_grace_timer()
        log.info("draining %d in-flight batch(es)", len(self._inflight))
        self._drain()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.source is not None:
            self.source.close()
        self.side.close()
        self._publish_enricher_stats()
        self._log_progress(final=True)
        if self.status:
            self.status.close()

    # -- per batch --

    def _prepare(self, msgs: list[Message]) -> Batch:
        """Enrich on this thread; what cannot be indexed becomes a dead-letter record.

        Hot path (every record). With the compiled core the batch comes back as a
        ready `_bulk` body (`Enricher.enrich_bulk`): no Python object per document;
        a rejected item's BulkItem is built only if Elasticsearch refuses it.
        Otherwise: one plain loop, the document id inlined (it is `document_id`).
        The next offset per partition is read from the batch's end either way.
        """
        values = [m.value() or b"" for m in msgs]
        kafka_ts = record_times(msgs)
        enrich_bulk = getattr(self.enricher, "enrich_bulk", None)
        ready = None
        if enrich_bulk is not None:
            # A fetched record always has its topic, partition and offset (the client's
            # stubs say Optional for every message).
            topics = cast(list[str], [m.topic() for m in msgs])
            partitions = cast(list[int], [m.partition() for m in msgs])
            offsets = cast(list[int], [m.offset() for m in msgs])
            ready = enrich_bulk(values, topics, partitions, offsets, self._bulk_head,
                                self.settings.parse.unparsed == "dead_letter", kafka_ts)
        if ready is not None:
            errors = ready.errors
            items: list[BulkItem] | EncodedBulk = EncodedBulk(
                ready.body, ready.ends,
                _Describe(self.settings.elasticsearch.index, ready.kept, topics, partitions,
                          offsets, values))
            alerts = ready.alerts
        else:
            items, errors, alerts = self._prepare_items(msgs, values, kafka_ts)
        dead = self._unparsed(msgs, errors)
        plugin_out = plugin_dead_letters(self.enricher, self.settings, len(msgs), errors)
        if plugin_out is not None:
            # The batch a plugin failed on is indexed not at all: every record of it
            # goes to the dead letters (those already there as unparsed stay so).
            failure, indexes = plugin_out
            items = []
            dead += [dead_letter(msgs[i], "plugin", failure) for i in indexes]
        # Records of a partition arrive in offset order: its last one here is the newest.
        offsets_done: dict[tuple[str, int], int] = {}
        assigned = len(self.source.assigned) if self.source is not None else 0
        for msg in reversed(msgs):
            key = cast(tuple[str, int], (msg.topic(), msg.partition()))
            if key not in offsets_done:
                offsets_done[key] = cast(int, msg.offset()) + 1
                if len(offsets_done) == assigned:
                    break
        self.progress.records_in += len(msgs)
        self.metrics.records_in.inc(len(msgs))
        self.metrics.bytes_in.inc(sum(map(len, values)))
        self.metrics.batch_size.observe(len(msgs))
        self._publish_record_counts()
        return Batch(items, dead, alerts, offsets_done, len(msgs))

    def _prepare_items(self, msgs: list[Message], values: list[bytes],
                       kafka_ts: list[float | None],
                       ) -> tuple[list[BulkItem], list[tuple[int, str]], list[dict[str, Any]]]:
        """The batch as BulkItems, through `enrich_batch` (any BatchEnricher), and its
        unparsed lines, (index, why)."""
        index = self.settings.elasticsearch.index
        results, alerts = self.enricher.enrich_batch(values, kafka_ts)
        errors = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
        skip = ({i for i, _ in errors} if self.settings.parse.unparsed == "dead_letter"
                else set())
        items: list[BulkItem] = []
        append = items.append
        for i, (msg, value, res) in enumerate(zip(msgs, values, results, strict=True)):
            if res.document is not None and i not in skip:
                append(BulkItem(index, f"{msg.topic()}-{msg.partition()}-{msg.offset()}",
                                res.document, value))
        return items, errors, alerts

    def _unparsed(self, msgs: list[Message], errors: list[tuple[int, str]]) -> list[OutRecord]:
        """Count the lines that could not be parsed; dead-letter them if so configured."""
        dead_letter_unparsed = self.settings.parse.unparsed == "dead_letter"
        dead: list[OutRecord] = []
        for i, error in errors:
            self.progress.unparsed += 1
            self.metrics.records_failed.labels(unparsed_reason(error)).inc()
            if dead_letter_unparsed:
                dead.append(dead_letter(msgs[i], "parse", error))
        return dead

    def _submit(self, batch: Batch) -> None:
        self._inflight.append((self._pool.submit(self._deliver, batch), batch))
        self.metrics.inflight.set(len(self._inflight))

    def _deliver(self, batch: Batch) -> None:
        """Runs on a bulk thread: index, dead-letter the rejected, ship alerts."""
        cfg = self.settings
        rejections = self.sink.write(batch.items, self.abort)
        dead = batch.dead_letters
        if rejections:
            by_pos = {r.item.position or source_position(r.item.doc_id): r for r in rejections}
            dead = dead + [
                OutRecord(
                    value=r.item.original,
                    key=None,
                    headers=[
                        ("envoygeo.stage", b"index"),
                        ("envoygeo.error", f"{r.status} {r.reason}".encode()[:4096]),
                        ("envoygeo.source", pos.encode()),
                    ],
                )
                for pos, r in by_pos.items()
            ]
        if dead:
            self.side.send(cfg.kafka.dead_letter_topic, dead, self.abort)
            for rec in dead:
                stage = dict(rec.headers).get("envoygeo.stage", b"?").decode()
                self.metrics.dead_lettered.labels(stage).inc()
        if batch.alerts:
            self._ship_alerts(batch.alerts)
        self.progress.indexed += len(batch.items) - len(rejections)
        self.progress.dead_lettered += len(dead)
        self.metrics.records_out.inc(len(batch.items) - len(rejections))

    def _ship_alerts(self, alerts: list[dict[str, Any]]) -> None:
        cfg = self.settings
        records, items = [], []
        for alert in alerts:
            # `_id` is the (rule, ip, period) key: a re-emitted alert overwrites itself.
            alert_id = alert["_id"]
            source = orjson.dumps({k: v for k, v in alert.items() if k != "_id"})
            records.append(OutRecord(value=source, key=alert_id.encode()))
            items.append(
                BulkItem(cfg.elasticsearch.alerts_index, alert_id, source, source, alert_id)
            )
            self.metrics.alerts.labels(alert["rule"]["name"]).inc()
        self.side.send(cfg.kafka.alerts_topic, records, self.abort)
        rejected = self.sink.write(items, self.abort)
        for r in rejected:  # our own alert documents: a rejection is a bug worth seeing
            log.error("alert document rejected: %s %s", r.status, r.reason)
        self.progress.alerts += len(alerts)

    # -- completion and commits --

    def _reap(self, wait: bool = False) -> None:
        """Commit the offsets of finished batches, in read order."""
        done: dict[tuple[str, int], int] = {}
        while self._inflight:
            future, batch = self._inflight[0]
            if not future.done():
                if not wait:
                    break
                try:
                    future.result()
                except BaseException:  # inspected below
                    pass
            exc = future.exception()
            if exc is not None:
                if not isinstance(exc, SinkStopped):
                    self._fatal = exc
                    refused = _es_refusal(exc, self.settings)
                    if refused:  # e.g. an API key revoked while running: no traceback
                        self._fatal_said = True
                        log.error("%s; not committing this batch or anything after it",
                                  refused)
                    else:
                        log.error(
                            "batch delivery failed; not committing it or anything after it",
                            exc_info=exc,
                        )
                else:
                    log.warning("shutdown before batch was delivered: %s", exc)
                self.stopping.set()
                # Nothing after an undelivered batch may be committed.
                self._inflight.clear()
                break
            self._inflight.popleft()
            done.update(batch.offsets)
        self.metrics.inflight.set(len(self._inflight))
        if self.source is None:
            return
        if done:
            self.source.mark_done(done)
        # While batches keep coming, commits are paced (each one is a coordinator write);
        # once nothing is in flight the worker has caught up, and it commits at once.
        if wait or (done and not self._inflight) or self.source.commit_due():
            self.source.commit_pending(asynchronous=not wait)

    def _oldest_done(self) -> bool:
        """A finished batch waits to be committed (wakes the poll early)."""
        return bool(self._inflight) and self._inflight[0][0].done()

    def _drain(self) -> None:
        self._reap(wait=True)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Finish and commit everything in flight before the partitions change hands.
        self._drain()

    def _ready(self) -> tuple[bool, str]:
        """Ready = this worker makes progress as soon as its dependencies answer: it is
        subscribed to its topics and not stopping. An Elasticsearch outage or holding no
        partition (mid-rebalance, more workers than partitions) does not make it
        unready: no traffic is routed to a worker, and every pod unready at once would
        stop the metrics scrape through the Service and make the PodDisruptionBudget
        block node drains (deploy/kubernetes/README.md). The body says what it waits for.
        """
        if self.source is None:
            return False, "starting: not in the consumer group yet"
        if self.stopping.is_set():
            return False, "stopping"
        n = len(self.source.assigned)
        state = f"{n} partition(s)" if n else "no partitions assigned (idle member)"
        if not self.sink.writable.is_set():
            state += f"; elasticsearch not accepting writes, paused: {self.sink.last_error}"
        if self._redis_down_since is not None:
            state += f"; rate backend not answering, paused: {self._redis_error}"
        return True, f"ok: {state}"

    def _publish_enricher_stats(self) -> None:
        """GeoIP cache counters (the enricher counts; we only read). At each progress
        line, not per batch: `stats()` builds a dict of every stage's figures."""
        stats = getattr(self.enricher, "stats", None)
        geo = stats().get("geoip") if stats is not None else None
        if geo:
            m = self.metrics
            m.catch_up(m.geoip_cache, geo["cache_hits"], "hit")
            m.catch_up(m.geoip_cache, geo["cache_misses"], "miss")
            m.catch_up(m.geoip_reload_failures, geo["reload_failures"])

    def _publish_plugin_errors(self) -> None:
        """Per batch: the plugin runner's failures by plugin (each exists at 0 from the
        first call, so a dashboard has its series before any failure)."""
        plugins = getattr(self.enricher, "plugins", None)
        if plugins is None:
            return
        m = self.metrics
        for name, total in plugins.errors.items():
            m.plugin_errors.labels(name)
            m.catch_up(m.plugin_errors, total, name)

    def _publish_record_counts(self) -> None:
        """Per batch: records by path, cut records, lines without an Envoy-seen address
        (cumulative attributes of the enricher, read as they are: a few integers)."""
        e, m = self.enricher, self.metrics
        for counter, attr, label in (
            (m.records_processed, "records_native", "native"),
            (m.records_processed, "records_python", "python"),
            (m.records_truncated, "lines_truncated", "line"),
            (m.records_truncated, "fields_truncated", "field"),
            (m.no_envoy_address, "no_remote_address", ""),
        ):
            value = getattr(e, attr, None)
            if isinstance(value, int):
                m.catch_up(counter, value, label)
        self._publish_plugin_errors()

    def _record_notes(self) -> tuple[str, dict[str, int]]:
        """The progress line's clauses on records that lost something: cut to the
        limits, or with no address Envoy saw (naming the option that may fix it)."""
        e = self.enricher
        counts = {name: getattr(e, name) for name in
                  ("lines_truncated", "fields_truncated", "no_remote_address")
                  if isinstance(getattr(e, name, None), int)}
        text = ""
        if counts.get("lines_truncated") or counts.get("fields_truncated"):
            text += (f", {counts['lines_truncated']} lines cut to limits.max_line_bytes, "
                     f"{counts['fields_truncated']} with fields cut to limits.max_field_bytes")
        note = getattr(e, "no_remote_address_note", None)
        if note is not None and (said := note()):
            text += f"; {said}"
        return text, counts

    def _log_progress(self, final: bool = False) -> None:
        p = self.progress
        now = time.monotonic()
        elapsed = max(now - p.started, 1e-9)
        average = p.records_in / elapsed
        if final:
            rate = f"{average:.0f} rec/s average over {elapsed:.0f}s"
            current = average
        else:
            current = (p.records_in - p.last_in) / max(now - p.last_at, 1e-9)
            rate = f"{current:.0f} rec/s over the last {now - p.last_at:.0f}s"
            p.last_at, p.last_in = now, p.records_in
        notes, note_counts = self._record_notes()
        log.info(
            "%s: %d in, %d indexed, %d dead-lettered, %d unparsed, %d alerts, %s%s%s",
            "summary" if final else "progress",
            p.records_in,
            p.indexed,
            p.dead_lettered,
            p.unparsed,
            p.alerts,
            rate,
            ", paused" if self.source is not None and self.source.paused else "",
            notes,
            extra={
                "fields": {
                    "records_in": p.records_in,
                    "indexed": p.indexed,
                    "dead_lettered": p.dead_lettered,
                    "unparsed": p.unparsed,
                    "alerts": p.alerts,
                    "records_per_s": round(current, 1),
                    "records_per_s_average": round(average, 1),
                    **note_counts,
                }
            },
        )


def _es_refusal(exc: BaseException, settings: Settings) -> str | None:
    """Elasticsearch refusing the credentials (401, 403) after the start-up check passed,
    as the one line `run` would have said at start; None for anything else."""
    from elasticsearch import ApiError

    from pipeline.service_errors import describe_elasticsearch_error

    if isinstance(exc, ApiError) and exc.meta.status in (401, 403):
        return describe_elasticsearch_error(exc, settings.elasticsearch)
    return None


def _redis_refusal(exc: BaseException, settings: Settings) -> str | None:
    """The one line for a Redis error of the rate backend (rates.backend: redis), as
    `run` says it at start; None for anything else."""
    if settings.rates.backend != "redis":
        return None
    import redis

    from pipeline.service_errors import describe_redis_error

    return describe_redis_error(exc, settings.rates) if isinstance(exc, redis.RedisError) \
        else None
