"""The worker, `setup`, `report` and `check-config --connect` against the real local
Elasticsearch behind a real TLS-terminating, authenticating HAProxy
(deploy/local/services/es-tls.sh): the repo CA in `elasticsearch.ca_certs`, basic auth
with the password from a file or the environment, an API key from a file. Each refusal
(an unknown CA, a wrong-host or expired certificate, a wrong password or key, no
credentials) ends each command at once with one line naming the cause and the key to
fix; `verify_certs: false` works only when said and is warned about. The password and
the API key appear in no output of any of it.

The plain node (:9200) is the independent view of what went through the proxy.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
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
    cli,
    free_port,
    produce,
    run_refused,
    start_worker,
    stop_worker,
    wait_for_committed,
    wait_for_count,
    write_config,
)

TLS = ROOT / ".local" / "tls"
STATE = ROOT / ".local" / "es-tls"
PROXY, WRONGHOST, EXPIRED = (f"https://127.0.0.1:{p}" for p in (9243, 9244, 9245))
USER = "envoygeo"

# Every output of this module, for the secret-leak check at the end.
CAPTURED: list[str] = []


@pytest.fixture(scope="module")
def proxy(es_url: str) -> dict[str, str]:
    """The proxy (started with `deploy/local/up es-tls` if it does not answer) and the
    credentials it checks."""
    ensure_service("es-tls", "127.0.0.1", 9243)
    return {"password": (STATE / "password").read_text().strip(),
            "api_key": (STATE / "api_key").read_text().strip()}


@pytest.fixture
def env(proxy: dict[str, str], es_url: str, kafka_bootstrap: str,
        unique: Callable[[str], str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    es = Elasticsearch(es_url, request_timeout=30)
    e = {"es": es, "es_url": es_url, "kafka": kafka_bootstrap, "topic": unique("est"),
         "index": unique("est-idx"), "group": unique("est-g"), "tmp": tmp_path, **proxy}
    yield e
    es.indices.delete(index=[e["index"], f"{e['index']}-alerts"], ignore_unavailable=True)
    for name in (e["index"], f"{e['index']}-alerts"):
        if es.indices.exists_index_template(name=name):
            es.indices.delete_index_template(name=name)
    es.close()


def basic(**overrides: Any) -> dict[str, Any]:
    return {"hosts": [PROXY], "ca_certs": str(TLS / "ca.pem"), "username": USER,
            "password_file": str(STATE / "password"), **overrides}


def api_key(**overrides: Any) -> dict[str, Any]:
    # localhost: the name in the certificate, as well as its IP address.
    return {"hosts": ["https://localhost:9243"], "ca_certs": str(TLS / "ca.pem"),
            "api_key_file": str(STATE / "api_key"), **overrides}


def config(e: dict[str, Any], name: str, es: dict[str, Any], **extra: Any) -> Path:
    return write_config(e["tmp"] / name, bootstrap=e["kafka"], es_url=PROXY, topic=e["topic"],
                        group=e["group"], index=e["index"], extra={"elasticsearch": es, **extra})


def envoygeo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli(*args, env=env, captured=CAPTURED)


def test_proxy_refuses_unauthenticated_requests(proxy: dict[str, str]) -> None:
    """The proxy really checks: no credentials -> 401 with WWW-Authenticate."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(PROXY, context=ctx, timeout=10)
    assert err.value.code == 401
    assert err.value.headers["WWW-Authenticate"] == 'Basic realm="elasticsearch"'
    key = urllib.request.Request(PROXY, headers={"Authorization": f"ApiKey {proxy['api_key']}"})
    with urllib.request.urlopen(key, context=ctx, timeout=10) as r:
        assert orjson.loads(r.read())["tagline"] == "You Know, for Search"


