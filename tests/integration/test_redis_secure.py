"""The worker's shared rate backend against a real secured Redis
(deploy/local/services/redis-secure.sh: redis-server 7, TLS only, ACL user envoygeo,
the default user off): `rediss://envoygeo@...` with `rates.redis_password_file` and
`rates.redis_ca_file`, or the password in the URL. A wrong password, an untrusted CA or
a plaintext URL ends `run` before it joins Kafka, with one line naming the cause and
the key to fix; `check-config --connect` says the same. The password appears in no
output of any of it.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from elasticsearch import Elasticsearch

from tests.conftest import ensure_service
from tests.integration.harness import (
    ROOT,
    access_records,
    cli,
    produce,
    run_refused,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_committed,
    wait_for_count,
    write_config,
)

TLS = ROOT / ".local" / "tls"
STATE = ROOT / ".local" / "redis-secure"
PORT = 6380
URL = f"rediss://envoygeo@127.0.0.1:{PORT}/0"

CAPTURED: list[str] = []


@pytest.fixture(scope="module")
def password() -> str:
    """The secured Redis (started with `deploy/local/up redis-secure` if it does not
    answer) and its ACL user's password."""
    ensure_service("redis-secure", "127.0.0.1", PORT)
    return (STATE / "password").read_text().strip()


@pytest.fixture
def env(password: str, es_url: str, kafka_bootstrap: str, unique: Callable[[str], str],
        tmp_path: Path) -> Iterator[dict[str, Any]]:
    es = Elasticsearch(es_url, request_timeout=30)
    client = redis.Redis.from_url(f"rediss://envoygeo:{password}@127.0.0.1:{PORT}/0",
                                  ssl_ca_certs=str(TLS / "ca.pem"))
    e = {"es": es, "es_url": es_url, "kafka": kafka_bootstrap, "topic": unique("rst"),
         "index": unique("rst-idx"), "group": unique("rst-g"), "prefix": unique("envoygeo-t"),
         "tmp": tmp_path, "password": password, "redis": client}
    yield e
    keys = list(client.scan_iter(match=f"{e['prefix']}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    es.indices.delete(index=[e["index"], f"{e['index']}-alerts"], ignore_unavailable=True)
    for name in (e["index"], f"{e['index']}-alerts"):
        if es.indices.exists_index_template(name=name):
            es.indices.delete_index_template(name=name)
    es.close()


def rates(e: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": URL, "key_prefix": e["prefix"],
            "redis_password_file": str(STATE / "password"),
            "redis_ca_file": str(TLS / "ca.pem"), **overrides}


def config(e: dict[str, Any], name: str, rates_section: dict[str, Any]) -> Path:
    return write_config(e["tmp"] / name, bootstrap=e["kafka"], es_url=e["es_url"],
                        topic=e["topic"], group=e["group"], index=e["index"],
                        extra={"rates": rates_section})


def envoygeo(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, captured=CAPTURED)


def test_worker_counts_rates_in_the_secured_redis(env: dict[str, Any]) -> None:
    e = env
    cfg = config(e, "worker.yaml", rates(e))
    setup_worker_env(cfg)
    produce(e["kafka"], e["topic"], access_records(30))
    log = e["tmp"] / "worker.log"
    worker = start_worker(cfg, log)
    try:
        assert wait_for_count(e["es"], e["index"], 30, timeout_s=90, procs=[worker]) == 30
    finally:
        assert stop_worker(worker) == 0
        CAPTURED.append(log.read_text())
    # The counts came from the secured Redis: its keys under the prefix, and the
    # documents' envoygeo.rate (one client, 30 requests within a minute).
    assert list(e["redis"].scan_iter(match=f"{e['prefix']}:r:*"))
    e["es"].indices.refresh(index=e["index"])
    hits = e["es"].search(index=e["index"], size=1, sort=[{"envoygeo.rate.60s": "desc"}],
                          query={"match_all": {}})["hits"]["hits"]
    assert hits[0]["_source"]["envoygeo"]["rate"]["60s"] == 30
    check = envoygeo("check-config", "-c", str(cfg), "--connect")
    line = next(x for x in check.stdout.splitlines() if x.startswith("redis"))
    assert re.fullmatch(rf"redis\s+ok\s+{re.escape(URL)}: redis 7\.\S+", line), line


def test_user_deleted_while_running_ends_the_worker_with_one_line(env: dict[str, Any]) -> None:
    """The worker's ACL user is deleted while it runs (Redis closes its connections): the
    next batch cannot count, and the worker exits 1 with one line instead of a
    traceback, committing nothing after what was indexed."""
    e = env
    user, secret = e["prefix"], f"pw-{e['prefix']}"
    e["redis"].acl_setuser(user, enabled=True, passwords=[f"+{secret}"],
                           keys=["envoygeo*"], commands=["+@all"])
    try:
        url = f"rediss://{user}:{secret}@127.0.0.1:{PORT}/0"
        cfg = config(e, "deleted.yaml", rates(e, redis_url=url, redis_password_file=None))
        setup_worker_env(cfg)
        produce(e["kafka"], e["topic"], access_records(20))
        log = e["tmp"] / "deleted.log"
        worker = start_worker(cfg, log)
        try:
            assert wait_for_count(e["es"], e["index"], 20, timeout_s=90, procs=[worker]) == 20
            assert wait_for_committed(e["kafka"], e["group"], e["topic"], 20,
                                      timeout_s=60) == 20
            e["redis"].acl_deluser(user)
            produce(e["kafka"], e["topic"], access_records(10, start=20))
            rc = worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
            CAPTURED.append(log.read_text())
    finally:
        e["redis"].acl_deluser(user)
    assert secret not in "".join(CAPTURED)
    assert rc == 1
    records = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.startswith(b"{")]
    errors = [r["message"] for r in records if r["log.level"] in ("error", "critical")]
    assert len(errors) == 1, errors
    assert re.fullmatch(
        rf"redis: (authentication failed|cannot use) at rediss://{user}:\*\*\*@127\.0\.0\.1:"
        rf"{PORT}/0.*; stopping \(records after the last committed offset are read again at "
        r"the next start\)", errors[0]), errors[0]
    assert "Traceback" not in log.read_text()
    assert wait_for_committed(e["kafka"], e["group"], e["topic"], 20, timeout_s=10) == 20


def test_password_in_the_url(env: dict[str, Any]) -> None:
    e = env
    url = f"rediss://envoygeo:{e['password']}@127.0.0.1:{PORT}/0"
    cfg = config(e, "url.yaml", rates(e, redis_url=url, redis_password_file=None))
    check = envoygeo("check-config", "-c", str(cfg), "--connect")
    line = next(x for x in check.stdout.splitlines() if x.startswith("redis"))
    assert re.fullmatch(rf"redis\s+ok\s+rediss://envoygeo:\*\*\*@127\.0\.0\.1:{PORT}/0: "
                        r"redis 7\.\S+", line), line
    shown = envoygeo("check-config", "-c", str(cfg))
    assert f"redis_url: rediss://envoygeo:***@127.0.0.1:{PORT}/0" in shown.stdout


WHERE = re.escape(URL)
NEGATIVE: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    ("wrong-password", lambda e: rates(
        e, redis_password_file=None,
        redis_url=f"rediss://envoygeo:{e['password']}x@127.0.0.1:{PORT}/0"),
     rf"redis: authentication failed at rediss://envoygeo:\*\*\*@127\.0\.0\.1:{PORT}/0 "
     r"\(invalid username-password pair or user is disabled\) - check the user in "
     r"rates\.redis_url and its password \(in the URL or rates\.redis_password_file\)"),
    ("no-password", lambda e: rates(e, redis_password_file=None),
     rf"redis: authentication failed at {WHERE} \(invalid username-password pair or user is "
     r"disabled\) - check the user in rates\.redis_url and its password \(in the URL or "
     r"rates\.redis_password_file\)"),
    ("unknown-ca", lambda e: rates(e, redis_ca_file=str(TLS / "other-ca.pem")),
     rf"redis: TLS certificate verify failed at {WHERE} \(self-signed certificate in "
     r"certificate chain: the server's certificate is not signed by a CA in "
     r".*/other-ca\.pem\) - check rates\.redis_url's host / rates\.redis_ca_file"),
    ("system-store", lambda e: rates(e, redis_ca_file=None),
     rf"redis: TLS certificate verify failed at {WHERE} \(self-signed certificate in "
     r"certificate chain: the server's certificate is not signed by a CA in the system "
     r"trust store\) - check rates\.redis_url's host / rates\.redis_ca_file"),
    ("plaintext-url", lambda e: rates(e, redis_ca_file=None,
                                      redis_url=f"redis://envoygeo@127.0.0.1:{PORT}/0"),
     rf"redis: cannot use redis://envoygeo@127\.0\.0\.1:{PORT}/0: ConnectionError: .* \(a TLS "
     r"port\? then rediss://\)"),
]

