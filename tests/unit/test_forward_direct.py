"""`forward.mode: direct` with a small fake Elasticsearch sink: ids, ack timing, both
enrichment paths, failures (the real node: tests/integration/test_forward_direct.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from pipeline import native
from pipeline.config import ConfigError, Settings, load_settings
from pipeline.enricher import Enricher
from pipeline.plugins import EnricherPlugin, PluginBatch
from pipeline.sinks.elasticsearch import BulkItem, EncodedBulk, action_head, encode_items
from pipeline.sources.forward import EventTime, Frame
from pipeline.sources.forward_direct import DirectServer, chunk_key
from pipeline.sources.forward_server import ServerOptions
from tests.integration.harness import ISTIO_LINE


class FakeSink:
    """Takes bulk bodies; `fail` makes every write raise as a refusing cluster would."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.writable = threading.Event()
        self.writable.set()
        self.last_error = ""
        self.bodies: list[bytes] = []
        self.fail = fail
        self.acks_seen_at_write: list[int] = []

    def action_head(self, index: str) -> bytes:
        return action_head(b"index", index)

    def write(self, items: Sequence[BulkItem] | EncodedBulk, stop: Any = None) -> list[Any]:
        if self.fail is not None:
            raise self.fail
        enc = items if isinstance(items, EncodedBulk) else encode_items(items)
        self.bodies.append(enc.body)
        return []

    def close(self) -> None:
        pass

    def docs(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(index, id, document without event.ingested) of every item written."""
        out = []
        for body in self.bodies:
            lines = body.splitlines()
            for action, source in zip(lines[::2], lines[1::2], strict=True):
                meta = orjson.loads(action)["index"]
                doc = orjson.loads(source)
                doc["event"].pop("ingested", None)
                out.append((meta["_index"], meta["_id"], doc))
        return out


class FakeConn:
    peer = "127.0.0.1:5555"
    transport = None
    closing = False

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def stop_reading(self) -> None:
        pass


def options() -> ServerOptions:
    return ServerOptions(host="127.0.0.1", port=0, topic="", max_chunk_bytes=1 << 20,
                         max_inflight_chunks=4, max_connections=10)


def lines(n: int) -> list[str]:
    return [ISTIO_LINE.format(ts="2026-12-03T10:00:00.000Z", n=i, size=100,
                              client="81.2.69.160", port=40000 + i) for i in range(n)]


def frame(n: int, chunk: str | None = "ofUIM6hKShPK5FrtqBdklA==") -> Frame:
    entries: list[tuple[Any, dict[Any, Any]]] = [
        (EventTime(1795914780, i), {"log": text, "stream": "stdout"})
        for i, text in enumerate(lines(n))]
    return Frame("Forward", "kube.envoy", entries, {"chunk": chunk} if chunk else {})


def serve(frames: list[Frame], sink: FakeSink, settings: Settings | None = None,
          plugins: Sequence[EnricherPlugin] = ()) -> tuple[DirectServer, list[FakeConn]]:
    settings = settings or Settings()
    server = DirectServer(options(), settings,
                          lambda: Enricher.from_settings(settings, extra_plugins=plugins),
                          sink)  # type: ignore[arg-type]
    conns = [FakeConn() for _ in frames]

    async def go() -> None:
        for conn, f in zip(conns, frames, strict=True):
            assert server.relay(conn, f)  # type: ignore[arg-type]
            # Nothing is acked before the enrichment thread and the sink are done.
            assert conn.written == []
        await asyncio.wait_for(server._idle.wait(), 30)
        await asyncio.sleep(0)

    asyncio.run(go())
    return server, conns


def test_chunk_key_keeps_a_plain_chunk_id_and_digests_the_rest() -> None:
    values = [b'{"log":"a"}', b'{"log":"b"}']
    assert chunk_key(frame(1), values) == "fwd-ofUIM6hKShPK5FrtqBdklA=="
    odd = chunk_key(frame(1, chunk='a"b\\c'), values)
    assert odd.startswith("fwd-s") and len(odd) == 5 + 64
    plain = chunk_key(frame(1, chunk=None), values)
    assert plain.startswith("fwd-h") and plain == chunk_key(frame(1, chunk=None), values)
    assert plain != chunk_key(frame(1, chunk=None), values[:1])
    assert plain != chunk_key(frame(1, chunk=None), [values[1], values[0]])


@pytest.mark.parametrize("path", ["native", "python"])
def test_a_chunk_is_indexed_by_id_and_acked_after_the_sink(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "native" and native._native is None:
        pytest.fail("the compiled core is not built")  # deploy/local/install builds it
    monkeypatch.setenv("ENVOYGEO_NATIVE", "1" if path == "native" else "0")
    sink = FakeSink()
    server, (conn,) = serve([frame(5)], sink)
    try:
        assert conn.written == [b"\x81\xa3ack\xb8ofUIM6hKShPK5FrtqBdklA=="]
        docs = sink.docs()
        assert [d[1] for d in docs] == [f"fwd-ofUIM6hKShPK5FrtqBdklA==-0-{i}" for i in range(5)]
        assert {d[0] for d in docs} == {"envoygeo-logs"}
        assert [d[2]["source"]["ip"] for d in docs] == ["81.2.69.160"] * 5
        assert [d[2]["url"]["original"] for d in docs] == \
            [f"/api/items/{i}?page=1" for i in range(5)]
        # (not kept in a local: the compiled core must be freed on its own thread)
        assert (server.enricher.records_native, server.enricher.records_python) == \
            ((5, 0) if path == "native" else (0, 5))
        assert server.indexed == 5 and server.acked == 1
    finally:
        server.close()


def test_both_paths_write_the_same_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ENVOYGEO_NATIVE", flag)
        sink = FakeSink()
        server, _ = serve([frame(8), frame(3, chunk=None)], sink)
        server.close()
        out.append(sink.docs())
    assert out[0] == out[1] and len(out[0]) == 11


def test_unparsable_lines_go_to_the_dead_letter_index(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(environ={"ENVOYGEO_PARSE__UNPARSED": "dead_letter",
                                      "ENVOYGEO_FORWARD__MODE": "direct"})
    f = frame(3)
    f.entries.append((EventTime(1795914780, 9), {"log": "not an access log"}))
    sink = FakeSink()
    server, (conn,) = serve([f], sink, settings)
    try:
        docs = sink.docs()
        assert [(d[0], d[1]) for d in docs] == [
            *[("envoygeo-logs", f"fwd-ofUIM6hKShPK5FrtqBdklA==-0-{i}") for i in range(3)],
            ("envoygeo-dead-letter", "fwd-ofUIM6hKShPK5FrtqBdklA==-0-3")]
        dead = docs[3][2]
        assert dead["envoygeo"]["stage"] == "parse"
        assert orjson.loads(dead["event"]["original"])["log"] == "not an access log"
        assert conn.written  # acked: every event indexed or dead-lettered
        assert server.dm.events_dead_lettered.labels("parse")._value.get() == 1
        assert server.unparsed == 1
    finally:
        server.close()


class Down(EnricherPlugin):
    name = "down"

    def enrich(self, batch: PluginBatch) -> list[dict[str, Any] | None]:
        raise ConnectionError("customer table unreachable")


@pytest.mark.parametrize("flag", ["1", "0"])
def test_a_chunk_a_plugin_failed_on_goes_to_the_dead_letter_index(
        flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """plugins.on_error: dead_letter in direct mode: nothing of the chunk is indexed,
    every event is a dead letter (the unparsable one with stage parse), then acked."""
    monkeypatch.setenv("ENVOYGEO_NATIVE", flag)
    settings = load_settings(environ={"ENVOYGEO_PARSE__UNPARSED": "dead_letter",
                                      "ENVOYGEO_PLUGINS__ON_ERROR": "dead_letter",
                                      "ENVOYGEO_FORWARD__MODE": "direct"})
    f = frame(3)
    f.entries.append((EventTime(1795914780, 9), {"log": "not an access log"}))
    sink = FakeSink()
    server, (conn,) = serve([f], sink, settings, plugins=[Down(Down.Config())])
    try:
        docs = sink.docs()
        assert {d[0] for d in docs} == {"envoygeo-dead-letter"} and len(docs) == 4
        stages = {d[1]: (d[2]["envoygeo"]["stage"], d[2]["envoygeo"]["error"]) for d in docs}
        why = "enrichment plugin down failed: ConnectionError: customer table unreachable"
        assert stages == {**{f"fwd-ofUIM6hKShPK5FrtqBdklA==-0-{i}": ("plugin", why)
                             for i in range(3)},
                          "fwd-ofUIM6hKShPK5FrtqBdklA==-0-3": (
                              "parse", stages["fwd-ofUIM6hKShPK5FrtqBdklA==-0-3"][1])}
        assert conn.written  # acked: every event dead-lettered
        dm = server.dm.events_dead_lettered
        assert (dm.labels("plugin")._value.get(), dm.labels("parse")._value.get()) == (3, 1)
        assert server.indexed == 0 and server.dead_lettered == 4
        # (read outside an assert: pytest keeps an assert's operands, and the core
        # must be freed on the enrichment thread)
        native_records = server.enricher.records_native
        assert (native_records > 0) == (flag == "1")
    finally:
        server.close()


def test_a_failing_sink_means_no_ack_a_closed_connection_and_a_count() -> None:
    from elasticsearch import ApiError

    class Meta:
        status = 403

    sink = FakeSink(fail=ApiError("security_exception", Meta(), {}))  # type: ignore[arg-type]
    server, (conn,) = serve([frame(4)], sink)
    try:
        assert conn.written == [] and conn.closed
        m = server.metrics
        assert m.chunks_refused.labels("elasticsearch_error")._value.get() == 1
        assert m.events_failed._value.get() == 4
        assert server.inflight == 0 and server.acked == 0
    finally:
        server.close()


def test_the_inflight_limit_refuses_the_next_acked_chunk() -> None:
    sink = FakeSink()
    server = DirectServer(options(), Settings(), lambda: Enricher.from_settings(Settings()),
                          sink)  # type: ignore[arg-type]
    conns = [FakeConn() for _ in range(5)]

    async def go() -> list[bool]:
        got = [server.relay(c, frame(2, chunk=f"c{i}"))  # type: ignore[arg-type]
               for i, c in enumerate(conns)]
        await asyncio.wait_for(server._idle.wait(), 30)
        return got

    try:
        assert asyncio.run(go()) == [True] * 4 + [False]
        assert conns[4].closed and conns[4].written == []
        assert all(c.written for c in conns[:4])
    finally:
        server.close()


@pytest.mark.parametrize("key,value,why", [
    ("TOPIC", "t", "forward.topic: topic is the Kafka topic of mode relay"),
    ("TAG_HEADER", "true", "forward: tag_header is a Kafka header of mode relay"),
])
def test_direct_mode_refuses_relay_only_keys(key: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"ENVOYGEO_FORWARD__MODE": "direct",
                               f"ENVOYGEO_FORWARD__{key}": value})
    assert why.split(": ", 1)[1] in str(err.value)


def test_frames_without_ack_request_pause_reading_past_the_limit() -> None:
    """They cannot be refused (the client would not resend), so their connection stops
    being read at max_inflight_chunks pending frames and resumes once they are indexed."""

    class Transport:
        resumed = 0

        def resume_reading(self) -> None:
            self.resumed += 1

    class PausingConn(FakeConn):
        def __init__(self) -> None:
            super().__init__()
            self.transport = Transport()  # type: ignore[assignment]
            self.paused = 0

        def stop_reading(self) -> None:
            self.paused += 1

    sink = FakeSink()
    server = DirectServer(options(), Settings(), lambda: Enricher.from_settings(Settings()),
                          sink)  # type: ignore[arg-type]
    conn = PausingConn()

    async def go() -> list[bool]:
        got = [server.relay(conn, frame(2, chunk=None)) for _ in range(5)]  # type: ignore[arg-type]
        paused_before_done = conn.paused
        await asyncio.wait_for(server._idle.wait(), 30)
        return [*got, paused_before_done > 0]

    try:
        assert asyncio.run(go()) == [True] * 6  # none refused; paused at the limit
        assert conn.transport.resumed >= 1  # type: ignore[attr-defined]
        assert conn.written == [] and not conn.closed
        assert len({d[1] for d in sink.docs()}) == 2  # five identical frames: one id set
        assert server.indexed == 10
    finally:
        server.close()
