"""In-process rate counters: exact for one worker, bounded memory.

Representation (why it is shaped like this): 1M tracked IPs must fit in a few hundred
MB and must not slow the garbage collector, so per IP there is exactly one
``array('q')`` (not GC-tracked, ~88 bytes for one bucket) in a dict keyed by the IP
string. Each element packs one second-bucket as ``(bucket - EPOCH_BASE) << 32 | count``;
the array is kept sorted, so ``bisect`` finds window edges and the C ``sum()`` of a slice
adds a window's counts (the bucket parts land above bit 32 and are masked off). A window
count therefore costs two C calls whatever the number of buckets, which matters for the
hot IPs of an attack. Dict order doubles as recency order (an IP is popped and
re-inserted on each event), so idle and over-capacity eviction pops from the front.
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


class MemoryRates:
    """See module docstring and `pipeline.enrich.rates` for the exact semantics."""

    def __init__(
        self,
        windows: Sequence[int] = (10, 60, 300),
        lateness_s: int = 60,
        max_ips: int = 1_000_000,
        max_alert_keys: int = 100_000,
        evict_idle: bool = True,
    ) -> None:
        self.windows: tuple[int, ...] = tuple(sorted(set(int(w) for w in windows)))
        self.lateness_s = int(lateness_s)
        self.retention_s = max(self.windows) + self.lateness_s
        self.max_ips = int(max_ips)
        self.evict_idle = evict_idle
        self._state: dict[str, array[int]] = {}
        self._newest = -(1 << 62)  # newest relative bucket seen by this backend
        self._alert_keys: OrderedDict[str, float] = OrderedDict()
        self._max_alert_keys = max_alert_keys
        self.events = 0
        self.late_events = 0
        self.evicted_idle = 0
        self.evicted_capacity = 0

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
                arr = array("q", (t << _SHIFT | 1,))
                state[ip] = arr
                if t > newest_all:
                    newest_all = t
                out.append(ones)
                continue
            state[ip] = arr  # re-insert at the end: dict order is recency order
            newest = arr[-1] >> _SHIFT
            if t >= newest:
                if t == newest:
                    arr[-1] += 1
                else:
                    arr.append(t << _SHIFT | 1)
                    cut = (t - retention + 1) << _SHIFT  # keep buckets > t - R
                    if arr[0] < cut:
                        del arr[: bisect_left(arr, cut)]
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
                j = bisect_left(arr, key)
                if arr[j] >> _SHIFT == t:  # j < len(arr): arr[-1] is newer than t
                    arr[j] += 1
                else:
                    arr.insert(j, key | 1)
                hi = j + 1
            out.append(
                tuple(
                    [
                        sum(arr[bisect_left(arr, (t - w + 1) << _SHIFT, 0, hi) : hi]) & _MASK
                        for w in windows
                    ]
                )
            )
        self._newest = newest_all
        self.events += len(events)
        self.late_events += len(late)
        self._evict()
        return out, late

    def _evict(self) -> None:
        """Drop IPs idle past the retention horizon, then the least recent over capacity."""
        state = self._state
        horizon = self._newest - self.retention_s
        while self.evict_idle and state:
            ip = next(iter(state))
            if state[ip][-1] >> _SHIFT > horizon:
                break
            del state[ip]
            self.evicted_idle += 1
        while len(state) > self.max_ips:
            del state[next(iter(state))]
            self.evicted_capacity += 1

    def claim_alerts(self, claims: Sequence[tuple[str, int]]) -> list[bool]:
        """In-process dedupe: a bounded set of keys (oldest dropped beyond the cap)."""
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
