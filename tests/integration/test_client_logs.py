"""The Elasticsearch client's own log lines against the real node: its per-request INFO
line ("POST http://.../_bulk [status:200 ...]") is DEBUG in the worker's JSON log, so a
worker at INFO writes nothing per request; with DEBUG on, the line is there."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from pipeline.config import ElasticsearchSettings
from pipeline.logs import setup_logging
from pipeline.sinks.elasticsearch import make_client


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    setup_logging("INFO")


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_bulk_requests_log_nothing_at_info(log_stream: io.StringIO, es_url: str) -> None:
    client = make_client(ElasticsearchSettings(hosts=[es_url]))
    try:
        for level in ("INFO", "DEBUG"):
            setup_logging(level)
            logging.getLogger().handlers[0].setStream(log_stream)  # type: ignore[attr-defined]
            client.bulk(operations=b'{"index":{"_index":"envoygeo-log-test"}}\n{"a":1}\n',
                        refresh=True)
            if level == "INFO":
                assert _lines(log_stream) == [], log_stream.getvalue()
        client.indices.delete(index="envoygeo-log-test", ignore_unavailable=True)
    finally:
        client.close()
    debug = [e for e in _lines(log_stream) if e["log.logger"] == "elastic_transport.transport"]
    assert debug and all(e["log.level"] == "debug" for e in debug), debug
    assert any("_bulk" in str(e["message"]) and "status:200" in str(e["message"])
               for e in debug), debug
