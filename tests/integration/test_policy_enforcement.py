"""Closing the loop for real: flood through HAProxy (PROXY v2) -> Envoy 1.40, the worker
raises the rate alert from Envoy's own access log, `envoygeo policy --once` writes the
RBAC file Envoy loads through ECDS, and Envoy answers that client 403 (others 200)
without a restart, until the deny expires.

Also proven here: the RBAC `remote_ip` principal matches the PROXY-protocol client,
not HAProxy (the physical peer) and not a client-sent X-Forwarded-For; the audit index
holds each change with the alert id; the alerts topic gives the same decision as the
alerts index.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from string import Template

import pytest
import yaml
from elasticsearch import Elasticsearch

from pipeline.decode.presets import ISTIO_DEFAULT
from pipeline.lab.stack import (
    CLIENT_HEADER,
    envoy_binary,
    free_port,
    haproxy_binary,
    haproxy_config,
    stop_process,
    wait_port,
)
from tests.integration.harness import (
    ROOT,
    fluent_bit_record,
    produce,
    setup_worker_env,
    start_worker,
    stop_worker,
    write_config,
)

pytestmark = pytest.mark.integration

FLOODER = "198.51.100.7"
OTHER = "203.0.113.9"
THRESHOLD = 30
EXPIRE_S = 30
FILTER = "envoygeo-rbac"


@dataclass
class Gateway:
    port: int  # HAProxy frontend, PROXY v2 to Envoy
    admin: int
    log: Path
    rbac: Path


SHIPPED = ROOT / "deploy" / "local" / "envoy" / "rbac-gateway.yaml"


def _envoy_config(listen: int, admin: int, rbac: Path, log: Path) -> str:
    """The shipped example, as a user fills it in (its format is Istio's default)."""
    text = Template(SHIPPED.read_text()).substitute(
        LISTEN_PORT=listen, ADMIN_PORT=admin, RBAC_FILE=rbac, ACCESS_LOG=log)
    hcm = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    fmt = hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]
    assert fmt["inline_string"] == ISTIO_DEFAULT
    assert hcm["http_filters"][0]["name"] == FILTER
    return text


