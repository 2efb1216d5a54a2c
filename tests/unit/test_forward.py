"""The forward protocol decoder and server against what a real Fluent Bit 5.1.1 sent.

The streams are `../shared/samples/fluent-bit-5.1.1/forward-*-conn1.bin` (copied to
tests/data/fluent-bit-5.1.1), captured byte for byte (see its README); the expected
events come from the CRI file Fluent Bit tailed (`expected-records.jsonl`), not from our
own decoder.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from pipeline.decode.envelope import decode_envelope
from pipeline.sources.forward import (
    EventTime,
    ForwardError,
    Frame,
    TooLarge,
    ack,
    decode_frame,
    gunzip,
    helo,
    pack,
    parse_ping,
    ping_ok,
    pong,
    unpacker,
)
from pipeline.sources.forward_server import (
    TAG_HEADER,
    ForwardMetrics,
    ForwardServer,
    ServerOptions,
    relay_value,
)

# A copy of the forward captures (and the expected records) lives in tests/data, so the
# tests run from any clone; test_the_copies_are_the_captures checks it against the original.
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "fluent-bit-5.1.1"
ORIGINAL = Path(__file__).resolve().parents[3] / "shared" / "samples" / "fluent-bit-5.1.1"
VARIANTS = ("default", "ack", "gzip-ack", "time-int", "shared-key")
TAG = ("kube.tmp.fbcap.var.log.containers.istio-ingressgateway-7d9f_istio-system_istio-proxy-"
       "2d5c06badcc7858d23943757e433975579fd4f34d2cdfa8c2a69a3f33f6af282.log")
CHUNK = "ofUIM6hKShPK5FrtqBdklA=="
SHARED_KEY = "fbcap-shared-secret"
BIG = 64 * 1024 * 1024



def _cri_ns(stamp: str) -> tuple[int, int]:
    """(seconds, nanoseconds) of an RFC3339Nano UTC stamp, exactly."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    sec = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    return sec, int(frac.ljust(9, "0"))


def expected_records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (SAMPLES / "expected-records.jsonl").open()]


def stream(variant: str) -> bytes:
    return (SAMPLES / f"forward-{variant}-conn1.bin").read_bytes()


def server_sent(variant: str) -> bytes:
    path = SAMPLES / f"forward-{variant}-conn1.server-sent.bin"
    return path.read_bytes() if path.exists() else b""


def relayed_event(value: bytes) -> dict[str, Any]:
    """A relayed Kafka value as a dict: the compiled relay's `format msgpack` record (a
    map's first byte is never `{`) or the Python path's JSON."""
    event = orjson.loads(value) if value[:1] == b"{" else msgpack.unpackb(value)
    assert isinstance(event, dict)
    return event


def objects(data: bytes) -> list[Any]:
    u = unpacker(BIG)
    u.feed(data)
    out = list(u)
    assert u.tell() == len(data)
    return out


