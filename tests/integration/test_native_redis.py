"""The compiled fast path with the Redis rate backend (events leave the native batch
and counts come back into it), against the Python reference on the same real Redis."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from pipeline.bench.core import corpus
from pipeline.enrich.alerts import AlertRule
from pipeline.enrich.rates import RatesConfig
from tests.unit.test_native import _need_native, run_both  # noqa: F401 - autouse fixture

pytestmark = pytest.mark.integration


def test_redis_rates_identical_on_both_paths(redis_url: str,
                                             unique: Callable[[str], str]) -> None:
    records, _ = corpus(3000, 300, seed=5)
    # Records only Python takes (an ISO collector time, a line of no known format),
    # mixed in: their events are counted in record order with the native ones.
    line = orjson.loads(records[0])["log"]
    records[10:10] = [orjson.dumps({"@timestamp": "2026-11-29T01:13:00Z", "log": line}),
                      orjson.dumps({"@timestamp": 1.7959e9, "log": "not an access log"})]
    prefix = {True: unique("native"), False: unique("python")}  # counters not shared

    def rates_for(use_native: bool) -> RatesConfig:
        return RatesConfig(backend="redis", redis_url=redis_url, key_prefix=prefix[use_native],
                           windows=(1, 10, 60), lateness_s=5)

    docs, alerts, e = run_both(records, batch=500, rates_for=rates_for,
                               rules=[AlertRule(name="burst", window_s=10, threshold=20)],
                               native=3000)
    assert e.records_python == 2
    assert alerts, "the threshold is low enough that alerts must fire"
    assert all(b'"rate":{' in d.document for d in docs[:10])
