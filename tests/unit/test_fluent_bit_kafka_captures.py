"""Every Kafka record a real Fluent Bit 5.1.1 wrote, in every `out_kafka` format, decodes
to the expected record on the Python path and on the compiled core.

The records are `kafka-records.jsonl` of `../shared/samples/fluent-bit-5.1.1/` (copied
to tests/data/fluent-bit-5.1.1 for clean clones): 7 variants x 24 records, value bytes
as captured. The expected `log` of record n is `expected-records.jsonl`'s; the event
time is its first CRI chunk's timestamp, in the precision each format keeps.
"""

from __future__ import annotations

import base64
import os
from collections import defaultdict
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.enricher as enricher_mod
from pipeline import native
from pipeline.decode.envelope import ENVELOPE_RAW, decode_envelope
from pipeline.metrics import unparsed_reason
from tests.unit.test_native import run_both

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "fluent-bit-5.1.1"
ORIGINAL = Path(__file__).resolve().parents[3] / "shared" / "samples" / "fluent-bit-5.1.1"
VARIANTS = ("json-default", "json-iso8601", "json-iso8601-ns", "msgpack", "raw",
            "json-msgkey-field", "json-msgkey-static")
# Records the compiled core writes itself, per variant: all but the 7 Envoy JSON lines
# (the JSON log parser is Python's) and the non-ASCII line n=17 (Python's by design),
# in every format (msgpack records are read by the core's own msgpack reader).
NATIVE = dict.fromkeys(VARIANTS, 16)


@cache
def captured() -> dict[str, list[bytes]]:
    """variant -> the Kafka record values, in offset order."""
    out: dict[str, list[bytes]] = defaultdict(list)
    for line in (SAMPLES / "kafka-records.jsonl").read_bytes().splitlines():
        rec = orjson.loads(line)
        out[rec["variant"]].append(base64.b64decode(rec["value_b64"]))
    return dict(out)


@cache
def expected() -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in (SAMPLES / "expected-records.jsonl").read_bytes().splitlines()]


def cri_ns(text: str) -> int:
    """RFC3339Nano (trailing zeros trimmed) -> epoch nanoseconds, exactly."""
    head, frac = text.rstrip("Z").split(".")
    sec = int(datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp())
    return sec * 1_000_000_000 + int(frac.ljust(9, "0"))


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason="no ../shared/samples next to this clone")
def test_copy_is_the_capture() -> None:
    assert (SAMPLES / "kafka-records.jsonl").read_bytes() == \
        (ORIGINAL / "kafka-records.jsonl").read_bytes()