def frames(variant: str) -> list[Frame]:
    return [decode_frame(o, BIG) for o in objects(stream(variant))
            if not (isinstance(o, list) and o and o[0] == "PING")]


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason="no ../shared/samples next to this clone")
def test_the_copies_are_the_captures() -> None:
    for copy in SAMPLES.iterdir():
        assert copy.read_bytes() == (ORIGINAL / copy.name).read_bytes(), copy.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_captured_stream_decodes_to_the_exact_events(variant: str) -> None:
    (frame,) = frames(variant)
    expected = expected_records()
    assert frame.tag == TAG
    assert frame.mode == ("CompressedPackedForward" if variant == "gzip-ack" else "Forward")
    assert len(frame.entries) == len(expected) == 24
    for (time_, record), exp in zip(frame.entries, expected, strict=True):
        sec, nsec = _cri_ns(exp["cri_timestamps"][0])
        if variant == "time-int":
            assert type(time_) is int and time_ == sec  # time_as_integer: seconds only
        else:
            assert time_ == EventTime(sec, nsec)
        assert record == {"time": exp["cri_timestamps"][0], "stream": "stdout",
                          "_p": "P" if exp["cri_chunks"] > 1 else "F", "log": exp["log"]}
        assert len(record["log"].encode()) == exp["log_bytes"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_option_map_and_our_ack_are_what_fluent_bit_got(variant: str) -> None:
    (frame,) = frames(variant)
    if variant in ("ack", "gzip-ack"):
        assert frame.chunk == CHUNK and frame.option["size"] == 24
        assert ack(frame.chunk) == server_sent(variant)  # byte for byte, 30 bytes
    else:
        assert frame.option == {} and frame.chunk is None


def test_the_chunk_id_is_the_sha512_prefix_of_the_packed_entries() -> None:
    (obj,) = objects(stream("gzip-ack"))
    raw = gunzip(obj[1], BIG)
    assert len(raw) == 51600
    import base64
    assert base64.b64encode(hashlib.sha512(raw).digest()[:16]).decode() == CHUNK


def test_the_shared_key_handshake_answers_exactly_what_fluent_bit_accepted() -> None:
    helo_obj, pong_obj = objects(server_sent("shared-key"))
    nonce = helo_obj[1]["nonce"]
    ping_obj = objects(stream("shared-key"))[0]
    ping = parse_ping(ping_obj)
    assert ping.hostname == "fbcap-client.example"
    assert len(ping.salt) == 16  # sent as str, not UTF-8: kept byte for byte
    assert ping_ok(ping, nonce, SHARED_KEY)
    assert not ping_ok(ping, nonce, "another-key")
    # Our HELO and PONG, given the capture's nonce, are the capture server's bytes.
    sent = server_sent("shared-key")
    assert helo(nonce) + pong(ping, nonce, SHARED_KEY, "fbcap-server.example", True) == sent
    assert pong_obj[1] is True


def test_message_mode_packed_forward_and_lax_times() -> None:
    rec = {"log": "x"}
    frame = decode_frame(["app", 1700000000, rec], BIG)
    assert (frame.mode, frame.entries, frame.chunk) == ("Message", [(1700000000, rec)], None)
    frame = decode_frame(["app", EventTime(1, 2), rec, {"chunk": "c1"}], BIG)
    assert frame.entries == [(EventTime(1, 2), rec)] and frame.chunk == "c1"
    frame = decode_frame(["app", 1.5, rec], BIG)
    assert frame.entries == [(1.5, rec)]
    # msgpack round trip: EventTime as ext 0, Fluentd's PackedForward (bin) of [time, record]
    entries = [[msgpack.ExtType(0, b"\x00\x00\x00\x01\x00\x00\x00\x02"), {"a": 1}],
               [7, {"b": 2}]]
    payload = b"".join(msgpack.packb(e) for e in entries)
    (obj,) = objects(msgpack.packb(["t", payload, {"chunk": "k", "size": 2}]))
    frame = decode_frame(obj, BIG)
    assert frame.mode == "PackedForward"
    assert frame.entries == [(EventTime(1, 2), {"a": 1}), (7, {"b": 2})]
    # Fluentd may send several gzip members back to back
    gz = gzip.compress(msgpack.packb(entries[0])) + gzip.compress(msgpack.packb(entries[1]))
    (obj,) = objects(msgpack.packb(["t", gz, {"compressed": "gzip"}]))
    frame = decode_frame(obj, BIG)
    assert frame.mode == "CompressedPackedForward" and len(frame.entries) == 2


@pytest.mark.parametrize(("obj", "reason"), [
    ("just a string", "unknown_mode"),
    ([1, [], {}], "unknown_mode"),
    (["t", {"not": "a time"}, {}], "bad_entry"),  # Message mode with no time
    (["t", 1, {"r": 1}, {}, "extra"], "unknown_mode"),
    (["t", [], "option not a map"], "unknown_mode"),
    (["t", [[1]]], "bad_entry"),
    (["t", [["not a time", {}]]], "bad_entry"),
    (["t", [[[1, "no meta map"], {}]]], "bad_entry"),
    (["t", b"\x92\x01", {}], "malformed"),  # packed entries cut mid-entry
    (["t", b"\xc1", {}], "malformed"),  # a byte msgpack never uses
    (["t", b"not gzip", {"compressed": "gzip"}], "bad_compression"),
    (["t", b"", {"compressed": "zstd"}], "bad_compression"),
])
def test_bad_frames_say_why(obj: Any, reason: str) -> None:
    with pytest.raises(ForwardError) as err:
        decode_frame(obj, BIG)
    assert err.value.reason == reason


def test_a_gzip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\x00" * (8 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    with pytest.raises(TooLarge):
        decode_frame(["t", bomb, {"compressed": "gzip"}], 1024 * 1024)


def test_relay_value_is_the_fluent_bit_kafka_json_the_worker_reads() -> None:
    (frame,) = frames("ack")
    exp = expected_records()
    for (time_, record), e in zip(frame.entries, exp, strict=True):
        value = relay_value(time_, record)
        obj = orjson.loads(value)
        assert list(obj)[0] == "@timestamp"
        assert obj["@timestamp"] == pytest.approx(time_.timestamp, abs=1e-6)  # type: ignore[union-attr]
        env = decode_envelope(value)
        assert (env.kind, env.payload, env.error) == ("fluent-bit", e["log"], None)
        assert env.timestamp == pytest.approx(time_.timestamp, abs=1e-6)  # type: ignore[union-attr]
    # integer time, bytes and non-UTF-8 strings in a record do not stop the relay
    odd = {"log": "a\udcffb", "bin": b"\x01", "n": {1: EventTime(2, 500000000)}}
    obj = orjson.loads(relay_value(5, odd))
    assert obj == {"@timestamp": 5.0, "log": "a\ufffdb", "bin": "\x01", "n": {"1": 2.5}}


# -- the server, over a real socket, with a stand-in for the Kafka producer -------------


class FakeProducer:
    """Holds delivery reports until the test releases them (or fails them)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, Any]] = []
        self.pending: list[Any] = []

    def produce(self, topic: str, value: bytes, key: Any = None, partition: int = -1,
                callback: Any = None, on_delivery: Any = None, timestamp: int = 0,
                headers: Any = None) -> None:
        # confluent-kafka's signature, positional order included (the relay passes them so)
        self.records.append((topic, value, headers))
        self.pending.append(on_delivery or callback)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0

    def deliver(self, error: str | None = None) -> None:
        pending, self.pending = self.pending, []
        for report in pending:
            report(error, None)


class Harness:
    def __init__(self, **options: Any) -> None:
        opts = {"host": "127.0.0.1", "port": 0, "topic": "t", "max_chunk_bytes": BIG,
                "max_inflight_chunks": 8, "max_connections": 16, **options}
        self.producer = FakeProducer()
        self.metrics = ForwardMetrics()
        self.server = ForwardServer(ServerOptions(**opts), self.producer,  # type: ignore[arg-type]
                                    self.metrics)

    def value(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels or None)
        return v or 0.0


async def _recv(reader: asyncio.StreamReader, n: int, timeout: float = 2) -> bytes:
    return await asyncio.wait_for(reader.read(n), timeout)


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Closed by the server with nothing sent (a reset: closed with our bytes arriving)."""
    try:
        return await _recv(reader, 100) == b""
    except ConnectionResetError:
        return True


async def _no_data(reader: asyncio.StreamReader, wait: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), wait)
    except TimeoutError:
        return True
    return False


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_ack_only_after_kafka_acknowledged_every_record() -> None:
    async def main() -> None:
        h = Harness(tag_header=True)
        await h.server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(stream("ack"))
        await writer.drain()
        for _ in range(100):
            if len(h.producer.records) == 24:
                break
            await asyncio.sleep(0.01)
        assert len(h.producer.records) == 24
        assert await _no_data(reader)  # Kafka has not answered: no ack yet
        topic, value, headers = h.producer.records[15]
        assert topic == "t" and headers == [(TAG_HEADER, TAG.encode())]
        assert relayed_event(value)["_p"] == "P"
        h.producer.deliver()
        assert await _recv(reader, 100) == server_sent("ack")
        assert h.value("envoygeo_forward_events_relayed_total") == 24
        assert h.value("envoygeo_forward_chunks_acked_total") == 1
        writer.close()
        assert await h.server.drain(1)
    run(main())


