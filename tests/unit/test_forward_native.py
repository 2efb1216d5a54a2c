"""The forward relay's compiled path (`native/src/forward.rs`) against its Python path.

The compiled path turns a PackedForward payload into Fluent Bit `format msgpack` values
(the record's bytes sliced, `@timestamp` prepended); the Python path writes Fluent Bit
`format json` values. Both must say the same event, the worker must index both alike on
each of its own paths, and whatever the compiled path does not take (None) must be
relayed by the Python path exactly as before. Every comparison asserts how many values
the compiled path produced.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import struct
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.enricher as enricher_mod
from pipeline import native
from pipeline.sources.forward import EventTime, ForwardError, decode_frame, unpack_entries
from pipeline.sources.forward_server import native_relay_values, relay_value
from tests.unit.test_forward import (
    BIG,
    Harness,
    _recv,
    expected_records,
    frames,
    objects,
    run,
    server_sent,
    stream,
)
from tests.unit.test_native import run_both

VARIANTS = ("default", "ack", "gzip-ack", "time-int", "shared-key")


@pytest.fixture(autouse=True)
def _native_required(monkeypatch: pytest.MonkeyPatch) -> None:
    if not native.available():
        if os.environ.get("ENVOYGEO_REQUIRE_NATIVE") == "1":
            pytest.fail("the native core is required here but was not built")
        pytest.skip("native core not built (no Rust toolchain at install)")
    monkeypatch.setattr(enricher_mod, "_ingested_now", lambda: "2026-11-29T05:00:00.000Z")


def relay(payload: bytes) -> list[bytes] | None:
    fn = native_relay_values()
    assert fn is not None
    return fn(payload)


def _time(t: Any) -> Any:
    return msgpack.ExtType(0, struct.pack(">II", t.sec, t.nsec)) if type(t) is EventTime else t


def packed(entries: list[Any]) -> bytes:
    return b"".join(msgpack.packb(e) for e in entries)


def python_values(payload: bytes) -> list[bytes]:
    return [relay_value(t, r) for t, r in unpack_entries(payload)]


def same_events(payload: bytes) -> list[bytes]:
    """The compiled path's values, asserted equal, event for event, to the Python path's."""
    values = relay(payload)
    py = python_values(payload)
    assert values is not None, "the compiled path left this payload to Python"
    assert len(values) == len(py)  # the compiled path produced every event
    assert [msgpack.unpackb(v) for v in values] == [orjson.loads(v) for v in py]
    for v in values:
        assert v[0] in range(0x80, 0x90) or v[0] in (0xDE, 0xDF)  # read as msgpack
        assert next(iter(msgpack.unpackb(v))) == "@timestamp"
    return values


def captured_payload() -> bytes:
    """Every event a real Fluent Bit 5.1.1 sent (all five captures), as one payload."""
    return packed([[_time(t), r] for v in VARIANTS for f in frames(v) for t, r in f.entries])


def test_every_captured_fluent_bit_event_is_the_same_event_on_both_paths() -> None:
    values = same_events(captured_payload())
    assert len(values) == 24 * len(VARIANTS)
    exp = expected_records()
    for i, v in enumerate(values):
        assert msgpack.unpackb(v)["log"] == exp[i % 24]["log"]


def test_the_captured_gzip_chunk_takes_the_compiled_path() -> None:
    (obj,) = [o for o in objects(stream("gzip-ack")) if o[0] != "PING"]
    fast = decode_frame(obj, BIG, native_relay_values())
    slow = decode_frame(obj, BIG)
    assert fast.mode == slow.mode == "CompressedPackedForward"
    assert fast.values is not None and fast.entries == [] and fast.count == 24
    assert slow.values is None and slow.count == 24
    assert [msgpack.unpackb(v) for v in fast.values] == \
        [orjson.loads(relay_value(t, r)) for t, r in slow.entries]


RECORD = {"log": "GET / 200", "stream": "stdout", "_p": "F", "time": "2026-11-29T01:13:00Z"}


def test_times_and_values_the_compiled_path_takes() -> None:
    ext8 = b"\x92\xc7\x08\x00" + struct.pack(">II", 1700000000, 123456789) + msgpack.packb(RECORD)
    payload = packed([
        [msgpack.ExtType(0, struct.pack(">II", 1700000000, 999999999)), RECORD],
        [1700000000, RECORD], [-5, RECORD], [2**64 - 1, RECORD], [0, {}],
        [1700000000.25, RECORD],
        [[msgpack.ExtType(0, struct.pack(">II", 1, 2)), {"m": [1, {"x": None}]}], RECORD],
        [7, {f"k{i}": i for i in range(40)}],  # map16 once @timestamp is added
        [7, {f"k{i}": i for i in range(14)}],  # fixmap of 15 with @timestamp
        [7, {f"k{i}": i for i in range(15)}],  # 16 with @timestamp: map16
        [7, {"s": "é€😀" * 30000, "n": [None, True, False, -1, -129, 2**63, -2**63, 1.5e300],
             "deep": {"a": {"b": {"c": [[[{"d": "e"}]]]}}}, "kubernetes": {"pod_name": "p"}}],
    ]) + ext8 + msgpack.packb([3, {"f32": 1.1}], use_single_float=True)
    values = same_events(payload)
    assert len(values) == 13
    assert msgpack.unpackb(values[0])["@timestamp"] == 1700000000 + 999999999 / 1e9
    assert msgpack.unpackb(values[11])["@timestamp"] == 1700000000 + 123456789 / 1e9


def _nest(depth: int) -> Any:
    v: Any = "x"
    for _ in range(depth):
        v = {"a": v}
    return v


LEFT_TO_PYTHON = {
    "str not UTF-8": b"\x92\x01\x81\xa3log\xa2\xff\xfe",
    "bin value": packed([[1, {"log": b"\x01\x02"}]]),
    "ext value": packed([[1, {"x": msgpack.ExtType(5, b"abc")}]]),
    "EventTime in the record": packed([[1, {"t": msgpack.ExtType(0, bytes(8))}]]),
    "non-str key": packed([[1, {1: "a"}]]),
    "nested non-str key": packed([[1, {"k": {2: "a"}}]]),
    "own @timestamp": packed([[1, {"@timestamp": 5, "log": "x"}]]),
    "msgpack Timestamp time": packed([[msgpack.Timestamp(1, 2), RECORD]]),
    "nesting past 64": packed([[1, _nest(70)]]),
    "NaN value": packed([[1, {"x": float("nan")}]]),
    "infinite float": packed([[1, {"x": float("inf")}]]),
    "infinite time": packed([[float("-inf"), RECORD]]),
}


@pytest.mark.parametrize("name", LEFT_TO_PYTHON)
def test_what_the_compiled_path_leaves_to_python_is_relayed_as_before(name: str) -> None:
    payload = packed([[1, RECORD]]) + LEFT_TO_PYTHON[name] + packed([[2, RECORD]])
    assert relay(payload) is None  # the whole payload: never half and half
    frame = decode_frame(["t", payload], BIG, native_relay_values())
    assert frame.values is None and frame.count == 3
    assert [relay_value(t, r) for t, r in frame.entries] == python_values(payload)


MALFORMED = {
    "cut mid-entry": packed([[1, RECORD]])[:-3],
    "trailing byte": packed([[1, RECORD]]) + b"\xc1",
    "entry of three": packed([[1, RECORD, 3]]),
    "record not a map": packed([[1, ["log"]]]),
    "metadata not a map": packed([[[1, [1]], RECORD]]),
    "time not a time": packed([["now", RECORD]]),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_payloads_are_reported_as_without_the_compiled_path(name: str) -> None:
    payload = MALFORMED[name]
    assert relay(payload) is None
    with pytest.raises(ForwardError) as fast:
        decode_frame(["t", payload], BIG, native_relay_values())
    with pytest.raises(ForwardError) as slow:
        decode_frame(["t", payload], BIG)
    assert (fast.value.reason, str(fast.value)) == (slow.value.reason, str(slow.value))


_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_records = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "@timestamp"), _values,
                           max_size=20)
_times = (st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
          | st.builds(EventTime, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_times, _records), min_size=1, max_size=8))
def test_arbitrary_records_are_the_same_events_on_both_paths(
        entries: list[tuple[Any, dict[str, Any]]]) -> None:
    same_events(packed([[_time(t), r] for t, r in entries]))


def test_the_worker_indexes_both_relay_forms_alike_on_both_of_its_paths() -> None:
    """Every captured event relayed as the compiled path's msgpack and as the Python
    path's JSON: the worker's compiled core and its Python path write the same documents
    for each form (run_both), and the two forms give the same documents."""
    payload = captured_payload()
    fast = same_events(payload)
    slow = python_values(payload)
    n = 16 * len(VARIANTS)  # per capture, 8 of its 24 lines are the Python path's anyway
    docs_fast, _, _ = run_both(fast, batch=10, native=n)
    docs_slow, _, _ = run_both(slow, batch=10, native=n)
    assert all(d.error is None for d in docs_fast)
    assert [orjson.loads(d.document) for d in docs_fast] == \
        [orjson.loads(d.document) for d in docs_slow]


MODES = {"default": "Forward", "ack": "Forward", "gzip-ack": "CompressedPackedForward",
         "time-int": "Forward"}


@pytest.mark.parametrize("variant", list(MODES))
def test_the_server_relays_msgpack_on_the_compiled_path_and_json_without_it(
        variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every captured Fluent Bit stream: Forward mode (its default) as well as gzip."""
    async def main(expect_msgpack: bool) -> None:
        h = Harness()
        assert (h.server.relay_values is not None) == expect_msgpack
        await h.server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(stream(variant))
        await writer.drain()
        for _ in range(200):
            if len(h.producer.records) == 24:
                break
            await asyncio.sleep(0.01)
        values = [v for _, v, _ in h.producer.records]
        assert len(values) == 24
        if expect_msgpack:
            events = [msgpack.unpackb(v) for v in values]
        else:
            events = [orjson.loads(v) for v in values]
        assert [e["log"] for e in events] == [r["log"] for r in expected_records()]
        h.producer.deliver()
        if server_sent(variant):
            assert await _recv(reader, 100) == server_sent(variant)
        for _ in range(200):  # delivery reports reach the loop thread-safely
            if h.value("envoygeo_forward_events_relayed_total") == 24:
                break
            await asyncio.sleep(0.01)
        assert h.value("envoygeo_forward_events_received_total", mode=MODES[variant]) == 24
        assert h.value("envoygeo_forward_events_relayed_total") == 24
        writer.close()
        assert await h.server.drain(1)
        return events

    compiled = run(main(True))
    monkeypatch.setenv("ENVOYGEO_NATIVE", "0")
    assert run(main(False)) == compiled  # the same events, key for key


