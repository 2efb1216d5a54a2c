"""Alert engine with the memory backend: one alert per (rule, IP, period), allow-lists."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from pipeline.enrich.alerts import AlertEngine, AlertRule, alert_id
from pipeline.enrich.rates.memory import MemoryRates

pytestmark = pytest.mark.unit

T0 = 1_764_000_000.0  # multiple of 10 and 60


def feed(engine: AlertEngine, backend: MemoryRates, events: list, batch: int = 7) -> list:
    alerts = []
    for k in range(0, len(events), batch):
        b = events[k : k + batch]
        alerts += engine.evaluate(b, backend.count_batch(b), geo=lambda ip: {"geo": {"x": ip}})
    return alerts


def burst(ip: str, start: float, n: int, step: float) -> list:
    return [(ip, start + i * step) for i in range(n)]


def test_one_alert_per_ip_rule_and_period() -> None:
    m = MemoryRates((10, 60), 60)
    rules = [
        AlertRule(name="fast", window_s=10, threshold=20),
        AlertRule(name="slow", window_s=60, threshold=100),
    ]
    eng = AlertEngine(rules, m)
    # 198.51.100.7: 10 req/s for 120 s; 198.51.100.8: 1 req/s (never alerts)
    events = sorted(
        burst("198.51.100.7", T0, 1200, 0.1) + burst("198.51.100.8", T0, 120, 1.0),
        key=lambda e: e[1],
    )
    alerts = feed(eng, m, events)
    keys = [a["_id"] for a in alerts]
    assert len(keys) == len(set(keys))
    fast = {a["envoygeo"]["alert"]["period"] for a in alerts if a["rule"]["name"] == "fast"}
    slow = {a["envoygeo"]["alert"]["period"] for a in alerts if a["rule"]["name"] == "slow"}
    assert fast == {int(T0 // 10) + k for k in range(12)}
    assert slow == {int(T0 // 60), int(T0 // 60) + 1}
    assert {a["source"]["ip"] for a in alerts} == {"198.51.100.7"}


def test_alert_document_fields() -> None:
    m = MemoryRates((10,), 60)
    eng = AlertEngine([AlertRule(name="r1", window_s=10, threshold=3)], m)
    alerts = feed(eng, m, burst("2001:db8::5", T0 + 1.25, 5, 0.5), batch=5)
    assert len(alerts) == 1
    a = alerts[0]
    assert a["_id"] == alert_id("r1", "2001:db8::5", int(T0 // 10))
    assert a["@timestamp"] == "2025-11-24T16:00:02.250Z"
    assert a["source"] == {"ip": "2001:db8::5", "geo": {"x": "2001:db8::5"}}
    assert a["event"]["kind"] == "alert"
    assert a["envoygeo"]["alert"] == {
        "rule": "r1",
        "window_s": 10,
        "threshold": 3,
        "count": 3,
        "period": int(T0 // 10),
        "period_start": "2025-11-24T16:00:00.000Z",
        "event_time": T0 + 2.25,
    }


def test_allow_listed_cidrs_never_alert() -> None:
    m = MemoryRates((10,), 60)
    rule = AlertRule(
        name="r", window_s=10, threshold=2, allow_cidrs=("203.0.113.0/24", "2001:db8:aa::/48")
    )
    eng = AlertEngine([rule], m, global_allow_cidrs=["192.0.2.1/32"])
    events = []
    for ip in ["203.0.113.9", "2001:db8:aa::1", "::ffff:203.0.113.10", "192.0.2.1", "198.51.100.1"]:
        events += burst(ip, T0, 20, 0.2)
    events.sort(key=lambda e: e[1])
    alerts = feed(eng, m, events)
    assert [a["source"]["ip"] for a in alerts] == ["198.51.100.1"]
    assert eng.suppressed_allowlist == 4


def test_jump_past_threshold_and_out_of_order_still_one_alert() -> None:
    m = MemoryRates((10,), 60)
    eng = AlertEngine([AlertRule(name="r", window_s=10, threshold=3)], m)
    ev = burst("198.51.100.1", T0 + 1, 10, 0.01)  # one batch: counts 1..10
    rng = random.Random(1)
    rng.shuffle(ev)
    alerts = feed(eng, m, ev, batch=10)
    assert len(alerts) == 1


def test_two_engines_share_one_memory_backend_dedupe() -> None:
    # Same process, two engines (e.g. two pipelines) over one backend: still one alert.
    m = MemoryRates((10,), 60)
    rule = AlertRule(name="r", window_s=10, threshold=2)
    e1, e2 = AlertEngine([rule], m), AlertEngine([rule], m)
    ev = burst("198.51.100.1", T0, 6, 0.1)
    a1 = e1.evaluate(ev[:3], m.count_batch(ev[:3]))
    a2 = e2.evaluate(ev[3:], m.count_batch(ev[3:]))
    assert len(a1) + len(a2) == 1


def test_rule_validation() -> None:
    m = MemoryRates((10,), 60)
    with pytest.raises(ValueError):
        AlertEngine([AlertRule(name="r", window_s=60, threshold=2)], m)
    with pytest.raises(ValidationError):
        AlertRule(name="r", window_s=10, threshold=2, allow_cidrs=("nope",))
    with pytest.raises(ValidationError):
        AlertRule(name="bad name", window_s=10, threshold=2)


def test_failed_claim_is_retried_next_batch() -> None:
    class Flaky(MemoryRates):
        fail = True

        def claim_alerts(self, claims):  # type: ignore[no-untyped-def]
            if self.fail:
                self.fail = False
                raise ConnectionError("down")
            return super().claim_alerts(claims)

    m = Flaky((10,), 60)
    eng = AlertEngine([AlertRule(name="r", window_s=10, threshold=1)], m)
    ev = [("198.51.100.1", T0)]
    with pytest.raises(ConnectionError):
        eng.evaluate(ev, m.count_batch(ev))
    ev = [("198.51.100.1", T0 + 1)]
    assert len(eng.evaluate(ev, m.count_batch(ev))) == 1
