"""Redis rate backend and alert dedupe against a real local Redis (deploy/local)."""

from __future__ import annotations

import random
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from rates_reference import (  # noqa: E402
    batches,
    in_order_events,
    reference_counts,
    shuffle_within,
)

from pipeline.enrich.alerts import AlertEngine, AlertRule  # noqa: E402
from pipeline.enrich.rates import RatesConfig, open_backend  # noqa: E402
from pipeline.enrich.rates.memory import MemoryRates  # noqa: E402
from pipeline.enrich.rates.redis import RedisRates  # noqa: E402

pytestmark = pytest.mark.integration

WINDOWS = (10, 60, 300)
LATENESS = 60


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    """`redis_url` (tests/conftest.py) starts the local Redis when nothing answers."""
    c = redis.Redis.from_url(redis_url)
    c.ping()
    yield c
    c.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    p = f"envoygeo-test-{uuid.uuid4().hex[:12]}"
    yield p
    keys = list(client.scan_iter(match=f"{p}:*", count=1000))
    for k in range(0, len(keys), 500):
        client.delete(*keys[k : k + 500])


def backend(client: redis.Redis, prefix: str, **kw: object) -> RedisRates:
    return RedisRates(
        client,
        kw.pop("windows", WINDOWS),
        kw.pop("lateness_s", LATENESS),  # type: ignore[arg-type]
        key_prefix=prefix,
    )


def run(b: RedisRates | MemoryRates, events: list, rng: random.Random) -> tuple[list, list]:
    counts: list = []
    late: list = []
    for chunk in batches(rng, events, 120):
        c, lt = b.count_batch_detailed(chunk)
        late.extend(len(counts) + i for i in lt)
        counts.extend(c)
    return counts, late


@pytest.mark.parametrize("shuffled", [False, True])
def test_matches_reference(client: redis.Redis, prefix: str, shuffled: bool) -> None:
    rng = random.Random(7 + shuffled)
    events = in_order_events(rng, 4000, n_ips=300, mean_gap=0.3)
    if shuffled:
        events = shuffle_within(rng, events, LATENESS)
    got = run(backend(client, prefix), events, rng)
    assert got == reference_counts(events, WINDOWS, LATENESS)


def test_arbitrary_order_with_late_events_matches_reference_and_memory(
    client: redis.Redis, prefix: str
) -> None:
    rng = random.Random(3)
    ips = ["a", "b", "2001:db8::1"]
    events = [(rng.choice(ips), 1000 + rng.uniform(0, 200)) for _ in range(1500)]
    windows, lateness = (3, 17, 40), 9
    r = run(backend(client, prefix, windows=windows, lateness_s=lateness), events, rng)
    m = run(MemoryRates(windows, lateness, evict_idle=False), events, rng)
    ref = reference_counts(events, windows, lateness)
    assert r == ref
    assert m == ref
    assert ref[1], "the stream must contain late events"


def test_two_workers_interleaving_equal_one_worker(client: redis.Redis, prefix: str) -> None:
    rng = random.Random(11)
    events = shuffle_within(rng, in_order_events(rng, 4000, n_ips=200, mean_gap=0.3), LATENESS)
    w1, w2 = backend(client, prefix), backend(client, prefix)
    counts: list = []
    for chunk in batches(rng, events, 100):
        counts.extend(rng.choice((w1, w2)).count_batch(chunk))
    assert counts == reference_counts(events, WINDOWS, LATENESS)[0]
    # and the same stream through one fresh instance (other prefix) gives the same counts
    single = backend(client, prefix + "-single")
    assert run(single, events, rng)[0] == counts