def serve(data: bytes, pieces: list[int], expect: int = 0,
          **options: Any) -> tuple[list[bytes], Harness]:
    """`data` written to a forward server in pieces of the given sizes (then the rest),
    each drained and given a moment so the server reads them apart; the Kafka values it
    produced (waiting for `expect` of them or a malformed-input report) and its harness."""
    async def main() -> tuple[list[bytes], Harness]:
        h = Harness(**options)
        await h.server.start()
        _, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        at = 0
        for n in pieces:
            writer.write(data[at:at + n])
            at += n
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(data[at:])
        await writer.drain()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if h.value("envoygeo_forward_bad_input_total", reason="malformed") or \
                    len(h.producer.records) >= expect:
                break
        await asyncio.sleep(0.05)
        writer.close()
        await h.server.drain(1)
        return [v for _, v, _ in h.producer.records], h

    return run(main())  # type: ignore[no-any-return]


STREAMS = b"".join(stream(v) for v in MODES)  # four frames back to back, 96 events


@pytest.mark.parametrize("piece", [1, 7, 100, 1500, 65536])
def test_frames_split_anywhere_are_relayed_whole_by_the_compiled_path(piece: int) -> None:
    """A stream read in pieces of any size, frames back to back: every event relayed once,
    each as the compiled path's msgpack (so the Forward frames took it too)."""
    n = len(STREAMS) // piece + 1 if piece < 1500 else 40
    values, h = serve(STREAMS, [piece] * min(n, 3000), expect=96)
    assert len(values) == 96
    assert all(v[:1] != b"{" for v in values)  # 96 values from the compiled path
    logs = [r["log"] for r in expected_records()]
    assert [msgpack.unpackb(v)["log"] for v in values] == logs * 4
    assert h.value("envoygeo_forward_events_received_total", mode="Forward") == 72
    assert h.value("envoygeo_forward_bad_input_total", reason="malformed") == 0