def test_capture_holds_every_variant() -> None:
    assert {v: len(r) for v, r in captured().items()} == dict.fromkeys(VARIANTS, 24)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_record_decodes_to_the_expected_record(variant: str) -> None:
    """Per record: the whole line (n=16 joined, 41127 bytes, though its `_p` is "P"),
    the stream, the kind and the collector time at the precision the format keeps."""
    for i, (value, exp) in enumerate(zip(captured()[variant], expected(), strict=True)):
        env = decode_envelope(value)
        where = f"{variant} record n={exp['n']}"
        assert env.error is None, where
        assert env.payload == exp["log"], where
        assert len(env.payload.encode()) == exp["log_bytes"], where
        assert not env.partial and env.tags == [], where
        ns = cri_ns(exp["cri_timestamps"][0])
        if variant == "raw":
            assert (env.kind, env.stream, env.timestamp) == ("bare", None, None), where
            continue
        assert (env.kind, env.stream) == ("fluent-bit", "stdout"), where
        assert env.timestamp is not None, where
        if variant == "json-iso8601":  # 6 digits, truncated
            assert env.timestamp == (ns // 1000) / 1e6, where
        elif variant == "msgpack":  # float64 sec + nsec / 1e9, exactly
            assert env.timestamp == ns // 10**9 + (ns % 10**9) / 1e9, where
        else:  # iso8601_ns: nanoseconds, held as a double (~0.2 µs); double: %.16g text
            assert abs(env.timestamp - ns / 1e9) < 1.5e-6, where
        if i == 15:  # the P, P, F line, joined by Fluent Bit, flagged with the first `_p`
            assert len(exp["cri_timestamps"]) == 3
            record = msgpack.unpackb(value) if variant == "msgpack" else orjson.loads(value)
            assert record["_p"] == "P", where  # ignored: the line is whole, not held back


@pytest.fixture
def _native_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    if not native.available():
        if os.environ.get("ENVOYGEO_REQUIRE_NATIVE") == "1":
            pytest.fail("the native core is required here but was not built")
        pytest.skip("native core not built (no Rust toolchain at install)")
    monkeypatch.setattr(enricher_mod, "_ingested_now", lambda: "2026-11-29T05:00:00.000Z")


def _docs(variant: str, **kw: Any) -> list[dict[str, Any]]:
    values = captured()[variant]
    docs, _, _ = run_both(values, batch=10, native=kw.pop("native", NATIVE[variant]), **kw)
    assert all(d.error is None for d in docs), [d.error for d in docs if d.error]
    return [orjson.loads(d.document) for d in docs]


@pytest.mark.usefixtures("_native_pinned")
@pytest.mark.parametrize("variant", VARIANTS)
def test_both_paths_index_every_captured_record(variant: str) -> None:
    """Both paths write the same 24 documents, each the document of its expected line."""
    docs = _docs(variant)
    assert len(docs) == 24
    bare = _docs_of_lines()
    for doc, ref, exp in zip(docs, bare, expected(), strict=True):
        where = f"{variant} n={exp['n']}"
        assert doc["@timestamp"] == ref["@timestamp"], where
        assert doc["envoygeo"]["timestamp_source"] == "log", where
        for field in ("source", "url", "http", "user_agent"):
            assert doc.get(field) == ref.get(field), (where, field)
        assert doc["envoygeo"]["envelope"] == ("bare" if variant == "raw" else "fluent-bit")
        if variant != "raw":
            assert doc["envoygeo"]["stream"] == "stdout", where
    # The joined 41 KB line: whole up to its query (after the long user agent), the
    # agent cut to limits.max_field_bytes and tagged, as for any long field.
    assert docs[15]["url"]["query"] == "q=long-ua"
    assert len(docs[15]["user_agent"]["original"]) == 8192
    assert "envoygeo_field_truncated" in docs[15]["tags"]
    assert docs[16]["url"]["path"] == "/café/日本"


@cache
def _docs_of_lines() -> list[dict[str, Any]]:
    """The reference: each expected line as a bare record, Python path."""
    from pipeline.clientip import ClientIpResolver
    from pipeline.decode.parser import make_parser
    from pipeline.process import RecordProcessor
    proc = RecordProcessor(make_parser("auto"), ClientIpResolver())
    proc.ingested = "2026-11-29T05:00:00.000Z"
    out = [proc.process(exp["log"].encode()) for exp in expected()]
    assert proc.failed == 0
    return [d for d in out if d is not None]


@pytest.mark.usefixtures("_native_pinned")
def test_forced_raw_reads_a_collector_shaped_line_as_the_line() -> None:
    """The one ambiguous case: `format raw` of a line that is itself JSON with `log`."""
    line = orjson.loads(orjson.dumps(expected()[2]["log"]))  # an Envoy JSON line (n=3)
    shaped = orjson.dumps({**orjson.loads(line), "log": "not the access log"})
    auto = decode_envelope(shaped)
    assert (auto.kind, auto.payload) == ("fluentd", "not the access log")
    raw = decode_envelope(shaped, ENVELOPE_RAW)
    assert (raw.kind, raw.payload) == ("bare", shaped.decode())
    # Both paths, forced raw, on the captured raw records and the shaped one: the text
    # lines run native, the JSON ones (parser) and n=17 (non-ASCII) in Python.
    docs, _, _ = run_both([*captured()["raw"], shaped], native=16, envelope=ENVELOPE_RAW)
    assert [d.error for d in docs] == [None] * 25
    last = orjson.loads(docs[-1].document)
    assert last["envoygeo"]["envelope"] == "bare"
    assert last["source"]["ip"] == "127.0.0.5"


def _malformed() -> list[bytes]:
    good = captured()["msgpack"][0]
    return [good[:-5],  # truncated inside the log string
            good + b"\xc0",  # trailing data
            b"\x81\xa3log\xa2\xff\xfe",  # a str that is not UTF-8
            b"\x81\xa3log\xc1",  # a reserved byte
            bytes([0xDE, 0x00, 0x02]) + msgpack.packb("log") ]  # a map missing a value


def test_malformed_msgpack_is_an_error_with_the_bytes() -> None:
    for bad in _malformed():
        env = decode_envelope(bad)
        assert env.kind == "invalid" and env.payload is None, bad
        assert env.error is not None and env.error.startswith("malformed msgpack record"), bad
        assert unparsed_reason(env.error) == "bad_envelope"
        assert env.original == bad.hex()


@pytest.mark.usefixtures("_native_pinned")
def test_malformed_msgpack_counted_as_failed_on_both_paths() -> None:
    """Among good records, each path reports each malformed one (no crash, no loss)."""
    good = captured()["json-default"][:3]
    bad = _malformed()
    docs, _, e = run_both([*good, *bad, *good], native=4)  # n=1, 2 twice (n=3: JSON)
    errors = [d.error for d in docs]
    assert errors[:3] == errors[-3:] == [None] * 3
    assert all(x is not None and x.startswith("malformed msgpack record") for x in errors[3:-3])
    assert e.processor.failed == len(bad)
    for d in docs[3:-3]:
        doc = orjson.loads(d.document)
        assert "_envoygeo_parse_failure" in doc["tags"]
        assert doc["event"]["original"]  # the bytes, as hex, for whoever reads it


ISO_STAMPS = ["2026-11-29T01:13:00.667000123Z", "2026-11-29T01:13:00.667000Z",
              "2026-11-29T01:13:00.6Z", "2026-11-29T01:13:00.1234567891234Z",
              "2028-02-29T23:59:59.999999999Z", "1970-01-01T00:00:00.000001Z",
              "2300-01-01T00:00:00.5Z",  # beyond 2^53 µs: Python's
              "2026-11-29T01:13:00Z", "2026-11-29T01:13:00.Z", "2026-11-29 01:13:00.5Z",
              "2026-11-29T01:13:00.5+01:00", "2026-02-29T01:13:00.5Z",
              "2026-11-29T24:00:00.5Z", "2026-11-29T01:13:60.5Z", "2026-13-01T00:00:00.5Z",
              "1969-12-31T23:59:59.5Z", "2026-11-29T01:13:00.5z", "２026-11-29T01:13:00.5Z"]
# The RFC 3339 UTC forms with a fraction, in 1970..2255, that the core reads itself.
ISO_NATIVE = 6


@pytest.mark.usefixtures("_native_pinned")
def test_iso_collector_times_identical_on_both_paths() -> None:
    """`@timestamp` text as Fluent Bit's iso8601/iso8601_ns writes it (and near misses):
    the same instant, or the same "unknown", on both paths; the lines carry no time."""
    line = expected()[0]["log"].split("] ", 1)[1]  # no START_TIME: the envelope's time
    line = '[-] ' + line
    records = [orjson.dumps({"@timestamp": s, "log": line, "stream": "stdout"})
               for s in ISO_STAMPS]
    docs, _, _ = run_both(records, native=ISO_NATIVE, log_format="envoy")
    stamps = [orjson.loads(d.document)["@timestamp"] for d in docs]
    assert stamps[0] == "2026-11-29T01:13:00.667Z"
    assert stamps[4] == "2028-03-01T00:00:00.000Z"  # rounded half up to the millisecond
    sources = [orjson.loads(d.document)["envoygeo"]["timestamp_source"] for d in docs]
    assert sources[:10] == ["envelope"] * 10


def test_text_starting_like_a_msgpack_map_is_still_text() -> None:
    """0xde/0xdf also start UTF-8 letters (Thaana, NKo): such a line stays a line."""
    for line in ("ހ access line", "߀ access line"):
        env = decode_envelope(line.encode())
        assert (env.kind, env.payload, env.error) == ("bare", line, None)


def _mp(*pairs: tuple[Any, Any]) -> bytes:
    """A msgpack map with the given pairs in order (duplicates kept)."""
    out = bytearray(b"\xde" + len(pairs).to_bytes(2, "big"))
    for k, v in pairs:
        out += msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True)
    return bytes(out)