@pytest.mark.parametrize("auth", ["basic-file", "basic-env", "api-key-file"])
def test_setup_worker_report_and_check_config_through_the_proxy(
        env: dict[str, Any], auth: str) -> None:
    e = env
    es, extra_env = {
        "basic-file": (basic(), {}),
        "basic-env": (basic(password_file=None),
                      {"ENVOYGEO_ELASTICSEARCH__PASSWORD": e["password"]}),
        "api-key-file": (api_key(), {}),
    }[auth]
    metrics_port = free_port()
    cfg = config(e, "worker.yaml", es, metrics={"port": metrics_port, "progress_interval_s": 2})
    setup = envoygeo("setup", "-c", str(cfg), env=extra_env)
    assert setup.returncode == 0, setup.stderr
    assert f"installed index template {e['index']} -> {e['index']}*" in setup.stdout
    assert e["es"].indices.exists_index_template(name=e["index"])  # on the real node
    produce(e["kafka"], e["topic"], access_records(40))
    log = e["tmp"] / "worker.log"
    os.environ.update(extra_env)
    try:
        worker = start_worker(cfg, log)
    finally:
        for k in extra_env:
            os.environ.pop(k)
    try:
        assert wait_for_count(e["es"], e["index"], 40, timeout_s=90, procs=[worker]) == 40
        assert wait_for_committed(e["kafka"], e["group"], e["topic"], 40, timeout_s=60) == 40
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            CAPTURED.append(r.read().decode())
    finally:
        assert stop_worker(worker) == 0
        CAPTURED.append(log.read_text())
    check = envoygeo("check-config", "-c", str(cfg), "--connect", env=extra_env)
    assert re.search(r"^elasticsearch\s+ok\s+https://(127\.0\.0\.1|localhost):9243: cluster",
                     check.stdout, re.M), check.stdout
    assert check.returncode == 0, check.stdout
    html = e["tmp"] / "report.html"
    report = envoygeo("report", "-c", str(cfg), "--since", "30d", "-o", str(html), env=extra_env)
    assert report.returncode == 0, report.stderr
    assert f"wrote {html}: 40 requests" in report.stdout, report.stdout


# (case, elasticsearch settings, the one line, after "elasticsearch: ")
NEGATIVE: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    ("unknown-ca", lambda e: basic(ca_certs=str(TLS / "other-ca.pem")),
     r"TLS certificate verify failed at https://127\.0\.0\.1:9243 \(unable to get local issuer "
     r"certificate: the server's certificate is not signed by a CA in .*/other-ca\.pem\) - "
     r"check elasticsearch\.hosts / elasticsearch\.ca_certs"),
    ("system-store", lambda e: basic(ca_certs=None),
     r"TLS certificate verify failed at https://127\.0\.0\.1:9243 \(unable to get local issuer "
     r"certificate: the server's certificate is not signed by a CA in the system trust "
     r"store\) - check elasticsearch\.hosts / elasticsearch\.ca_certs"),
    ("wrong-host", lambda e: basic(hosts=[WRONGHOST]),
     r"TLS certificate verify failed at https://127\.0\.0\.1:9244 \(hostname mismatch: hostname "
     r"'127\.0\.0\.1' doesn't match 'not-this-host\.invalid'\) - check elasticsearch\.hosts / "
     r"elasticsearch\.ca_certs"),
    ("expired", lambda e: basic(hosts=[EXPIRED]),
     r"TLS certificate verify failed at https://127\.0\.0\.1:9245 \(certificate has expired: "
     r"the server shows an expired certificate\) - check elasticsearch\.hosts / "
     r"elasticsearch\.ca_certs"),
    ("wrong-password", lambda e: basic(password_file=None, password=e["password"] + "x"),
     r"authentication failed at https://127\.0\.0\.1:9243 \(HTTP 401, basic auth as user "
     r"envoygeo\) - check elasticsearch\.username / password / password_file"),
    ("wrong-api-key", lambda e: api_key(api_key_file=None, api_key=base64.b64encode(
        b"envoygeo:" + e["password"].encode()).decode()),
     r"authentication failed at https://localhost:9243 \(HTTP 401, API key\) - check "
     r"elasticsearch\.api_key / api_key_file"),
    ("no-credentials", lambda e: basic(username=None, password_file=None),
     r"authentication failed at https://127\.0\.0\.1:9243 \(HTTP 401, no credentials sent\) - "
     r"check elasticsearch\.api_key or username / password"),
]

# A refusal is the first answer: Python start-up and one request (measured ~1.5 s).
EXIT_WITHIN_S = 10.0


