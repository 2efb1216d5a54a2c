"""Per-IP request rates in trailing event-time windows: the shared contract of all backends.

Semantics (both backends implement exactly this; tests recompute it by brute force):

* Time is bucketed into whole seconds: ``b = floor(ts)`` of the event time (not the
  processing time).
* ``R = max(windows) + lateness_s`` is the retention horizon of one IP.
* Events are numbered in processing order (batches in the order ``count_batch`` is
  called, events in list order). For event *i* with IP *p* and bucket *t*, let
  ``N_i = max(b_j for j <= i with ip_j == p)`` (the newest bucket seen for *p*,
  including this event). Then for each window *W* (seconds)::

      count_W(i) = #{ j <= i : ip_j == p  and  t - W < b_j <= t  and  (j == i or b_j > N_i - R) }

  i.e. the events of this IP seen so far, this one included, whose second lies in the
  W-second window ending at this event's second. Events with *later* timestamps that
  happened to be processed earlier are not counted (they are not "before" this one),
  and an event processed later never changes an earlier event's count.
* ``late``: event *i* is late when ``t < N_i - lateness_s``. For an event that is not
  late the ``b_j > N_i - R`` clause never excludes anything, so its counts are the plain
  sliding-window counts. A late event's counts are best effort by design: buckets older
  than ``N_i - R`` are forgotten (a late event older than that counts only itself).
* Exactness also needs the IP's state to still exist: the memory backend may evict an
  IP whose newest bucket is ``<= G - R`` (G = newest bucket seen by that backend) or
  when it is over ``max_ips``; Redis keys expire ``R + key_ttl_slack_s`` wall-clock
  seconds after their last update. Events within ``lateness_s`` of the stream's newest
  event are therefore exact; counts are capped below 2**32 per bucket.

Timestamps must lie between 1970 and 2091 (buckets are stored relative to
``EPOCH_BASE`` in 32 bits by the memory backend): MIN_EVENT_TS..MAX_EVENT_TS. The
enricher counts no event outside it (its document carries no rates).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, field_validator

EPOCH_BASE = 1_700_000_000
MIN_EVENT_TS = 0.0
MAX_EVENT_TS = float(EPOCH_BASE + (1 << 31) - 2)

Event = tuple[str, float]
Counts = tuple[int, ...]


class RatesConfig(BaseModel):
    """Rate counter settings; `backend` picks the implementation in `open_backend`."""

    model_config = {"frozen": True}

    backend: Literal["memory", "redis"] = "memory"
    windows: tuple[int, ...] = (10, 60, 300)
    lateness_s: int = Field(default=60, ge=0)
    # memory backend
    max_ips: int = Field(default=1_000_000, ge=1)
    # redis backend
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis://[user[:password]@]host:port/db, rediss:// for TLS.")
    redis_password_file: Path | None = Field(
        default=None, description="File holding the password of the URL's user (a "
                                  "Kubernetes Secret volume) instead of the URL.")
    redis_ca_file: Path | None = Field(
        default=None, description="PEM CA certificate(s) a rediss:// server's certificate "
                                  "must chain to (default: the system trust store).")
    key_prefix: str = "envoygeo"
    key_ttl_slack_s: int = Field(default=600, ge=0)

    @field_validator("windows")
    @classmethod
    def _windows_sorted_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(w <= 0 for w in v):
            raise ValueError("windows must be non-empty positive seconds")
        return tuple(sorted(set(v)))

    @property
    def retention_s(self) -> int:
        return max(self.windows) + self.lateness_s


@runtime_checkable
class RateBackend(Protocol):
    """What the pipeline and the alert engine need from a counter store."""

    windows: tuple[int, ...]

    def count_batch(self, events: Sequence[Event]) -> list[Counts]:
        """Record `events` (ip, event time) and return, per event, one count per window."""
        ...

    def count_batch_detailed(self, events: Sequence[Event]) -> tuple[list[Counts], list[int]]:
        """As `count_batch`, plus the indexes of late events (see module docstring)."""
        ...

    def claim_alerts(self, claims: Sequence[tuple[str, int]]) -> list[bool]:
        """For each (dedupe key, ttl seconds): True for the one caller that claims it first."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def rate_fields(windows: Sequence[int], counts: Counts) -> dict[str, int]:
    """`{"10s": n, "60s": n, ...}` for the document (e.g. under `envoygeo.rate`)."""
    return {f"{w}s": c for w, c in zip(windows, counts, strict=True)}


def open_backend(cfg: RatesConfig, native: bool = True) -> RateBackend:
    """Build the configured backend (imports lazily: redis-py is only needed for redis).

    The memory backend is the compiled one when it is built, unless `native=False`."""
    if cfg.backend == "memory":
        from pipeline import native as native_mod

        if native and native_mod.available():
            from pipeline.enrich.rates.native import NativeMemoryRates

            return NativeMemoryRates.from_config(cfg)
        from pipeline.enrich.rates.memory import MemoryRates

        return MemoryRates.from_config(cfg)
    from pipeline.enrich.rates.redis import RedisRates

    return RedisRates.from_config(cfg)
