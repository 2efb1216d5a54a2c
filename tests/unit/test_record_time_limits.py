"""No document without `@timestamp`, and what one record may cost (issue 12, item 3);
the records with no address Envoy saw, counted and explained (item 7).

`@timestamp` falls back from the line's START_TIME to the envelope's time, the Kafka
record's timestamp, then ingest time, and `envoygeo.timestamp_source` says which.
Lines and fields longer than `limits` are cut at a UTF-8 boundary, tagged, named and
counted. Every behaviour is checked on the Python reference and, differentially, on
the compiled core (`run_both(native=N)`: N records written by the core).
"""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.clientip import ClientIpPolicy, ClientIpResolver
from pipeline.commands.enrich import enrich
from pipeline.config import ConfigError, load_settings
from pipeline.decode.envoy_format import compile_format
from pipeline.decode.parser import make_parser
from pipeline.document import iso_timestamp
from pipeline.enricher import Enricher
from pipeline.process import Limits, RecordProcessor, cut_utf8
from pipeline.sources.kafka import record_times
from pipeline.worker import Worker
from tests.unit.test_native import _need_native, run_both  # noqa: F401 - autouse fixture
from tests.unit.test_samples_in_envelopes import WRAPPERS

pytestmark = pytest.mark.unit

INGESTED = "2026-11-29T05:00:00.000Z"  # `_need_native` pins `event.ingested` to this
KAFKA_TS = 1795900000.25
ENVELOPE_TS = 1795914780.665  # WRAPPERS["fluent-bit"]'s @timestamp

# A custom format without %START_TIME%: its lines carry no time of their own.
NO_TIME = ('%REQ(:METHOD)% %RESPONSE_CODE% "%REQ(USER-AGENT)%" "%REQ(X-FORWARDED-FOR)%" '
           "%DOWNSTREAM_REMOTE_ADDRESS% %REQ(X-TRACE)%\n")
NO_TIME_LINE = 'GET 200 "curl/8" "-" 89.160.20.112:4000 trace-1'
TIMED_LINE = ('[2026-11-29T01:13:00.665Z] "GET /x HTTP/1.1" 200 - 0 20 3 2 "-" "curl/8" '
              '"id-1" "shop.example.com" "10.0.7.2:8080"')


def _docs(results: list) -> list[dict]:
    return [orjson.loads(r.document) for r in results]


def _stamp(doc: dict) -> tuple[str, str]:
    return doc["@timestamp"], doc["envoygeo"]["timestamp_source"]


# -- @timestamp ---------------------------------------------------------------------


def test_timestamp_fallback_order_identical() -> None:
    """log > envelope > kafka > ingest, for parsed lines of a format without a time
    and for unparsed records alike; the core writes the parsed ones."""
    bare = WRAPPERS["bare"]
    fluent = WRAPPERS["fluent-bit"]
    records = [
        bare(NO_TIME_LINE)[0],  # no time anywhere: the Kafka record's
        fluent(NO_TIME_LINE)[0],  # the envelope's, though Kafka has one
        bare(NO_TIME_LINE)[0],  # no Kafka time either: ingest time
        bare("not an access log")[0],  # unparsed, Kafka time
        fluent("not an access log")[0],  # unparsed, envelope time
        bare("not an access log")[0],  # unparsed, ingest time
    ]
    kafka = [KAFKA_TS, KAFKA_TS, None, KAFKA_TS, KAFKA_TS, None]
    docs, _, e = run_both(records, kafka_ts=kafka, log_format=NO_TIME, native=3)
    got = [_stamp(d) for d in _docs(docs)]
    assert got == [
        (iso_timestamp(KAFKA_TS), "kafka"), (iso_timestamp(ENVELOPE_TS), "envelope"),
        (INGESTED, "ingest"),
        (iso_timestamp(KAFKA_TS), "kafka"), (iso_timestamp(ENVELOPE_TS), "envelope"),
        (INGESTED, "ingest"),
    ]
    assert all(d.document is not None for d in docs)


