"""`envoygeo report` connects the way the configuration says: a private CA
(`elasticsearch.ca_certs`), basic auth or an API key, from the file or from
ENVOYGEO_ELASTICSEARCH__* variables.

The server is a small HTTPS stand-in that records each request's Authorization header
and answers like an Elasticsearch with no matching index: the local node runs without
TLS or security, so it cannot show which credentials and CA a client used.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import main


@pytest.fixture
def tls_es(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    auth: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            auth.append(self.headers.get("Authorization", ""))
            path = self.path.split("?")[0]
            body: Any = {}
            if path.endswith("/_search"):
                body = {"hits": {"total": {"value": 0, "relation": "eq"}, "hits": []}}
            elif path.endswith("/_field_caps"):
                body = {"indices": [], "fields": {}}
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Elastic-Product", "Elasticsearch")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", cert, auth
    httpd.shutdown()
    httpd.server_close()


def _report(tmp_path: Path, config: str, env: dict[str, str] | None = None) -> Any:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config)
    return CliRunner().invoke(main, ["report", "-c", str(cfg), "-o", str(tmp_path / "r.html")],
                              env={"ENVOYGEO_ES_URL": None, **(env or {})})


def test_ca_and_basic_auth_from_the_config_file(tls_es: tuple[str, Path, list[str]],
                                                tmp_path: Path) -> None:
    url, ca, auth = tls_es
    result = _report(tmp_path, f"elasticsearch:\n  hosts: [{url}]\n  ca_certs: {ca}\n"
                               "  username: reporter\n  password: s3cret\n  index: web\n")
    assert result.exit_code == 0, result.output
    assert "no index matches 'web*'" in result.stderr  # the stand-in has no index
    expected = "Basic " + base64.b64encode(b"reporter:s3cret").decode()
    assert auth and set(auth) == {expected}


def test_api_key_from_the_environment(tls_es: tuple[str, Path, list[str]],
                                      tmp_path: Path) -> None:
    url, ca, auth = tls_es
    result = _report(tmp_path, f"elasticsearch:\n  hosts: [{url}]\n  ca_certs: {ca}\n",
                     env={"ENVOYGEO_ELASTICSEARCH__API_KEY": "a2V5OnNlY3JldA=="})
    assert result.exit_code == 0, result.output
    assert auth and set(auth) == {"ApiKey a2V5OnNlY3JldA=="}


def test_without_the_ca_the_certificate_is_refused(tls_es: tuple[str, Path, list[str]],
                                                   tmp_path: Path) -> None:
    url, _, auth = tls_es
    result = _report(tmp_path, f"elasticsearch:\n  hosts: [{url}]\n")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: elasticsearch: TLS certificate verify failed at {url} (self-signed "
        "certificate: the server's certificate is not signed by a CA in the system trust "
        "store) - check elasticsearch.hosts / elasticsearch.ca_certs")
    assert auth == []