def test_a_record_kafka_can_never_take_is_dropped_and_the_chunk_acked() -> None:
    from confluent_kafka import KafkaError, KafkaException

    async def main() -> None:
        h = Harness()
        real = h.producer.produce

        def produce(topic: str, value: bytes, *args: Any, **kwargs: Any) -> None:
            if len(value) > 30000:  # the 41 KB record, as librdkafka refuses it
                raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
            real(topic, value, *args, **kwargs)

        h.producer.produce = produce  # type: ignore[method-assign]
        await h.server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(stream("ack"))
        while len(h.producer.pending) < 23:
            await asyncio.sleep(0.01)
        h.producer.deliver()
        assert await _recv(reader, 100) == server_sent("ack")
        assert h.value("envoygeo_forward_events_too_large_total") == 1
        assert h.value("envoygeo_forward_events_relayed_total") == 23
        assert h.value("envoygeo_forward_events_failed_total") == 0
        await h.server.drain(1)
    run(main())


def test_a_kafka_failure_means_no_ack_and_a_closed_connection() -> None:
    async def main() -> None:
        h = Harness()
        await h.server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(stream("gzip-ack"))
        await writer.drain()
        while len(h.producer.pending) < 24:
            await asyncio.sleep(0.01)
        h.producer.deliver("Broker: Not enough in-sync replicas")
        assert await _closed(reader)  # closed, nothing acked
        assert h.value("envoygeo_forward_chunks_refused_total", reason="kafka_error") == 1
        assert h.value("envoygeo_forward_events_failed_total") == 24
        assert h.value("envoygeo_forward_chunks_acked_total") == 0
        await h.server.drain(1)
    run(main())


