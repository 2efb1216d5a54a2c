"""`envoygeo dashboards import` against a local HTTP server standing in for Kibana/OSD.

The server records each request and answers like the real APIs; the tests assert the
exact request shape the import API needs (method, path, overwrite=true, XSRF header,
multipart body with a `file` part named *.ndjson) and the rule create/update calls.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.dashboards import files, kibana


@dataclass
class Seen:
    method: str
    path: str
    headers: Message  # case-insensitive, as HTTP headers are
    body: bytes


@dataclass
class FakeServer:
    url: str
    seen: list[Seen] = field(default_factory=list)
    # (method, path without query) -> (status, JSON body); default handled below
    replies: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)


def _import_ok(ndjson: bytes) -> dict[str, Any]:
    objs = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
    return {"success": True, "successCount": len(objs), "successResults": [
        {"type": o["type"], "id": o["id"], "meta": {"title": o["attributes"].get("title")}}
        for o in objs]}


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            fake.seen.append(Seen(self.command, self.path, self.headers, body))
            status, payload = fake.replies.get((self.command, self.path.split("?")[0]),
                                               (200, None))
            if payload is None and "_import" in self.path:
                payload = _import_ok(_file_part(self.headers["Content-Type"], body)[1])
            raw = json.dumps(payload or {"id": "x"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_POST = do_PUT = do_GET = _reply

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()


def _file_part(content_type: str, body: bytes) -> tuple[Any, bytes]:
    """Parse multipart/form-data with the stdlib email parser; returns (part, content)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    (part,) = list(msg.iter_parts())
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    return part, content


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["dashboards", "import", *args], env=env or {})


def test_kibana_import_request_and_rule_creation(server: FakeServer) -> None:
    result = _run("--kibana", server.url, "--space", "ops", "--api-key", "c2VjcmV0",
                  "--threshold", "900", "--window", "5m", "--term-size", "50")
    assert result.exit_code == 0, result.output
    imp, rule = server.seen
    assert imp.method == "POST"
    assert imp.path == "/s/ops/api/saved_objects/_import?overwrite=true"
    assert imp.headers["kbn-xsrf"] == "true"
    assert imp.headers["Authorization"] == "ApiKey c2VjcmV0"
    ctype = imp.headers["Content-Type"]
    assert ctype.startswith("multipart/form-data; boundary=")
    boundary = ctype.split("boundary=", 1)[1]
    assert imp.body.startswith(f"--{boundary}\r\n".encode())
    assert imp.body.endswith(f"--{boundary}--\r\n".encode())
    part, content = _file_part(ctype, imp.body)
    assert part.get_param("name", header="content-disposition") == "file"
    assert part.get_filename().endswith(".ndjson")
    assert content.decode() == files.generated()[files.KIBANA_NDJSON]
    # then the rule, with the options applied
    assert (rule.method, rule.path) == ("POST", f"/s/ops/api/alerting/rule/{kibana.RULE_ID}")
    assert rule.headers["kbn-xsrf"] == "true" and rule.headers["Content-Type"] == "application/json"
    body = json.loads(rule.body)
    assert body["rule_type_id"] == ".es-query" and body["consumer"] == "stackAlerts"
    assert body["params"]["threshold"] == [900]
    assert (body["params"]["timeWindowSize"], body["params"]["timeWindowUnit"]) == (5, "m")
    assert body["params"]["termField"] == "source.ip" and body["params"]["termSize"] == 50
    assert "imported 13 saved object(s)" in result.output
    assert "lens/envoygeo-top-ips Top source IPs" in result.output
    assert f"rule {kibana.RULE_ID} created" in result.output


def test_existing_rule_is_updated_with_put(server: FakeServer) -> None:
    path = f"/api/alerting/rule/{kibana.RULE_ID}"
    server.replies[("POST", path)] = (409, {"statusCode": 409, "message": "exists"})
    result = _run("--kibana", server.url, "--username", "elastic", "--password", "pw")
    assert result.exit_code == 0, result.output
    _, post, put = server.seen
    assert post.method == "POST" and (put.method, put.path) == ("PUT", path)
    assert put.headers["Authorization"] == "Basic " + base64.b64encode(b"elastic:pw").decode()
    update = json.loads(put.body)
    assert "rule_type_id" not in update and "consumer" not in update
    assert update["params"]["termField"] == "source.ip"
    assert "updated" in result.output


def test_opensearch_dashboards_import(server: FakeServer) -> None:
    result = _run("--opensearch-dashboards", server.url,
                  env={"ENVOYGEO_KIBANA__API_KEY": ""})
    assert result.exit_code == 0, result.output
    (imp,) = server.seen  # no rule: OSD has no Kibana alerting API
    assert imp.path == "/api/saved_objects/_import?overwrite=true"
    assert imp.headers["osd-xsrf"] == "true" and "kbn-xsrf" not in imp.headers
    part, content = _file_part(imp.headers["Content-Type"], imp.body)
    assert part.get_filename().endswith(".ndjson")
    assert content.decode() == files.generated()[files.OSD_NDJSON]


