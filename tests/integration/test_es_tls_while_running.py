"""The sink's retry reason with the real client against real endpoints: the HAProxy of
`deploy/local/up es-tls` showing an expired (:9245) and a wrong-host (:9244)
certificate, and a loopback port nothing listens on. The errors the official client
raises there are what a certificate that stops verifying, or a node that goes away,
looks like to a running worker (tests/unit/test_es_sink_tls.py: the pause line)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pipeline.config import ElasticsearchSettings
from pipeline.sinks.elasticsearch import BulkItem, ElasticsearchSink, SinkStopped
from tests.conftest import ensure_service
from tests.integration.harness import ROOT, free_port

CA = ROOT / ".local" / "tls" / "ca.pem"


def _reason(url: str) -> str:
    """The sink's `last_error` after one failed bulk request to `url` (stopped there)."""
    sink = ElasticsearchSink(ElasticsearchSettings(
        hosts=[url], ca_certs=str(CA) if url.startswith("https") else None,
        request_timeout_s=5, retry_initial_backoff_ms=1))
    stop = threading.Event()
    bulk = sink.client.bulk

    def once(**kw: Any) -> Any:
        stop.set()
        return bulk(**kw)

    sink.client.bulk = once  # type: ignore[method-assign]
    try:
        with pytest.raises(SinkStopped):
            sink.write([BulkItem("envoygeo-tls-probe", "1", b"{}", b"")], stop)
    finally:
        sink.close()
    assert not sink.writable.is_set()
    return sink.last_error


def test_certificate_failures_and_refused_connections_say_why() -> None:
    ensure_service("es-tls", "127.0.0.1", 9243)
    assert _reason("https://127.0.0.1:9245") == (
        "elasticsearch: TLS certificate verify failed at https://127.0.0.1:9245 (certificate "
        "has expired: the server shows an expired certificate) - check elasticsearch.hosts / "
        "elasticsearch.ca_certs")
    assert _reason("https://127.0.0.1:9244").startswith(
        "elasticsearch: TLS certificate verify failed at https://127.0.0.1:9244 (hostname "
        "mismatch: ")
    port = free_port()
    assert _reason(f"http://127.0.0.1:{port}") == (
        "ConnectionError: Connection error (ConnectionRefusedError: [Errno 111] Connection "
        "refused)")