@pytest.mark.usefixtures("_native_pinned")
def test_msgpack_edge_cases_identical_on_both_paths() -> None:
    """msgpack maps around what Fluent Bit writes: the core reads the common ones itself
    (exactly `native` of them) and hands the rest to msgpack-python; same documents."""
    line = expected()[0]["log"]
    kube = {"pod_name": "gw-1", "namespace_name": "istio-system", "labels": {"app": "gw"},
            "container_name": "istio-proxy", "restarts": 3, "ready": True, "ids": [1, -2]}
    ts = 1795914780.667
    native_ones = [
        msgpack.packb({"@timestamp": ts, "log": line, "kubernetes": kube}),
        msgpack.packb({"@timestamp": int(ts), "stream": "stderr", "log": line}),
        msgpack.packb({"@timestamp": int(ts * 1000), "log": line}),  # milliseconds
        msgpack.packb({"@timestamp": None, "time": ts, "message": line}),
        msgpack.packb({"@timestamp": "2026-11-29T01:13:00.667000123Z", "log": line}),
        msgpack.packb({"@timestamp": 1e300, "log": line}),  # out of range: unknown
        msgpack.packb({"log": line, "tag": "kube.x"}),  # fluentd-like
        msgpack.packb({"@timestamp": ts, "log": 7, "message": line}),
        _mp(("@timestamp", ts), ("log", "x"), ("log", line)),  # the later duplicate
        msgpack.packb({"@timestamp": ts, "log": line, "kubernetes": "not a map"}),
        struct_float32(line),
    ]
    python_ones = [
        msgpack.packb({"log": line, "stream": "stdout", "time": "2026-11-29T01:13:00Z"}),  # Docker
        msgpack.packb({"@timestamp": msgpack.Timestamp(1795914780, 667000000), "log": line},
                      datetime=False),
        msgpack.packb({"@timestamp": ts, "log": line.encode()}, use_bin_type=True),  # bin
        msgpack.packb({"@timestamp": ts, 1: "x", "log": line}),  # a non-str key
        msgpack.packb({"@timestamp": ts, "log": line, "kubernetes": {"cpu": 0.5}}),  # float
        msgpack.packb({"@timestamp": "1795914780.5", "log": line}),  # epoch as text
        msgpack.packb({"@timestamp": ts, "log": "ünï " + line}),  # non-ASCII
        msgpack.packb({"@timestamp": ts, "authority": "x", "path": "/"}),  # the log itself
        msgpack.packb({"@timestamp": ts, "log": line}) + b"\x00",  # trailing byte
        msgpack.packb({"@timestamp": ts, "log": line})[:-3],  # truncated
        b"\x81\xa3log\xa2\xff\xfe",  # not UTF-8
    ]
    docs, _, _ = run_both(native_ones + python_ones, batch=7, native=len(native_ones))
    errors = [d.error for d in docs]
    assert errors[:len(native_ones)] == [None] * len(native_ones)
    first = orjson.loads(docs[0].document)
    assert first["kubernetes"]["labels"] == {"app": "gw"}
    assert first["url"]["path"] == "/hello.txt"


