"""Memory rate backend against the brute-force reference of the documented semantics."""

from __future__ import annotations

import random
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rates_reference import (  # noqa: E402
    batches,
    in_order_events,
    reference_counts,
    shuffle_within,
)

from pipeline.enrich.rates import (  # noqa: E402
    RateBackend,
    RatesConfig,
    open_backend,
    rate_fields,
)
from pipeline.enrich.rates.memory import MemoryRates  # noqa: E402
from pipeline.enrich.rates.native import NativeMemoryRates  # noqa: E402

pytestmark = pytest.mark.unit

WINDOWS = (10, 60, 300)
LATENESS = 60


def run(backend: MemoryRates, events: list, rng: random.Random) -> tuple[list, list]:
    counts: list = []
    late: list = []
    for b in batches(rng, events):
        c, lt = backend.count_batch_detailed(b)
        late.extend(len(counts) + i for i in lt)
        counts.extend(c)
    return counts, late


@pytest.mark.parametrize("seed", range(5))
def test_in_order_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    events = in_order_events(rng, 3000, n_ips=500, mean_gap=0.4)  # ~1200 s > retention
    m = MemoryRates(WINDOWS, LATENESS)
    counts, late = run(m, events, rng)
    ref, ref_late = reference_counts(events, WINDOWS, LATENESS)
    assert counts == ref
    assert late == ref_late == []
    assert m.stats()["evicted_idle"] > 0  # eviction happened and did not change any count


@pytest.mark.parametrize("seed", range(5))
def test_shuffled_within_lateness_matches_reference(seed: int) -> None:
    rng = random.Random(100 + seed)
    events = shuffle_within(rng, in_order_events(rng, 3000, mean_gap=0.4), LATENESS)
    m = MemoryRates(WINDOWS, LATENESS)
    counts, late = run(m, events, rng)
    ref, ref_late = reference_counts(events, WINDOWS, LATENESS)
    assert counts == ref
    assert late == ref_late == []


def test_late_and_very_late_events() -> None:
    m = MemoryRates((10, 60), lateness_s=5)  # retention 65
    ev = [
        ("a", 1000.0),
        ("a", 1000.9),
        ("a", 1090.0),
        ("a", 1080.0),
        ("a", 1030.0),
        ("a", 1024.0),
        ("a", 1090.5),
    ]
    counts, late = m.count_batch_detailed(ev)
    ref, ref_late = reference_counts(ev, (10, 60), 5)
    assert counts == ref
    assert late == ref_late == [3, 4, 5]
    # 1024 <= 1090 - 65: forgotten horizon, counts only itself; never seen by later events
    assert counts[5] == (1, 1)
    assert counts[6] == (2, 3)  # 1090, 1080 and itself; 1030 is just outside (1030, 1090]


def test_window_edges_are_whole_seconds() -> None:
    m = MemoryRates((10,), 60)
    # (t-10, t] on floor(ts): 999.99 is outside the window of 1009.0; 1000.99 is not of 1010.0
    c = m.count_batch([("x", 999.99), ("x", 1000.99), ("x", 1009.0), ("x", 1009.99), ("x", 1010.0)])
    assert c == [(1,), (2,), (2,), (3,), (3,)]


def test_later_timestamp_processed_earlier_is_not_counted() -> None:
    m = MemoryRates((10,), 60)
    assert m.count_batch([("x", 1005.0), ("x", 1001.0), ("x", 1006.0)]) == [(1,), (1,), (3,)]


def test_capacity_eviction_is_lru_and_counted() -> None:
    m = MemoryRates((10,), 60, max_ips=3)
    m.count_batch([("a", 1.0), ("b", 1.0), ("c", 1.0), ("a", 2.0), ("d", 2.0)])
    assert len(m) == 3
    assert m.stats()["evicted_capacity"] == 1
    # "b" was least recently seen and is gone; "a" survived
    assert m.count_batch([("a", 3.0), ("b", 3.0)]) == [(3,), (1,)]


def test_ipv6_and_ipv4_keys_are_distinct() -> None:
    m = MemoryRates((10,), 0)
    assert m.count_batch([("::ffff:1.2.3.4", 5.0), ("1.2.3.4", 5.0), ("1.2.3.4", 5.5)]) == [
        (1,),
        (1,),
        (2,),
    ]


def test_open_backend_and_protocol() -> None:
    b = open_backend(RatesConfig(windows=(60, 10), lateness_s=5))
    assert isinstance(b, MemoryRates | NativeMemoryRates) and isinstance(b, RateBackend)
    assert b.windows == (10, 60)
    with pytest.raises(ValueError):
        RatesConfig(windows=())


def test_claim_alerts_bounded() -> None:
    m = MemoryRates(max_alert_keys=2)
    assert m.claim_alerts([("k1", 10), ("k1", 10), ("k2", 10)]) == [True, False, True]
    assert m.claim_alerts([("k3", 10), ("k2", 10)]) == [True, False]
    assert m.claim_alerts([("k1", 10)]) == [True]  # fell out of the bounded set


def test_memory_per_ip_is_small() -> None:
    n = 50_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    m = MemoryRates(max_ips=10 * n)
    events = [
        (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1_764_000_000.0 + i / n) for i in range(n)
    ]
    m.count_batch(events)
    del events
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(m) == n
    assert used / n < 250, f"{used / n:.0f} bytes per IP"


events_st = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "2001:db8::1"]),
        st.floats(min_value=1000, max_value=1200, allow_nan=False),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    events=events_st,
    windows=st.sets(st.integers(1, 40), min_size=1, max_size=3),
    lateness=st.integers(0, 30),
    split=st.integers(1, 30),
)
def test_arbitrary_order_matches_reference(
    events: list, windows: set, lateness: int, split: int
) -> None:
    m = MemoryRates(tuple(windows), lateness, evict_idle=False)
    counts: list = []
    late: list = []
    for k in range(0, len(events), split):
        c, lt = m.count_batch_detailed(events[k : k + split])
        late.extend(k + i for i in lt)
        counts.extend(c)
    assert (counts, late) == reference_counts(events, tuple(windows), lateness)


def test_rate_fields() -> None:
    assert rate_fields((10, 60), (3, 7)) == {"10s": 3, "60s": 7}


def test_running_totals_rebase_keeps_counts_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.enrich.rates import memory

    monkeypatch.setattr(memory, "_REBASE", 5)  # rebase all the time
    rng = random.Random(42)
    events = shuffle_within(rng, in_order_events(rng, 2000, n_ips=5, mean_gap=0.05), 3)
    m = MemoryRates((1, 4, 9), 3)
    assert run(m, events, rng) == reference_counts(events, (1, 4, 9), 3)
