"""`envoygeo forward` against the real secured Kafka broker
(deploy/local/services/kafka-secure.sh; fixtures of test_kafka_secure.py): it relays
through SASL_SSL from configuration alone, and a refused connection (wrong password, an
untrusted CA, no client certificate) ends it within seconds, exit 3, with the one line
`run` and `setup` say, instead of librdkafka's retries until the start-up wait ends.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fluent import sender

from tests.conftest import ensure_service
from tests.integration.harness import ROOT, create_topic, free_port, read_topic
from tests.integration.test_forward import start_forward, stop
from tests.integration.test_kafka_secure import (
    INTERNAL,
    NEGATIVE,
    SASL_SSL,
    STATE,
    sasl_security,
)

# Python start-up, SECURITY_GRACE_S (3 s) and the certificate diagnosis; without the
# refusal check the start waited out its 10 s for metadata.
EXIT_WITHIN_S = 8.0
CASES = [c for c in NEGATIVE if c[0] in ("wrong-password", "unknown-ca", "no-client-cert")]


@pytest.fixture(scope="module")
def secure_kafka() -> str:
    """The secured broker (`deploy/local/up kafka-secure` if it does not answer) and
    its SCRAM password."""
    ensure_service("kafka-secure", "127.0.0.1", 9098)
    return (STATE / "password").read_text().strip()


def forward_config(path: Path, bootstrap: str, topic: str, security: dict[str, Any],
                   port: int = 0, metrics_port: int = 0) -> Path:
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic],
                  "security": security},
        "metrics": {"host": "127.0.0.1"},
        "forward": {"host": "127.0.0.1", "port": port or free_port(),
                    "metrics_port": metrics_port, "shutdown_grace_s": 10},
    }))
    return path


def test_forward_relays_through_sasl_ssl(secure_kafka: str, tmp_path: Path,
                                         unique: Callable[[str], str]) -> None:
    topic = unique("fsec")
    create_topic(INTERNAL, topic, partitions=1)
    port, mport = free_port(), free_port()
    cfg = forward_config(tmp_path / "forward.yaml", SASL_SSL, topic, sasl_security(),
                         port, mport)
    log = tmp_path / "forward.log"
    proc = start_forward(cfg, log, port, mport)
    try:
        client = sender.FluentSender("envoy", host="127.0.0.1", port=port)
        for i in range(5):
            assert client.emit("access", {"log": f"line {i}"}), client.last_error
        client.close()
        records = read_topic(INTERNAL, topic, 5)
    finally:
        assert stop(proc) == 0, log.read_text()
    assert sorted(orjson.loads(r.value())["log"] for r in records) == \
        [f"line {i}" for i in range(5)]
    assert secure_kafka not in log.read_text()


@pytest.mark.parametrize("case,bootstrap,security,expected", CASES,
                         ids=[c[0] for c in CASES])
def test_refused_connection_ends_forward_with_one_line(
        secure_kafka: str, tmp_path: Path, unique: Callable[[str], str], case: str,
        bootstrap: str, security: Callable[[str], dict[str, Any]], expected: str) -> None:
    cfg = forward_config(tmp_path / f"{case}.yaml", bootstrap, unique("fsec"),
                         security(secure_kafka))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "forward", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    took = time.monotonic() - started
    print(f"{case}: exit {proc.returncode} after {took:.2f}s")
    assert proc.returncode == 3, proc.stderr
    assert took < EXIT_WITHIN_S, f"{case}: exited after {took:.1f}s"
    # The one line on stderr; librdkafka's repeated refusals are not logged.
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert re.match("envoygeo forward: " + expected, proc.stderr), proc.stderr
    assert secure_kafka not in proc.stdout + proc.stderr