def test_log_time_wins_and_rates_keep_event_time() -> None:
    """START_TIME beats every fallback; a Kafka or ingest time is never counted as the
    request's time by the rate stage (no `envoygeo.rate` without an event time)."""
    docs, _, _ = run_both([WRAPPERS["fluent-bit"](TIMED_LINE)[0]], kafka_ts=[KAFKA_TS],
                          log_format="auto", native=1)
    assert _stamp(_docs(docs)[0]) == ("2026-11-29T01:13:00.665Z", "log")
    records = [WRAPPERS["fluent-bit"](NO_TIME_LINE)[0], WRAPPERS["bare"](NO_TIME_LINE)[0]]
    docs, _, _ = run_both(records, kafka_ts=[KAFKA_TS, KAFKA_TS], log_format=NO_TIME,
                          native=2)
    enveloped, untimed = _docs(docs)
    assert enveloped["envoygeo"]["timestamp_source"] == "envelope"
    assert "rate" in enveloped["envoygeo"]  # the shipper's time is an event time
    assert untimed["envoygeo"]["timestamp_source"] == "kafka"
    assert untimed["source"]["ip"] == "89.160.20.112"
    assert "rate" not in untimed["envoygeo"]


def test_kafka_record_times() -> None:
    """What the worker hands the enricher: seconds, or None where Kafka has no time (or
    a producer set one no `@timestamp` can hold)."""
    msgs = [SimpleNamespace(timestamp=lambda t=t: t) for t in [
        (TIMESTAMP_CREATE_TIME, 1795900000250), (TIMESTAMP_LOG_APPEND_TIME, 1000),
        (TIMESTAMP_NOT_AVAILABLE, -1), (TIMESTAMP_CREATE_TIME, -5),
        (TIMESTAMP_CREATE_TIME, 2**62)]]
    assert record_times(msgs) == [KAFKA_TS, 1.0, None, None, None]  # type: ignore[arg-type]
    records = [WRAPPERS["bare"](NO_TIME_LINE)[0]] * 2
    docs, _, _ = run_both(records, kafka_ts=record_times(msgs[3:5]),  # type: ignore[arg-type]
                          log_format=NO_TIME, native=2)
    assert [_stamp(d) for d in _docs(docs)] == [(INGESTED, "ingest")] * 2


def test_enrich_command_dates_records_without_time_at_ingest(tmp_path) -> None:
    """`envoygeo enrich` reads files, not Kafka: ingest time, and it says so."""
    path = tmp_path / "x.log"
    path.write_text(NO_TIME_LINE + "\n")
    result = CliRunner().invoke(enrich, ["--log-format", NO_TIME, str(path)])
    doc = orjson.loads(result.stdout.splitlines()[0])
    assert doc["envoygeo"]["timestamp_source"] == "ingest"
    assert doc["@timestamp"] == doc["event"]["ingested"]


# -- limits ------------------------------------------------------------------------


def test_cut_utf8_keeps_whole_characters() -> None:
    assert cut_utf8("abc", 3) is None
    assert cut_utf8("é" * 10, 5) == "éé"  # 2-byte characters: never half of one
    assert cut_utf8("€" * 10, 8) == "€€"
    assert cut_utf8("a" + "😀" * 3, 4) == "a"
    assert cut_utf8("😀" * 3, 4) == "😀"


def test_field_cut_identical_and_named() -> None:
    """A long user agent, XFF and extra are cut to max_field_bytes: tagged, listed in
    `envoygeo.truncated` in field order, counted; the core writes them all."""
    limits = Limits(max_line_bytes=4096, max_field_bytes=256)
    xff = ",".join(f"10.0.{i // 256}.{i % 256}" for i in range(60))  # ~600 bytes
    lines = [
        f'GET 200 "{"u" * 300}" "-" 89.160.20.112:4000 trace-1',
        f'GET 200 "curl/8" "{xff}" 89.160.20.112:4000 {"t" * 1000}',
        f'GET 200 "{"u" * 256}" "-" 89.160.20.112:4000 trace-1',  # exactly the limit
    ]
    records = [WRAPPERS["fluent-bit"](line)[0] for line in lines]
    docs, _, e = run_both(records, log_format=NO_TIME, native=3, limits=limits)
    ua, chain, exact = _docs(docs)
    assert ua["user_agent"]["original"] == "u" * 256
    assert ua["envoygeo"]["truncated"] == ["user_agent"]
    assert "envoygeo_field_truncated" in ua["tags"]
    assert chain["envoygeo"]["truncated"] == ["x_forwarded_for", "REQ(X-TRACE)"]
    assert len(chain["envoy"]["x_forwarded_for"]) <= 256
    assert chain["envoy"]["extra"]["REQ(X-TRACE)"] == "t" * 256
    assert "truncated" not in exact["envoygeo"] and "tags" not in exact
    assert e.fields_truncated == 2 and e.lines_truncated == 0


