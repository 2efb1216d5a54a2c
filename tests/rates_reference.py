"""Brute-force reference for the rate semantics in `pipeline.enrich.rates` (tests only).

Deliberately naive (re-scans every earlier event of the IP) so that it shares no code or
data structure with the backends it checks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def reference_counts(
    events: Sequence[tuple[str, float]], windows: Sequence[int], lateness: int
) -> tuple[list[tuple[int, ...]], list[int]]:
    windows = sorted(set(windows))
    retention = max(windows) + lateness
    seen: dict[str, list[int]] = {}
    out: list[tuple[int, ...]] = []
    late: list[int] = []
    for i, (ip, ts) in enumerate(events):
        t = math.floor(ts)
        prior = seen.setdefault(ip, [])
        newest = max([*prior, t])
        if t < newest - lateness:
            late.append(i)
        out.append(
            tuple(
                1 + sum(1 for b in prior if t - w < b <= t and b > newest - retention)
                for w in windows
            )
        )
        prior.append(t)
    return out, late


def zipf_ips(rng: random.Random, n_ips: int, n: int, s: float = 1.1) -> list[str]:
    weights = [1 / (k + 1) ** s for k in range(n_ips)]
    pool = [f"198.51.{k // 250}.{k % 250}" if k % 3 else f"2001:db8::{k:x}" for k in range(n_ips)]
    return rng.choices(pool, weights, k=n)


def in_order_events(
    rng: random.Random,
    n: int,
    n_ips: int = 40,
    start: float = 1_764_000_000.0,
    mean_gap: float = 0.2,
) -> list[tuple[str, float]]:
    ips = zipf_ips(rng, n_ips, n)
    ts = start
    out = []
    for ip in ips:
        ts += rng.expovariate(1 / mean_gap)
        out.append((ip, ts))
    return out


def shuffle_within(
    rng: random.Random, events: list[tuple[str, float]], lateness: int
) -> list[tuple[str, float]]:
    """Reorder so no event arrives after one more than `lateness` seconds newer."""
    keyed = [(ts + rng.uniform(0, lateness), k, (ip, ts)) for k, (ip, ts) in enumerate(events)]
    keyed.sort()
    return [e for _, _, e in keyed]


def batches(
    rng: random.Random, events: list[tuple[str, float]], max_size: int = 50
) -> list[list[tuple[str, float]]]:
    out = []
    i = 0
    while i < len(events):
        k = rng.randint(1, max_size)
        out.append(events[i : i + k])
        i += k
    return out