@pytest.mark.parametrize("case,es,expected", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_refusal_is_one_line_in_every_command(
        env: dict[str, Any], case: str, es: Callable[[dict[str, Any]], dict[str, Any]],
        expected: str) -> None:
    e = env
    cfg = config(e, f"{case}.yaml", es(e))
    run_refused(cfg, "elasticsearch: " + expected, EXIT_WITHIN_S, CAPTURED)
    setup = envoygeo("setup", "-c", str(cfg), "--no-topics")
    assert setup.returncode == 3
    assert re.fullmatch("envoygeo setup: elasticsearch: " + expected, setup.stderr.strip())
    report = envoygeo("report", "-c", str(cfg), "-o", str(e["tmp"] / "r.html"))
    assert report.returncode == 1
    assert re.fullmatch("error: elasticsearch: " + expected, report.stderr.strip()), \
        report.stderr
    check = envoygeo("check-config", "-c", str(cfg), "--connect", "--timeout", "3")
    assert check.returncode == 3
    line = next(x for x in check.stdout.splitlines() if x.startswith("elasticsearch"))
    assert re.fullmatch(r"elasticsearch\s+FAILED\s+elasticsearch: " + expected, line), line
    assert not e["es"].indices.exists_index_template(name=e["index"])  # nothing got through


def test_verify_certs_false_is_explicit_and_warned(env: dict[str, Any]) -> None:
    """The wrong-host proxy, accepted only with verify_certs: false; the worker says so
    at start, in its log, once (its DEBUG log: every request line, no credential)."""
    e = env
    cfg = config(e, "insecure.yaml", basic(hosts=[WRONGHOST], ca_certs=None,
                                           verify_certs=False))
    setup = envoygeo("setup", "-c", str(cfg))
    assert setup.returncode == 0, setup.stderr
    warning = ("elasticsearch.verify_certs is false: the certificates of "
               "https://127.0.0.1:9244 are not verified")
    assert warning in setup.stderr
    produce(e["kafka"], e["topic"], access_records(10))
    log = e["tmp"] / "insecure.log"
    # At DEBUG, the level where the HTTP clients log each request: the leak check at the
    # end reads this log too.
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "-c", str(cfg), "--log-level",
             "DEBUG"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "ENVOYGEO_KAFKA__GROUP_INSTANCE_ID": "insecure"})
    try:
        assert wait_for_count(e["es"], e["index"], 10, timeout_s=90, procs=[worker]) == 10
    finally:
        assert stop_worker(worker) == 0
        CAPTURED.append(log.read_text())
    records = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.startswith(b"{")]
    warned = [r for r in records if r["message"].startswith(warning)]
    assert len(warned) == 1 and warned[0]["log.level"] == "warning", records[:5]
    assert "InsecureRequestWarning" not in log.read_text()
    assert [r for r in records if r["log.level"] == "debug"
            and "127.0.0.1:9244" in r["message"]], "no request line at DEBUG"


def test_secret_files_are_checked_at_load(env: dict[str, Any]) -> None:
    e = env
    cfg = config(e, "missing.yaml", basic(password_file=str(e["tmp"] / "nope")))
    check = envoygeo("check-config", "-c", str(cfg))
    assert check.returncode == 2
    assert f"elasticsearch.password_file: cannot read {e['tmp'] / 'nope'}: No such file" \
        in check.stderr, check.stderr
    shown = envoygeo("check-config", "-c", str(config(e, "shown.yaml", basic(
        password_file=None, password=e["password"]))))
    assert shown.returncode == 0 and "password: '***'" in shown.stdout, shown.stdout


@pytest.mark.parametrize("case,kibana,expected", [
    # No Kibana runs here, so behind the proxy is Elasticsearch, which answers Kibana's
    # import API with 400: proof the TLS and the credentials (from a file) got through.
    ("accepted", {"url": PROXY, "password_file": str(STATE / "password")},
     r"error: saved objects import: HTTP 400 request failed"),
    ("api-key-file", {"url": PROXY, "username": None, "api_key_file": str(STATE / "api_key")},
     r"error: saved objects import: HTTP 400 request failed"),
    ("wrong-password", {"url": PROXY, "password": "wrong"},
     r"error: saved objects import: HTTP 401 authentication failed: check "
     r"kibana\.api_key/api_key_file or kibana\.username/password/password_file .*"),
    ("unknown-ca", {"url": PROXY, "ca_certs": str(TLS / "other-ca.pem"),
                    "password_file": str(STATE / "password")},
     r"error: saved objects import: TLS certificate verify failed at https://127\.0\.0\.1:9243 "
     r"\(unable to get local issuer certificate: the server's certificate is not signed by a "
     r"CA in .*/other-ca\.pem\) - check kibana\.url / kibana\.ca_certs"),
    ("wrong-host", {"url": WRONGHOST, "password_file": str(STATE / "password")},
     r"error: saved objects import: TLS certificate verify failed at https://127\.0\.0\.1:9244 "
     r"\(hostname mismatch: .*\) - check kibana\.url / kibana\.ca_certs"),
    ("expired", {"url": EXPIRED, "password_file": str(STATE / "password")},
     r"error: saved objects import: TLS certificate verify failed at https://127\.0\.0\.1:9245 "
     r"\(certificate has expired: the server shows an expired certificate\) - check "
     r"kibana\.url / kibana\.ca_certs"),
])
def test_dashboards_import_tls_and_credentials(env: dict[str, Any], case: str,
                                               kibana: dict[str, Any], expected: str) -> None:
    """`dashboards import -c` talks to Kibana, which is not available here: what is real
    is the TLS verification and the credentials against the proxy."""
    e = env
    section = {"ca_certs": str(TLS / "ca.pem"), "username": USER, **kibana}
    cfg = config(e, f"kibana-{case}.yaml", basic(), kibana=section)
    result = envoygeo("dashboards", "import", "-c", str(cfg), "--no-rule")
    assert result.returncode == 1
    assert re.fullmatch(expected, result.stderr.strip()), result.stderr