def test_line_cut_identical_tagged_and_counted() -> None:
    """A line over max_line_bytes is cut before parsing: it no longer parses, so it is
    indexed as unparsed with the cut line as `event.original`, tagged (not dropped,
    not dead-lettered: the Kafka record can exceed what a dead-letter topic takes)."""
    limits = Limits(max_line_bytes=1024, max_field_bytes=256)
    long_line = f'GET 200 "{"u" * 2000}" "-" 89.160.20.112:4000 trace-1'
    records = [WRAPPERS["fluent-bit"](long_line)[0], WRAPPERS["bare"]("z" * 5000)[0],
               WRAPPERS["bare"](NO_TIME_LINE)[0]]
    docs, _, e = run_both(records, log_format=NO_TIME, native=1, limits=limits,
                          kafka_ts=[KAFKA_TS] * 3)
    cut, garbage, ok = _docs(docs)
    assert cut["event"]["original"] == long_line[:1024]
    assert {"envoygeo_line_truncated", "_envoygeo_parse_failure"} <= set(cut["tags"])
    assert garbage["event"]["original"] == "z" * 1024
    assert "envoygeo_line_truncated" in garbage["tags"]
    assert "tags" not in ok
    assert e.lines_truncated == 2


def test_non_ascii_field_cut_at_a_character_boundary() -> None:
    """The Python path cuts UTF-8 (the core hands non-ASCII lines to it)."""
    limits = Limits(max_line_bytes=4096, max_field_bytes=255)
    line = f'GET 200 "{"ü" * 200}" "-" 89.160.20.112:4000 trace-1'
    docs, _, _ = run_both([WRAPPERS["bare"](line)[0]], log_format=NO_TIME, native=0,
                          limits=limits)
    (doc,) = _docs(docs)
    assert doc["user_agent"]["original"] == "ü" * 127  # 254 bytes: no half character
    assert doc["envoygeo"]["truncated"] == ["user_agent"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 700), st.integers(0, 40), st.integers(0, 700)),
                min_size=1, max_size=6),
       st.integers(16, 300), st.integers(0, 600))
def test_random_lengths_identical(sizes: list[tuple[int, int, int]], max_field: int,
                                  extra_line: int) -> None:
    """Values just under, at and over the limits, on both paths."""
    limits = Limits(max_line_bytes=max_field + 200 + extra_line, max_field_bytes=max_field)
    lines = [f'GET 200 "{"u" * ua}" "{",".join(["10.1.2.3"] * hops) or "-"}" '
             f'203.0.113.9:1 {"t" * trace or "x"}' for ua, hops, trace in sizes]
    records = [WRAPPERS["bare"](line)[0] for line in lines] + [
        WRAPPERS["bare"](NO_TIME_LINE)[0]]  # always one the core writes
    run_both(records, batch=4, log_format=NO_TIME, native_min=1, limits=limits,
             policy=ClientIpPolicy(("10.0.0.0/8", "203.0.113.0/24"), 3))


