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
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from pipeline.clientip import ClientIpPolicy, ClientIpResolver
from pipeline.config import Settings
from pipeline.decode.parser import make_parser
from pipeline.enrich import geoip as geoip_mod
from pipeline.enrich.alerts import AlertEngine, AlertRule
from pipeline.enrich.geoip import GeoIP
from pipeline.enrich.rates import Event, RateBackend, RatesConfig, open_backend
from pipeline.process import Processed, RecordProcessor
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


class Enriched(NamedTuple):
    """What the worker needs of one input record."""

    document: bytes | None  # serialised ECS document; None if merged into a later record
    error: str | None  # why the access-log line could not be parsed, if it could not


class Enricher:
    def __init__(
        self,
        processor: RecordProcessor,
        geoip: GeoIP | None = None,
        rates: RateBackend | None = None,
        alerts: AlertEngine | None = None,
        on_rates: Callable[[float], None] | None = None,
    ) -> None:
        self.processor = processor
        self.geoip = geoip
        self.rates = rates
        self.alerts = alerts
        self._on_rates = on_rates
        # Rate keys ("10s", "60s", ...) built once, not per document.
        self._rate_keys = [f"{w}s" for w in rates.windows] if rates is not None else []
        self.rate_seconds = 0.0
        tune_gc()

    @classmethod
    def from_settings(cls, settings: Settings,
                      on_rates: Callable[[float], None] | None = None) -> Enricher:
        """Build every stage from the configuration; raises with a reason if one cannot start."""
        parser = make_parser(settings.parse.log_format, settings.parse.json_keys or None)
        policy = ClientIpPolicy(tuple(settings.client_ip.trusted_proxies),
                                settings.client_ip.trusted_hops)
        g = settings.geoip
        geoip = GeoIP.from_config(g) if (g.city or g.country or g.asn) else None
        rates = alerts = None
        if settings.rates.enabled:
            rates = open_backend(settings.rates)
            if settings.rates.alerts:
                alerts = AlertEngine(settings.rates.alerts, rates,
                                     lateness_s=settings.rates.lateness_s)
        return cls(RecordProcessor(parser, ClientIpResolver(policy)), geoip, rates, alerts,
                   on_rates)

    @classmethod
    def build(cls, processor: RecordProcessor, geoip: GeoIP | None,
              rates_cfg: RatesConfig | None, rules: Sequence[AlertRule] = ()) -> Enricher:
        """For the CLI and benchmarks, which assemble stages from options."""
        rates = open_backend(rates_cfg) if rates_cfg is not None else None
        alerts = (AlertEngine(rules, rates, lateness_s=rates_cfg.lateness_s)
                  if rates is not None and rates_cfg is not None and rules else None)
        return cls(processor, geoip, rates, alerts)

    # -- batches --

    def enrich_records(self, values: Sequence[bytes], flush_partials: bool = True,
                       ) -> tuple[list[Processed | None], list[dict[str, Any]]]:
        """One Processed per value (None: a partial line joined into a later one)."""
        process = self.processor.process_record
        out: list[Processed | None] = [process(v) for v in values]
        if flush_partials:
            self._attach_flushed(out)
        return out, self._enrich(out)

    def flush(self) -> tuple[list[Processed], list[dict[str, Any]]]:
        """End of input: partial lines still held back, enriched like the rest."""
        out = self.processor.flush_records()
        return out, self._enrich(out)  # type: ignore[arg-type]

    def _enrich(self, out: Sequence[Processed | None]) -> list[dict[str, Any]]:
        """GeoIP, rates and ECS bookkeeping on processed records, in place; returns alerts."""
        ingested = datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        lookup = self.geoip.batch_lookup() if self.geoip is not None else None
        apply_geo = geoip_mod.apply
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
            if ip is None:
                continue
            if lookup is not None:
                apply_geo(doc, lookup(ip))
            if ts is not None:
                events.append((ip, ts))
                event_docs.append(doc)

        alerts: list[dict[str, Any]] = []
        if self.rates is not None and events:
            started = time.perf_counter()
            counts, late = self.rates.count_batch_detailed(events)
            elapsed = time.perf_counter() - started
            self.rate_seconds += elapsed
            if self._on_rates is not None:
                self._on_rates(elapsed)
            keys = self._rate_keys
            for doc, c in zip(event_docs, counts, strict=True):
                doc["envoygeo"]["rate"] = dict(zip(keys, c, strict=True))
            for i in late:
                event_docs[i].setdefault("tags", []).append(RATE_LATE_TAG)
            if self.alerts is not None:
                alerts = self.alerts.evaluate(events, counts, self._alert_geo)
        return alerts

    def enrich_batch(self, values: Sequence[bytes]) -> tuple[list[Enriched], list[dict[str, Any]]]:
        """The worker's entry point: serialised documents, one per input value."""
        records, alerts = self.enrich_records(values)
        dumps = orjson.dumps
        return [
            Enriched(None, None) if r is None else Enriched(dumps(r.doc), r.error)
            for r in records
        ], alerts

    def _attach_flushed(self, out: list[Processed | None]) -> None:
        """Partial lines still open at the end of a batch become documents now.

        A batch boundary must not hold records back: their offsets are committed with
        the batch. Each flushed line takes the slot of the last held-back record.
        """
        flushed = self.processor.flush_records()
        if not flushed:
            return
        held = [i for i, r in enumerate(out) if r is None]
        for slot, rec in zip(held[-len(flushed):], flushed, strict=False):
            out[slot] = rec

    def _alert_geo(self, ip: str) -> dict[str, Any]:
        if self.geoip is None:
            return {}
        return geoip_mod.geo_fields(self.geoip.lookup(ip))

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"parsed": self.processor.parsed, "failed": self.processor.failed}
        if self.geoip is not None:
            out["geoip"] = self.geoip.stats()
        if self.rates is not None:
            out["rates"] = self.rates.stats()
        return out

    def close(self) -> None:
        if self.rates is not None:
            self.rates.close()
