from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.decode.envelope import PartialJoiner, decode_envelope
from tests.unit.decode_samples import sample_lines

pytestmark = pytest.mark.unit

LINE = sample_lines()[0][1]
KUBE = {"pod_name": "istio-ingressgateway-7d9f", "namespace_name": "istio-system",
        "container_name": "istio-proxy", "labels": {"app": "istio-ingressgateway"}}


def test_bare_line() -> None:
    env = decode_envelope(LINE.encode() + b"\n")
    assert (env.kind, env.payload, env.error) == ("bare", LINE, None)


def test_bare_envoy_json_is_not_an_envelope() -> None:
    raw = b'{"start_time":"2026-11-29T01:13:00.665Z","method":"GET","log_level":"x"}'
    env = decode_envelope(raw)
    assert env.kind == "bare" and env.payload == raw.decode()


@pytest.mark.parametrize("key", ["log", "message"])
def test_fluent_bit_epoch_timestamp(key: str) -> None:
    rec = {"@timestamp": 1795914780.665, key: LINE, "stream": "stdout", "kubernetes": KUBE}
    env = decode_envelope(orjson.dumps(rec))
    assert env.kind == "fluent-bit"
    assert env.payload == LINE
    assert env.kubernetes == KUBE
    assert env.timestamp == pytest.approx(1795914780.665)
    assert env.stream == "stdout"


def test_fluent_bit_iso_timestamp() -> None:
    rec = {"@timestamp": "2026-11-29T01:13:00.665000Z", "log": LINE + "\n"}
    env = decode_envelope(orjson.dumps(rec))
    assert env.kind == "fluent-bit" and env.payload == LINE
    assert env.timestamp == pytest.approx(1795914780.665)


def test_fluentd_out_kafka2() -> None:
    rec = {"message": LINE, "kubernetes": KUBE, "tag": "kube.var.log.containers.x"}
    env = decode_envelope(orjson.dumps(rec))
    assert env.kind == "fluentd" and env.payload == LINE and env.kubernetes == KUBE


def test_docker_json_file_strips_newline() -> None:
    rec = {"log": LINE + "\n", "stream": "stdout", "time": "2026-11-29T01:13:00.123456789Z"}
    env = decode_envelope(orjson.dumps(rec))
    assert env.kind == "docker" and env.payload == LINE and not env.partial
    assert env.timestamp == pytest.approx(1795914780.123456)


def test_cri_full_line() -> None:
    env = decode_envelope(f"2026-11-29T01:13:00.123456789Z stdout F {LINE}".encode())
    assert env.kind == "cri" and env.payload == LINE and env.stream == "stdout"
    assert not env.partial


def test_cri_inside_collector_json_is_unwrapped() -> None:
    rec = {"@timestamp": 1.0, "log": f"2026-11-29T01:13:00Z stderr F {LINE}", "kubernetes": KUBE}
    env = decode_envelope(orjson.dumps(rec))
    assert env.kind == "fluent-bit" and env.payload == LINE and env.stream == "stderr"


def test_merged_log_record() -> None:
    rec = {"@timestamp": 1.0, "kubernetes": KUBE, "method": "GET", "response_code": 200}
    env = decode_envelope(orjson.dumps(rec))
    assert orjson.loads(env.payload or "") == {"method": "GET", "response_code": 200}
    assert "envelope_merged_log" in env.tags


def test_cri_partials_joined_per_stream() -> None:
    j = PartialJoiner()
    a, b = LINE[:30], LINE[30:]
    assert j.feed(decode_envelope(f"2026-11-29T01:13:00Z stdout P {a}".encode())) is None
    # An interleaved stderr line of the same container passes straight through.
    other = j.feed(decode_envelope(b"2026-11-29T01:13:00Z stderr F warning"))
    assert other is not None and other.payload == "warning"
    done = j.feed(decode_envelope(f"2026-11-29T01:13:01Z stdout F {b}".encode()))
    assert done is not None and done.payload == LINE
    assert "envelope_joined_partials" in done.tags
    assert j.flush() == []


def test_docker_partial_joined() -> None:
    j = PartialJoiner()
    first = orjson.dumps({"log": LINE[:10], "stream": "stdout", "time": "2026-11-29T01:13:00Z"})
    last = orjson.dumps({"log": LINE[10:] + "\n", "stream": "stdout",
                         "time": "2026-11-29T01:13:00Z"})
    assert j.feed(decode_envelope(first)) is None
    done = j.feed(decode_envelope(last))
    assert done is not None and done.payload == LINE


def test_unfinished_partial_flushed_and_tagged() -> None:
    j = PartialJoiner()
    assert j.feed(decode_envelope(b"2026-11-29T01:13:00Z stdout P abc")) is None
    (env,) = j.flush()
    assert env.payload == "abc" and "envelope_partial_incomplete" in env.tags


def test_partial_run_bounded() -> None:
    j = PartialJoiner(max_bytes=10)
    assert j.feed(decode_envelope(b"2026-11-29T01:13:00Z stdout P 0123456")) is None
    env = j.feed(decode_envelope(b"2026-11-29T01:13:00Z stdout P 789abc"))
    assert env is not None and env.payload == "0123456789abc"
    assert "envelope_partial_too_long" in env.tags


def test_invalid_utf8_replaced_and_tagged() -> None:
    env = decode_envelope(b"\xff\xfe" + LINE.encode())
    assert env.error is None and "envelope_invalid_utf8" in env.tags
    assert env.payload is not None and env.payload.endswith(LINE)


@pytest.mark.parametrize("raw", [b"", b"\n", b"   \r\n"])
def test_empty_is_an_error(raw: bytes) -> None:
    env = decode_envelope(raw)
    assert env.error == "empty record" and env.payload is None


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    env = decode_envelope(data)
    assert env.payload is not None or env.error is not None


@given(st.dictionaries(st.sampled_from(["log", "message", "@timestamp", "time", "stream",
                                        "kubernetes", "tag", "log_processed"]),
                       st.one_of(st.none(), st.integers(), st.floats(allow_nan=False),
                                 st.text(max_size=40), st.dictionaries(st.text(max_size=5),
                                                                       st.integers()))))
@settings(max_examples=300, deadline=None)
def test_arbitrary_collector_json_never_raises(rec: dict) -> None:
    j = PartialJoiner()
    j.feed(decode_envelope(json.dumps(rec)))
    j.flush()
