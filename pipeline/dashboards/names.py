"""The indices the dashboards, the Kibana rule and the report read: the configured ones.

Why one small type: the worker writes to `elasticsearch.index` / `alerts_index`, and
every object that reads those indices (data views, the rule's `params.index`, the
report's searches, the validator's choice of field table) must name exactly them. A
deployment that renames its index gets dashboards for that index, not for
`envoygeo-logs*`. With `privacy.client_ip: hash` the log index has no `source.ip`:
`client` is then `envoygeo.client_id`, so the top-client panels and the Kibana rule
group on the pseudonym instead of finding nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import schema
from pipeline.config import ElasticsearchSettings, PrivacySettings

CLIENT_IP = "source.ip"
CLIENT_ID = "envoygeo.client_id"  # privacy.client_ip: hash


def pattern(index: str) -> str:
    """The wildcard that covers an index, its rollovers and a data stream's backing
    indices, as `schema.index_templates` does (`<index>*`)."""
    return index if index.endswith("*") else f"{index}*"


@dataclass(frozen=True)
class IndexNames:
    logs: str = schema.LOGS_TEMPLATE
    alerts: str = schema.ALERTS_TEMPLATE
    client: str = CLIENT_IP  # the log index's field naming a client

    @classmethod
    def from_settings(cls, es: ElasticsearchSettings,
                      privacy: PrivacySettings | None = None) -> IndexNames:
        hashed = privacy is not None and privacy.client_ip == "hash"
        return cls(logs=es.index, alerts=es.alerts_index,
                   client=CLIENT_ID if hashed else CLIENT_IP)

    @property
    def client_label(self) -> str:
        return "Source IP" if self.client == CLIENT_IP else "Client (pseudonym)"

    @property
    def logs_pattern(self) -> str:
        return pattern(self.logs)

    @property
    def alerts_pattern(self) -> str:
        return pattern(self.alerts)

    def fields_for(self, index_pattern: str) -> tuple[schema.Field, ...] | None:
        """The field table an index pattern reads, by name prefix; the longer name is
        tried first so `x` / `x-alerts` style pairs resolve to the right table."""
        candidates = sorted([(self.logs.rstrip("*"), schema.FIELDS),
                             (self.alerts.rstrip("*"), schema.ALERT_FIELDS)],
                            key=lambda c: -len(c[0]))
        for prefix, fields in candidates:
            if index_pattern.startswith(prefix):
                return fields
        return None


DEFAULT = IndexNames()