def test_a_large_forward_frame_is_scanned_once_not_once_per_read() -> None:
    """The scan's resume point moves past every whole entry, so the next read starts
    there instead of at the frame's first byte."""
    scan = native._native.forward_frame_scan
    entries = [[i, {"log": "x" * 200, "n": i}] for i in range(1000)]
    frame = msgpack.packb(["tag", entries, {"chunk": "c1"}])
    buf = bytearray()
    resume = (0, 0, 0)
    positions = []
    for at in range(0, len(frame), 4096):
        buf += frame[at:at + 4096]
        status, a, b, c, d = scan(buf, 0, *resume)
        if status == 0:
            assert d > len(buf)  # it asks for more than it has
            resume = (a, b, c)
            positions.append(a)
    assert status == 2 and a == len(frame)
    estart, eend = c, d
    assert frame[estart:eend] == b"".join(msgpack.packb(e) for e in entries)
    # every resume point but the first is past the entries already read in full
    assert positions == sorted(positions) and positions[-1] > len(frame) - 4096 - 300
    assert len(positions) == len(frame) // 4096


def test_what_the_scan_or_the_relay_leaves_is_decoded_by_python_as_before() -> None:
    """A record the compiled relay does not take (a bin value) is relayed as JSON by the
    Python path; a record nested past the scan's depth hands the rest of the connection
    to msgpack-python, which relays the next frames as before; 0xc1 is malformed."""
    odd = msgpack.packb(["t", [[1, {"log": "a", "b": b"\x00"}]]], use_bin_type=True)
    deep: Any = "x"
    for _ in range(80):
        deep = [deep]
    nested = msgpack.packb(["t", [[2, {"log": "b", "deep": deep}]]])
    plain = msgpack.packb(["t", [[3, {"log": "c"}]]])
    values, h = serve(odd + plain + nested + plain, [], expect=4)
    assert [relayed_form(v) for v in values] == ["json", "msgpack", "json", "json"]
    assert h.value("envoygeo_forward_bad_input_total", reason="malformed") == 0
    values, h = serve(plain + b"\xc1" + plain, [], expect=2)
    assert [relayed_form(v) for v in values] == ["msgpack"]
    assert h.value("envoygeo_forward_bad_input_total", reason="malformed") == 1


def relayed_form(value: bytes) -> str:
    return "json" if value[:1] == b"{" else "msgpack"


def test_a_forward_frame_over_the_limit_is_refused_as_before() -> None:
    frame = msgpack.packb(["t", [[i, {"log": "y" * 100}] for i in range(100)]])
    for pieces in ([], [100] * 50):
        values, h = serve(frame, pieces, max_chunk_bytes=len(frame) - 1)
        assert values == []
        assert h.value("envoygeo_forward_chunks_refused_total", reason="too_large") == 1


def test_a_gzip_chunk_of_captured_events_round_trips() -> None:
    payload = captured_payload()
    frame = decode_frame(["t", gzip.compress(payload), {"compressed": "gzip", "chunk": "c"}],
                         BIG, native_relay_values())
    assert frame.values is not None and frame.count == 24 * len(VARIANTS)
    assert frame.values == relay(payload)
