"""Secrets and TLS settings of Elasticsearch, Kibana and Redis: where each secret may
come from (inline, its ENVOYGEO_* variable, a `*_file`), what is refused at load
(naming the key), and what the clients are given. The real services are in
tests/integration/test_es_secure.py and test_redis_secure.py."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_settings, masked
from pipeline.enrich.rates import RatesConfig
from pipeline.enrich.rates.redis import connect
from pipeline.service_errors import describe_redis_error, tls_refusal
from pipeline.sinks.elasticsearch import make_client


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_settings(path, env or {})


def _secret(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")  # `echo value > file`: the newline is not part of it
    return path


def test_elasticsearch_password_file_reaches_the_client(tmp_path: Path) -> None:
    pw = _secret(tmp_path, "pw", "s3cret-pw")
    s = _load(tmp_path, f"elasticsearch: {{username: u, password_file: {pw}}}\n")
    assert s.elasticsearch.password_value() == "s3cret-pw"
    client = make_client(s.elasticsearch)
    expected = "Basic " + base64.b64encode(b"u:s3cret-pw").decode()
    assert client._headers["authorization"] == expected
    assert "s3cret-pw" not in repr(masked(s))


def test_elasticsearch_api_key_file_and_variable(tmp_path: Path) -> None:
    key = _secret(tmp_path, "key", "aWQ6a2V5")
    s = _load(tmp_path, f"elasticsearch: {{api_key_file: {key}}}\n")
    assert make_client(s.elasticsearch)._headers["authorization"] == "ApiKey aWQ6a2V5"
    s = _load(tmp_path, "elasticsearch: {username: u}\n",
              {"ENVOYGEO_ELASTICSEARCH__PASSWORD": "from-env"})
    assert s.elasticsearch.password_value() == "from-env"
    s = _load(tmp_path, "elasticsearch: {}\n",
              {"ENVOYGEO_ELASTICSEARCH__API_KEY_FILE": str(key)})
    assert s.elasticsearch.api_key_value() == "aWQ6a2V5"


@pytest.mark.parametrize("section,text,expected", [
    ("elasticsearch", "{username: u, password_file: /nonexistent/pw}",
     "elasticsearch.password_file: cannot read /nonexistent/pw: No such file or directory"),
    ("elasticsearch", "{api_key_file: /nonexistent/key}",
     "elasticsearch.api_key_file: cannot read /nonexistent/key"),
    ("elasticsearch", "{username: u, password: a, password_file: PW}",
     "elasticsearch: set password or password_file, not both"),
    ("elasticsearch", "{password_file: PW}", "elasticsearch: password/password_file need "
                                             "username"),
    ("kibana", "{api_key: a, api_key_file: PW}", "kibana: set api_key or api_key_file, not both"),
    ("kibana", "{password_file: /nonexistent/pw}", "kibana.password_file: cannot read"),
    ("rates", "{redis_password_file: /nonexistent/pw}", "rates.redis_password_file: cannot read"),
    ("rates", "{redis_url: 'rediss://u:p@h:6380/0', redis_password_file: PW}",
     "rates: set the password in redis_url or redis_password_file, not both"),
    ("rates", "{redis_url: 'redis://h:6379/0', redis_ca_file: PW}",
     "rates: redis_ca_file is only used with a rediss:// (TLS) redis_url"),
])
def test_refused_at_load_naming_the_key(tmp_path: Path, section: str, text: str,
                                        expected: str) -> None:
    pw = _secret(tmp_path, "pw", "hunter2")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, f"{section}: {text.replace('PW', str(pw))}\n")
    assert expected in str(err.value)
    assert "hunter2" not in str(err.value) and "'p'" not in str(err.value)


def test_kibana_secret_files_reach_the_dashboards_target(tmp_path: Path) -> None:
    from pipeline.commands.dashboards import _target

    pw = _secret(tmp_path, "pw", "kib-pw")
    s = _load(tmp_path, f"kibana: {{url: 'https://k:5601', username: u, password_file: {pw}}}\n")
    target = _target(s.kibana, "kibana", insecure=False)
    assert target.password == "kib-pw" and target.username == "u"


def test_redis_password_file_and_ca_reach_the_client(tmp_path: Path) -> None:
    pw = _secret(tmp_path, "pw", "redis-pw")
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    cfg = RatesConfig(backend="redis", redis_url="rediss://envoygeo@127.0.0.1:6380/0",
                      redis_password_file=pw, redis_ca_file=ca)
    kwargs = connect(cfg).connection_pool.connection_kwargs
    assert kwargs["password"] == "redis-pw" and kwargs["username"] == "envoygeo"
    assert kwargs["ssl_ca_certs"] == str(ca)
    pool = connect(cfg).connection_pool
    connection = pool.connection_class(**pool.connection_kwargs)  # not connected yet
    assert connection.cert_reqs == ssl.CERT_REQUIRED  # verification stays on


def test_tls_causes_are_named() -> None:
    """What `tls_refusal` reads from an exception chain, as the clients raise them."""
    def verify(code: int, message: str) -> Exception:
        cause = ssl.SSLCertVerificationError(1, message)
        cause.verify_code, cause.verify_message = code, message
        outer = ConnectionError("TLS error")
        outer.__cause__ = cause
        return outer

    assert tls_refusal(verify(10, "certificate has expired"), None) == (
        "verify", "certificate has expired: the server shows an expired certificate")
    assert tls_refusal(verify(20, "unable to get local issuer certificate"), "/x/ca.pem") == (
        "verify", "unable to get local issuer certificate: the server's certificate is not "
                  "signed by a CA in /x/ca.pem")
    assert tls_refusal(verify(64, "IP address mismatch"), None) == (
        "verify", "hostname mismatch: IP address mismatch")
    assert tls_refusal(ValueError("no"), None) is None


def test_redis_lines_never_show_the_url_password() -> None:
    import redis

    cfg = RatesConfig(backend="redis", redis_url="rediss://u:hunter2@h:6380/0")
    line = describe_redis_error(redis.AuthenticationError("invalid password."), cfg)
    assert line.startswith("redis: authentication failed at rediss://u:***@h:6380/0 ")
    assert "hunter2" not in line


def test_redis_url_turning_verification_off_is_warned_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.enrich.rates.redis as backend

    monkeypatch.setattr(backend, "_warned_unverified", False)
    cfg = RatesConfig(backend="redis",
                      redis_url="rediss://u:hunter2@h:6380/0?ssl_cert_reqs=none")
    with caplog.at_level("WARNING"):
        connect(cfg)
        connect(cfg)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["rates.redis_url turns TLS verification off (ssl_cert_reqs=none): the "
                      "certificate of rediss://u:***@h:6380/0 is not verified (anyone on the "
                      "path can read and change the traffic)"]
    caplog.clear()
    connect(RatesConfig(backend="redis", redis_url="rediss://h:6380/0"))
    assert not caplog.records
