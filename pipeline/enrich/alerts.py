"""Per-IP rate alerts: one alert per (rule, IP, window period), fleet-wide with Redis.

A rule fires for an event whose count in the rule's window is ``>= threshold`` (">="
rather than "==" so a batch that jumps past the threshold, or an out-of-order event,
still fires). The period is ``floor(ts / window)`` of the event time; the dedupe key
``<rule>:<ip>:<period>`` is claimed through the rate backend (`claim_alerts`: an
in-process bounded set for memory, ``SET NX EX`` for Redis), so however many events and
workers cross the threshold, exactly one claim succeeds and one alert is emitted.

A local bounded set of keys this worker already tried keeps the common case (a hot IP
staying above threshold for the rest of the period) free of any extra Redis round trip.
Allow-listed CIDRs are checked only for candidates (rare), with a small cache, so the
allow-list costs nothing on ordinary events.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from pipeline.enrich.rates import Counts, Event, RateBackend

GeoLookup = Callable[[str], dict[str, Any]]

# The one comparison every envoygeo threshold uses, spelt as Kibana's
# `params.thresholdComparator`: a rule fires when an IP's count in the window *reaches*
# its threshold. `AlertEngine.evaluate` and the native pre-selection test `n >= threshold`,
# and the generated Kibana rule (`pipeline.dashboards.kibana.rate_rule`) carries this
# string, so `threshold: 600` means the same in the worker and in Kibana.
THRESHOLD_COMPARATOR = ">="


def reached(count: int, threshold: int) -> bool:
    """`count THRESHOLD_COMPARATOR threshold`, for callers off the hot path."""
    return count >= threshold


class AlertRule(BaseModel):
    """`window_s` must be one of the rate backend's windows."""

    model_config = {"frozen": True}

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    window_s: int = Field(gt=0)
    threshold: int = Field(gt=0)
    allow_cidrs: tuple[str, ...] = ()

    @field_validator("allow_cidrs")
    @classmethod
    def _valid_cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for c in v:
            ipaddress.ip_network(c, strict=False)
        return v


def alert_id(rule: str, ip: str, period: int) -> str:
    """Deterministic id: re-emitting the same alert overwrites instead of duplicating."""
    return f"{rule}:{ip}:{period}"


class AlertEngine:
    """Turns (events, counts) from a rate backend into alert documents."""

    def __init__(
        self,
        rules: Sequence[AlertRule],
        backend: RateBackend,
        *,
        lateness_s: int = 60,
        local_keys: int = 100_000,
        global_allow_cidrs: Sequence[str] = (),
    ) -> None:
        windows = backend.windows
        self.backend = backend
        self.lateness_s = lateness_s
        # (rule, index of its window in the counts tuple, allow networks)
        self._rules: list[tuple[AlertRule, int, list[Any]]] = []
        shared = [ipaddress.ip_network(c, strict=False) for c in global_allow_cidrs]
        for r in rules:
            if r.window_s not in windows:
                raise ValueError(f"rule {r.name}: window {r.window_s}s not in {windows}")
            nets = shared + [ipaddress.ip_network(c, strict=False) for c in r.allow_cidrs]
            self._rules.append((r, windows.index(r.window_s), nets))
        self._tried: OrderedDict[str, None] = OrderedDict()
        self._local_keys = local_keys
        self._allowed_cache: dict[tuple[str, int], bool] = {}
        self.emitted = 0
        self.suppressed_allowlist = 0

    def _allowed(self, ip: str, rule_idx: int, nets: list[Any]) -> bool:
        key = (ip, rule_idx)
        hit = self._allowed_cache.get(key)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(ip)
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            ok = any(addr.version == n.version and addr in n for n in nets)
        except ValueError:
            ok = False
        if len(self._allowed_cache) > 100_000:
            self._allowed_cache.clear()
        self._allowed_cache[key] = ok
        return ok

    def thresholds(self) -> list[tuple[int, int]]:
        """(window index, threshold) per rule: enough to pre-select the events that
        `evaluate` can act on (the native path passes only those)."""
        return [(wi, rule.threshold) for rule, wi, _ in self._rules]

    def evaluate(
        self,
        events: Sequence[Event],
        counts: Sequence[Counts],
        geo: GeoLookup | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts newly claimed by this worker for this batch, ready to index or produce.

        `geo(ip)` returns the ECS `source`-shaped geo dict (e.g. `geoip.geo_fields`);
        it is only called for emitted alerts.
        """
        # Cheap first pass: only threshold crossings not already tried locally.
        cands: list[
            tuple[str, int, AlertRule, int, int]
        ] = []  # key, event idx, rule, period, count
        tried = self._tried
        for ri, (rule, wi, nets) in enumerate(self._rules):
            threshold = rule.threshold
            window = rule.window_s
            for i, c in enumerate(counts):
                n = c[wi]
                if n < threshold:  # not reached(n, threshold), inlined: per event
                    continue
                ip, ts = events[i]
                period = int(ts // window)
                key = alert_id(rule.name, ip, period)
                if key in tried:
                    continue
                tried[key] = None
                if nets and self._allowed(ip, ri, nets):
                    self.suppressed_allowlist += 1
                    continue
                cands.append((key, i, rule, period, n))
        while len(tried) > self._local_keys:
            tried.popitem(last=False)
        if not cands:
            return []
        try:
            won = self.backend.claim_alerts(
                [(key, rule.window_s + self.lateness_s + 60) for key, _, rule, _, _ in cands]
            )
        except Exception:
            for key, *_ in cands:  # not claimed: let the next batch try again
                tried.pop(key, None)
            raise
        alerts: list[dict[str, Any]] = []
        for (key, i, rule, period, n), ok in zip(cands, won, strict=True):
            if not ok:
                continue
            ip, ts = events[i]
            alerts.append(_alert_doc(key, rule, ip, ts, period, n, geo(ip) if geo else {}))
        self.emitted += len(alerts)
        return alerts


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _alert_doc(
    key: str,
    rule: AlertRule,
    ip: str,
    ts: float,
    period: int,
    count: int,
    source_geo: dict[str, Any],
) -> dict[str, Any]:
    source: dict[str, Any] = {"ip": ip}
    source.update(source_geo)
    return {
        "_id": key,
        "@timestamp": _iso(ts),
        "event": {
            "kind": "alert",
            "category": ["network"],
            "type": ["info"],
            "module": "envoygeo",
            "dataset": "envoygeo.rate_alert",
        },
        "rule": {"name": rule.name},
        "source": source,
        "related": {"ip": [ip]},
        "envoygeo": {
            "alert": {
                "rule": rule.name,
                "window_s": rule.window_s,
                "threshold": rule.threshold,
                "count": count,
                "period": period,
                "period_start": _iso(period * rule.window_s),
                "event_time": ts,
            }
        },
    }
