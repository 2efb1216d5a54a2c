"""The whole enrichment of a batch: decode -> parse -> client IP -> GeoIP -> rates -> alerts.

Why batches: the rate backend answers a whole batch in one call (one Redis round trip),
and alerts are evaluated on the batch's counts. Per-record stages stay in
`RecordProcessor`, so `envoygeo enrich`, the worker and the benchmarks all run the same
code in the same order.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import orjson

from pipeline import native as native_mod
from pipeline import omit as omit_mod
from pipeline.clientip import ClientIpPolicy, ClientIpResolver
from pipeline.config import Settings
from pipeline.decode.envelope import decode_envelope
from pipeline.decode.parser import make_parser
from pipeline.document import ingested_now
from pipeline.enrich import geoip as geoip_mod
from pipeline.enrich.alerts import AlertEngine, AlertRule
from pipeline.enrich.geoip import GeoIP
from pipeline.enrich.rates import (
    MAX_EVENT_TS,
    MIN_EVENT_TS,
    Event,
    RateBackend,
    RatesConfig,
    open_backend,
)
from pipeline.plugins import EnricherPlugin, PluginBatch
from pipeline.plugins.runner import FAILED_TAG, PluginRunner, splice
from pipeline.process import Limits, Processed, RecordProcessor
from pipeline.schema import ECS_VERSION

RATE_LATE_TAG = "_envoygeo_rate_late"


# Why the collector is tuned: a batch keeps every document alive until it is
# serialised (rates are counted for the whole batch first), ~15 GC-tracked containers
# per record. With CPython's default generation-0 threshold (700) each of them is
# traversed in gen 0 and gen 1, and a full collection over the whole heap (caches
# included) runs every few thousand records: measured at ~25% of `bench core`. The hot
# path makes no reference cycles, so collecting rarely frees nothing later than now.
GC_GEN0_THRESHOLD = 100_000


def tune_gc() -> None:
    """Raise the gen-0 threshold to GC_GEN0_THRESHOLD; never lowers a higher setting."""
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _ingested_now() -> str:
    """`event.ingested` for a batch (and the `@timestamp` of its records with no
    other time): now, in the `@timestamp` text form."""
    return ingested_now()


class Enriched(NamedTuple):
    """What the worker needs of one input record."""

    document: bytes | None  # serialised ECS document; None if merged into a later record
    error: str | None  # why the access-log line could not be parsed, if it could not


class BulkReady(NamedTuple):
    """A batch as a `_bulk` body (`Enricher.enrich_bulk`)."""

    body: bytes
    ends: list[int]  # where each item's two lines end in body
    kept: list[int]  # the record index of each item in body
    errors: list[tuple[int, str]]  # (record index, why) of lines that could not be parsed
    alerts: list[dict[str, Any]]


class _NativeRun(NamedTuple):
    batch: Any  # pipeline._native.Batch, rates counted, not yet serialised
    records: dict[int, Processed | None]  # the Python path's records, by index
    alerts: list[dict[str, Any]]
    fragments: list[bytes | None] | None  # plugin fields by record (native ones set in batch)


class Enricher:
    def __init__(
        self,
        processor: RecordProcessor,
        geoip: GeoIP | None = None,
        rates: RateBackend | None = None,
        alerts: AlertEngine | None = None,
        on_rates: Callable[[float], None] | None = None,
        native: bool = True,
        plugins: PluginRunner | None = None,
        omit: tuple[str, ...] = (),
    ) -> None:
        self.processor = processor
        # `document.profile` / `document.omit`: the fields left out of every document.
        self.omit = omit
        self._omit_tree = omit_mod.tree(omit) if omit else None
        self.plugins = plugins if plugins is not None and plugins.plugins else None
        # Why a plugin failed on the latest batch (None: none did, or no plugins): with
        # `plugins.on_error: dead_letter` the worker dead-letters that batch whole.
        self.plugin_failure: str | None = None
        self.geoip = geoip
        self.rates = rates
        self.alerts = alerts
        self._on_rates = on_rates
        # Rate keys ("10s", "60s", ...) built once, not per document.
        self._rate_keys = [f"{w}s" for w in rates.windows] if rates is not None else []
        self.rate_seconds = 0.0
        self._native_rates = getattr(rates, "native", None)
        self._fast: Any = None
        self._native_geo_generation: int | None = None
        self.native_geo_status = "off"
        self.native_status = "off"
        # Input records by the path that wrote their document, cumulative (each record
        # once; the worker exports them as a counter with a `path` label).
        self.records_native = 0
        self.records_python = 0
        if native:
            self._fast, why = native_mod.build_core(
                processor.parser, processor.resolver,
                self._geo_source_fragment if geoip is not None else None,
                geoip.cache_size if geoip is not None else 0,
                rates.windows if rates is not None else (), processor.limits,
                processor.envelope)
            self.native_status = "on" if self._fast is not None else f"off: {why}"
            if self._fast is not None and self.plugins is not None:
                self._fast.set_plugin_inputs(self.plugins.want_user_agent)
            if self._fast is not None and omit:
                self._fast.set_omit(list(omit))
        tune_gc()

    @classmethod
    def from_settings(cls, settings: Settings,
                      on_rates: Callable[[float], None] | None = None,
                      extra_plugins: Sequence[EnricherPlugin] = ()) -> Enricher:
        """Build every stage from the configuration; raises with a reason if one cannot start.

        `extra_plugins`: plugin instances run after the configured ones (`plugins.enabled`),
        for use in-process without registering an entry point; their fields are not in
        the field table (templates), which only installed plugins join."""
        parser = make_parser(settings.parse.log_format, settings.parse.json_keys or None)
        policy = ClientIpPolicy(tuple(settings.client_ip.trusted_proxies),
                                settings.client_ip.trusted_hops,
                                settings.client_ip.envoy_use_remote_address)
        g = settings.geoip
        geoip = GeoIP.from_config(g) if (g.city or g.country or g.asn) else None
        rates = alerts = None
        if settings.rates.enabled:
            rates = open_backend(settings.rates)
            if settings.rates.alerts:
                alerts = AlertEngine(settings.rates.alerts, rates,
                                     lateness_s=settings.rates.lateness_s)
        limits = Limits(settings.limits.max_line_bytes, settings.limits.max_field_bytes)
        resolver = ClientIpResolver(policy, privacy=settings.privacy.policy())
        on_error = settings.plugins.on_error
        plugins = PluginRunner.from_config(settings.plugins.enabled, settings.plugins.sections(),
                                           on_error)
        if extra_plugins:
            plugins = PluginRunner([*plugins.plugins, *extra_plugins], on_error)
        return cls(RecordProcessor(parser, resolver, limits, settings.parse.envelope), geoip,
                   rates, alerts, on_rates, plugins=plugins, omit=settings.document.paths())

    @classmethod
    def build(cls, processor: RecordProcessor, geoip: GeoIP | None,
              rates_cfg: RatesConfig | None, rules: Sequence[AlertRule] = (),
              native: bool = True, plugins: PluginRunner | None = None,
              omit: tuple[str, ...] = ()) -> Enricher:
        """For the CLI and benchmarks, which assemble stages from options.

        `native=False` runs the Python reference of every stage (tests, benchmarks);
        `omit`: fields left out of the documents (`DocumentSettings.paths()`)."""
        rates = open_backend(rates_cfg, native=native) if rates_cfg is not None else None
        alerts = (AlertEngine(rules, rates, lateness_s=rates_cfg.lateness_s)
                  if rates is not None and rates_cfg is not None and rules else None)
        return cls(processor, geoip, rates, alerts, native=native, plugins=plugins,
                   omit=omit)

    # -- batches --

    def enrich_records(self, values: Sequence[bytes], flush_partials: bool = True,
                       kafka_ts: Sequence[float | None] | None = None,
                       ) -> tuple[list[Processed | None], list[dict[str, Any]]]:
        """One Processed per value (None: a partial line joined into a later one).

        `kafka_ts`: each record's Kafka timestamp (`sources.kafka.record_times`), for
        `@timestamp` when the record has no time of its own; without it, ingest time.
        Plugin fields are merged into the documents (dicts).
        """
        out, alerts = self._records(values, flush_partials, kafka_ts)
        if self.plugins is not None:
            self.plugin_failure = self.plugins.merge_into(
                [r.doc if r is not None else None for r in out], self._plugin_batch(out))
        return out, alerts

    def _plugin_batch(self, records: Sequence[Processed | None]) -> PluginBatch:
        """The plugins' inputs of records the Python path processed."""
        ips = [None if r is None else r.ip for r in records]
        if self.plugins is None or not self.plugins.want_user_agent:
            return PluginBatch(ips, [None] * len(ips))
        uas = [None if r is None else (r.doc.get("user_agent") or {}).get("original")
               for r in records]
        return PluginBatch(ips, uas)

    def _records(self, values: Sequence[bytes], flush_partials: bool,
                 kafka_ts: Sequence[float | None] | None,
                 ) -> tuple[list[Processed | None], list[dict[str, Any]]]:
        """`enrich_records` without the plugins."""
        process = self.processor.process_record
        ingested = self.processor.ingested = _ingested_now()
        out: list[Processed | None] = (
            [process(v) for v in values] if kafka_ts is None
            else [process(v, t) for v, t in zip(values, kafka_ts, strict=True)])
        self.records_python += len(out)
        if flush_partials:
            held = [i for i, r in enumerate(out) if r is None]
            for slot, rec in self._flushed_into(held):
                out[slot] = rec
        return out, self._enrich(out, ingested=ingested)

    def flush(self) -> tuple[list[Processed], list[dict[str, Any]]]:
        """End of input: partial lines still held back, enriched like the rest."""
        ingested = self.processor.ingested = _ingested_now()
        out = self.processor.flush_records()
        alerts = self._enrich(out, ingested=ingested)  # type: ignore[arg-type]
        if self.plugins is not None and out:
            self.plugin_failure = self.plugins.merge_into([r.doc for r in out],
                                                          self._plugin_batch(out))
        return out, alerts

    def _enrich(self, out: Sequence[Processed | None], count: bool = True,
                ingested: str | None = None) -> list[dict[str, Any]]:
        """GeoIP, rates and ECS bookkeeping on processed records, in place; returns alerts.

        `count=False`, `ingested`: the native path counts the whole batch itself and
        stamps every record of the batch with one `event.ingested`.
        """
        if ingested is None:
            ingested = _ingested_now()
        lookup = self.geoip.batch_lookup() if self.geoip is not None else None
        apply_geo = geoip_mod.apply
        omit, omit_fields = self._omit_tree, omit_mod.apply
        events: list[Event] = []
        event_docs: list[dict[str, Any]] = []
        # One pass for the per-record stages; plain loop, no per-record helper calls.
        for rec in out:
            if rec is None:
                continue
            doc, ip, ts, error = rec
            doc["ecs"] = {"version": ECS_VERSION}
            event = doc["event"]
            event["ingested"] = ingested
            event["module"] = "envoygeo"
            if error is None:
                event["type"] = ["access"]
                event["dataset"] = "envoygeo.access"
            else:
                event["dataset"] = "envoygeo.unparsed"
            if ip is not None:
                if lookup is not None:
                    apply_geo(doc, lookup(ip))
                if not doc.get("source", True):  # a hashed client without GeoIP: no `{}`
                    del doc["source"]
                if ts is not None and MIN_EVENT_TS <= ts < MAX_EVENT_TS:
                    events.append((ip, ts))
                    event_docs.append(doc)
            if omit is not None:
                omit_fields(doc, omit)

        alerts: list[dict[str, Any]] = []
        if self.rates is not None and events and count:
            started = time.perf_counter()
            counts, late = self.rates.count_batch_detailed(events)
            self._rates_took(time.perf_counter() - started)
            keys = self._rate_keys
            for doc, c in zip(event_docs, counts, strict=True):
                doc.setdefault("envoygeo", {})["rate"] = dict(zip(keys, c, strict=True))
            for i in late:
                event_docs[i].setdefault("tags", []).append(RATE_LATE_TAG)
            if self.alerts is not None:
                alerts = self.alerts.evaluate(events, counts, self._alert_geo)
        return alerts

    def enrich_batch(self, values: Sequence[bytes],
                     kafka_ts: Sequence[float | None] | None = None,
                     ) -> tuple[list[Enriched], list[dict[str, Any]]]:
        """The worker's entry point: serialised documents, one per input value."""
        if self._fast is not None:
            return self._enrich_batch_native(values, kafka_ts)
        records, alerts = self._records(values, True, kafka_ts)
        dumps = orjson.dumps
        if self.plugins is None:
            return [
                Enriched(None, None) if r is None else Enriched(dumps(r.doc), r.error)
                for r in records
            ], alerts
        # The same fragments, spliced the same way, as on the compiled path.
        frags, failed = self.plugins.fragments(self._plugin_batch(records))
        self.plugin_failure = failed
        if failed:
            for r in records:
                if r is not None:
                    r.doc.setdefault("tags", []).append(FAILED_TAG)
        return [
            Enriched(None, None) if r is None else Enriched(splice(dumps(r.doc), f), r.error)
            for r, f in zip(records, frags, strict=True)
        ], alerts

    def _native_batch(self, values: Sequence[bytes],
                      kafka_ts: Sequence[float | None] | None) -> _NativeRun:
        """A batch through the compiled core, up to (not including) serialisation.

        The core writes the documents it can; the records it hands back run through
        the same Python stages as always (`RecordProcessor`, `_enrich`'s bookkeeping)
        and join the batch's rate counting in record order, so counts, alerts and
        documents are what the Python path alone would produce (`_python_records` says
        how split lines are kept so).
        """
        geo = self.geoip
        core = self._fast
        generation = 0
        if geo is not None:
            geo.batch_lookup()  # the reload check, once per batch
            generation = geo.generation
            if generation != self._native_geo_generation:
                # (Re)read the databases Python has just validated; if that fails the
                # native cache asks Python's lookup instead, so nothing is lost.
                why = core.open_geo(*geoip_mod.native_spec(geo))
                self.native_geo_status = "on" if why is None else f"off: {why}"
                self._native_geo_generation = generation
        hits, native_lookups = core.geo_hits, core.geo_native_lookups
        ingested = self.processor.ingested = _ingested_now()
        batch = core.begin(values if isinstance(values, list) else list(values),
                           ingested, generation,
                           kafka_ts if kafka_ts is None or isinstance(kafka_ts, list)
                           else list(kafka_ts))
        if geo is not None:
            geo.external_hits += core.geo_hits - hits
            geo.external_misses += core.geo_native_lookups - native_lookups
        records = self._python_records(batch, values, kafka_ts)
        n_python = len(records)  # before flushed lines fill held-back slots (same keys)
        self.records_python += n_python
        self.records_native += len(values) - n_python
        self.processor.parsed += len(values) - n_python
        if records:
            for i, rec in records.items():
                if rec is not None and rec.ip is not None and rec.ts is not None \
                        and MIN_EVENT_TS <= rec.ts < MAX_EVENT_TS:
                    batch.set_event(i, rec.ip, rec.ts)
            self._enrich(list(records.values()), count=False, ingested=ingested)
        alerts: list[dict[str, Any]] = []
        if self.rates is not None:
            started = time.perf_counter()
            if self._native_rates is not None:
                batch.count(self._native_rates)
            else:
                counts, late = self.rates.count_batch_detailed(batch.events())
                batch.set_counts(counts, late)
            self._rates_took(time.perf_counter() - started)
            keys = self._rate_keys
            for i, c, late_event in batch.python_counts():
                doc = records[i].doc  # type: ignore[union-attr]
                doc.setdefault("envoygeo", {})["rate"] = dict(zip(keys, c, strict=True))
                if late_event:
                    doc.setdefault("tags", []).append(RATE_LATE_TAG)
            if self.alerts is not None:
                events, counts = batch.alert_candidates(self.alerts.thresholds())
                if events:
                    alerts = self.alerts.evaluate(events, counts, self._alert_geo)
        return _NativeRun(batch, records, alerts, self._native_plugins(batch, records))

    def _native_plugins(self, batch: Any, records: dict[int, Processed | None],
                        ) -> list[bytes | None] | None:
        """The plugins on a compiled batch: the core hands out the native records'
        inputs (two lists), the Python records add theirs, and the fragments go back
        to the core, which splices them while it writes the documents (no dicts)."""
        if self.plugins is None:
            return None
        ips, uas = batch.plugin_inputs()
        want_ua = self.plugins.want_user_agent
        for i, rec in records.items():
            if rec is not None:
                ips[i] = rec.ip
                if want_ua:
                    uas[i] = (rec.doc.get("user_agent") or {}).get("original")
        frags, failed = self.plugins.fragments(
            PluginBatch(ips, uas if want_ua else [None] * len(ips)))
        self.plugin_failure = failed
        batch.set_plugin_fields(frags)
        if failed:
            batch.add_tag(list(range(len(ips))), FAILED_TAG)
            for rec in records.values():
                if rec is not None:
                    rec.doc.setdefault("tags", []).append(FAILED_TAG)
        return frags

    def _python_records(self, batch: Any, values: Sequence[bytes],
                        kafka_ts: Sequence[float | None] | None,
                        ) -> dict[int, Processed | None]:
        """The batch's records the Python path owns, processed in record order.

        Those are the core's fallback (CRI and Docker envelopes among them, so the
        partial-line joiner sees every piece of a split line, in order) plus any record
        the core wrote that continues a split line the joiner holds open: the joiner
        alone knows which stream a piece belongs to. So while a line is open, each
        native record is offered to the joiner as the Python path would: passed
        through unchanged, the native document stands; taken (joined), the core hands
        the record back. Open lines left at the end of the batch are flushed into the
        last held-back slots, as `enrich_records` does: a batch never holds records
        back past its commit. Cost: one step per fallback record, plus a Python decode
        per native record only while a split line is open.
        """
        process = self.processor.process_record
        joiner = self.processor.joiner
        feed, record = joiner.feed, self.processor.record
        hand_back = self._fast.hand_back
        records: dict[int, Processed | None] = {}
        k = 0  # the next native record not yet offered to the joiner
        for i in (*batch.fallback, len(values)):
            while k < i and joiner.pending:
                env = decode_envelope(values[k], self.processor.envelope)
                joined = feed(env)  # as process_record(values[k]) would
                if joined is not env:  # a piece of the open line: the joiner's now
                    hand_back(batch, k)
                    records[k] = None if joined is None else record(
                        joined, None if kafka_ts is None else kafka_ts[k])
                k += 1
            if i < len(values):
                records[i] = process(values[i], None if kafka_ts is None else kafka_ts[i])
            k = i + 1
        held = sorted(i for i, r in records.items() if r is None)
        for slot, rec in self._flushed_into(held):
            records[slot] = rec
        return dict(sorted(records.items()))

    def _enrich_batch_native(self, values: Sequence[bytes],
                             kafka_ts: Sequence[float | None] | None,
                             ) -> tuple[list[Enriched], list[dict[str, Any]]]:
        """`enrich_batch` through the compiled core."""
        batch, records, alerts, frags = self._native_batch(values, kafka_ts)
        fallback = batch.fallback
        docs = batch.finish()
        if not fallback:
            return [Enriched(d, None) for d in docs], alerts
        dumps = orjson.dumps
        out: list[Enriched] = []
        for i, d in enumerate(docs):
            if d is not None:
                out.append(Enriched(d, None))
            else:
                rec = records[i]
                out.append(Enriched(None, None) if rec is None
                           else Enriched(splice(dumps(rec.doc), frags[i] if frags else None),
                                         rec.error))
        return out, alerts

    def enrich_bulk(self, values: list[bytes], topics: list[str], partitions: list[int],
                    offsets: list[int], head: bytes, drop_errors: bool,
                    kafka_ts: list[float | None] | None = None) -> BulkReady | None:
        """The worker's compiled path: the batch enriched straight into a `_bulk` body.

        Record i's document id is `topics[i]-partitions[i]-offsets[i]` after `head`
        (the action line up to the id, see `ElasticsearchSink.action_head`). Lines that
        could not be parsed are reported in `errors` and, with `drop_errors`, left out
        of the body (the worker dead-letters them). `kafka_ts`: as for `enrich_records`.
        None: use `enrich_batch` (no compiled core).
        """
        if self._fast is None:
            return None
        batch, records, alerts, frags = self._native_batch(values, kafka_ts)
        errors: list[tuple[int, str]] = []
        python_docs: dict[int, bytes | None] = {}
        for i, rec in records.items():
            if rec is not None and rec.error is not None:
                errors.append((i, rec.error))
            python_docs[i] = (None if rec is None or (drop_errors and rec.error is not None)
                              else splice(orjson.dumps(rec.doc), frags[i] if frags else None))
        body, ends, kept = batch.finish_bulk(head, topics, partitions, offsets, python_docs)
        return BulkReady(body, ends, kept, errors, alerts)

    def _geo_source_fragment(self, ip: str) -> tuple[str | None, bytes | None]:
        """The native core's GeoIP cache miss: this enricher's lookup, rendered."""
        return geoip_mod.source_fragment(self.geoip.lookup(ip))  # type: ignore[union-attr]

    def _flushed_into(self, held: Sequence[int]) -> list[tuple[int, Processed]]:
        """Partial lines still open at the end of a batch, as documents now: (slot, record).

        A batch boundary must not hold records back: their offsets are committed with
        the batch. Each flushed line takes the slot of the last held-back record
        (`held`: the indexes of the batch's held-back records, in order).
        """
        flushed = self.processor.flush_records()
        if not flushed:
            return []
        return list(zip(held[-len(flushed):], flushed, strict=False))

    def _rates_took(self, elapsed: float) -> None:
        self.rate_seconds += elapsed
        if self._on_rates is not None:
            self._on_rates(elapsed)

    def _alert_geo(self, ip: str) -> dict[str, Any]:
        if self.geoip is None:
            return {}
        return geoip_mod.geo_fields(self.geoip.lookup(ip))

    def _counted(self, name: str, python: int) -> int:
        """A per-record count of the Python path plus the compiled core's."""
        return python + (getattr(self._fast, name) if self._fast is not None else 0)

    @property
    def lines_truncated(self) -> int:
        """Records whose line was cut to `limits.max_line_bytes`."""
        return self._counted("lines_truncated", self.processor.lines_truncated)

    @property
    def fields_truncated(self) -> int:
        """Records with a field cut to `limits.max_field_bytes`."""
        return self._counted("fields_truncated", self.processor.fields_truncated)

    @property
    def no_remote_address(self) -> int:
        """Records whose line holds no address Envoy saw (`clientip_no_remote_address`)."""
        return self._counted("no_remote_address", self.processor.resolver.no_remote_address)

    def no_remote_address_note(self) -> str:
        """What a summary says about records with no address Envoy saw ("" if none)."""
        n = self.no_remote_address
        if not n:
            return ""
        if self.processor.resolver.policy.envoy_use_remote_address:
            return (f"{n} lines had no address Envoy saw, not even in X-Forwarded-For "
                    "(does Envoy run with use_remote_address: true?)")
        return (f"{n} lines had no address Envoy saw (Envoy's default format?): set "
                "client_ip.envoy_use_remote_address if Envoy runs with "
                "use_remote_address: true")

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"parsed": self.processor.parsed, "failed": self.processor.failed,
                               "native": self.native_status,
                               "lines_truncated": self.lines_truncated,
                               "fields_truncated": self.fields_truncated,
                               "no_remote_address": self.no_remote_address}
        if self._fast is not None:
            out["native_handed_back"] = self._fast.handed_back
            out["native_geoip"] = self.native_geo_status
        if self.geoip is not None:
            out["geoip"] = self.geoip.stats()
        if self.rates is not None:
            out["rates"] = self.rates.stats()
        return out

    def close(self) -> None:
        if self.rates is not None:
            self.rates.close()
        if self.plugins is not None:
            self.plugins.close()
