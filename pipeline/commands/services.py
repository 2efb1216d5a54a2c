"""`envoygeo services`: one line per local service, so a person sees at a glance what runs."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline.kafka_log import kafka_logger


def _kafka(bootstrap: str) -> str:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 3000},
                        logger=kafka_logger())
    try:
        meta = admin.list_topics(timeout=5)
    finally:
        # librdkafka's lines reach the logger only when the client is served: without
        # this, why the broker did not answer (refused, TLS, auth) would never be said.
        admin.poll(0)
    brokers = ", ".join(f"{b.host}:{b.port}" for b in meta.brokers.values())
    return f"brokers {brokers}, {len(meta.topics)} topics"


def _elasticsearch(url: str) -> str:
    from elasticsearch import Elasticsearch

    with Elasticsearch(url, request_timeout=5) as es:
        info = es.info()
        health = es.cluster.health()
    return f"{info['version']['number']} cluster {info['cluster_name']} status {health['status']}"


def _redis(url: str) -> str:
    import redis

    # The sync client returns a dict (its stubs also allow the asyncio client's awaitable).
    client = redis.Redis.from_url(url, socket_timeout=3)
    info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
    return f"{info['redis_version']}"


@click.command()
@click.option("--kafka", "kafka_bootstrap", default="127.0.0.1:9092", show_default=True)
@click.option("--elasticsearch", "es_url", default="http://127.0.0.1:9200", show_default=True)
@click.option("--redis", "redis_url", default="redis://127.0.0.1:6379/0", show_default=True)
def services(kafka_bootstrap: str, es_url: str, redis_url: str) -> None:
    """Check that Kafka, Elasticsearch and Redis answer, and print their versions.

    Start them with `deploy/local/up`. Exits 1 if any does not answer.
    """
    failed = 0
    for name, endpoint, probe in (
        ("kafka", kafka_bootstrap, _kafka),
        ("elasticsearch", es_url, _elasticsearch),
        ("redis", redis_url, _redis),
    ):
        try:
            click.echo(f"{name:<14} {endpoint:<28} up: {probe(endpoint)}")
        except Exception as exc:  # any failure is the answer we report
            failed += 1
            click.echo(f"{name:<14} {endpoint:<28} DOWN: {type(exc).__name__}: {exc}")
    sys.exit(1 if failed else 0)
