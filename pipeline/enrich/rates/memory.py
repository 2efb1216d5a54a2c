"""In-process rate counters: exact for one worker, bounded memory.

Representation (why it is shaped like this): 1M tracked IPs must fit in a few hundred
MB and must not slow the garbage collector, so per IP there is exactly one
``array('q')`` (not GC-tracked, 96 bytes for one bucket) in a dict keyed by the IP
string. Each element packs one second-bucket and the IP's *running total* of events up
to and including that bucket: ``(bucket - EPOCH_BASE) << 32 | total``. Element 0 is a
sentinel holding the running total before the first kept bucket. The array is sorted by
bucket, so a window count is ``total(last bucket <= t) - total(just before the window)``:
two ``bisect`` calls and a subtraction in C whatever the number of buckets, which matters
for the hot IPs of an attack (summing a 300-bucket slice allocated 300 ints per window).
In-order events touch only the last element; an out-of-order event adds one to the
totals of the (at most lateness-many) later buckets. Totals are rebased before they
near 2**32. Dict order doubles as recency order (an IP is popped and re-inserted on each
event), so idle and over-capacity eviction walk the front of the dict.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pipeline.enrich.rates import EPOCH_BASE, Counts, Event, RatesConfig

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
_REBASE = 1 << 31


def _rebase(arr: array[int]) -> None:
    """Keep running totals far from 2**32 (a carry would corrupt the bucket bits)."""
    base = arr[0] & _MASK
    arr[:] = array("q", [(v & ~_MASK) | ((v & _MASK) - base) for v in arr])


class LocalAlertClaims:
    """In-process alert dedupe for the memory backends: a bounded set of claimed keys
    (oldest dropped beyond the cap); exact for one worker, as the counts are."""

    def __init__(self, max_alert_keys: int = 100_000) -> None:
        self._alert_keys: OrderedDict[str, float] = OrderedDict()
        self._max_alert_keys = max_alert_keys

    def claim_alerts(self, claims: Sequence[tuple[str, int]]) -> list[bool]:
        keys = self._alert_keys
        res: list[bool] = []
        for key, ttl in claims:
            if key in keys:
                res.append(False)
                continue
            keys[key] = ttl
            res.append(True)
            while len(keys) > self._max_alert_keys:
                keys.popitem(last=False)
        return res


class MemoryRates(LocalAlertClaims):
    """See module docstring and `pipeline.enrich.rates` for the exact semantics.

    `pipeline.enrich.rates.native.NativeMemoryRates` is the same counter compiled;
    this one is the reference the tests hold it to, and the fallback without it.
    """

    def __init__(
        self,
        windows: Sequence[int] = (10, 60, 300),
        lateness_s: int = 60,
        max_ips: int = 1_000_000,
        max_alert_keys: int = 100_000,
        evict_idle: bool = True,
    ) -> None:
        super().__init__(max_alert_keys)
        self.windows: tuple[int, ...] = tuple(sorted(set(int(w) for w in windows)))
        self.lateness_s = int(lateness_s)
        self.retention_s = max(self.windows) + self.lateness_s
        self.max_ips = int(max_ips)
        self.evict_idle = evict_idle
        self._state: dict[str, array[int]] = {}
        self._newest = -(1 << 62)  # newest relative bucket seen by this backend
        self.events = 0
        self.late_events = 0
        self.evicted_idle = 0
        self.evicted_capacity = 0
        self._since_evict = 0
        self._evict_every = 64

    @classmethod
    def from_config(cls, cfg: RatesConfig) -> MemoryRates:
        return cls(cfg.windows, cfg.lateness_s, cfg.max_ips)

    def __len__(self) -> int:
        return len(self._state)

    def count_batch(self, events: Sequence[Event]) -> list[Counts]:
        return self.count_batch_detailed(events)[0]

    def count_batch_detailed(self, events: Sequence[Event]) -> tuple[list[Counts], list[int]]:
        # Hot loop: locals only, no per-event helper calls, one tuple allocated per event.
        state = self._state
        windows = self.windows
        lateness = self.lateness_s
        retention = self.retention_s
        newest_all = self._newest
        out: list[Counts] = []
        late: list[int] = []
        ones = (1,) * len(windows)
        for i, (ip, ts) in enumerate(events):
            t = int(ts // 1) - EPOCH_BASE
            arr = state.pop(ip, None)
            if arr is None:
                # [sentinel with running total 0, this bucket with running total 1]
                arr = array("q", ((t - 1) << _SHIFT, t << _SHIFT | 1))
                state[ip] = arr
                if t > newest_all:
                    newest_all = t
                out.append(ones)
                continue
            state[ip] = arr  # re-insert at the end: dict order is recency order
            last = arr[-1]
            newest = last >> _SHIFT
            if t >= newest:
                if t == newest:
                    arr[-1] = last + 1
                else:
                    arr.append(t << _SHIFT | ((last + 1) & _MASK))
                    cut = (t - retention + 1) << _SHIFT  # keep buckets > t - R
                    if arr[1] < cut:
                        # The last dropped bucket becomes the sentinel: its running total
                        # is what the first kept bucket builds on.
                        del arr[: bisect_left(arr, cut, 1) - 1]
                    if arr[-1] & _MASK > _REBASE:
                        _rebase(arr)
                    if t > newest_all:
                        newest_all = t
                hi = len(arr)
            else:
                if t < newest - lateness:
                    late.append(i)
                if t <= newest - retention:
                    out.append(ones)  # only itself: everything it could see is forgotten
                    continue
                key = t << _SHIFT
                j = bisect_left(arr, key, 1)
                if arr[j] >> _SHIFT == t:  # j < len(arr): arr[-1] is newer than t
                    arr[j : len(arr)] = array("q", [v + 1 for v in arr[j:]])
                else:
                    arr[j:j] = array("q", [key | ((arr[j - 1] + 1) & _MASK)])
                    arr[j + 1 : len(arr)] = array("q", [v + 1 for v in arr[j + 1 :]])
                hi = j + 1
            # Window count = running total at this bucket minus the running total just
            # before the window: two bisects and a subtraction per window, in C.
            top = arr[hi - 1]
            out.append(
                tuple(
                    [
                        (top - arr[bisect_left(arr, (t - w + 1) << _SHIFT, 1, hi) - 1]) & _MASK
                        for w in windows
                    ]
                )
            )
        self._newest = newest_all
        self.events += len(events)
        self.late_events += len(late)
        self._evict(len(events))
        return out, late

    def _evict(self, n_events: int) -> None:
        """Drop IPs idle past the retention horizon, then the least recent over capacity.

        Runs at most once per `_evict_every` events and walks the dict front with a
        single iterator: deleted entries stay as holes at the front of a dict until it
        resizes, so calling next(iter(d)) per eviction would rescan them (quadratic).
        """
        state = self._state
        excess = len(state) - self.max_ips
        self._since_evict += n_events
        if excess <= 0 and self._since_evict < self._evict_every:
            return
        self._since_evict = 0
        self._evict_every = max(64, len(state) >> 6)  # amortised: O(1) per event
        doomed: list[str] = []
        if self.evict_idle:
            horizon_key = (self._newest - self.retention_s + 1) << _SHIFT
            for ip, arr in state.items():
                if arr[-1] >= horizon_key:
                    break
                doomed.append(ip)
        self.evicted_idle += len(doomed)
        excess -= len(doomed)
        if excess > 0:
            skip = len(doomed)
            for k, ip in enumerate(state):
                if k >= skip + excess:
                    break
                if k >= skip:
                    doomed.append(ip)
            self.evicted_capacity += excess
        for ip in doomed:
            del state[ip]

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "tracked_ips": len(self._state),
            "events": self.events,
            "late_events": self.late_events,
            "evicted_idle": self.evicted_idle,
            "evicted_capacity": self.evicted_capacity,
        }

    def close(self) -> None:
        self._state.clear()