def struct_float32(line: str) -> bytes:
    """`@timestamp` as a msgpack float32 (0xca), which Fluent Bit does not write."""
    import struct
    return (b"\x82" + msgpack.packb("@timestamp") + b"\xca" + struct.pack(">f", 1.7e9)
            + msgpack.packb("log") + msgpack.packb(line))


def test_bench_corpus_is_shaped_like_the_captures() -> None:
    """`bench core --fluent-bit-formats` measures records laid out as Fluent Bit's."""
    from pipeline.bench.core import corpus
    from pipeline.bench.envelopes import FORMATS, in_every_format
    records = corpus(50, 10)[0]
    formats = in_every_format(records)
    assert set(formats) == set(FORMATS)
    first = {name: values[0] for name, values in formats.items()}
    assert 0x80 <= first["msgpack"][0] <= 0x8F  # a fixmap, `@timestamp` first
    assert first["msgpack"][1:12] == b"\xaa@timestamp"
    assert first["msgpack"][12] == 0xCB  # float64, as captured
    assert orjson.loads(first["json iso8601"])["@timestamp"].endswith("Z")
    assert len(orjson.loads(first["json iso8601_ns"])["@timestamp"]) == 30
    for name, values in formats.items():
        envs = [decode_envelope(v) for v in values]
        logs = [orjson.loads(r)["log"] for r in records]
        assert [e.payload for e in envs] == logs, name
        assert all(e.error is None for e in envs), name


