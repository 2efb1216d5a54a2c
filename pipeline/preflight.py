"""What `run` needs before it starts, checked by one code path for `run` and `check-config`.

`load_settings` validates what can be judged from the text alone (types, ranges, URL
syntax, format strings). `load_for_run` adds what needs the machine but no server:
the GeoIP databases open and answer (the same `GeoIP.open` the worker calls), the
Elasticsearch CA file loads, librdkafka accepts the consumer's settings (the worker's
own `consumer_config`, minus the brokers, so nothing connects). `probe_services`
(`check-config --connect`) then asks Kafka, Elasticsearch and Redis, with the
configured credentials and bounded timeouts, the questions `run` depends on.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import (
    ConfigError,
    KafkaSettings,
    Settings,
    explain,
    load_settings,
    url_without_password,
)
from pipeline.config_sources import Problem


def load_for_run(path: Path | str | None = None) -> Settings:
    """`load_settings` plus `local_problems`: what `run` and `check-config` both load."""
    settings = load_settings(path)
    problems = local_problems(settings)
    if problems:
        raise ConfigError(explain(problems, path))
    return settings


def local_problems(settings: Settings) -> list[Problem]:
    """Files and client settings `run` would fail on, each named by its key."""
    return _geoip_problems(settings) + _ca_problems(settings) + _librdkafka_problems(settings)


def _geoip_problems(settings: Settings) -> list[Problem]:
    from pipeline.enrich.geoip import GeoIP, GeoIPReloadError

    problems = []
    for role in ("city", "country", "asn"):
        path = getattr(settings.geoip, role)
        if path is None:
            continue
        try:
            opened = GeoIP.open(**{role: path})
        except GeoIPReloadError as exc:
            problems.append((f"geoip.{role}", f"cannot use {path}: {exc.__cause__ or exc}"))
        else:
            for db in opened.databases:  # `run` opens its own; keep no mapping open
                db.reader.close()
    return problems


def _ca_problems(settings: Settings) -> list[Problem]:
    ca = settings.elasticsearch.ca_certs
    if ca is None:
        return []
    try:
        # What the HTTP client does with ca_certs when it opens its first connection.
        ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        return [("elasticsearch.ca_certs", f"cannot load {ca} as PEM certificates: {exc}")]
    return []


def _librdkafka_problems(settings: Settings) -> list[Problem]:
    from confluent_kafka import Consumer, KafkaException

    from pipeline.sources.kafka import consumer_config

    try:
        conf = consumer_config(settings.kafka, settings.kafka.group_instance_id)
    except ValueError as exc:  # KafkaConfigError names its keys itself
        key, _, why = str(exc).partition(": ")
        return [(key, why)]
    # Without bootstrap.servers librdkafka validates every property (names, values,
    # SSL files, SASL completeness) and never opens a connection.
    conf.pop("bootstrap.servers", None)
    try:
        Consumer(conf, logger=_Discard()).close()
    except KafkaException as exc:
        from pipeline.kafka_security import setting_named_by

        why = exc.args[0].str()
        return [(setting_named_by(why, settings.kafka), why)]
    return []


class _Discard:
    """A librdkafka logger that keeps nothing (the offline check's client is a probe)."""

    def log(self, level: int, fmt: str, *args: object) -> None:
        pass


# -- check-config --connect --------------------------------------------------------

class ServiceCheck(NamedTuple):
    service: str
    status: str  # "ok", "FAILED" or "skipped"
    detail: str


class ProbeFailed(Exception):
    """A service did not answer as `run` needs; the message says what and why."""


def probe_services(settings: Settings, timeout_s: float = 5.0) -> list[ServiceCheck]:
    """Kafka, Elasticsearch and Redis at once. Each client call is bounded by `timeout_s`;
    a probe still running after `deadline_factor` of them is reported and abandoned
    (daemon threads), so a client that ignores its timeout cannot hang the command."""
    redis_why = ("" if settings.rates.enabled and settings.rates.backend == "redis"
                 else "rates.backend is not redis" if settings.rates.enabled
                 else "rates.enabled is false")
    # `envoygeo forward` in mode direct is the one command that runs without Kafka.
    kafka_why = "forward.mode is direct (no Kafka)" if settings.forward.mode == "direct" else ""
    probes: list[tuple[str, Callable[[Settings, float], str], str]] = [
        ("kafka", probe_kafka, kafka_why), ("elasticsearch", probe_elasticsearch, ""),
        ("redis", probe_redis, redis_why)]
    outcome: dict[str, ServiceCheck] = {}

    def run(name: str, probe: Callable[[Settings, float], str]) -> None:
        try:
            outcome[name] = ServiceCheck(name, "ok", probe(settings, timeout_s))
        except Exception as exc:  # the answer we report, whatever the client raised
            text = str(exc) if isinstance(exc, ProbeFailed) else f"{type(exc).__name__}: {exc}"
            outcome[name] = ServiceCheck(name, "FAILED", " ".join(text.split())[:400])

    threads = [threading.Thread(target=run, args=(name, probe), daemon=True)
               for name, probe, skip in probes if not skip]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE_FACTOR * timeout_s + 1
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    results = []
    for name, _, skip in probes:
        if skip:
            results.append(ServiceCheck(name, "skipped", skip))
        else:
            results.append(outcome.get(name) or ServiceCheck(
                name, "FAILED", f"no answer within {DEADLINE_FACTOR * timeout_s + 1:.0f} s"))
    return results


# Elasticsearch's probe makes up to five bounded requests one after another (info, then
# the template check per index); the others two at most.
DEADLINE_FACTOR = 5


class _Collect:
    """librdkafka's errors and error-level log lines, kept to explain a failure."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, err: Any) -> None:
        self.errors.append(err.str())

    def log(self, level: int, fmt: str, *args: object) -> None:
        if level <= 3 and len(args) == 3:
            self.errors.append(str(args[2]))

    def why(self) -> str:
        return f" ({self.errors[0]})" if self.errors else ""

    def refusal(self, k: KafkaSettings) -> str | None:
        """A refused handshake or password among them, said as the worker says it."""
        from pipeline.kafka_security import classify, describe_failure

        for text in self.errors:
            kind = classify(None, text)
            if kind is not None:
                return describe_failure(kind, k, text, 0)
        return None


def probe_kafka(settings: Settings, timeout_s: float) -> str:
    """Metadata and the group coordinator, with the worker's own librdkafka settings."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from pipeline.sources.kafka import consumer_config

    k = settings.kafka
    # No group.instance.id: the probe never joins the group, and must not fence a
    # running worker that uses the configured one.
    conf = consumer_config(k, None)
    collect = _Collect()
    conf.update({"error_cb": collect.error,
                 "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000))})
    consumer = Consumer(conf, logger=collect)
    try:
        start = time.monotonic()
        try:
            meta = consumer.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            consumer.poll(0)  # serves the error and log callbacks that say why
            refused = collect.refusal(k)
            if refused:
                raise ProbeFailed(refused) from None
            if not collect.errors and time.monotonic() - start >= timeout_s * 0.9:
                collect.errors.append(f"no answer within {timeout_s:g} s")
            raise ProbeFailed(f"{k.bootstrap_servers}: {exc.args[0].str()}{collect.why()}") \
                from None
        topics = meta.topics
        if k.topic_pattern:
            import re

            pattern = re.compile(k.topic_pattern)
            source = sorted(t for t in topics if pattern.match(t))
            missing = [] if source else [f"(none matches {k.topic_pattern})"]
        else:
            source = [t for t in k.topics if t in topics]
            missing = [t for t in k.topics if t not in topics]
        missing += [t for t in (k.dead_letter_topic, k.alerts_topic) if t not in topics]
        if missing:
            raise ProbeFailed(f"{k.bootstrap_servers}: missing topics {', '.join(missing)} "
                              "(`envoygeo setup` creates them)")
        for name in (*source, k.dead_letter_topic, k.alerts_topic):
            if topics[name].error is not None:
                raise ProbeFailed(f"topic {name}: {topics[name].error.str()}")
        # Reading the group's committed offsets needs the group coordinator and, on a
        # secured cluster, the group's Describe/Read ACLs: what joining needs.
        try:
            consumer.committed([TopicPartition(source[0], 0)], timeout=timeout_s)
        except KafkaException as exc:
            consumer.poll(0)
            raise ProbeFailed(f"group {k.group_id}: {exc.args[0].str()}{collect.why()}") \
                from None
        shown = ", ".join(f"{t} ({len(topics[t].partitions)} partitions)"
                          for t in (*source, k.dead_letter_topic, k.alerts_topic))
        return (f"{k.bootstrap_servers}: {len(meta.brokers)} broker(s); topics {shown}; "
                f"group {k.group_id} coordinator answers")
    finally:
        consumer.close()


def probe_elasticsearch(settings: Settings, timeout_s: float) -> str:
    """The cluster answers with the configured auth/CA, and the index templates `run`
    requires are in place (the same `missing_templates` check)."""
    from elastic_transport import TransportError
    from elasticsearch import ApiError

    from pipeline.service_errors import describe_elasticsearch_error
    from pipeline.setup import missing_templates
    from pipeline.sinks.elasticsearch import make_client

    cfg = settings.elasticsearch
    where = ", ".join(cfg.hosts)
    with make_client(cfg) as client:
        es = client.options(request_timeout=timeout_s)
        try:
            info = es.info()
            missing = missing_templates(es, settings)
        except (TransportError, ApiError) as exc:  # the words `run` would exit with
            raise ProbeFailed(describe_elasticsearch_error(exc, cfg)) from None
    if missing:
        raise ProbeFailed(f"{where}: no envoygeo index template covers {', '.join(missing)} "
                          "(`envoygeo setup` installs them; `run` refuses to start without)")
    return (f"{where}: cluster {info['cluster_name']} {info['version']['number']}; "
            f"index templates cover {cfg.index}, {cfg.alerts_index}")


def probe_redis(settings: Settings, timeout_s: float) -> str:
    """PING with the URL's credentials (rates.backend: redis)."""
    import redis

    from pipeline.enrich.rates.redis import connect
    from pipeline.service_errors import describe_redis_error

    where = url_without_password(settings.rates.redis_url)
    client = connect(settings.rates, socket_connect_timeout=timeout_s,
                     socket_timeout=timeout_s)
    try:
        info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
        version = info["redis_version"]
    except redis.RedisError as exc:
        raise ProbeFailed(describe_redis_error(exc, settings.rates)) from None
    finally:
        client.close()
    return f"{where}: redis {version}"
