"""Where alerts are read from: the alerts index (default) or the alerts topic.

The worker writes every alert to both (`elasticsearch.alerts_index`,
`kafka.alerts_topic`), with the same id. Each round reads the alerts of the last
`expire_after_s` seconds afresh instead of keeping its own tally: the deny set is a
pure function of what the fleet alerted on, so a restarted or second `policy` process
decides the same, and nothing is lost between rounds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson

from pipeline.policy.decide import Offence

ALERT_DATASET = "envoygeo.rate_alert"


def offence_from_doc(doc_id: str, src: dict[str, Any]) -> Offence | None:
    """None for a document that is not a rate alert (another dataset in the index)."""
    if (src.get("event") or {}).get("dataset", ALERT_DATASET) != ALERT_DATASET:
        return None
    ip = (src.get("source") or {}).get("ip")
    alert = (src.get("envoygeo") or {}).get("alert") or {}
    ts = src.get("@timestamp")
    if not isinstance(ts, str):
        return None
    when = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return Offence(ip=str(ip), alert_id=doc_id,
                   rule=str((src.get("rule") or {}).get("name") or alert.get("rule")),
                   ts=when, count=int(alert.get("count") or 0))


def from_elasticsearch(es: Any, index: str, since: float, page: int = 1000) -> list[Offence]:
    """Every alert with @timestamp >= since, paged through a point in time (alerts are
    one per rule, address and window period, so even a wide flood is thousands, not
    millions)."""
    if not es.indices.exists(index=index):
        return []  # no alert yet: the worker creates the index with the first one
    query = {"bool": {"filter": [
        {"range": {"@timestamp": {"gte": int(since * 1000), "format": "epoch_millis"}}},
        {"term": {"event.dataset": ALERT_DATASET}}]}}
    out: list[Offence] = []
    pit = es.open_point_in_time(index=index, keep_alive="1m")["id"]
    try:
        after: list[Any] | None = None
        while True:
            kwargs: dict[str, Any] = {}
            if after is not None:
                kwargs["search_after"] = after
            # With a point in time, Elasticsearch adds the _shard_doc tiebreaker itself.
            resp = es.search(query=query, size=page, sort=[{"@timestamp": "asc"}],
                             pit={"id": pit, "keep_alive": "1m"}, **kwargs)
            pit = resp.get("pit_id", pit)
            hits = resp["hits"]["hits"]
            for h in hits:
                o = offence_from_doc(h["_id"], h["_source"])
                if o is not None:
                    out.append(o)
            if len(hits) < page:
                return out
            after = hits[-1]["sort"]
    finally:
        es.close_point_in_time(id=pit)


def from_kafka(conf: dict[str, Any], topic: str, since: float,
               timeout_s: float = 30.0) -> list[Offence]:
    """Every alert produced at or after `since` (the record timestamp), read from each
    partition's offset for that time up to the end as it was when reading started."""
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.kafka_log import kafka_logger

    # Assigned partitions, never subscribed: the group id is required but never joined.
    consumer = Consumer({**conf, "group.id": "envoygeo-policy", "enable.auto.commit": False,
                         "enable.partition.eof": True}, logger=kafka_logger())
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise RuntimeError(f"alerts topic {topic!r} not found "
                               f"({meta.error if meta is not None else 'no metadata'})")
        wanted = [TopicPartition(topic, p, int(since * 1000)) for p in meta.partitions]
        starts = consumer.offsets_for_times(wanted, timeout=timeout_s)
        ends: dict[int, int] = {}
        assign = []
        for tp in starts:
            _, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
            if tp.offset >= 0 and tp.offset < high:  # -1: nothing that recent
                ends[tp.partition] = high
                assign.append(tp)
        out: list[Offence] = []
        if not assign:
            return out
        consumer.assign(assign)
        deadline = time.monotonic() + timeout_s
        for msg in _messages(consumer, ends, deadline):
            try:
                src = orjson.loads(msg.value())
            except orjson.JSONDecodeError:
                continue  # not ours: the topic only carries alert documents
            key = msg.key()
            o = offence_from_doc(key.decode() if key else "", src)
            if o is not None:
                out.append(o)
        return out
    finally:
        consumer.close()


def _messages(consumer: Any, ends: dict[int, int], deadline: float) -> Iterator[Any]:
    pending = dict(ends)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"alerts topic: partitions {sorted(pending)} not read to "
                               "their end in time")
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error() is not None:
            if msg.error().code() == -191:  # _PARTITION_EOF
                pending.pop(msg.partition(), None)
                continue
            raise RuntimeError(f"alerts topic: {msg.error()}")
        if msg.offset() + 1 >= pending.get(msg.partition(), 0):
            pending.pop(msg.partition(), None)
        if msg.partition() in ends and msg.offset() < ends[msg.partition()]:
            yield msg