@pytest.mark.usefixtures("_native_pinned")
def test_parse_envelope_setting_reaches_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ENVOYGEO_PARSE__ENVELOPE=raw` as the worker builds its enricher: the compiled core
    reads the collector-shaped line as the line, as the Python path does."""
    from pipeline.config import load_settings
    from pipeline.enricher import Enricher
    monkeypatch.setenv("ENVOYGEO_RATES__ENABLED", "false")
    shaped = orjson.dumps({"log": "not the access log", "authority": "a.example", "path": "/x"})
    text = captured()["raw"][0]
    for mode, envelope in (("raw", "bare"), ("auto", "fluentd")):
        monkeypatch.setenv("ENVOYGEO_PARSE__ENVELOPE", mode)
        e = Enricher.from_settings(load_settings())
        assert e.processor.envelope == mode and e.native_status == "on"
        docs, _ = e.enrich_batch([shaped, text])
        # The text line is the core's either way; the shaped one is Python's either way
        # (raw: an Envoy JSON line, the JSON parser's; auto: its `log` parses as nothing).
        assert e.records_native == 1
        assert orjson.loads(docs[0].document)["envoygeo"]["envelope"] == envelope


# float32-sized floats: packed either as float32 (0xca) or float64 (0xcb), per example.
_MP_VALUES = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) \
    | st.floats(width=32) \
    | st.text(max_size=20) | st.binary(max_size=8)


@pytest.mark.usefixtures("_native_pinned")
@given(st.lists(st.dictionaries(
    st.sampled_from(["@timestamp", "log", "message", "stream", "time", "timestamp",
                     "kubernetes", "_p", "attrs", "tag"]),
    _MP_VALUES | st.sampled_from([x["log"] for x in expected()[:3]])
    | st.dictionaries(st.text(max_size=5), _MP_VALUES, max_size=3), max_size=6),
    max_size=8), st.booleans())
@settings(max_examples=150, deadline=None)
def test_arbitrary_msgpack_maps_identical(maps: list[dict[str, Any]], single: bool) -> None:
    """Whatever a map holds (floats as float32 or float64), both paths write the same
    documents; the captured record at the end is always the core's."""
    values = [msgpack.packb(m, use_bin_type=True, use_single_float=single) for m in maps]
    run_both([*values, captured()["msgpack"][0]], native_min=1)
