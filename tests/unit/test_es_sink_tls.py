"""A certificate that stops verifying while the worker runs (expired, rotated to another
host name or CA): the sink retries it like any connection failure, and its retry
warnings and the worker's pause line give the reason, in the words of `run`'s start-up
check, instead of the client's bare "TLS error"."""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import pytest
from elastic_transport import ConnectionError, TlsError

from pipeline.config import ElasticsearchSettings
from pipeline.sinks.elasticsearch import ElasticsearchSink, SinkStopped, failure_text
from tests.unit.test_es_sink import ScriptedClient, _items
from tests.unit.test_metrics import _stub_worker

EXPIRED = ("elasticsearch: TLS certificate verify failed at https://es.example:9200 "
           "(certificate has expired: the server shows an expired certificate) - check "
           "elasticsearch.hosts / elasticsearch.ca_certs")


def _tls_error(code: int, message: str) -> TlsError:
    """Shaped as elastic_transport raises it: TlsError("TLS error") from urllib3's
    SSLError from the handshake's SSLCertVerificationError."""
    verify = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                             f"verify failed: {message}")
    verify.verify_code, verify.verify_message = code, message
    try:
        try:
            raise ssl.SSLError("wrapped") from verify
        except ssl.SSLError as wrapped:
            raise TlsError("TLS error", errors=(wrapped,)) from wrapped
    except TlsError as exc:
        return exc


def _settings() -> ElasticsearchSettings:
    return ElasticsearchSettings(hosts=["https://es.example:9200"], ca_certs="/etc/ca.pem",
                                 retry_initial_backoff_ms=1, retry_max_backoff_ms=2)


def test_retry_warning_says_the_tls_reason(caplog: pytest.LogCaptureFixture) -> None:
    client = ScriptedClient([_tls_error(10, "certificate has expired"), {}])
    sink = ElasticsearchSink(_settings(), client=client)  # type: ignore[arg-type]
    errors: list[str] = []
    bulk = client.bulk

    def spy(**kw: Any) -> Any:
        errors.append(sink.last_error)
        return bulk(**kw)

    client.bulk = spy  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING)
    assert sink.write(_items(2)) == []
    assert errors == ["", EXPIRED]  # what the second attempt was made after
    assert sink.writable.is_set() and sink.last_error == ""
    assert [r.getMessage() for r in caplog.records] == [
        f"bulk: 2 item(s) to retry in {r.args[1]:.2f}s (attempt 1): {EXPIRED}"  # type: ignore[index]
        for r in caplog.records]


def test_pause_line_says_the_tls_reason(caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    client = ScriptedClient([_tls_error(20, "unable to get local issuer certificate")])
    sink = ElasticsearchSink(_settings(), client=client)  # type: ignore[arg-type]
    bulk = client.bulk

    def failing(**kw: Any) -> Any:
        stop.set()  # the worker's shutdown ends the retries after this attempt
        return bulk(**kw)

    client.bulk = failing  # type: ignore[method-assign]
    with pytest.raises(SinkStopped):
        sink.write(_items(1), stop)
    worker = _stub_worker()
    worker.sink = sink
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="envoygeo.worker")
    worker._pause()
    assert [r.getMessage() for r in caplog.records] == [
        "paused fetching: Elasticsearch is not accepting writes (elasticsearch: TLS "
        "certificate verify failed at https://es.example:9200 (unable to get local issuer "
        "certificate: the server's certificate is not signed by a CA in /etc/ca.pem) - "
        "check elasticsearch.hosts / elasticsearch.ca_certs); resuming when it does"]


def test_other_connection_failures_name_their_root_cause() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as refused:
            raise ConnectionError("Connection error") from refused
    except ConnectionError as exc:
        assert failure_text(exc, _settings()) == (
            "ConnectionError: Connection error (ConnectionRefusedError: [Errno 111] "
            "Connection refused)")
    assert failure_text(ConnectionError("Connection error"), _settings()) == \
        "ConnectionError: Connection error"
