"""Run Envoy 1.40 with the gateway listener rendered from the manifests (EnvoyFilter's
proxy_protocol filter first, tls_inspector, JSON access log from mesh-config.yaml), send
a request behind a PROXY v1 header, and parse the logged line with envoygeo's own JSON
parser: proof that the shipped format carries the true client to the worker."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time
from pathlib import Path

import yaml

from pipeline.decode.access_log import AccessLog
from pipeline.decode.json_log import JsonLogParser
from pipeline.lab.stack import envoy_binary, free_port
from tests.unit.test_manifests import _envoy_bootstrap


def _send(port: int, payload: bytes, deadline: float) -> bytes:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(payload)
                return conn.recv(65536)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_proxy_protocol_client_reaches_the_json_log(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = _envoy_bootstrap()
    listener = bootstrap["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--log-level", "error",
                             "--base-id", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        request = (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\n"
                   b"GET /shop?x=1 HTTP/1.1\r\nHost: shop.example\r\n"
                   b"User-Agent: curl/8.5\r\nX-Forwarded-For: 198.51.100.9\r\n"
                   b"Connection: close\r\n\r\n")
        reply = _send(port, request, time.monotonic() + 30)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "Envoy wrote no access log line"
        line = proc.stdout.readline().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    obj = json.loads(line)
    parsed = JsonLogParser().parse(line)
    assert isinstance(parsed, AccessLog), parsed
    assert parsed.downstream_remote_address == "203.0.113.7:51234"  # from the PROXY header
    assert (parsed.downstream_direct_remote_address or "").startswith("127.0.0.1:")  # "LB"
    # use_remote_address: Envoy appends the address it trusts to what the client sent.
    assert parsed.x_forwarded_for == "198.51.100.9,203.0.113.7"
    assert (parsed.method, parsed.path, parsed.response_code) == ("GET", "/shop?x=1", 200)
    assert parsed.authority == "shop.example" and parsed.user_agent == "curl/8.5"
    assert parsed.start_time and obj["request_id"]
