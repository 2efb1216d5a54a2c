"""The worker, `setup`, `check-config --connect` and the dead-letter producer against a
real secured Kafka 4.x broker (deploy/local/services/kafka-secure.sh): SASL_SSL with a
SCRAM-SHA-512 user, and SSL with a required client certificate. Each refused
connection (wrong password, an untrusted CA, an expired or wrong-host broker
certificate, no or a foreign client certificate) ends the worker within seconds with
one line naming the cause; the SCRAM password appears in no output of any of it.

The secured broker's plaintext INTERNAL listener (loopback, inter-broker) is where the
tests produce source records and read commits and dead letters: an independent view of
what the worker did through the secured listeners.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import Elasticsearch

from tests.conftest import ensure_service
from tests.integration.harness import (
    ROOT,
    access_records,
    free_port,
    log_messages,
    produce,
    read_topic,
    service,
    start_worker,
    stop_worker,
    wait_for_committed,
    wait_for_count,
    write_config,
)

TLS = ROOT / ".local" / "tls"
STATE = ROOT / ".local" / "kafka-secure"
SASL_SSL, MTLS, EXPIRED, WRONGHOST, INTERNAL = (f"127.0.0.1:{p}" for p in range(9094, 9099))
USER = "envoygeo"

# Every output of this module, for the secret-leak check at the end.
CAPTURED: list[str] = []


@pytest.fixture(scope="module")
def secure_kafka() -> str:
    """The secured broker (started with `deploy/local/up kafka-secure` if it does not
    answer); returns the SCRAM password it was formatted with."""
    ensure_service("kafka-secure", "127.0.0.1", 9098)
    return (STATE / "password").read_text().strip()


@pytest.fixture
def setup_env(secure_kafka: str, es_url: str, unique: Callable[[str], str],
              tmp_path: Path) -> Iterator[dict[str, Any]]:
    es = Elasticsearch(es_url, request_timeout=30)
    env = {"es": es, "es_url": es_url, "topic": unique("ks"), "index": unique("ks-idx"),
           "group": unique("ks-g"), "tmp": tmp_path, "password": secure_kafka}
    yield env
    es.indices.delete(index=[env["index"], f"{env['index']}-alerts"], ignore_unavailable=True)
    es.close()


def sasl_security(**overrides: Any) -> dict[str, Any]:
    return {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "username": USER,
            "password_file": str(STATE / "password"), "ca_file": str(TLS / "ca.pem"),
            **overrides}


def mtls_security(**overrides: Any) -> dict[str, Any]:
    return {"protocol": "SSL", "ca_file": str(TLS / "ca.pem"),
            "cert_file": str(TLS / "client.pem"), "key_file": str(TLS / "client.key"),
            **overrides}


def config(env: dict[str, Any], name: str, bootstrap: str, security: dict[str, Any],
           **extra: Any) -> Path:
    return write_config(env["tmp"] / name, bootstrap=bootstrap, es_url=env["es_url"],
                        topic=env["topic"], group=env["group"], index=env["index"],
                        extra={"kafka": {"security": security}, **extra})


def envoygeo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})
    CAPTURED.append(proc.stdout + proc.stderr)
    return proc


@pytest.mark.parametrize("listener", ["sasl_ssl", "mtls"])
def test_worker_consumes_indexes_dead_letters_and_commits_through_secured_listener(
        setup_env: dict[str, Any], listener: str) -> None:
    env = setup_env
    bootstrap, security = ((SASL_SSL, sasl_security()) if listener == "sasl_ssl"
                           else (MTLS, mtls_security()))
    metrics_port = free_port()
    cfg = config(env, "worker.yaml", bootstrap, security, parse={"unparsed": "dead_letter"},
                 metrics={"port": metrics_port, "progress_interval_s": 2})
    # `setup` creates the source, dead-letter and alerts topics through the secured listener.
    setup = envoygeo("setup", "-c", str(cfg))
    assert setup.returncode == 0, setup.stderr
    assert "created topics:" in setup.stdout and env["topic"] in setup.stdout
    produce(INTERNAL, env["topic"], [b"not an access log", *access_records(50)])
    log = env["tmp"] / "worker.log"
    worker = start_worker(cfg, log)
    try:
        assert wait_for_count(env["es"], env["index"], 50, timeout_s=90, procs=[worker]) == 50
        dead = read_topic(INTERNAL, f"{env['topic']}-dlq", expect=1)
        assert wait_for_committed(INTERNAL, env["group"], env["topic"], 51, timeout_s=60) == 51
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            CAPTURED.append(r.read().decode())
    finally:
        assert stop_worker(worker) == 0
        CAPTURED.append(log.read_text())
    assert [m.value() for m in dead] == [b"not an access log"]
    # check-config --connect through it too (after the worker: on a freshly started
    # broker the group coordinator's topic is created by the first group to ask).
    check = envoygeo("check-config", "-c", str(cfg), "--connect")
    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(r"kafka\s+ok", check.stdout), check.stdout


# (case, bootstrap, security, expected one-line message)
NEGATIVE = [
    ("wrong-password", SASL_SSL, lambda pw: sasl_security(password_file=None, password="x" + pw),
     r"kafka: authentication failed at 127\.0\.0\.1:9094 \(SCRAM-SHA-512, user envoygeo\): "
     r"check kafka\.security\.username/password"),
    ("unknown-ca", SASL_SSL, lambda pw: sasl_security(ca_file=str(TLS / "other-ca.pem")),
     r"kafka: cannot verify the broker's TLS certificate at 127\.0\.0\.1:9094: unable to get "
     r"local issuer certificate \(the broker's certificate is not signed by a CA in "
     r".*other-ca\.pem\); check kafka\.security\.ca_file"),
    ("expired-broker-cert", EXPIRED, lambda pw: mtls_security(),
     r"kafka: cannot verify the broker's TLS certificate at 127\.0\.0\.1:9096: certificate has "
     r"expired \(the broker shows an expired certificate\)"),
    ("wrong-host-broker-cert", WRONGHOST, lambda pw: mtls_security(),
     r"kafka: cannot verify the broker's TLS certificate at 127\.0\.0\.1:9097: IP address "
     r"mismatch, certificate is not valid for '127\.0\.0\.1'.* \(the certificate is not for "
     r"127\.0\.0\.1\)"),
    ("no-client-cert", MTLS, lambda pw: mtls_security(cert_file=None, key_file=None),
     r"kafka: the broker at 127\.0\.0\.1:9095 refused this client's TLS certificate: this "
     r"client sent no certificate and the broker requires one; check "
     r"kafka\.security\.cert_file/key_file"),
    ("foreign-client-cert", MTLS, lambda pw: mtls_security(
        cert_file=str(TLS / "other-client.pem"), key_file=str(TLS / "other-client.key")),
     r"kafka: the broker at 127\.0\.0\.1:9095 refused this client's TLS certificate: client "
     r"certificate .*other-client\.pem is not signed by a CA the broker trusts"),
]

# Python start-up and the Elasticsearch template check (~1-2 s), the refusals'
# SECURITY_GRACE_S (3 s), the certificate diagnosis and shutdown: measured 4.3-4.9 s.
EXIT_WITHIN_S = 10.0


@pytest.mark.parametrize("case,bootstrap,security,expected", NEGATIVE,
                         ids=[c[0] for c in NEGATIVE])
def test_refused_connection_ends_worker_with_one_line(
        setup_env: dict[str, Any], case: str, bootstrap: str,
        security: Callable[[str], dict[str, Any]], expected: str) -> None:
    env = setup_env
    cfg = config(env, f"{case}.yaml", bootstrap, security(env["password"]))
    assert envoygeo("setup", "-c", str(cfg), "--no-topics").returncode == 0
    log = env["tmp"] / "worker.log"
    started = time.monotonic()
    worker = start_worker(cfg, log)
    try:
        rc = worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    took = time.monotonic() - started
    CAPTURED.append(log.read_text())
    print(f"{case}: exit {rc} after {took:.2f}s")
    assert rc == 1
    assert took < EXIT_WITHIN_S, f"{case}: exited after {took:.1f}s"
    messages = log_messages(log)
    records = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    errors = [r["message"] for r in records if r["log.level"] in ("error", "critical")]
    warnings = [r["message"] for r in records if r["log.level"] == "warning"]
    assert len(errors) == 1, "\n".join(messages)
    assert not warnings, warnings
    assert re.match(expected, errors[0]), errors[0]
    # No retry storm in the log: librdkafka's repeated refusals are not logged as such.
    assert not [m for m in messages if "SSL handshake failed" in m and not m.startswith("kafka:")
                or "SASL authentication error" in m and not m.startswith("kafka:")], messages
    # check-config --connect says the same thing.
    check = envoygeo("check-config", "-c", str(cfg), "--connect")
    assert check.returncode == 3
    assert re.search(expected, " ".join(check.stdout.split())), check.stdout


def test_password_from_environment_and_setup_refusal(setup_env: dict[str, Any]) -> None:
    """ENVOYGEO_KAFKA__SECURITY__PASSWORD works; a wrong one makes `setup` say why."""
    env = setup_env
    security = sasl_security(password_file=None)
    cfg = config(env, "env.yaml", SASL_SSL, security)
    ok = envoygeo("setup", "-c", str(cfg),
                  env={"ENVOYGEO_KAFKA__SECURITY__PASSWORD": env["password"]})
    assert ok.returncode == 0, ok.stderr
    bad = envoygeo("setup", "-c", str(cfg),
                   env={"ENVOYGEO_KAFKA__SECURITY__PASSWORD": env["password"] + "x"})
    assert bad.returncode == 3
    assert bad.stderr.startswith("envoygeo setup: kafka: authentication failed at "
                                 "127.0.0.1:9094 (SCRAM-SHA-512, user envoygeo)"), bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr  # one line, no librdkafka repeats
    shown = envoygeo("check-config", "-c", str(cfg),
                     env={"ENVOYGEO_KAFKA__SECURITY__PASSWORD": env["password"]})
    assert shown.returncode == 0 and "password: '***'" in shown.stdout, shown.stdout


def test_a_restarting_broker_is_waited_for_not_a_refusal(setup_env: dict[str, Any]) -> None:
    """While the broker restarts the worker sees refused TCP connections, not refused
    handshakes or credentials: it waits, rejoins and goes on indexing.

    This broker is this module's own (no other test uses it), so restarting it is safe.
    """
    env = setup_env
    cfg = config(env, "restart.yaml", SASL_SSL, sasl_security())
    assert envoygeo("setup", "-c", str(cfg)).returncode == 0
    produce(INTERNAL, env["topic"], access_records(10))
    log = env["tmp"] / "worker.log"
    worker = start_worker(cfg, log)
    try:
        assert wait_for_count(env["es"], env["index"], 10, timeout_s=60, procs=[worker]) == 10
        service("kafka-secure", "stop")
        time.sleep(2)
        service("kafka-secure", "start")
        produce(INTERNAL, env["topic"], access_records(10, start=10))
        assert wait_for_count(env["es"], env["index"], 20, timeout_s=90, procs=[worker]) == 20
        assert wait_for_committed(INTERNAL, env["group"], env["topic"], 20, timeout_s=60) == 20
    finally:
        assert stop_worker(worker) == 0
        CAPTURED.append(log.read_text())
    assert not [m for m in log_messages(log) if m.startswith("kafka:")]


def test_the_password_appears_in_no_output(secure_kafka: str) -> None:
    """Runs last in this module: every captured output of the tests above."""
    assert len(CAPTURED) >= 10, "the tests above did not run"
    leaked = [text[:200] for text in CAPTURED if secure_kafka in text]
    assert not leaked
