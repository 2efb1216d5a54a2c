"""One JSON log stream: every librdkafka client the product builds hands its log lines to
the Python logger (pipeline/kafka_log.py), so none writes raw `%3|...|FAIL|` lines."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

import orjson

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
