"""Bulk sink retry logic against a scripted fake client (the real node: integration tests)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from elastic_transport import ApiResponseMeta, ConnectionError, HttpHeaders, NodeConfig
from elasticsearch import ApiError

from pipeline.config import ElasticsearchSettings
from pipeline.sinks.elasticsearch import (
    BulkItem,
    ElasticsearchSink,
    EncodedBulk,
    SinkStopped,
    encode_items,
    make_client,
)


class ScriptedClient:
    """Answers each bulk call from a script: an exception, or a status per document id."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[list[str]] = []

    def bulk(self, operations: bytes, filter_path: str) -> Any:
        lines = operations.splitlines()
        ids = [orjson.loads(line)["index"]["_id"] for line in lines[::2]]
        self.calls.append(ids)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        items = [{"index": {"status": step.get(i, 201), **(
            {"error": {"type": "document_parsing_exception", "reason": f"bad {i}"}}
            if step.get(i, 201) >= 300 else {})}} for i in ids]
        errors = any(s >= 300 for s in step.values())
        return SimpleNamespace(body={"errors": errors, "items": items})

    def close(self) -> None:
        pass


def _items(n: int) -> list[BulkItem]:
    return [BulkItem("idx", f"id{i}", b'{"a":%d}' % i, b"raw%d" % i, f"t/0/{i}") for i in range(n)]


def _sink(client: ScriptedClient) -> ElasticsearchSink:
    settings = ElasticsearchSettings(retry_initial_backoff_ms=1, retry_max_backoff_ms=2)
    return ElasticsearchSink(settings, client=client)  # type: ignore[arg-type]


def test_encoded_body_is_ndjson_with_ids() -> None:
    body = encode_items(_items(2)).body
    lines = body.split(b"\n")
    assert lines[-1] == b""
    assert orjson.loads(lines[0]) == {"index": {"_index": "idx", "_id": "id0"}}
    assert lines[1] == b'{"a":0}'


@pytest.mark.parametrize("doc_id", [
    "topic.a_b-3-17", "say \"hi\"", "back\\slash", "tab\there", "caf\u00e9 \u2603", "\x7f", "",
])
def test_encoding_quotes_any_id_and_index_exactly(doc_id: str) -> None:
    items = [BulkItem("idx", doc_id, b'{"a":1}'), BulkItem('odd"index', "x", b"{}")]
    lines = encode_items(items, op=b"create").body.split(b"\n")
    assert orjson.loads(lines[0]) == {"create": {"_index": "idx", "_id": doc_id}}
    assert orjson.loads(lines[2]) == {"create": {"_index": 'odd"index', "_id": "x"}}
    assert lines[1] == b'{"a":1}' and lines[3] == b"{}"


def test_only_failed_items_are_retried_and_4xx_rejected() -> None:
    client = ScriptedClient([{"id1": 429, "id2": 503, "id3": 400}, {"id2": 429}, {}])
    sink = _sink(client)
    rejected = sink.write(_items(4))
    assert client.calls == [["id0", "id1", "id2", "id3"], ["id1", "id2"], ["id2"]]
    assert [(r.item.doc_id, r.status) for r in rejected] == [("id3", 400)]
    assert "document_parsing_exception" in rejected[0].reason
    assert sink.writable.is_set()


def test_transport_errors_retry_whole_batch_and_clear_writable() -> None:
    seen_unwritable = []
    client = ScriptedClient([ConnectionError("refused"), ConnectionError("refused"), {}])
    sink = _sink(client)
    original_bulk = client.bulk

    def spy(**kw: Any) -> Any:
        seen_unwritable.append(not sink.writable.is_set())
        return original_bulk(**kw)

    client.bulk = spy  # type: ignore[method-assign]
    assert sink.write(_items(3)) == []
    assert len(client.calls) == 3
    assert seen_unwritable == [False, True, True]
    assert sink.writable.is_set()


def _api_error(status: int) -> ApiError:
    meta = ApiResponseMeta(status=status, http_version="1.1", headers=HttpHeaders(),
                           duration=0.0, node=NodeConfig("http", "127.0.0.1", 9200))
    return ApiError("boom", meta=meta, body={"error": "boom"})


def test_whole_request_429_is_retried_but_413_raises() -> None:
    client = ScriptedClient([_api_error(429), {}])
    assert _sink(client).write(_items(1)) == []
    with pytest.raises(ApiError):
        _sink(ScriptedClient([_api_error(413)])).write(_items(1))


def test_stop_event_interrupts_endless_retry() -> None:
    client = ScriptedClient([ConnectionError("down")] * 1000)
    stop = threading.Event()
    stop.set()
    with pytest.raises(SinkStopped):
        _sink(client).write(_items(2), stop)


def test_batches_are_split_by_docs_and_bytes() -> None:
    client = ScriptedClient([{}] * 10)
    settings = ElasticsearchSettings(bulk_max_docs=3, bulk_max_bytes=10_000)
    sink = ElasticsearchSink(settings, client=client)  # type: ignore[arg-type]
    assert sink.write(_items(7)) == []
    assert client.calls == [["id0", "id1", "id2"], ["id3", "id4", "id5"], ["id6"]]

    big = [BulkItem("idx", f"b{i}", b"x" * 600, b"", "") for i in range(4)]
    client = ScriptedClient([{}] * 10)
    settings = ElasticsearchSettings(bulk_max_docs=100, bulk_max_bytes=1500)
    ElasticsearchSink(settings, client=client).write(big)  # type: ignore[arg-type]
    assert client.calls == [["b0", "b1"], ["b2", "b3"]]


def test_client_sends_an_encoded_body_without_copying_it() -> None:
    serializers = make_client(ElasticsearchSettings()).transport.serializers
    body = encode_items(_items(3)).body
    for mimetype in ("application/x-ndjson",
                     "application/vnd.elasticsearch+x-ndjson; compatible-with=9"):
        assert serializers.dumps(body, mimetype) is body
    assert serializers.dumps([{"a": 1}], "application/x-ndjson") == b'{"a":1}\n'  # as before


def test_encoded_bulk_lines_and_sink_retries_by_slices() -> None:
    items = _items(5)
    enc = encode_items(items)
    assert enc.lines(range(5)) is enc.body
    assert enc.lines(range(1, 3)) == encode_items(items[1:3]).body
    assert enc.lines([4, 0]) == encode_items([items[4], items[0]]).body
    assert enc.lines(range(0)) == b""
    described: list[int] = []

    def describe(j: int) -> BulkItem:
        described.append(j)
        return items[j]

    client = ScriptedClient([{"id1": 429, "id3": 400}, {}])
    rejected = _sink(client).write(EncodedBulk(enc.body, enc.ends, describe))
    assert client.calls == [["id0", "id1", "id2", "id3", "id4"], ["id1"]]
    assert [(r.item.doc_id, r.status) for r in rejected] == [("id3", 400)]
    assert described == [3]  # only the rejected item became an object
