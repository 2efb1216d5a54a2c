"""Logs an operator can read: every librdkafka client the product builds hands its log
lines to the Python logger (pipeline/kafka_log.py), so none writes raw `%3|...|FAIL|`
lines; the Elasticsearch client's per-request and per-failure lines are DEBUG, and the
sink's own retry warnings back off."""

from __future__ import annotations

import ast
import io
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from elastic_transport import ConnectionError as TransportConnectionError

from pipeline.config import ElasticsearchSettings
from pipeline.logs import setup_logging
from pipeline.sinks.elasticsearch import BulkItem, ElasticsearchSink
from tests.unit.test_es_sink import ScriptedClient

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = {"Producer", "Consumer", "AdminClient"}


def test_every_librdkafka_client_in_the_product_gets_a_logger() -> None:
    """A client built without `logger=` writes librdkafka's lines raw to stderr."""
    built, bare = 0, []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            if name in CLIENTS:
                built += 1
                if not any(k.arg == "logger" for k in node.keywords):
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert built >= 8  # the scan sees the clients (consumer, sinks, setup, services, ...)
    assert bare == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_services_admin_client_logs_json_when_kafka_is_down() -> None:
    """`envoygeo services`' AdminClient against a closed port: librdkafka's connection
    failures come out as JSON lines of the envoygeo.kafka.librdkafka logger."""
    script = (
        "from pipeline.logs import setup_logging\n"
        "from pipeline.commands.services import _kafka\n"
        "setup_logging('INFO')\n"
        "try:\n"
        f"    _kafka('127.0.0.1:{_closed_port()}')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.stdout.strip() == "KafkaException", (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert lines, "librdkafka said nothing about the refused connection"
    entries = [orjson.loads(line) for line in lines]  # raises on a raw `%3|...` line
    kafka = [e for e in entries if e["log.logger"] == "envoygeo.kafka.librdkafka"]
    assert kafka and any("Connection refused" in e["message"] for e in kafka), entries


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The worker's JSON logging, written to a string."""
    stream = io.StringIO()
    setup_logging("INFO")
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    setup_logging("INFO")


def test_client_node_pool_warnings_are_debug(log_stream: io.StringIO) -> None:
    """elastic_transport's node pool warns on every failed request and, as a warning
    too, when the node answers again; the sink and the worker say both already."""
    pool = logging.getLogger("elastic_transport.node_pool")
    pool.warning("Node %r has failed for %i times in a row, putting on %i second timeout",
                 "<Node>", 7, 30)
    pool.warning("Node %r has been marked alive after a successful request", "<Node>")
    pool.info("Resurrected node %r (force=%s)", "<Node>", False)
    pool.error("something the client thinks is an error")
    assert [e["message"] for e in _json_lines(log_stream)] == [
        "something the client thinks is an error"]
    setup_logging("DEBUG")
    logging.getLogger().handlers[0].setStream(log_stream)  # type: ignore[attr-defined]
    pool.warning("Node %r has been marked alive after a successful request", "<Node>")
    assert _json_lines(log_stream)[-1]["log.level"] == "debug"


def test_bulk_retries_are_warned_at_doubling_attempts(
        caplog: pytest.LogCaptureFixture) -> None:
    """Ten failed requests in a row: warnings at attempts 1, 2, 4, 8, the rest DEBUG."""
    failures = [TransportConnectionError("refused") for _ in range(10)]
    client = ScriptedClient([*failures, {}])
    sink = ElasticsearchSink(ElasticsearchSettings(retry_initial_backoff_ms=1,
                                                   retry_max_backoff_ms=1),
                             client=client)  # type: ignore[arg-type]
    caplog.set_level(logging.DEBUG, logger="pipeline.sinks.elasticsearch")
    assert sink.write([BulkItem("idx", "id0", b"{}", b"raw", "t/0/0")]) == []
    retries = [r for r in caplog.records if "to retry" in r.getMessage()]
    assert len(retries) == 10
    warned = [r.getMessage() for r in retries if r.levelno == logging.WARNING]
    assert [int(re.search(r"attempt (\d+)", m).group(1)) for m in warned  # type: ignore[union-attr]
            ] == [1, 2, 4, 8], warned
