"""What a refused connection to Elasticsearch or Redis means, in one line.

Why here and not in each command: `run`, `setup`, `report` and `check-config --connect`
meet the same refusals (an untrusted, expired or wrong-host certificate, a wrong
password or API key) through the same clients, and each should say it the same way:
which service, what was refused, why as far as can be told, and which key to fix.
The clients' own texts are a chain of wrapped exceptions ("TLS error", "Connection
error") whose useful part is at the bottom. No line here contains a secret: only user
names, file paths and URLs without their passwords.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from pipeline.config import url_without_password

if TYPE_CHECKING:
    from pipeline.config import ElasticsearchSettings
    from pipeline.enrich.rates import RatesConfig

# OpenSSL's X509_V_ERR_* codes that mean "not signed by a CA this client trusts".
_UNTRUSTED = (2, 18, 19, 20, 21)
_EXPIRED = 10


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen:
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def tls_refusal(exc: BaseException, ca_file: object) -> tuple[str, str] | None:
    """(kind, reason) when a TLS handshake failed somewhere in `exc`'s chain: kind is
    "verify" (this client refused the server's certificate) or "handshake"; None when
    the failure was not TLS."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            message = cause.verify_message or str(cause)
            if cause.verify_code == _EXPIRED:
                return "verify", f"{message}: the server shows an expired certificate"
            if cause.verify_code in _UNTRUSTED:
                return "verify", (f"{message}: the server's certificate is not signed by a CA "
                                  f"in {ca_file or 'the system trust store'}")
            if cause.verify_code in (62, 64) or "mismatch" in message.lower():
                return "verify", f"hostname mismatch: {message}"
            return "verify", message
        if isinstance(cause, ssl.CertificateError) or type(cause).__name__ == "CertificateError":
            # urllib3's own host name check: "hostname 'x' doesn't match 'y'".
            return "verify", f"hostname mismatch: {cause}"
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLError):
            return "handshake", getattr(cause, "reason", None) or str(cause)
    return None


def tls_line(exc: BaseException, service: str, where: str, ca_file: object,
             verify_keys: str, handshake_check: str) -> str | None:
    """The line for a failed TLS handshake (None when `exc` is not one): a refused
    certificate names `verify_keys`, another handshake failure `handshake_check`."""
    tls = tls_refusal(exc, ca_file)
    if tls is None:
        return None
    if tls[0] == "verify":
        return (f"{service}: TLS certificate verify failed at {where} ({tls[1]}) - check "
                f"{verify_keys}")
    return f"{service}: TLS handshake with {where} failed ({tls[1]}) - check {handshake_check}"


def describe_elasticsearch_error(exc: BaseException, cfg: ElasticsearchSettings) -> str:
    """One line for an Elasticsearch request that failed before any answer worth
    retrying: refused TLS, refused credentials, no connection, or an HTTP error."""
    from elastic_transport import ConnectionError as TransportConnectionError
    from elastic_transport import ConnectionTimeout
    from elasticsearch import ApiError

    where = ", ".join(url_without_password(h) for h in cfg.hosts)
    tls = tls_line(exc, "elasticsearch", where, cfg.ca_certs,
                   "elasticsearch.hosts / elasticsearch.ca_certs",
                   "that elasticsearch.hosts says https:// only for a TLS port")
    if tls is not None:
        return tls
    if isinstance(exc, ApiError):
        status = exc.meta.status
        if status == 401:
            if cfg.api_key is not None or cfg.api_key_file is not None:
                how, keys = "API key", "elasticsearch.api_key / api_key_file"
            elif cfg.username:
                how, keys = (f"basic auth as user {cfg.username}",
                             "elasticsearch.username / password / password_file")
            else:
                how, keys = ("no credentials sent",
                             "elasticsearch.api_key or username / password")
            return (f"elasticsearch: authentication failed at {where} (HTTP 401, {how}) - "
                    f"check {keys}")
        if status == 403:
            return (f"elasticsearch: permission denied at {where} (HTTP 403: {exc.message}) - "
                    f"the configured user or API key lacks a privilege envoygeo needs")
        return f"elasticsearch: {where} answered HTTP {status}: {exc.message}"
    if isinstance(exc, ConnectionTimeout):
        return (f"elasticsearch: no answer from {where} within the request timeout - check "
                f"elasticsearch.hosts and elasticsearch.request_timeout_s")
    if isinstance(exc, TransportConnectionError):
        root = _chain(exc)[-1]
        hint = (" (an http:// URL for a TLS port?)"
                if "RemoteDisconnected" in type(root).__name__ else "")
        return (f"elasticsearch: cannot connect to {where}: {type(root).__name__}: {root}{hint} "
                f"- check elasticsearch.hosts and that Elasticsearch is up")
    return f"elasticsearch: {where}: {type(exc).__name__}: {exc}"


def describe_redis_error(exc: BaseException, cfg: RatesConfig) -> str:
    """One line for a Redis connection the rate backend cannot use."""
    import redis

    where = url_without_password(cfg.redis_url)
    tls = tls_line(exc, "redis", where, cfg.redis_ca_file,
                   "rates.redis_url's host / rates.redis_ca_file",
                   "that rates.redis_url says rediss:// only for a TLS port")
    if tls is not None:
        return tls
    if isinstance(exc, redis.AuthenticationError):
        return (f"redis: authentication failed at {where} ({str(exc).rstrip('.')}) - check "
                f"the user in rates.redis_url and its password (in the URL or "
                f"rates.redis_password_file)")
    if isinstance(exc, redis.ResponseError) and "NOPERM" in str(exc):
        return (f"redis: permission denied at {where} ({exc}) - the ACL user needs "
                f"+@all (or +@scripting +@write +@read) on keys {cfg.key_prefix}*")
    text = " ".join(str(exc).split())
    hint = ""
    if (cfg.redis_url.startswith("redis://") and isinstance(exc, redis.ConnectionError)
            and ("reset by peer" in text or "closed by server" in text)):
        hint = " (a TLS port? then rediss://)"
    return f"redis: cannot use {where}: {type(exc).__name__}: {text}{hint}"
