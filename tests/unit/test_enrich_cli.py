from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.document import PARSE_FAILURE_TAG
from tests.unit.decode_samples import sample_lines

pytestmark = pytest.mark.unit

ISTIO_LINE = next(line for _, line in sample_lines() if "setsrc6" in line and "via_up" in line)


def run(args: list[str], stdin: bytes = b"") -> tuple[int, list[dict], str]:
    result = CliRunner().invoke(main, ["enrich", *args], input=stdin)
    docs = [orjson.loads(x) for x in result.stdout_bytes.splitlines()]
    return result.exit_code, docs, result.stderr


def test_all_samples_from_files_in_order(tmp_path: Path) -> None:
    lines = [line for _, line in sample_lines()]
    f = tmp_path / "in.log"
    f.write_text("\n".join(lines) + "\n\n")  # blank lines are skipped
    code, docs, err = run([str(f)])
    assert code == 0, err
    assert len(docs) == len(lines)
    for doc, line in zip(docs, lines, strict=True):  # same order as the input
        assert doc["http"]["request"].get("id", "-") in line
        assert doc.get("url", {}).get("original", "-") in line
    assert f"{len(lines)} records, {len(lines)} parsed, 0 failed" in err


def test_ecs_document_shape() -> None:
    code, (doc,), _ = run(["--log-format", "istio"], ISTIO_LINE.encode())
    assert code == 0
    assert doc["@timestamp"] == "2026-11-29T01:13:00.689Z"
    assert doc["source"] == {"ip": "2001:4860:4860::8888", "port": 36400}
    # Written once: the logged remote address is source.ip:source.port, HTTP/1.1 is
    # http.version; the IPv4-mapped local address says more than destination, so it stays.
    assert "downstream_remote_address" not in doc["envoy"]
    assert "protocol" not in doc["envoy"]
    assert doc["envoy"]["downstream_local_address"] == "[::ffff:127.0.0.1]:18002"
    assert doc["destination"] == {"ip": "127.0.0.1", "port": 18002}
    assert doc["http"] == {"request": {"method": "GET", "id": "ac4d1392-5144-4a20-b37e-"
                                                               "4ea5ea55ac80", "bytes": 0},
                           "response": {"status_code": 200, "bytes": 20}, "version": "1.1"}
    assert doc["url"] == {"original": "/hello.txt?q=setsrc6", "path": "/hello.txt",
                          "query": "q=setsrc6", "domain": "127.0.0.1"}
    assert doc["user_agent"] == {"original": "geo-test/1.0"}
    assert doc["event"]["duration"] == 0
    assert doc["envoy"]["upstream"]["cluster"] == "upstream"
    assert doc["envoygeo"]["ip_source"] == "peer"
    assert doc["envoygeo"]["ip_class"] == "public"
    assert "2001:4860:4860::8888" in doc["related"]["ip"]


def test_failures_are_documents_and_exit_1() -> None:
    stdin = b"garbage line\n" + ISTIO_LINE.encode() + b"\n\xff\xfe\n"
    code, docs, err = run([], stdin)
    assert code == 1
    assert len(docs) == 3
    assert docs[0]["tags"] == [PARSE_FAILURE_TAG]
    assert docs[0]["event"]["original"] == "garbage line"
    assert "no known format" in docs[0]["error"]["message"]
    assert "source" in docs[1]
    assert docs[2]["tags"] == ["envelope_invalid_utf8", PARSE_FAILURE_TAG]
    assert "3 records, 1 parsed, 2 failed" in err


def test_trusted_proxy_options() -> None:
    line = ISTIO_LINE.replace("[2001:4860:4860::8888]:36400", "10.0.0.1:36400").replace(
        '"2001:4860:4860::8888"', '"6.6.6.6, 81.2.69.142"')
    code, (doc,), _ = run(["--trusted-proxy", "10.0.0.0/8"], line.encode())
    assert code == 0
    assert doc["source"]["ip"] == "81.2.69.142"
    assert doc["envoygeo"]["ip_source"] == "x_forwarded_for"
    _, (doc2,), _ = run([], line.encode())
    assert doc2["source"]["ip"] == "10.0.0.1"


def test_custom_format_and_json_keys() -> None:
    code, (doc,), _ = run(["--log-format", "%DOWNSTREAM_REMOTE_ADDRESS% \"%REQ(USER-AGENT)%\""],
                          b'81.2.69.142:1 "my agent"\n')
    assert code == 0 and doc["source"]["ip"] == "81.2.69.142"
    assert doc["user_agent"]["original"] == "my agent"
    code, (doc,), _ = run(["--json-keys", "peer=downstream_remote_address"],
                          b'{"peer": "81.2.69.142:2", "method": "GET"}\n')
    assert code == 0 and doc["source"]["port"] == 2


@pytest.mark.parametrize("args", [["--log-format", "%NOPE%"], ["--trusted-proxy", "300.0.0.0/8"],
                                  ["--json-keys", "a=nofield"]])
def test_bad_options_exit_2(args: list[str]) -> None:
    code, _, err = run(args)
    assert code == 2 and "Invalid value" in err


def test_help_teaches() -> None:
    result = CliRunner().invoke(main, ["enrich", "--help"])
    assert result.exit_code == 0
    for words in ("Examples:", "Exit status", "--trusted-proxy", "istio-legacy", "CRI"):
        assert words in result.output
