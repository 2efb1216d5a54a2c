"""`kafka.security`: validation, the librdkafka mapping every client uses, the
classification of refused connections, and when refusals end the worker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from pipeline.config import ConfigError, KafkaSettings, load_settings, masked
from pipeline.kafka_log import LibrdkafkaLogger
from pipeline.kafka_security import (
    CLIENT_CERT,
    SASL,
    TLS,
    VERIFY,
    classify,
    client_config,
    describe_failure,
    librdkafka_security,
)
from pipeline.sinks.kafka import KafkaTopicSink
from pipeline.sources.kafka import SecurityRefusals, consumer_config

# librdkafka's own texts, as the secured local broker made it say them (2.x).
SASL_TEXT = ("sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: Authentication "
             "failed during authentication due to invalid credentials with SASL mechanism "
             "SCRAM-SHA-512 (after 316ms in state AUTH_REQ)")
VERIFY_TEXT = ("ssl://127.0.0.1:9096/bootstrap: SSL handshake failed: error:0A000086:SSL "
               "routines::certificate verify failed: broker certificate could not be verified, "
               "verify that ssl.ca.location is correctly configured or root CA certificates "
               "are installed (install ca-certificates package) (after 3ms in state "
               "SSL_HANDSHAKE)")
CLIENT_TEXT = ("ssl://127.0.0.1:9095/bootstrap: Receive failed: error:0A000412:SSL routines::"
               "ssl/tls alert bad certificate: SSL alert number 42 (after 0ms in state "
               "APIVERSION_QUERY)")
NO_ISSUER = ("No matching issuer found in server trusted certificate authorities, not "
             "sending any client certificates")
REFUSED = ("sasl_ssl://127.0.0.1:9094/bootstrap: Connect to ipv4#127.0.0.1:9094 failed: "
           "Connection refused (after 0ms in state CONNECT)")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("ca", "CA"), ("cert", "CERT"), ("key", "KEY"),
                       ("password", "s3cret-pw\n"), ("key_password", "k3y-pw")):
        out[name] = tmp_path / name
        out[name].write_text(text)
    return out


def sasl(files: dict[str, Path], **extra: object) -> KafkaSettings:
    return KafkaSettings(security={  # type: ignore[arg-type]
        "protocol": "SASL_SSL", "username": "envoygeo", "password_file": files["password"],
        "ca_file": files["ca"], **extra})


def test_plaintext_maps_to_nothing_so_librdkafka_only_configs_keep_working() -> None:
    k = KafkaSettings(librdkafka={"security.protocol": "SASL_SSL", "sasl.username": "u"})
    assert librdkafka_security(k.security) == {}
    assert consumer_config(k, None)["security.protocol"] == "SASL_SSL"


def test_sasl_ssl_maps_onto_librdkafka_with_the_password_file_read(
        files: dict[str, Path]) -> None:
    conf = librdkafka_security(sasl(files).security)
    assert conf == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": "envoygeo", "sasl.password": "s3cret-pw",
                    "ssl.ca.location": str(files["ca"])}


def test_mtls_maps_certificate_key_and_key_password(files: dict[str, Path]) -> None:
    k = KafkaSettings(security={  # type: ignore[arg-type]
        "protocol": "SSL", "ca_file": files["ca"], "cert_file": files["cert"],
        "key_file": files["key"], "key_password_file": files["key_password"]})
    assert librdkafka_security(k.security) == {
        "security.protocol": "SSL", "ssl.ca.location": str(files["ca"]),
        "ssl.certificate.location": str(files["cert"]), "ssl.key.location": str(files["key"]),
        "ssl.key.password": "k3y-pw"}


def test_every_client_gets_the_mapping_and_explicit_librdkafka_keys_win(
        files: dict[str, Path]) -> None:
    k = sasl(files).model_copy(update={"librdkafka": {
        "sasl.mechanism": "SCRAM-SHA-256", "ssl.endpoint.identification.algorithm": "none",
        "fetch.min.bytes": 1}})
    consumer = consumer_config(k, None)
    producer = client_config(k, acks="all")
    for conf in (consumer, producer):
        assert conf["sasl.mechanism"] == "SCRAM-SHA-256"  # the escape hatch wins
        assert conf["sasl.password"] == "s3cret-pw"
        assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert consumer["fetch.min.bytes"] == 1
    assert "fetch.min.bytes" not in producer  # a consumer setting: not the producer's
    assert producer["acks"] == "all"
    # A real librdkafka producer accepts it (without the CA: librdkafka parses that file).
    side = KafkaTopicSink.for_worker(k.model_copy(update={
        "security": k.security.model_copy(update={"ca_file": None})}))
    side.close()


def test_password_from_the_environment(tmp_path: Path, files: dict[str, Path]) -> None:
    s = load_settings(None, {
        "ENVOYGEO_KAFKA__SECURITY__PROTOCOL": "SASL_SSL",
        "ENVOYGEO_KAFKA__SECURITY__USERNAME": "envoygeo",
        "ENVOYGEO_KAFKA__SECURITY__PASSWORD": "from-env"})
    assert librdkafka_security(s.kafka.security)["sasl.password"] == "from-env"
    shown = masked(s)["kafka"]["security"]
    assert shown["password"] == "***"
    s = load_settings(None, {"ENVOYGEO_KAFKA__SECURITY__PROTOCOL": "SASL_SSL",
                             "ENVOYGEO_KAFKA__SECURITY__USERNAME": "envoygeo",
                             "ENVOYGEO_KAFKA__SECURITY__PASSWORD_FILE": str(files["password"])})
    assert masked(s)["kafka"]["security"]["password_file"] == str(files["password"])


@pytest.mark.parametrize("env,expected", [
    ({"PROTOCOL": "SSL", "CA_FILE": "/nonexistent/ca.pem"},
     "kafka.security.ca_file (from ENVOYGEO_KAFKA__SECURITY__CA_FILE): cannot read "
     "/nonexistent/ca.pem: No such file or directory"),
    ({"PROTOCOL": "SASL_SSL", "USERNAME": "u", "PASSWORD_FILE": "/nonexistent/pw"},
     "kafka.security.password_file (from ENVOYGEO_KAFKA__SECURITY__PASSWORD_FILE): cannot "
     "read /nonexistent/pw"),
    ({"PROTOCOL": "SASL_SSL", "PASSWORD": "p"}, "protocol SASL_SSL needs username"),
    ({"PROTOCOL": "SASL_SSL", "USERNAME": "u"}, "needs password or password_file"),
    ({"PROTOCOL": "SSL", "USERNAME": "u"}, "username/password are only used with SASL_"),
    ({"CA_FILE": "/etc/hostname"}, "are only used with SSL or SASL_SSL, not PLAINTEXT"),
    ({"PROTOCOL": "SSL", "CERT_FILE": "/etc/hostname"}, "cert_file and key_file go together"),
    ({"PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "GSSAPI"}, "kafka.security.sasl_mechanism"),
])
def test_bad_security_settings_name_the_key(env: dict[str, str], expected: str) -> None:
    environ = {f"ENVOYGEO_KAFKA__SECURITY__{k}": v for k, v in env.items()}
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ)
    assert expected in str(err.value)


def test_both_password_and_file_is_an_error_and_the_password_is_not_shown(
        files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"ENVOYGEO_KAFKA__SECURITY__PROTOCOL": "SASL_SSL",
                             "ENVOYGEO_KAFKA__SECURITY__USERNAME": "u",
                             "ENVOYGEO_KAFKA__SECURITY__PASSWORD": "hunter2-secret",
                             "ENVOYGEO_KAFKA__SECURITY__PASSWORD_FILE": str(files["password"])})
    assert "set password or password_file, not both" in str(err.value)
    assert "hunter2-secret" not in str(err.value)


@pytest.mark.parametrize("code,text,kind", [
    (KafkaError._AUTHENTICATION, SASL_TEXT, SASL),
    (KafkaError._SSL, VERIFY_TEXT, VERIFY),
    (KafkaError._TRANSPORT, "ssl://h:1/bootstrap: error:0A000086:SSL routines::certificate "
                            "verify failed (after 3ms in state SSL_HANDSHAKE)", VERIFY),
    (KafkaError._TRANSPORT, CLIENT_TEXT, CLIENT_CERT),
    (None, NO_ISSUER, CLIENT_CERT),
    (KafkaError._SSL, "ssl://h:1/bootstrap: SSL handshake failed: wrong version number", TLS),
    # A broker that is down or restarting: transient, never a refusal.
    (KafkaError._TRANSPORT, REFUSED, None),
    (KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down", None),
    (KafkaError._TRANSPORT, "ssl://h:1/bootstrap: Disconnected (after 5012ms in state UP)",
     None),
])
def test_classify(code: int | None, text: str, kind: str | None) -> None:
    err = KafkaError(code, text) if code is not None else None
    assert classify(err, text) == kind


def test_refusals_are_fatal_only_after_the_grace_and_a_working_connection_clears_them() -> None:
    now = [100.0]
    k = KafkaSettings(bootstrap_servers="127.0.0.1:9094", security={  # type: ignore[arg-type]
        "protocol": "SASL_SSL", "username": "envoygeo", "password": "pw"})
    refusals = SecurityRefusals(k, grace_s=3.0, clock=lambda: now[0])
    auth = KafkaError(KafkaError._AUTHENTICATION, SASL_TEXT)
    assert not refusals.seen(KafkaError(KafkaError._TRANSPORT, REFUSED))
    assert refusals.verdict() is None
    for _ in range(9):  # every 0.35 s, as librdkafka retries a refused password
        assert refusals.seen(auth)
        now[0] += 0.35
    assert refusals.verdict() is None  # 2.8 s: still within the grace
    refusals.seen(auth)
    verdict = refusals.verdict()
    assert verdict is not None and verdict.startswith(
        "kafka: authentication failed at 127.0.0.1:9094 (SCRAM-SHA-512, user envoygeo)")
    assert "(refused for 3.1s; not retrying)" in verdict
    refusals.clear()  # an assignment or a record: the connection works
    assert refusals.verdict() is None
    refusals.seen(auth)
    now[0] += 10  # a lone refusal long ago is not part of a new episode
    refusals.seen(auth)
    assert refusals.verdict() is None


def test_the_message_names_the_user_and_never_the_password(files: dict[str, Path]) -> None:
    k = sasl(files).model_copy(update={"librdkafka": {"sasl.password": "override-pw"}})
    line = describe_failure(SASL, k, SASL_TEXT, 3.2)
    assert line == (
        "kafka: authentication failed at 127.0.0.1:9094 (SCRAM-SHA-512, user envoygeo): "
        "check kafka.security.username/password/password_file and sasl_mechanism (refused "
        "for 3.2s; not retrying) [librdkafka: SASL authentication error: Authentication "
        "failed during authentication due to invalid credentials with SASL mechanism "
        "SCRAM-SHA-512]")
    assert "s3cret" not in line and "override-pw" not in line
    client = describe_failure(CLIENT_CERT, KafkaSettings(
        bootstrap_servers="b:9095", security={"protocol": "SSL"}), CLIENT_TEXT, 0)  # type: ignore[arg-type]
    assert client.startswith("kafka: the broker at 127.0.0.1:9095 refused this client's TLS "
                             "certificate: this client sent no certificate and the broker "
                             "requires one; check kafka.security.cert_file/key_file")


def test_the_worker_logger_leaves_refusals_to_the_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.kafka_security.librdkafka")
    reported = LibrdkafkaLogger(logger, security_reported=True)
    plain = LibrdkafkaLogger(logger)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for text in (SASL_TEXT, VERIFY_TEXT, CLIENT_TEXT):
            reported.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", text)
        reported.log(logging.WARNING, "%s [%s] %s", "SSL", "rdkafka#consumer-1", NO_ISSUER)
        reported.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", REFUSED)
        plain.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-2", SASL_TEXT)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, REFUSED), (logging.ERROR, SASL_TEXT)]


def test_a_file_librdkafka_cannot_use_is_blamed_on_its_security_key(tmp_path: Path) -> None:
    """check-config / run: librdkafka's verdict on the files names the key that set them."""
    from pipeline.preflight import local_problems

    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    s = load_settings(None, {"ENVOYGEO_KAFKA__SECURITY__PROTOCOL": "SSL",
                             "ENVOYGEO_KAFKA__SECURITY__CA_FILE": str(bad)})
    [(key, why)] = local_problems(s)
    assert key == "kafka.security.ca_file"
    assert "ssl.ca.location failed" in why
    s = load_settings(None, {"ENVOYGEO_KAFKA__LIBRDKAFKA__SECURITY.PROTOCOL": "SSL",
                             "ENVOYGEO_KAFKA__LIBRDKAFKA__SSL.CA.LOCATION": str(bad)})
    assert [key for key, _ in local_problems(s)] == ["kafka.librdkafka"]


def test_refusal_log_keeps_the_first_refusal_and_passes_the_rest_on() -> None:
    """`setup`'s AdminClient logger: the refusal explains a failed call; other lines go on."""
    from pipeline.kafka_security import RefusalLog

    class Keep:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def log(self, level: int, fmt: str, *args: object) -> None:
            self.lines.append(str(args[2]))

    keep = Keep()
    refusals = RefusalLog(forward=keep)
    assert refusals.explain(KafkaSettings()) is None and not refusals.lasted(0)
    refusals.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", REFUSED)
    refusals.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                 "[thrd:sasl_ssl://127.0.0.1:9094/bootstrap]: " + SASL_TEXT)
    refusals.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", VERIFY_TEXT)
    assert keep.lines == [REFUSED]
    assert refusals.kind == SASL and refusals.lasted(0)
    k = KafkaSettings(bootstrap_servers="127.0.0.1:9094", security={  # type: ignore[arg-type]
        "protocol": "SASL_SSL", "username": "envoygeo", "password": "pw"})
    explained = refusals.explain(k)
    assert explained is not None and explained.startswith(
        "kafka: authentication failed at 127.0.0.1:9094 (SCRAM-SHA-512, user envoygeo)")