def test_one_round_trip_per_batch(
    client: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = backend(client, prefix)
    b.count_batch([("198.51.100.1", 1000.0)])  # loads the script
    sent: list = []
    real = client.execute_command
    monkeypatch.setattr(
        client, "execute_command", lambda *a, **k: sent.append(a[0]) or real(*a, **k)
    )
    b.count_batch([(f"198.51.100.{i % 7}", 1000.0 + i) for i in range(500)])
    assert sent == ["EVALSHA"]


def test_keys_expire_and_old_buckets_are_pruned(client: redis.Redis, prefix: str) -> None:
    b = backend(client, prefix, windows=(10,), lateness_s=5)
    b.count_batch([("x", 1000.0), ("x", 1001.0), ("x", 1100.0)])
    key = f"{prefix}:r:x"
    # msgpack [running total before the first kept bucket, 1100, total up to 1100]
    assert client.get(key) == bytes([0x93, 0x02, 0xCD, 0x04, 0x4C, 0x03])
    assert 0 < client.ttl(key) <= 15 + 600


def test_open_backend_from_config(redis_url: str, prefix: str) -> None:
    b = open_backend(RatesConfig(backend="redis", redis_url=redis_url, key_prefix=prefix))
    assert isinstance(b, RedisRates)
    assert b.count_batch([("x", 5.0), ("x", 5.5)]) == [(1, 1, 1), (2, 2, 2)]
    b.close()


def test_alerts_exactly_once_across_two_workers(client: redis.Redis, prefix: str) -> None:
    rules = [
        AlertRule(name="fast", window_s=10, threshold=20),
        AlertRule(name="slow", window_s=60, threshold=100, allow_cidrs=("203.0.113.0/24",)),
    ]
    w1, w2 = backend(client, prefix), backend(client, prefix)
    e1, e2 = AlertEngine(rules, w1), AlertEngine(rules, w2)
    t0 = 1_764_000_000.0
    events = []
    for ip in ["198.51.100.7", "2001:db8::7", "203.0.113.5"]:
        events += [(ip, t0 + i * 0.1) for i in range(1200)]  # 10 req/s for 120 s
    events += [("198.51.100.8", t0 + i) for i in range(120)]  # 1 req/s: never alerts
    events.sort(key=lambda e: e[1])
    rng = random.Random(5)
    alerts = []
    for chunk in batches(rng, events, 60):
        w, e = rng.choice(((w1, e1), (w2, e2)))
        alerts += e.evaluate(chunk, w.count_batch(chunk))
    ids = [a["_id"] for a in alerts]
    assert len(ids) == len(set(ids))
    got = {(a["rule"]["name"], a["source"]["ip"], a["envoygeo"]["alert"]["period"]) for a in alerts}
    want = set()
    for ip in ["198.51.100.7", "2001:db8::7", "203.0.113.5"]:
        want |= {("fast", ip, int(t0 // 10) + k) for k in range(12)}
    for ip in ["198.51.100.7", "2001:db8::7"]:  # 203.0.113.0/24 is allow-listed for "slow"
        want |= {("slow", ip, int(t0 // 60)), ("slow", ip, int(t0 // 60) + 1)}
    assert got == want
    assert e1.emitted > 0 and e2.emitted > 0  # both workers really took part


@pytest.mark.parametrize("shuffled", [False, True])
def test_hot_ips_dense_events_match_reference(
    client: redis.Redis, prefix: str, shuffled: bool
) -> None:
    # Few IPs, ~20 events/s each: exercises the script's same-second and sliding paths.
    rng = random.Random(21 + shuffled)
    events = in_order_events(rng, 6000, n_ips=3, mean_gap=0.02)
    if shuffled:
        events = shuffle_within(rng, events, 5)
    windows, lateness = (2, 7, 30), 5
    got = run(backend(client, prefix, windows=windows, lateness_s=lateness), events, rng)
    assert got == reference_counts(events, windows, lateness)
    assert got == run(MemoryRates(windows, lateness), events, rng)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "2001:db8::1"]),
            st.floats(min_value=1000, max_value=1100, allow_nan=False),
        ),
        max_size=80,
    ),
    windows=st.sets(st.integers(1, 30), min_size=1, max_size=3),
    lateness=st.integers(0, 20),
    split=st.integers(1, 25),
)
def test_arbitrary_order_property(
    client: redis.Redis, events: list, windows: set, lateness: int, split: int
) -> None:
    b = RedisRates(client, tuple(windows), lateness, key_prefix=f"envoygeo-test-{uuid.uuid4().hex}")
    counts: list = []
    late: list = []
    try:
        for k in range(0, len(events), split):
            c, lt = b.count_batch_detailed(events[k : k + split])
            late.extend(k + i for i in lt)
            counts.extend(c)
    finally:
        keys = list(client.scan_iter(match=f"{b.key_prefix}:*"))
        if keys:
            client.delete(*keys)
    assert (counts, late) == reference_counts(events, tuple(windows), lateness)


def test_retention_limit(client: redis.Redis) -> None:
    with pytest.raises(ValueError):
        RedisRates(client, (3600,), 600)
