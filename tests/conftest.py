"""Shared fixtures.

Tests under tests/unit are marked `unit`, tests under tests/integration `integration`
(by directory, so a new file cannot forget its marker). Integration fixtures reuse
services that already answer and otherwise start them through deploy/local/up, the
same script a person uses, so the tests prove the repo's own set-up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

KAFKA_BOOTSTRAP = os.environ.get("ENVOYGEO_TEST_KAFKA", "127.0.0.1:9092")
ES_URL = os.environ.get("ENVOYGEO_TEST_ES", "http://127.0.0.1:9200")
REDIS_URL = os.environ.get("ENVOYGEO_TEST_REDIS", "redis://127.0.0.1:6379/0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ensure_service(name: str, host: str, port: int) -> None:
    """Start `name` with deploy/local/up unless something already listens on its port."""
    if _port_open(host, port):
        return
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "local" / "up"), name],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"deploy/local/up {name} failed:\n{proc.stdout}\n{proc.stderr}")


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    hostport = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return (host or hostport, int(port) if port else default_port)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    ensure_service("kafka", *_host_port(KAFKA_BOOTSTRAP, 9092))
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def es_url() -> str:
    ensure_service("elasticsearch", *_host_port(ES_URL, 9200))
    return ES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    ensure_service("redis", *_host_port(REDIS_URL, 6379))
    return REDIS_URL


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names for topics, indices and key prefixes that no other test (or run) uses."""
    token = uuid.uuid4().hex[:10]

    def make(prefix: str) -> str:
        return f"{prefix}-{token}"

    return make


@pytest.fixture
def es_client(es_url: str) -> Iterator[object]:
    from elasticsearch import Elasticsearch

    client = Elasticsearch(es_url, request_timeout=30)
    yield client
    client.close()