def test_limits_configuration(tmp_path) -> None:
    env = {"ENVOYGEO_LIMITS__MAX_LINE_BYTES": "32768",
           "ENVOYGEO_LIMITS__MAX_FIELD_BYTES": "1024",
           "ENVOYGEO_CLIENT_IP__ENVOY_USE_REMOTE_ADDRESS": "true"}
    s = load_settings(None, env)
    assert (s.limits.max_line_bytes, s.limits.max_field_bytes) == (32768, 1024)
    assert s.client_ip.envoy_use_remote_address is True
    defaults = load_settings(None, {})
    assert (defaults.limits.max_line_bytes, defaults.limits.max_field_bytes) == (65536, 8192)
    assert defaults.client_ip.envoy_use_remote_address is False
    with pytest.raises(ConfigError, match=r"limits: .*max_field_bytes \(9000\) must not exceed"):
        load_settings(None, {"ENVOYGEO_LIMITS__MAX_LINE_BYTES": "4096",
                             "ENVOYGEO_LIMITS__MAX_FIELD_BYTES": "9000"})
    with pytest.raises(ConfigError, match="limits.max_line_bytes"):
        load_settings(None, {"ENVOYGEO_LIMITS__MAX_LINE_BYTES": "10"})
    e = Enricher.from_settings(s)
    assert e.processor.limits == Limits(32768, 1024)
    assert e.processor.resolver.policy.envoy_use_remote_address is True


# -- no address Envoy saw ----------------------------------------------------------

DEFAULT_LINE = ('[2026-11-29T01:13:00.665Z] "GET /x HTTP/1.1" 200 - 0 20 3 2 "{xff}" "curl/8" '
                '"id-1" "shop.example.com" "10.0.7.2:8080"')


def test_no_remote_address_counted_on_both_paths_and_named() -> None:
    records = [WRAPPERS["bare"](DEFAULT_LINE.format(xff="198.51.100.7,89.160.20.112"))[0],
               WRAPPERS["bare"](DEFAULT_LINE.format(xff="-"))[0]]
    _, _, e = run_both(records, log_format="envoy", native=2)
    assert e.no_remote_address == 2 and e._fast.no_remote_address == 2
    note = e.no_remote_address_note()
    assert note.startswith("2 lines had no address Envoy saw")
    assert "client_ip.envoy_use_remote_address" in note
    policy = ClientIpPolicy(envoy_use_remote_address=True)
    docs, _, e = run_both(records, log_format="envoy", native=2, policy=policy)
    first, second = _docs(docs)
    assert first["source"]["ip"] == "89.160.20.112" and first["envoygeo"]["ip_source"] == "peer"
    assert "source" not in second  # no XFF at all: still nothing Envoy saw
    assert e.no_remote_address == 1
    assert "not even in X-Forwarded-For" in e.no_remote_address_note()


def test_worker_progress_names_the_counts() -> None:
    proc = RecordProcessor(make_parser("envoy"), ClientIpResolver(), Limits(1024, 256))
    e = Enricher.build(proc, None, None, native=False)
    e.enrich_batch([DEFAULT_LINE.format(xff="-").encode(), b"q" * 3000])
    text, counts = Worker._record_notes(SimpleNamespace(enricher=e))  # type: ignore[arg-type]
    assert counts == {"lines_truncated": 1, "fields_truncated": 0, "no_remote_address": 1}
    assert "1 lines cut to limits.max_line_bytes" in text
    assert "1 lines had no address Envoy saw (Envoy's default format?): set " \
           "client_ip.envoy_use_remote_address" in text


def test_enrich_summary_names_the_option(tmp_path) -> None:
    path = tmp_path / "default.log"
    path.write_text(DEFAULT_LINE.format(xff="198.51.100.7,89.160.20.112") + "\n")
    plain = CliRunner().invoke(enrich, ["--log-format", "envoy", str(path)])
    assert "1 lines had no address Envoy saw" in plain.stderr
    assert "client_ip.envoy_use_remote_address" in plain.stderr
    assert "source" not in orjson.loads(plain.stdout.splitlines()[0])
    opted = CliRunner().invoke(enrich, ["--log-format", "envoy", "--envoy-use-remote-address",
                                        str(path)])
    assert "no address Envoy saw" not in opted.stderr
    assert orjson.loads(opted.stdout.splitlines()[0])["source"]["ip"] == "89.160.20.112"


def test_format_without_time_compiles() -> None:
    assert compile_format(NO_TIME).source == NO_TIME