def test_shared_key_right_and_wrong() -> None:
    async def main() -> None:
        h = Harness(shared_key=SHARED_KEY, self_hostname="fbcap-server.example")
        await h.server.start()
        # Fluent Bit's PING was made for the capture's nonce, so build ours the same way.
        for key, ok in ((SHARED_KEY, True), ("wrong", False)):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
            helo_bytes = await _recv(reader, 49)
            u = unpacker(1024)
            u.feed(helo_bytes)
            nonce = next(u)[1]["nonce"]
            salt = b"\xff" * 16
            digest = hashlib.sha512(salt + b"client" + nonce + key.encode()).hexdigest()
            writer.write(msgpack.packb(["PING", "client", salt, digest, "", ""]))
            writer.write(stream("ack"))
            await writer.drain()
            reply = await _recv(reader, 1000)
            u.feed(reply)
            answer = next(u)
            assert answer[:4] == ["PONG", ok, "" if ok else "shared_key mismatch",
                                  "fbcap-server.example"]
            if ok:
                assert answer[4] == hashlib.sha512(salt + b"fbcap-server.example" + nonce
                                                   + key.encode()).hexdigest()
                while len(h.producer.pending) < 24:
                    await asyncio.sleep(0.01)
                h.producer.deliver()
                assert await _recv(reader, 100) == server_sent("ack")
            else:
                assert await _closed(reader)  # refused: closed after PONG false
            writer.close()
        assert h.value("envoygeo_forward_bad_input_total", reason="auth_failed") == 1
        assert len(h.producer.records) == 24  # nothing from the refused client
        await h.server.drain(1)
    run(main())


def test_username_and_password() -> None:
    async def main() -> None:
        h = Harness(shared_key=SHARED_KEY, self_hostname="srv", users={"fluent": "pa55"})
        await h.server.start()
        for user, password, ok in (("fluent", "pa55", True), ("fluent", "wrong", False),
                                   ("nobody", "pa55", False), ("", "", False)):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
            u = unpacker(1024)
            u.feed(await _recv(reader, 1000))
            _, options = next(u)
            nonce, auth_salt = options["nonce"], options["auth"]
            assert len(auth_salt) == 16  # a password is asked for
            salt = b"\x01" * 16
            digest = hashlib.sha512(salt + b"c" + nonce + SHARED_KEY.encode()).hexdigest()
            pw_digest = hashlib.sha512(auth_salt + user.encode() + password.encode()).hexdigest()
            writer.write(msgpack.packb(["PING", "c", salt, digest, user, pw_digest]))
            u.feed(await _recv(reader, 1000))
            answer = next(u)
            assert answer[1:3] == [ok, "" if ok else "username/password mismatch"], user
            if not ok:
                assert await _closed(reader)
            writer.close()
        assert h.value("envoygeo_forward_bad_input_total", reason="auth_failed") == 3
        await h.server.drain(1)
    run(main())


def test_limits_refuse_without_ack() -> None:
    async def main() -> None:
        h = Harness(max_chunk_bytes=16 * 1024, max_inflight_chunks=1)
        await h.server.start()
        # over max_chunk_bytes (the capture is 51816 bytes)
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(stream("ack"))
        assert await _closed(reader)
        assert h.value("envoygeo_forward_chunks_refused_total", reason="too_large") == 1
        # one chunk in flight, the second is refused (inflight_limit)
        small = msgpack.packb(["app", [[1, {"log": "x"}]], {"chunk": "c1"}])
        r1, w1 = await asyncio.open_connection("127.0.0.1", h.server.port)
        w1.write(small)
        await w1.drain()
        while not h.producer.pending:
            await asyncio.sleep(0.01)
        r2, w2 = await asyncio.open_connection("127.0.0.1", h.server.port)
        w2.write(msgpack.packb(["app", [[1, {"log": "y"}]], {"chunk": "c2"}]))
        assert await _closed(r2)
        assert h.value("envoygeo_forward_chunks_refused_total", reason="inflight_limit") == 1
        h.producer.deliver()
        assert await _recv(r1, 100) == ack("c1")
        assert len(h.producer.records) == 1
        await h.server.drain(1)
    run(main())