@pytest.mark.parametrize(("status", "expect"), [
    (401, "HTTP 401 authentication failed"),
    (403, "HTTP 403 forbidden"),
    (409, "HTTP 409 version conflict"),
])
def test_http_errors_are_explained(server: FakeServer, status: int, expect: str) -> None:
    server.replies[("POST", "/api/saved_objects/_import")] = (
        status, {"statusCode": status, "message": "nope"})
    result = _run("--kibana", server.url)
    assert result.exit_code == 1
    assert expect in result.output and "(nope)" in result.output
    assert len(server.seen) == 1  # no rule request after a failed import


def test_rule_update_conflict_is_an_error(server: FakeServer) -> None:
    path = f"/api/alerting/rule/{kibana.RULE_ID}"
    server.replies[("POST", path)] = (409, {})
    server.replies[("PUT", path)] = (409, {"message": "version conflict"})
    result = _run("--kibana", server.url)
    assert result.exit_code == 1 and "alert rule update: HTTP 409" in result.output


def test_per_object_import_errors_are_reported(server: FakeServer) -> None:
    server.replies[("POST", "/api/saved_objects/_import")] = (200, {
        "success": False, "successCount": 12, "errors": [
            {"type": "lens", "id": "envoygeo-top-ips", "title": "Top source IPs",
             "error": {"type": "missing_references",
                       "references": [{"type": "index-pattern", "id": "envoygeo-logs"}]}},
            {"type": "map", "id": "envoygeo-map", "title": "Client locations",
             "error": {"type": "unsupported_type"}}]})
    result = _run("--kibana", server.url)
    assert result.exit_code == 1
    assert "12 imported, 2 failed" in result.output
    assert "missing references: index-pattern/envoygeo-logs" in result.output
    assert "unsupported type" in result.output


@pytest.mark.parametrize("args", [[], ["--kibana", "http://a", "--opensearch-dashboards",
                                       "http://b"], ["--kibana", "http://a", "--window", "5x"]])
def test_bad_usage(args: list[str]) -> None:
    assert _run(*args).exit_code == 2


def test_unreachable_server() -> None:
    result = _run("--kibana", "http://127.0.0.1:9")
    assert result.exit_code == 1 and "cannot reach" in result.output



CONFIG = """
elasticsearch:
  index: acme-edge-logs
  alerts_index: acme-edge-alerts
rates:
  windows: [10, 60, 300]
  alerts:
    - {name: burst, window_s: 10, threshold: 200}
    - {name: sustained, window_s: 300, threshold: 3000}
kibana:
  url: %s
  space: ops
"""


def test_import_reads_the_configuration(server: FakeServer, tmp_path: Any) -> None:
    """-c config.yaml: Kibana URL, space and API key (ENVOYGEO_KIBANA__API_KEY) from the
    configuration; the objects read the configured indices; one Kibana rule per
    `rates.alerts` rule, with its threshold, window and the worker's comparison."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG % server.url)
    result = _run("-c", str(cfg), env={"ENVOYGEO_KIBANA__API_KEY": "a2V5"})
    assert result.exit_code == 0, result.output
    imp, burst, sustained = server.seen
    assert imp.path == "/s/ops/api/saved_objects/_import?overwrite=true"
    assert imp.headers["Authorization"] == "ApiKey a2V5"
    _, content = _file_part(imp.headers["Content-Type"], imp.body)
    assert b"acme-edge-logs*" in content and b"envoygeo-logs" not in content
    got = {}
    for req in (burst, sustained):
        assert req.path.startswith(f"/s/ops/api/alerting/rule/{kibana.RULE_ID}-")
        p = json.loads(req.body)["params"]
        assert p["index"] == ["acme-edge-logs*"] and p["thresholdComparator"] == ">="
        got[req.path.rsplit("-", 1)[1]] = (p["threshold"], p["timeWindowSize"],
                                           p["timeWindowUnit"])
    assert got == {"burst": ([200], 10, "s"), "sustained": ([3000], 5, "m")}
    assert f"rule {kibana.RULE_ID}-burst created: >= 200 requests per source.ip in 10s " \
           "on acme-edge-logs*" in result.output


def test_old_kibana_variables_are_refused() -> None:
    """One naming scheme: the pre-0.2 ENVOYGEO_KIBANA_API_KEY is an error naming the
    new spelling, not silently ignored."""
    result = _run("--kibana", "http://127.0.0.1:9", env={"ENVOYGEO_KIBANA_API_KEY": "x"})
    assert result.exit_code == 2 and "ENVOYGEO_KIBANA__API_KEY" in result.output
