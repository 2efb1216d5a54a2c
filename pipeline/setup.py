"""What `envoygeo setup` installs, and what `envoygeo run` checks before it starts."""

from __future__ import annotations

import logging

from confluent_kafka.admin import AdminClient, NewTopic
from elasticsearch import Elasticsearch

from pipeline.config import Settings
from pipeline.kafka_log import kafka_logger
from pipeline.kafka_security import RefusalLog, client_config, list_topics
from pipeline.schema import component_templates, index_templates

log = logging.getLogger(__name__)


def install_templates(es: Elasticsearch, settings: Settings) -> list[str]:
    """Put the component and composable index templates; returns what was installed."""
    cfg = settings.elasticsearch
    done = []
    for name, body in component_templates().items():
        es.cluster.put_component_template(name=name, **body)
        done.append(f"component template {name}")
    for name, body in index_templates(cfg.index, cfg.alerts_index, cfg.data_stream).items():
        es.indices.put_index_template(name=name, **body)
        done.append(f"index template {name} -> {body['index_patterns'][0]}")
    return done


def missing_templates(es: Elasticsearch, settings: Settings) -> list[str]:
    """Indices (or existing indices) that would not get envoygeo's mappings.

    Asks Elasticsearch which template a new index of that name would get, rather than
    looking for our template by name: any template the operator installed that maps
    `source.ip` as `ip` is accepted, and a name no template covers is reported.
    """
    missing = []
    for name in (settings.elasticsearch.index, settings.elasticsearch.alerts_index):
        if es.indices.exists(index=name):
            mappings = next(iter(es.indices.get_mapping(index=name).body.values()))["mappings"]
        else:
            mappings = es.indices.simulate_index_template(name=name).body.get(
                "template", {}).get("mappings", {})
        source_ip = mappings.get("properties", {}).get("source", {}).get(
            "properties", {}).get("ip", {})
        if source_ip.get("type") != "ip":
            missing.append(name)
    return missing


def ensure_topics(settings: Settings, source_too: bool = True) -> list[str]:
    """Create the topics envoygeo owns (dead-letter, alerts) and, for demos, the source."""
    k = settings.kafka
    refusals = RefusalLog(forward=kafka_logger())
    admin = AdminClient(client_config(k), logger=refusals)
    existing = set(list_topics(admin, refusals, k).topics)
    wanted = [k.dead_letter_topic, k.alerts_topic]
    if source_too and not k.topic_pattern:
        wanted += k.topics
    new = [NewTopic(t, num_partitions=k.topic_partitions, replication_factor=-1)
           for t in dict.fromkeys(wanted) if t not in existing]
    created = []
    for topic, fut in admin.create_topics(new).items() if new else []:
        fut.result(timeout=30)
        created.append(topic)
    return created