def test_frames_without_an_ack_request_are_not_refused_for_the_inflight_limit() -> None:
    async def main() -> None:
        h = Harness(max_inflight_chunks=1)
        await h.server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        # what fluent-logger sends: one Message frame per event, no option
        writer.write(b"".join(msgpack.packb(["app", i, {"log": str(i)}]) for i in range(100)))
        await writer.drain()
        while len(h.producer.records) < 100:
            await asyncio.sleep(0.01)
        assert h.value("envoygeo_forward_chunks_refused_total", reason="inflight_limit") == 0
        assert h.value("envoygeo_forward_inflight_chunks") == 0
        h.producer.deliver("Local: Message timed out")  # lost: logged and counted
        await asyncio.sleep(0.1)
        assert h.value("envoygeo_forward_events_failed_total") == 100
        assert await _no_data(reader)  # not closed: the client could not resend anyway
        writer.close()
        await h.server.drain(1)
    run(main())


def test_bad_input_is_counted_and_the_server_keeps_serving() -> None:
    async def main() -> None:
        h = Harness()
        await h.server.start()
        for data, reason in ((b"\xc1\x00", "malformed"),
                             (msgpack.packb(["t", "x", 1, 2, 3]), "unknown_mode"),
                             (msgpack.packb(["t", [[1]]]), "bad_entry")):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
            writer.write(data)
            assert await _closed(reader)
            assert h.value("envoygeo_forward_bad_input_total", reason=reason) == 1
        # a client that goes away mid-frame
        with socket.create_connection(("127.0.0.1", h.server.port)) as s:
            s.sendall(stream("ack")[:1000])
        for _ in range(100):
            if h.value("envoygeo_forward_bad_input_total", reason="disconnect_mid_frame"):
                break
            await asyncio.sleep(0.01)
        assert h.value("envoygeo_forward_bad_input_total", reason="disconnect_mid_frame") == 1
        # still serving: the real capture goes through and is acked
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(stream("ack"))
        while len(h.producer.pending) < 24:
            await asyncio.sleep(0.01)
        h.producer.deliver()
        assert await _recv(reader, 100) == server_sent("ack")
        await h.server.drain(1)
    run(main())


def test_drain_acks_the_chunks_in_flight_then_closes() -> None:
    async def main() -> None:
        h = Harness()
        await h.server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(stream("gzip-ack"))
        while len(h.producer.pending) < 24:
            await asyncio.sleep(0.01)
        drain = asyncio.create_task(h.server.drain(5))
        await asyncio.sleep(0.1)
        assert not drain.done() and not h.server.serving
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", h.server.port)
        h.producer.deliver()
        assert await _recv(reader, 100) == server_sent("gzip-ack")
        assert await drain is True
        assert await _closed(reader)
    run(main())


def test_pack_keeps_non_utf8_strings() -> None:
    u = unpacker(1024)
    u.feed(b"\xa2\xff\xfe")
    (value,) = list(u)
    assert pack(value) == b"\xa2\xff\xfe"


def test_readme_lists_every_forward_metric() -> None:
    """The README's forward metrics table names every envoygeo_forward_* family with its
    labels, and nothing else."""
    import re

    from prometheus_client.metrics import MetricWrapperBase

    from pipeline.sources.forward_direct import DirectMetrics  # relay's and direct's

    exported = {}
    for metric in vars(DirectMetrics()).values():
        if isinstance(metric, MetricWrapperBase):
            suffix = "_total" if metric._type == "counter" else ""
            exported[metric._name + suffix] = set(metric._labelnames)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Forward protocol"):]
    section = section[:section.index("\n## ")]
    rows = re.findall(r"^\| `(envoygeo_\w+)(?:\{([^}]*)\})?` \|", section, re.M)
    listed = {name: set(filter(None, (x.strip() for x in (labels or "").split(","))))
              for name, labels in rows}
    assert listed == exported and len(exported) == 17


def test_shared_key_from_a_file(tmp_path: Path) -> None:
    """forward.shared_key_file (a Kubernetes Secret volume): read at start, one trailing
    newline dropped; not together with shared_key; a missing file names the key."""
    from pipeline.config import ForwardSettings

    key = tmp_path / "shared-key"
    key.write_text("s3cret\n")
    assert ForwardSettings(shared_key_file=key).shared_key_value() == "s3cret"
    assert ForwardSettings(shared_key="inline").shared_key_value() == "inline"
    assert ForwardSettings().shared_key_value() is None
    with pytest.raises(ValueError, match="set shared_key or shared_key_file, not both"):
        ForwardSettings(shared_key="x", shared_key_file=key)
    with pytest.raises(ValueError, match="cannot read"):
        ForwardSettings(shared_key_file=tmp_path / "missing")
    users = [{"username": "fluent-bit", "password": "pw"}]
    assert ForwardSettings(shared_key_file=key, users=users).users[0].username == "fluent-bit"
