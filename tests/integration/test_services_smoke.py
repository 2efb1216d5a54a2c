"""The local Kafka and Redis answer for real (Elasticsearch: test_elasticsearch_node.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=30)


def test_kafka_six_partitions_group_commit(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    topic, group = unique("smoke"), unique("smoke-group")
    _create_topic(kafka_bootstrap, topic, 6)

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    sent = {f"key-{i}": f"value-{i}".encode() for i in range(120)}
    for key, value in sent.items():
        producer.produce(topic, key=key.encode(), value=value)
    assert producer.flush(30) == 0

    consumer = Consumer({
        "bootstrap.servers": kafka_bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    received: dict[str, bytes] = {}
    partitions_seen: set[int] = set()
    deadline = time.monotonic() + 60
    while len(received) < len(sent) and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            raise KafkaException(msg.error())
        received[msg.key().decode()] = msg.value()
        partitions_seen.add(msg.partition())
    consumer.commit(asynchronous=False)
    committed = consumer.committed([TopicPartition(topic, p) for p in range(6)], timeout=30)
    consumer.close()

    assert received == sent
    assert len(partitions_seen) > 1, "keys should spread over the 6 partitions"
    assert sum(tp.offset for tp in committed if tp.offset >= 0) == len(sent)

    # A new member of the same group starts after the committed offsets: nothing to read.
    again = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group,
                      "auto.offset.reset": "earliest", "enable.auto.commit": False})
    again.subscribe([topic])
    leftovers = [m for m in (again.poll(1.0) for _ in range(8)) if m is not None and not m.error()]
    again.close()
    assert leftovers == []


def test_redis_incr_expire(redis_url: str, unique: Callable[[str], str]) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    key = unique("smoke:counter")
    assert client.incr(key) == 1
    assert client.incr(key) == 2
    assert client.expire(key, 1)
    assert 0 < client.ttl(key) <= 1
    time.sleep(1.6)
    assert client.get(key) is None


@pytest.mark.parametrize("name", ["kafka", "redis"])
def test_up_is_idempotent(name: str, kafka_bootstrap: str, redis_url: str) -> None:
    import subprocess

    from tests.conftest import ROOT

    out = subprocess.run(["bash", str(ROOT / "deploy/local/up"), name],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "already running" in out