@pytest.fixture
def own_proxy(es_url: str, tmp_path: Path) -> Iterator[tuple[str, Path, Callable[[], None]]]:
    """A second proxy instance of the same script, this test's own: (URL, its password
    file, restart-with-a-new-password)."""
    import random
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    base = next(p for p in (random.randrange(20000, 30000) for _ in range(50))
                if all(free(p + i) for i in range(3)))
    state = tmp_path / "proxy"
    script = ["bash", str(ROOT / "deploy" / "local" / "services" / "es-tls.sh")]
    proxy_env = {**os.environ, "ES_TLS_PORT": str(base), "ES_TLS_STATE": str(state)}

    def run(action: str) -> None:
        subprocess.run([*script, action], env=proxy_env, check=True, capture_output=True,
                       timeout=60)

    def rotate() -> None:
        run("stop")
        (state / "password").unlink()
        run("start")

    run("start")
    try:
        yield f"https://127.0.0.1:{base}", state / "password", rotate
    finally:
        run("stop")


def test_credentials_refused_while_running_end_the_worker_with_one_line(
        env: dict[str, Any], own_proxy: tuple[str, Path, Callable[[], None]]) -> None:
    """The password changes on the server while the worker runs (its file is read at
    start): the next bulk request gets 401, and the worker exits 1 with the one line,
    committing nothing after what was indexed."""
    e = env
    url, password_file, rotate = own_proxy
    CAPTURED_PASSWORDS.append(password_file.read_text().strip())
    cfg = config(e, "rotate.yaml", basic(hosts=[url], password_file=str(password_file)))
    assert envoygeo("setup", "-c", str(cfg)).returncode == 0
    produce(e["kafka"], e["topic"], access_records(20))
    log = e["tmp"] / "rotate.log"
    worker = start_worker(cfg, log)
    try:
        assert wait_for_count(e["es"], e["index"], 20, timeout_s=90, procs=[worker]) == 20
        assert wait_for_committed(e["kafka"], e["group"], e["topic"], 20, timeout_s=60) == 20
        rotate()
        CAPTURED_PASSWORDS.append(password_file.read_text().strip())
        produce(e["kafka"], e["topic"], access_records(10, start=20))
        rc = worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
        CAPTURED.append(log.read_text())
    assert rc == 1
    records = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.startswith(b"{")]
    errors = [r["message"] for r in records if r["log.level"] in ("error", "critical")]
    assert errors == [
        f"elasticsearch: authentication failed at {url} (HTTP 401, basic auth as user "
        "envoygeo) - check elasticsearch.username / password / password_file; not "
        "committing this batch or anything after it"], errors
    assert "Traceback" not in log.read_text()
    assert wait_for_committed(e["kafka"], e["group"], e["topic"], 20, timeout_s=10) == 20


# The passwords of the tests' own proxies, for the leak check.
CAPTURED_PASSWORDS: list[str] = []


def test_the_secrets_appear_in_no_output(proxy: dict[str, str]) -> None:
    """Runs last in this module: every captured output of the tests above."""
    assert len(CAPTURED) >= 30, "the tests above did not run"
    key_secret = base64.b64decode(proxy["api_key"]).decode().split(":", 1)[1]
    for secret in (proxy["password"], proxy["api_key"], key_secret, *CAPTURED_PASSWORDS):
        assert not [text[:200] for text in CAPTURED if secret in text]