def _policy(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "policy", "-c", str(config),
                           "--once", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy")


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    tag = f"{int(time.time() * 1000) % 10**9}"
    return {"topic": f"it-policy-{tag}", "index": f"it-policy-{tag}",
            "audit": f"it-policy-{tag}-audit"}


@pytest.fixture(scope="module")
def config(workdir: Path, names: dict[str, str], kafka_bootstrap: str, es_url: str) -> Path:
    (workdir / "allow.txt").write_text("# office\n192.0.2.0/24\n")
    return write_config(
        workdir / "config.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
        topic=names["topic"], group=names["topic"], index=names["index"],
        extra={"rates": {"windows": [10, 60], "alerts": [
                   {"name": "flood", "window_s": 10, "threshold": THRESHOLD}]},
               "policy": {"envoy_rbac_file": str(workdir / "rbac" / "rbac.json"),
                          "istio_file": str(workdir / "authz.yaml"),
                          "allow_files": [str(workdir / "allow.txt")],
                          "expire_after_s": EXPIRE_S, "audit_index": names["audit"]}})


@pytest.fixture(scope="module")
def gateway(workdir: Path, config: Path) -> Iterator[Gateway]:
    # The first round (no alerts yet) writes the empty RBAC file Envoy starts from.
    first = _policy(config)
    assert first.returncode == 0, first.stderr
    assert "0 denied" in first.stderr, first.stderr
    rbac = workdir / "rbac" / "rbac.json"
    listen, admin, front = free_port(), free_port(), free_port()
    log = workdir / "access.log"
    (workdir / "envoy.yaml").write_text(_envoy_config(listen, admin, rbac, log))
    # The lab's HAProxy: its v2 frontend sends PROXY v2 with the address a request
    # names in CLIENT_HEADER (its v1 frontend is not used here).
    (workdir / "haproxy.cfg").write_text(haproxy_config(free_port(), front, listen))
    envoy = subprocess.Popen([envoy_binary(), "-c", str(workdir / "envoy.yaml"),
                              "--base-id", str(admin), "--concurrency", "1", "-l", "warning"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    haproxy = None
    try:
        wait_port(listen, envoy, "envoy")
        haproxy = subprocess.Popen([haproxy_binary(), "-db", "-f", str(workdir / "haproxy.cfg")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_port(front, haproxy, "haproxy")
        yield Gateway(front, admin, log, rbac)
    finally:
        for proc in (haproxy, envoy):
            if proc is not None:
                stop_process(proc)


def _status(gw: Gateway, client: str, xff: str | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        headers = {CLIENT_HEADER: client, "user-agent": "envoygeo-it/1.0"}
        if xff:
            headers["x-forwarded-for"] = xff
        conn.request("GET", "/items", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _envoy_stat(gw: Gateway, name: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", gw.admin, timeout=5)
    try:
        conn.request("GET", f"/stats?filter=^{name}$")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    return body.partition(": ")[2].strip().strip('"')


def test_flood_alert_policy_403_then_expiry(gateway: Gateway, config: Path,
                                            names: dict[str, str], kafka_bootstrap: str,
                                            es_client: Elasticsearch, workdir: Path) -> None:
    gw = gateway
    ecds = f"extension_config_discovery.http_filter.{FILTER}"
    assert _envoy_stat(gw, f"{ecds}.update_success") == "1"
    # The worker is up (partitions assigned) before the flood, so the time from the
    # flood to the alert is the pipeline's, not the worker's start-up: the deny's expiry
    # runs from the alert's event time.
    setup_worker_env(config)
    worker = start_worker(config, workdir / "worker.log")
    alerts = f"{names['index']}-alerts"
    try:
        _eventually(lambda: '"message":"assigned ' in (workdir / "worker.log").read_text(), 120,
                    "the worker's partitions to be assigned")
        # 1. Everybody gets through; the flooder crosses the threshold.
        assert _status(gw, OTHER) == 200
        for _ in range(THRESHOLD + 10):
            assert _status(gw, FLOODER) == 200
        want = THRESHOLD + 11

        def logged() -> list[str]:
            return gw.log.read_text().splitlines() if gw.log.exists() else []

        _eventually(lambda: len(logged()) >= want, 20, f"{want} lines in Envoy's access log")
        lines = logged()
        assert sum(FLOODER in line for line in lines) == THRESHOLD + 10
        # 2. Ship Envoy's lines as Fluent Bit does; the real worker raises the alert.
        produce(kafka_bootstrap, names["topic"], [fluent_bit_record(line, time.time())
                                                   for line in lines])

        def alerted() -> bool:
            if not es_client.indices.exists(index=alerts):
                return False
            es_client.indices.refresh(index=alerts)
            return es_client.count(index=alerts)["count"] > 0
        _eventually(alerted, 60, "the worker's alert in " + alerts)
    finally:
        assert stop_worker(worker) == 0, (workdir / "worker.log").read_text()[-3000:]
    hits = es_client.search(index=alerts)["hits"]["hits"]
    assert [h["_source"]["source"]["ip"] for h in hits] == [FLOODER]
    alert_id = hits[0]["_id"]
    alert_ts = datetime.fromisoformat(
        hits[0]["_source"]["@timestamp"].replace("Z", "+00:00")).timestamp()
    assert time.time() < alert_ts + EXPIRE_S - 8, "too slow: the deny would expire at once"

    # 3. Dry run: the diff names the flooder, nothing is written.
    before = gw.rbac.read_text()
    dry = _policy(config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f'"address_prefix": "{FLOODER}"' in dry.stdout and "+" in dry.stdout
    assert f"added {FLOODER}/32" in dry.stderr
    assert gw.rbac.read_text() == before

    # The alerts topic gives the same decision as the alerts index.
    env_kafka = {**os.environ, "ENVOYGEO_POLICY__SOURCE": "kafka"}
    kdry = subprocess.run([sys.executable, "-m", "pipeline.cli", "policy", "-c", str(config),
                           "--once", "--dry-run"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env_kafka)
    assert kdry.returncode == 0, kdry.stderr
    assert kdry.stdout == dry.stdout

    # 4. The real round: Envoy reloads the file and denies the flooder only.
    real = _policy(config)
    assert real.returncode == 0, real.stderr
    assert f"added {FLOODER}/32" in real.stderr and alert_id in real.stderr
    _eventually(lambda: _envoy_stat(gw, f"{ecds}.update_success") == "2", 10,
                "Envoy to load the new RBAC file")
    assert _status(gw, FLOODER) == 403
    assert _status(gw, OTHER) == 200
    # remote_ip is the PROXY client: a forged X-Forwarded-For neither frees the flooder
    # nor gets an innocent client denied; HAProxy (127.0.0.1, the physical peer) is
    # not denied either, or every client would be.
    assert _status(gw, FLOODER, xff=OTHER) == 403
    assert _status(gw, OTHER, xff=FLOODER) == 200
    assert _status(gw, "192.0.2.10") == 200
    rbac = json.loads(gw.rbac.read_text())
    assert rbac["version_info"] == _envoy_stat(gw, f"{ecds}.version_text")
    istio = list(yaml.safe_load_all((workdir / "authz.yaml").read_text()))
    assert istio[0]["spec"]["rules"][0]["from"][0]["source"] == {
        "remoteIpBlocks": [f"{FLOODER}/32"], "notRemoteIpBlocks": ["192.0.2.0/24"]}
    es_client.indices.refresh(index=names["audit"])
    audit = es_client.search(index=names["audit"], sort=[{"@timestamp": "asc"}])["hits"]["hits"]
    added = [h["_source"] for h in audit]
    assert len(added) == 1 and added[0]["envoygeo"]["policy"]["change"] == "added"
    assert added[0]["envoygeo"]["policy"]["alert_ids"] == [alert_id]
    assert added[0]["related"]["ip"] == [FLOODER] and added[0]["user"]["name"]

    # A second round with nothing new changes nothing: no reload, no audit record.
    again = _policy(config)
    assert again.returncode == 0 and "0 added, 0 removed, 0 extended" in again.stderr
    assert _envoy_stat(gw, f"{ecds}.update_success") == "2"

    # 5. After expiry the flooder is released.
    time.sleep(max(0.0, alert_ts + EXPIRE_S + 0.5 - time.time()))
    late = _policy(config)
    assert late.returncode == 0, late.stderr
    assert f"removed {FLOODER}/32: expired" in late.stderr
    _eventually(lambda: _envoy_stat(gw, f"{ecds}.update_success") == "3", 10,
                "Envoy to load the released RBAC file")
    assert _status(gw, FLOODER) == 200
    es_client.indices.refresh(index=names["audit"])
    changes = [h["_source"]["envoygeo"]["policy"] for h in es_client.search(
        index=names["audit"], sort=[{"@timestamp": "asc"}])["hits"]["hits"]]
    assert [(c["change"], c["reason"]) for c in changes] == [
        ("added", changes[0]["reason"]), ("removed", "expired")]
    for index in (names["index"], alerts, names["audit"]):
        es_client.indices.delete(index=index, ignore_unavailable=True)


def test_loop_runs_rounds_until_sigterm(tmp_path: Path, es_url: str, kafka_bootstrap: str,
                                        es_client: Elasticsearch) -> None:
    """Without --once: a round every --interval, hot-reading the deny list, and a
    clean exit 0 on SIGTERM (as in a Kubernetes pod)."""
    deny = tmp_path / "deny.txt"
    deny.write_text("")
    tag = f"it-policy-loop-{int(time.time() * 1000) % 10**9}"
    config = write_config(tmp_path / "c.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                          topic=tag, group=tag, index=tag,
                          extra={"policy": {"istio_file": str(tmp_path / "authz.yaml"),
                                            "deny_files": [str(deny)], "audit_index": tag}})
    log = tmp_path / "policy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "policy", "-c",
                                 str(config), "--interval", "0.5"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        _eventually(lambda: "0 denied" in log.read_text(), 30, "the first round")
        deny.write_text("198.51.100.0/24  # added while running\n")
        _eventually(lambda: "added 198.51.100.0/24: in the deny list" in log.read_text(), 30,
                    "a later round to pick up the edited deny list")
        assert "198.51.100.0/24" in (tmp_path / "authz.yaml").read_text()
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text()
    es_client.indices.delete(index=tag, ignore_unavailable=True)
