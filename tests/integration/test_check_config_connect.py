"""`envoygeo check-config --connect` against the real local Kafka, Elasticsearch and Redis,
a Redis of our own that requires a password, and closed ports."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.cli import main
from pipeline.config import load_settings
from pipeline.setup import install_templates
from pipeline.sinks.elasticsearch import make_client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect(tmp_path: Path, config: str, timeout_s: float = 5) -> tuple[Result, dict[str, str]]:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    result = CliRunner().invoke(main, ["check-config", "-c", str(path), "--connect",
                                       "--timeout", str(timeout_s)])
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"kafka", "elasticsearch", "redis"}, result.output
    return result, lines


@pytest.fixture
def names(unique: Callable[[str], str]) -> dict[str, str]:
    return {"source": unique("cc-src"), "dead": unique("cc-dead"), "alerts": unique("cc-al"),
            "index": unique("cc-logs"), "alerts_index": unique("cc-alerts"),
            "group": unique("cc-group")}


def _config(names: dict[str, str], kafka: str, es: str, redis_url: str,
            librdkafka: str = "{}") -> str:
    return f"""
kafka:
  bootstrap_servers: {kafka}
  topics: [{names['source']}]
  dead_letter_topic: {names['dead']}
  alerts_topic: {names['alerts']}
  group_id: {names['group']}
  librdkafka: {librdkafka}
elasticsearch:
  hosts: [{es}]
  index: {names['index']}
  alerts_index: {names['alerts_index']}
rates:
  backend: redis
  redis_url: "{redis_url}"
"""


def test_connect_ok_then_missing_topics_and_templates(
        tmp_path: Path, names: dict[str, str], kafka_bootstrap: str, es_url: str,
        redis_url: str) -> None:
    config = _config(names, kafka_bootstrap, es_url, redis_url)
    # Nothing set up yet: both failures are reported, with what would fix them.
    result, lines = _connect(tmp_path, config)
    assert result.exit_code == 3
    assert lines["kafka"].split()[1] == "FAILED"
    assert f"missing topics {names['source']}, {names['dead']}, {names['alerts']}" \
        in lines["kafka"] and "envoygeo setup" in lines["kafka"]
    assert lines["elasticsearch"].split()[1] == "FAILED"
    assert f"no envoygeo index template covers {names['index']}, {names['alerts_index']}" \
        in lines["elasticsearch"]
    assert lines["redis"].split()[1] == "ok"

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topics = [names["source"], names["dead"], names["alerts"]]
    for future in admin.create_topics([NewTopic(t, 3, 1) for t in topics]).values():
        future.result(timeout=30)
    # Created is not yet visible: the broker's metadata cache catches up a moment later
    # (a clean-clone CI run saw check-config still miss all three).
    deadline = time.monotonic() + 30
    while not set(topics) <= set(admin.list_topics(timeout=5).topics) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    settings = load_settings(tmp_path / "config.yaml")
    with make_client(settings.elasticsearch) as es:
        install_templates(es, settings)
        try:
            result, lines = _connect(tmp_path, config)
        finally:
            es.indices.delete_index_template(name=names["index"])
            es.indices.delete_index_template(name=names["alerts_index"])
            admin.delete_topics(topics)
    assert result.exit_code == 0, result.output
    assert lines["kafka"].startswith("kafka          ok       ")
    assert f"topics {names['source']} (3 partitions)" in lines["kafka"]
    assert f"group {names['group']} coordinator answers" in lines["kafka"]
    assert lines["elasticsearch"].startswith("elasticsearch  ok       ")
    assert f"index templates cover {names['index']}, {names['alerts_index']}" \
        in lines["elasticsearch"]
    assert lines["redis"].startswith("redis          ok       ")


def _all_fail_in_time(tmp_path: Path, names: dict[str, str], port: int) -> dict[str, str]:
    """Every service at `port`, --timeout 2: all FAILED, exit 3, and soon."""
    config = _config(names, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}",
                     f"redis://127.0.0.1:{port}/0")
    start = time.monotonic()
    result, lines = _connect(tmp_path, config, timeout_s=2)
    elapsed = time.monotonic() - start
    assert result.exit_code == 3
    for service in ("kafka", "elasticsearch", "redis"):
        assert lines[service].split()[1] == "FAILED", lines[service]
    assert f"127.0.0.1:{port}" in lines["kafka"]
    # Probes run at once, each call bounded by --timeout: a bound, not a benchmark.
    assert elapsed < 20, elapsed
    return lines


def test_connect_closed_ports_fail_within_the_timeout(tmp_path: Path,
                                                      names: dict[str, str]) -> None:
    lines = _all_fail_in_time(tmp_path, names, _free_port())  # nothing listens there
    for service in ("kafka", "elasticsearch", "redis"):
        assert "connection refused" in lines[service].lower(), lines[service]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a hung service, the case a
    timeout exists for (a closed port fails at once)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield int(server.getsockname()[1])
    finally:
        server.close()


def test_connect_to_services_that_never_answer_is_bounded(
        tmp_path: Path, names: dict[str, str], silent_port: int) -> None:
    lines = _all_fail_in_time(tmp_path, names, silent_port)
    assert "no answer within 2 s" in lines["kafka"]
    for service in ("elasticsearch", "redis"):
        assert "timed out" in lines[service].lower() or "timeout" in lines[service].lower()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[int]:
    """A Redis of our own that refuses clients without the password."""
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", "right-pw", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_connect_uses_the_configured_credentials(
        tmp_path: Path, names: dict[str, str], kafka_bootstrap: str, es_url: str,
        password_redis: int) -> None:
    wrong = _config(names, kafka_bootstrap, es_url,
                    f"redis://:wrong-pw@127.0.0.1:{password_redis}/0",
                    # SASL against the plaintext listener: the settings are really used.
                    librdkafka="{security.protocol: SASL_PLAINTEXT, sasl.mechanism: PLAIN, "
                               "sasl.username: u, sasl.password: p}")
    result, lines = _connect(tmp_path, wrong, timeout_s=3)
    assert result.exit_code == 3
    assert lines["redis"].split()[1] == "FAILED"
    assert "wrong-pw" not in result.output and ":***@" in lines["redis"]
    assert "redis: authentication failed at redis://:***@127.0.0.1:" in lines["redis"]
    assert lines["kafka"].split()[1] == "FAILED"

    right = _config(names, kafka_bootstrap, es_url,
                    f"redis://:right-pw@127.0.0.1:{password_redis}/0")
    result, lines = _connect(tmp_path, right, timeout_s=3)
    assert lines["redis"].split()[1] == "ok", lines["redis"]
    assert "right-pw" not in result.output
