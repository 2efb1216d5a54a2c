"""Kafka authentication and encryption: `kafka.security` onto librdkafka, and what a
refused connection means.

One mapping for every Kafka client the product makes (the worker's consumer, the
dead-letter/alerts producer, `setup`'s AdminClient, `check-config --connect`, `demo`,
`bench e2e`): `client_config` gives the bootstrap servers, the mapped security settings
and the connection-level keys of `kafka.librdkafka`, which win over the mapped ones
(the escape hatch for anything the typed settings do not cover).

Why failures are classified here: librdkafka treats a refused handshake or a wrong
password like a broker that is down, and retries it every 50-350 ms forever (measured
against the local secured broker: 79 handshake failures in 4 s). A broker that is
restarting refuses the TCP connection or drops it; it does not fail certificate
verification, reject a client certificate or answer "invalid credentials". Those
failures are about this client's configuration, and waiting will not fix them, so the
worker exits after `SECURITY_GRACE_S` of nothing but them, with one line naming the
cause (`describe_failure`).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confluent_kafka import KafkaError

    from pipeline.config import KafkaSecuritySettings, KafkaSettings

# librdkafka keys that describe the connection (not a consumer's or producer's
# behaviour): the ones every client takes from `kafka.librdkafka`.
CONNECTION_PREFIXES = ("security.protocol", "sasl.", "ssl.", "client.id",
                       "socket.", "broker.address.family")

# How long only security failures (and no working connection) may last before the
# worker gives up: long enough for a broker that is still loading its SCRAM users
# after a restart, short enough that a bad setting is reported within seconds.
SECURITY_GRACE_S = 3.0


def librdkafka_security(sec: KafkaSecuritySettings) -> dict[str, Any]:
    """The librdkafka properties for `kafka.security` (nothing for plain PLAINTEXT, so
    a configuration that sets everything in `kafka.librdkafka` keeps working)."""
    conf: dict[str, Any] = {}
    if sec.protocol == "PLAINTEXT":
        return conf
    conf["security.protocol"] = sec.protocol
    from pipeline.config import secret_value

    if sec.protocol.startswith("SASL_"):
        password = secret_value(sec.password, sec.password_file)
        conf.update({"sasl.mechanism": sec.sasl_mechanism, "sasl.username": sec.username,
                     "sasl.password": password})
    if sec.ca_file is not None:
        conf["ssl.ca.location"] = str(sec.ca_file)
    if sec.cert_file is not None and sec.key_file is not None:
        conf["ssl.certificate.location"] = str(sec.cert_file)
        conf["ssl.key.location"] = str(sec.key_file)
    key_password = secret_value(sec.key_password, sec.key_password_file)
    if key_password is not None:
        conf["ssl.key.password"] = key_password
    return conf


def client_config(k: KafkaSettings, **base: Any) -> dict[str, Any]:
    """Settings of a producer or admin client: `base`, the brokers, the security
    mapping, then the connection keys of `kafka.librdkafka` (which win)."""
    conf: dict[str, Any] = {**base, "bootstrap.servers": k.bootstrap_servers}
    conf.update(librdkafka_security(k.security))
    conf.update({key: v for key, v in k.librdkafka.items()
                 if key.startswith(CONNECTION_PREFIXES)})
    return conf


# -- what a refused connection means ------------------------------------------------

# Kinds of failure that no retry fixes (see the module docstring).
SASL = "sasl"            # the broker refused the credentials
VERIFY = "verify"        # this client does not trust the broker's certificate
CLIENT_CERT = "client"   # the broker refused this client's certificate (or its absence)
TLS = "tls"              # another handshake failure (protocol mismatch, ...)

_BROKER = re.compile(r"^(?:\w+://)?(\[[^\]]+\]|[^:/\s]+):(\d+)")


def classify(err: KafkaError | None, text: str) -> str | None:
    """The kind of a librdkafka error or log line, or None when it is not one that
    says the configuration is wrong (connection refused, timeouts, disconnects)."""
    from confluent_kafka import KafkaError

    code = err.code() if err is not None else None
    low = text.lower()
    if code == KafkaError._AUTHENTICATION or "sasl authentication error" in low \
            or "authentication failed" in low:
        return SASL
    if "certificate verify failed" in low:
        return VERIFY
    if "alert bad certificate" in low or "alert certificate required" in low \
            or "alert unknown ca" in low or "no matching issuer found" in low:
        # The last: librdkafka sends no certificate the broker's CAs did not sign.
        return CLIENT_CERT
    if code == KafkaError._SSL or "ssl handshake failed" in low:
        return TLS
    return None


def describe_failure(kind: str, k: KafkaSettings, text: str, for_s: float) -> str:
    """One line: what the broker or this client refused, why (as far as can be told)
    and which setting to check. Never a secret: only the user name and file paths."""
    conf = {key: v for key, v in client_config(k).items() if "password" not in key}
    broker = _broker_of(text) or k.bootstrap_servers.split(",")[0].strip()
    seen = f" (refused for {for_s:.1f}s; not retrying)" if for_s else ""
    raw = _without_variables(text)
    if kind == SASL:
        mech = conf.get("sasl.mechanism", "?")
        user = conf.get("sasl.username", "?")
        return (f"kafka: authentication failed at {broker} ({mech}, user {user}): check "
                f"kafka.security.username/password/password_file and sasl_mechanism"
                f"{seen} [librdkafka: {raw}]")
    if kind == VERIFY:
        why = diagnose_certificate(broker, conf.get("ssl.ca.location"))
        return (f"kafka: cannot verify the broker's TLS certificate at {broker}: {why}; "
                f"check kafka.security.ca_file and that kafka.bootstrap_servers names the "
                f"host the certificate is for{seen}")
    if kind == CLIENT_CERT:
        cert = conf.get("ssl.certificate.location")
        why = (f"client certificate {cert} is not signed by a CA the broker trusts"
               if cert else
               "this client sent no certificate and the broker requires one")
        return (f"kafka: the broker at {broker} refused this client's TLS certificate: "
                f"{why}; check kafka.security.cert_file/key_file{seen} "
                f"[librdkafka: {raw}]")
    return (f"kafka: TLS handshake with {broker} failed: check kafka.security.protocol "
            f"and the listener's port{seen} [librdkafka: {raw}]")


def diagnose_certificate(broker: str, ca_file: str | None, timeout_s: float = 3.0) -> str:
    """Why the broker's certificate fails verification, in OpenSSL's words (librdkafka
    says only "certificate verify failed"): one TLS handshake with the same CA file and
    host name, made once, when the worker is about to exit anyway."""
    host, _, port = broker.rpartition(":")
    host = host.strip("[]")
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return "verification fails in librdkafka but passes with Python's OpenSSL"
    except ssl.SSLCertVerificationError as exc:
        message = exc.verify_message or str(exc)
        if exc.verify_code == 10:
            return f"{message} (the broker shows an expired certificate)"
        if exc.verify_code in (2, 19, 20, 21):
            return (f"{message} (the broker's certificate is not signed by a CA in "
                    f"{ca_file or 'the default trust store'})")
        if exc.verify_code in (62, 64) or "mismatch" in message.lower():
            return f"{message} (the certificate is not for {host})"
        return message
    except (OSError, ValueError) as exc:
        return f"certificate verify failed (could not look closer: {exc})"


def _broker_of(text: str) -> str | None:
    match = _BROKER.match(text)
    return f"{match.group(1)}:{match.group(2)}" if match else None


def _without_variables(text: str) -> str:
    """librdkafka's text without the broker (said already) and the parts that change
    between repeats."""
    text = re.sub(r"^\w+://[^\s]+?/\w+:\s*", "", text)
    return re.sub(r"\s*\(after \d+ms[^)]*\)", "", text).strip()


class RefusalLog:
    """A librdkafka `logger` for a client's start (`setup`'s AdminClient, `forward`'s
    producer): keeps the first refusal, to explain a failed call in `describe_failure`'s
    words, and passes every other line on; after `started()` it passes every line on
    (a refusal while running is then logged as librdkafka says it)."""

    def __init__(self, forward: Any = None) -> None:
        self.kind: str | None = None
        self.text = ""
        self.since = 0.0  # time.monotonic() of the first refusal
        self._forward = forward
        self._starting = True

    def started(self) -> None:
        self._starting = False

    def log(self, level: int, fmt: str, *args: object) -> None:
        if self._starting and len(args) == 3:
            text = re.sub(r"^\[thrd:[^\]]*\]:\s*", "", str(args[2]))
            kind = classify(None, text)
            if kind is not None:
                if self.kind is None:
                    self.kind, self.text, self.since = kind, text, time.monotonic()
                return
        if self._forward is not None:
            self._forward.log(level, fmt, *args)

    def lasted(self, seconds: float) -> bool:
        """Refusals began at least `seconds` ago."""
        return self.kind is not None and time.monotonic() - self.since >= seconds

    def explain(self, k: KafkaSettings) -> str | None:
        return describe_failure(self.kind, k, self.text, 0) if self.kind else None


class KafkaUnavailable(RuntimeError):
    """No metadata from Kafka at start; the message is one line (`describe_failure`'s
    when Kafka refused this client, librdkafka's error otherwise)."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


def list_topics(client: Any, refusals: RefusalLog, k: KafkaSettings,
                topic: str | None = None, within_s: float = 15.0) -> Any:
    """`client.list_topics` at a client's start, in 1 s steps so that a refused
    handshake or password ends it after SECURITY_GRACE_S instead of the whole wait
    (librdkafka retries refusals as if the broker were down). `client` logs through
    `refusals`. Raises KafkaUnavailable."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + within_s
    while True:
        try:
            return client.list_topics(topic, timeout=1)
        except KafkaException as exc:
            client.poll(0)  # serves the queued log lines that say why
            if refusals.lasted(SECURITY_GRACE_S) or time.monotonic() >= deadline:
                # A refusal is said as such, not as librdkafka's "transport failure".
                raise KafkaUnavailable(refusals.explain(k) or str(exc),
                                       refusals.kind is not None) from None


# librdkafka property -> the kafka.security key that sets it (for error messages).
_SOURCE_KEY = {"ssl.ca.location": "ca_file", "ssl.certificate.location": "cert_file",
               "ssl.key.location": "key_file", "ssl.key.password": "key_password",
               "sasl.mechanism": "sasl_mechanism", "sasl.username": "username",
               "sasl.password": "password", "security.protocol": "protocol"}


def setting_named_by(message: str, k: KafkaSettings) -> str:
    """The key to blame for a librdkafka error that names a property: the
    `kafka.security` one that set it, unless `kafka.librdkafka` set it explicitly."""
    for prop, field in _SOURCE_KEY.items():
        if prop in message and prop not in k.librdkafka \
                and k.security.protocol != "PLAINTEXT":
            return f"kafka.security.{field}"
    return "kafka.librdkafka"