EXIT_WITHIN_S = 10.0


@pytest.mark.parametrize("case,section,expected", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_refusal_ends_run_with_one_line(env: dict[str, Any], case: str,
                                        section: Callable[[dict[str, Any]], dict[str, Any]],
                                        expected: str) -> None:
    e = env
    cfg = config(e, f"{case}.yaml", section(e))
    setup_worker_env(cfg)
    run_refused(cfg, expected, EXIT_WITHIN_S, CAPTURED)
    check = envoygeo("check-config", "-c", str(cfg), "--connect", "--timeout", "3")
    assert check.returncode == 3
    line = next(x for x in check.stdout.splitlines() if x.startswith("redis"))
    assert re.fullmatch(r"redis\s+FAILED\s+" + expected, line), line


def test_password_file_and_url_password_together_are_refused(env: dict[str, Any]) -> None:
    e = env
    cfg = config(e, "both.yaml", rates(e, redis_url=f"rediss://envoygeo:{e['password']}"
                                                    f"@127.0.0.1:{PORT}/0"))
    check = envoygeo("check-config", "-c", str(cfg))
    assert check.returncode == 2
    assert "rates: set the password in redis_url or redis_password_file, not both" \
        in check.stderr, check.stderr


def test_the_password_appears_in_no_output(password: str) -> None:
    assert len(CAPTURED) >= 12, "the tests above did not run"
    assert not [text[:200] for text in CAPTURED if password in text]
