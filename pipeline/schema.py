"""The one definition of envoygeo's output fields.

Everything else is derived from FIELDS and ALERT_FIELDS: the Elasticsearch component and
index templates and the JSON Schema files in `schemas/` (written by
`envoygeo schema write`, checked by `tests/unit/test_schema.py`), and the drift test
that runs the document builder and fails on any field it emits that is not here, or
emits with the wrong JSON type. Kibana dashboards validate their field references
against the same table.
"""

from __future__ import annotations

from typing import Any

from pipeline.fields import Field
from pipeline.plugins import plugin_fields

ECS_VERSION = "8.17.0"
LOGS_TEMPLATE = "envoygeo-logs"
ALERTS_TEMPLATE = "envoygeo-alerts"


def _kw(name: str, doc: str, array: bool = False, search: bool = True) -> Field:
    return Field(name, "keyword", doc, array, search=search)


# Source fields of an access-log document (ECS names where ECS has one).
FIELDS: tuple[Field, ...] = (
    Field("@timestamp", "date", "Request start (Envoy START_TIME), else the shipper's time, "
          "else the Kafka record's, else ingest time (envoygeo.timestamp_source says which)."),
    _kw("ecs.version", "ECS version the document follows."),
    _kw("event.kind", "event, or pipeline_error for lines that could not be parsed."),
    _kw("event.category", "ECS category: web.", array=True),
    _kw("event.type", "ECS type: access.", array=True),
    _kw("event.outcome", "success / failure (5xx) / unknown."),
    Field("event.duration", "long", "Request duration in nanoseconds.", search=False),
    Field("event.ingested", "date", "When envoygeo built the document.", search=False),
    Field("event.original", "keyword", "The raw line, for unparsed records.", indexed=False),
    _kw("event.module", "Always envoygeo."),
    _kw("event.dataset", "envoygeo.access or envoygeo.rate_alert."),
    Field("error.message", "text", "Why the line could not be parsed."),
    _kw("tags", "Tags: parse failures, private client IPs, GeoIP misses, bad addresses.", True),
    Field("source.ip", "ip", "The true client address (PROXY protocol, peer or trusted XFF); "
          "its network with privacy.client_ip truncate, absent with hash."),
    Field("source.port", "long", "Client port, when the address came with one.",
          search=False),
    _kw("source.geo.continent_code", "GeoIP continent code."),
    _kw("source.geo.continent_name", "GeoIP continent name."),
    _kw("source.geo.country_iso_code", "GeoIP ISO 3166-1 alpha-2 country."),
    _kw("source.geo.country_name", "GeoIP country name."),
    _kw("source.geo.region_iso_code", "GeoIP ISO 3166-2 subdivision (e.g. US-CA)."),
    _kw("source.geo.region_name", "GeoIP subdivision name."),
    _kw("source.geo.city_name", "GeoIP city."),
    _kw("source.geo.postal_code", "GeoIP postal code."),
    _kw("source.geo.timezone", "GeoIP IANA time zone."),
    Field("source.geo.location", "geo_point", "GeoIP latitude/longitude ({lat, lon})."),
    Field("source.as.number", "long", "Autonomous system number."),
    _kw("source.as.organization.name", "Autonomous system organisation."),
    Field("destination.ip", "ip", "Envoy's listener address (DOWNSTREAM_LOCAL_ADDRESS)."),
    Field("destination.port", "long", "Envoy's listener port.", search=False),
    _kw("http.request.method", "HTTP method."),
    _kw("http.request.id", "x-request-id.", search=False),
    Field("http.request.bytes", "long", "Bytes received from the client (BYTES_RECEIVED).",
          search=False),
    Field("http.response.status_code", "long", "HTTP status (absent for TCP / no response)."),
    Field("http.response.bytes", "long", "Bytes sent to the client (BYTES_SENT).",
          search=False),
    _kw("http.version", "HTTP version (1.1, 2, 3)."),
    _kw("url.original", "Path and query as requested (X-ENVOY-ORIGINAL-PATH or :PATH)."),
    _kw("url.path", "Path without the query."),
    _kw("url.query", "Query string without '?'."),
    _kw("url.domain", ":authority / Host without port."),
    _kw("user_agent.original", "User-Agent header.", search=False),
    _kw("tls.client.server_name", "SNI (REQUESTED_SERVER_NAME)."),
    Field("related.ip", "ip", "Every address seen: client, peer, XFF hops, upstream.", True),
    _kw("envoy.log_format", "Which format parsed the line (envoy, istio, json, custom...)."),
    _kw("envoy.response_flags", "Envoy RESPONSE_FLAGS (UH, UF, NR, ...)."),
    _kw("envoy.response_code_details", "RESPONSE_CODE_DETAILS."),
    _kw("envoy.connection_termination_details", "CONNECTION_TERMINATION_DETAILS."),
    _kw("envoy.upstream_transport_failure_reason", "UPSTREAM_TRANSPORT_FAILURE_REASON."),
    _kw("envoy.route_name", "ROUTE_NAME."),
    _kw("envoy.x_forwarded_for", "X-Forwarded-For as received.", search=False),
    _kw("envoy.downstream_remote_address", "DOWNSTREAM_REMOTE_ADDRESS as logged, when it is "
        "not source.ip[:source.port] (an XFF client, an IPv4-mapped form).", search=False),
    _kw("envoy.downstream_direct_remote_address", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS (the LB).",
        search=False),
    _kw("envoy.downstream_local_address", "DOWNSTREAM_LOCAL_ADDRESS as logged, when it is "
        "not destination.ip[:destination.port].", search=False),
    _kw("envoy.protocol", "PROTOCOL as logged when not HTTP (HTTP/x is http.version)."),
    _kw("envoy.upstream.host", "UPSTREAM_HOST."),
    _kw("envoy.upstream.cluster", "UPSTREAM_CLUSTER."),
    _kw("envoy.upstream.local_address", "UPSTREAM_LOCAL_ADDRESS.", search=False),
    Field("envoy.upstream.service_time_ms", "long", "x-envoy-upstream-service-time.",
          search=False),
    Field("envoy.extra", "object", "Other logged values (dynamic metadata, custom keys).",
          indexed=False),
    _kw("kubernetes.pod_name", "Pod (Fluent Bit kubernetes filter)."),
    _kw("kubernetes.namespace_name", "Namespace."),
    _kw("kubernetes.container_name", "Container (istio-proxy)."),
    _kw("kubernetes.container_image", "Container image."),
    _kw("kubernetes.container_hash", "Container image digest.", search=False),
    _kw("kubernetes.docker_id", "Container id.", search=False),
    _kw("kubernetes.pod_id", "Pod UID.", search=False),
    _kw("kubernetes.host", "Node name."),
    Field("kubernetes.labels", "flattened", "Pod labels."),
    Field("kubernetes.annotations", "flattened", "Pod annotations."),
    _kw("envoygeo.ip_source", "How source.ip was found: proxy_protocol, peer, x_forwarded_for."),
    _kw("envoygeo.ip_class", "public, private, loopback, cgnat, link_local, reserved..."),
    _kw("envoygeo.client_id", "privacy.client_ip hash: HMAC-SHA256 of the client address "
        "(32 hex), a pseudonym in place of source.ip."),
    _kw("envoygeo.envelope", "Record envelope: fluentbit, fluentd, docker, cri, bare."),
    _kw("envoygeo.stream", "stdout / stderr, when the envelope says."),
    _kw("envoygeo.timestamp_source", "Where @timestamp came from: log (START_TIME), "
        "envelope (the shipper's time), kafka (the Kafka record's), ingest (envoygeo's)."),
    _kw("envoygeo.truncated", "Fields cut to limits.max_field_bytes (tag "
        "envoygeo_field_truncated; envoygeo_line_truncated: the line was cut).", array=True),
    Field("envoygeo.rate.*", "long", "Requests by this client in the trailing window (e.g. 60s).",
          search=False),
)

# Fields something envoygeo ships reads, and what: the bundled dashboards (Kibana,
# OpenSearch Dashboards), `envoygeo report`, the alert rules and `envoygeo policy`, or
# the dead-letter/unparsed path. `document.omit` refuses these (a dashboard panel or a
# rule would go blank); tests/unit/test_document_omit.py fails when one of those files
# starts reading a field that is not listed here.
READ_BY: dict[str, str] = {
    "@timestamp": "every dashboard, the report and the alert rules",
    "event.kind": "the dashboards and the Kibana alert rule (pipeline_error lines)",
    "event.original": "unparsed lines (their only content)",
    "error.message": "unparsed lines (why they could not be parsed)",
    "tags": "the dashboards and the report (parse failures, GeoIP misses)",
    "source.ip": "the dashboards, the report, the alert rules and envoygeo policy",
    "source.geo.country_iso_code": "the dashboards and the report (top countries)",
    "source.geo.country_name": "the report (top countries)",
    "source.geo.city_name": "the dashboards and the report (top cities)",
    "source.geo.location": "the dashboards and the report (the map)",
    "http.response.status_code": "the dashboards (status codes)",
    "http.response.bytes": "the dashboards and the report (bytes sent)",
    "url.domain": "the dashboards (hosts)",
    "envoygeo.ip_source": "the dashboards and the report (how the client was found)",
    "envoygeo.client_id": "the dashboards and the report with privacy.client_ip: hash",
    "envoygeo.envelope": "the dashboards (shippers)",
    "envoygeo.rate.*": "the dashboards and the alert rules (per-IP rates)",
}

# `document.profile: lean`: the fields nothing in READ_BY's list reads and that a
# request's story does not need (constants, the shipper's bookkeeping, GeoIP detail
# below the city, pod identity beyond the namespace, duplicates of other fields).
# Why a profile and not a mapping choice: every mapping tried for issue 15 (LEAN_CHOICES,
# the Istio integration's, stored vs synthetic _source, constant fields, a 13-field
# mapping, SMILE bodies, bigger bulks) left the node's CPU per document inside the
# rounds' noise; a JFR profile of the node puts ~45 % of it in parsing and mapping the
# JSON fields and ~30 % in Lucene's per-field indexing, so the fields a document carries
# are what it costs. Leaving out groups of them (100,000 documents, 6 alternated rounds,
# the shipped template, node CPU per document against the full documents): the 5
# constants 0.93x, 7 bookkeeping/duplicate fields (event.ingested, http.request.id,
# url.original, envoy.upstream.local_address, envoygeo.stream/timestamp_source,
# envoy.log_format) 0.92x, kubernetes 0.94x, GeoIP below the city 0.96x, related.ip
# 0.95x: each about 1 us per field, and together (this list) `envoygeo bench index
# --rounds 5 --only envoygeo,envoygeo-lean,istio-integration,dynamic`: 44.1 against
# 62.4 us/doc and 65.5 against 107.0 B/doc; 0.69x the Istio integration's CPU and 0.24x
# its store (the full documents: 1.00x and 0.40x). Dashboard aggregations as fast.
LEAN_OMIT: tuple[str, ...] = (
    "ecs.version", "event.module", "event.dataset", "event.category", "event.type",
    "event.ingested", "http.request.id", "url.original", "related.ip",
    "source.geo.continent_code", "source.geo.continent_name", "source.geo.region_iso_code",
    "source.geo.postal_code", "source.geo.timezone",
    "envoy.log_format", "envoy.upstream.local_address",
    "envoygeo.stream", "envoygeo.timestamp_source",
    "kubernetes.pod_name", "kubernetes.container_name", "kubernetes.container_image",
    "kubernetes.container_hash", "kubernetes.docker_id", "kubernetes.pod_id",
    "kubernetes.host", "kubernetes.labels", "kubernetes.annotations",
)

# The installed enrichment plugins' fields (entry points `envoygeo.enrichers`, see
# pipeline/plugins): templates, JSON Schemas and the dashboards validator see them as
# they see the core's. A plugin that names a core field is refused (`plugin_fields`).
CORE_FIELDS = FIELDS
FIELDS = CORE_FIELDS + plugin_fields(CORE_FIELDS)

# Alert documents (their own index: one per IP, rule and window period).
ALERT_FIELDS: tuple[Field, ...] = (
    Field("@timestamp", "date", "Time of the event that crossed the threshold."),
    _kw("event.kind", "alert."),
    _kw("event.category", "network.", array=True),
    _kw("event.type", "info.", array=True),
    _kw("event.module", "envoygeo."),
    _kw("event.dataset", "envoygeo.rate_alert."),
    _kw("rule.name", "The alert rule."),
    Field("source.ip", "ip", "The client that crossed the threshold."),
    *(f for f in FIELDS if f.name.startswith(("source.geo.", "source.as."))),
    Field("related.ip", "ip", "The client.", True),
    _kw("envoygeo.alert.rule", "Rule name."),
    Field("envoygeo.alert.window_s", "long", "Rule window in seconds."),
    Field("envoygeo.alert.threshold", "long", "Rule threshold."),
    Field("envoygeo.alert.count", "long", "Requests in the window when the rule fired."),
    Field("envoygeo.alert.period", "long", "floor(event time / window): the dedupe period."),
    Field("envoygeo.alert.period_start", "date", "Start of that period."),
    Field("envoygeo.alert.event_time", "double", "Event time, epoch seconds."),
)


def field_map(fields: tuple[Field, ...] = FIELDS) -> dict[str, Field]:
    return {f.name: f for f in fields}


# -- Elasticsearch templates --------------------------------------------------------


# -- Lean template choices (issue 15) ---------------------------------------------------
#
# Each choice was measured by `envoygeo bench index --ablate` (the optimised candidate
# with and without it, same run, 200,000 bench-corpus documents, Elasticsearch 9.5.3 on
# this shared 2-core machine, load average 4-11 from other sessions); figures are
# medians of the node's CPU per document and of store bytes per document after a force
# merge to one segment. A: `--rounds 3 --choices best_compression,doc_values_only,
# no_norms,sort_timestamp --ablate` (standard index mode); B: `--rounds 2 --choices
# best_compression,doc_values_only,logsdb,no_norms,sort_timestamp --ablate` (under
# logsdb). A choice is in SHIPPED_LEAN, and so in the templates in schemas/, only when
# it measurably wins and loses nothing the dashboards, the report, the alert rule or the
# documented queries use.
# Already true of the template before issue 15, so not choices: keywords have no norms
# (Elasticsearch's default), there are no multi-fields, and `event.original` is kept in
# _source only (index: false, doc_values: false).
# Dashboard aggregation p50s (top countries, top IPs, geotile grid, requests over
# time) were the same within the noise for every choice (9-49 ms, all candidates).
LEAN_CHOICES: dict[str, str] = {
    # error.message is the only text field, and only unparsed records have it: no
    # envoygeo view scores it. No measurable effect (the corpus has no unparsed
    # records), so not shipped; harmless for a cluster to turn on.
    "no_norms": "text fields without norms",
    # The fields with Field.search False. A: store 304 -> 249 B/doc (-18%), CPU 87.4
    # -> 82.6 us/doc (-5%, within the rounds' spread); B (logsdb): 164 -> 108 B/doc
    # (-34%), 98.5 -> 88.7 us/doc. Term, range, prefix and geo_bounding_box queries on
    # such a field still answer on this node (doc values scan), only slower. SHIPPED.
    "doc_values_only": "no inverted index / BKD for aggregated or displayed-only fields",
    # A: store 407 -> 249 B/doc (-39%), CPU 88.8 -> 82.6 us/doc (no cost measurable).
    # B: no change (logsdb's default codec is already best_compression). SHIPPED; the
    # local node has zstd for it (deploy/local/elasticsearch/README.md).
    "best_compression": "index.codec: best_compression (zstd stored fields)",
    # A: store 249.0 vs 249.2 B/doc without it (nothing: envoygeo's documents arrive in
    # time order already), CPU 82.6 vs 63.6 us/doc without it (+30%, every round).
    # Not shipped.
    "sort_timestamp": "index sorting on @timestamp, newest first",
    # The local node (no x-pack) accepts index.mode: logsdb with synthetic _source. B:
    # store 249.5 -> 108.3 B/doc (-57%), CPU 83.0 -> 88.7 us/doc (+7%); against the
    # Istio integration's mapping in one run: 0.35x its store at 1.10x its CPU.
    # Synthetic _source returns geo_point quantised (-22.9068 reads back as
    # -22.906800038181245), and outside this node a cluster needs an Enterprise licence
    # for it (else stored _source). Not shipped: it costs CPU, which issue 15 is about;
    # opt in by overriding envoygeo-settings with index.mode: logsdb.
    "logsdb": "index.mode: logsdb (synthetic _source, host.name/@timestamp sort)",
    # Synthetic _source alone, in the standard index mode: logsdb's store saving without
    # its index sorting (what cost CPU in sort_timestamp and logsdb). `envoygeo bench
    # index --rounds 3 --choices synthetic_source --only envoygeo,istio-integration,
    # optimised` (200,000 documents, same run, load 2-3): store 221.1 -> 106.9 B/doc
    # (-52%; 0.40x the Istio integration's), CPU 130.9 vs 144.5 us/doc (0.89x vs 0.91x the
    # Istio mapping's, paired by round: inside the noise); aggregation p50s unchanged.
    # What _source then returns: geo_point quantised (-22.9068 reads back as
    # -22.906800038181245), keyword/ip arrays sorted and deduplicated (tags,
    # related.ip, event.category), everything else as sent. On Elasticsearch without a
    # licence that includes synthetic _source, the node stores _source as usual instead
    # (Elasticsearch's SyntheticSourceIndexSettingsProvider), so the setting is safe to
    # ship: the saving comes where the licence allows. SHIPPED; a cluster that needs the
    # exact bytes back overrides envoygeo-settings with index.mapping.source.mode: stored.
    "synthetic_source": "index.mapping.source.mode: synthetic (standard index mode)",
}
# Together, before synthetic_source (`envoygeo bench index --rounds 3`, 200,000
# documents, same run): 66.9 us/doc and 249.8 B/doc against 88.5 and 458.5 without them
# (envoygeo-plain) and 80.2 and 309.0 for the Istio integration's mapping (0.83x,
# 0.81x). With synthetic_source and the leaner documents (no field under two names,
# pipeline/document.py), `envoygeo bench index --rounds 3 --only envoygeo,dynamic,
# istio-integration` on a busier machine (node CPU per document ~2x the earlier run's
# for every candidate): 151.4 us/doc and 107.0 B/doc against 157.3 and 270.7 for the
# Istio mapping (0.91x, 0.40x paired by round) and 245.6 and 482.7 for dynamic mapping
# (1.45x, 1.78x); aggregation p50s the same within 2 ms.
# Arrays kept as sent (else a one-element array reads back as a scalar and arrays come
# back sorted and deduplicated: `tags`, `event.category`, `related.ip`).
SYNTHETIC_SOURCE: dict[str, Any] = {
    "mapping": {"source": {"mode": "synthetic"}, "synthetic_source_keep": "arrays"}}
SHIPPED_LEAN: frozenset[str] = frozenset({"best_compression", "doc_values_only",
                                          "synthetic_source"})


def _mapping_for(f: Field, lean: frozenset[str] = frozenset()) -> dict[str, Any]:
    if f.es_type == "object":
        return {"type": "object", "enabled": False}
    m: dict[str, Any] = {"type": f.es_type}
    if f.es_type == "keyword":
        m["ignore_above"] = 1024
        if not f.indexed:
            m.update(index=False, doc_values=False)
    if f.es_type == "ip" or f.es_type == "geo_point":
        # A malformed address in one document must not reject it (it is tagged instead).
        m["ignore_malformed"] = True
    if "doc_values_only" in lean and f.indexed and not f.search:
        m["index"] = False
    if "no_norms" in lean and f.es_type == "text":
        m["norms"] = False
    return m


def index_settings(lean: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The `index` settings of envoygeo-settings with the chosen lean choices."""
    index: dict[str, Any] = {
        "number_of_shards": 1,
        "auto_expand_replicas": "0-1",
        "refresh_interval": "5s",
    }
    if "best_compression" in lean:
        index["codec"] = "best_compression"
    if "sort_timestamp" in lean:
        index["sort"] = {"field": "@timestamp", "order": "desc"}
    if "logsdb" in lean:
        index["mode"] = "logsdb"
    if "synthetic_source" in lean:
        index.update(SYNTHETIC_SOURCE)
    return index


def mappings(fields: tuple[Field, ...], lean: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Nested `properties` for the exact fields, dynamic templates for the `.*` ones."""
    props: dict[str, Any] = {}
    dynamic_templates: list[dict[str, Any]] = []
    for f in fields:
        if f.name.endswith(".*"):
            # Keys chosen at run time (rate windows): the parent object alone maps
            # dynamically, and only through this template.
            dynamic_templates.append({
                f.name[:-2].replace(".", "_"): {
                    "path_match": f.name,
                    "mapping": ({"type": f.es_type, "index": False}
                                if "doc_values_only" in lean and not f.search
                                else {"type": f.es_type}),
                }
            })
            node = props
            for part in f.name.split(".")[:-1]:
                node = node.setdefault(part, {"properties": {}})
                parent, node = node, node["properties"]
            parent["dynamic"] = True
            continue
        node = props
        parts = f.name.split(".") if f.name != "@timestamp" else ["@timestamp"]
        for part in parts[:-1]:
            node = node.setdefault(part, {"properties": {}})["properties"]
        node[parts[-1]] = _mapping_for(f, lean)
    out: dict[str, Any] = {"dynamic_templates": dynamic_templates, "properties": props}
    # Unknown fields (a newer envoygeo, user additions) are kept in _source, not mapped:
    # an unexpected value must never reject a document.
    out["dynamic"] = False
    return out


def component_templates() -> dict[str, dict[str, Any]]:
    settings = {
        "template": {
            # Replicas, refresh and the codec are cluster choices: override this
            # component template per cluster (index.mode: logsdb, see LEAN_CHOICES).
            "settings": {"index": index_settings(SHIPPED_LEAN - {"synthetic_source"})}
        },
        "_meta": {"managed_by": "envoygeo", "doc": "Index settings; override per cluster."},
    }
    return {
        "envoygeo-settings": settings,
        "envoygeo-logs-mappings": {
            # Synthetic _source for the access logs only: `envoygeo policy` reads alerts
            # back from their _source, exactly as written.
            "template": {"mappings": mappings(FIELDS, SHIPPED_LEAN),
                         **({"settings": {"index": SYNTHETIC_SOURCE}}
                            if "synthetic_source" in SHIPPED_LEAN else {})},
            "_meta": {"managed_by": "envoygeo", "ecs_version": ECS_VERSION},
        },
        "envoygeo-alerts-mappings": {
            "template": {"mappings": mappings(ALERT_FIELDS, SHIPPED_LEAN)},
            "_meta": {"managed_by": "envoygeo", "ecs_version": ECS_VERSION},
        },
    }


def index_templates(logs_index: str = LOGS_TEMPLATE, alerts_index: str = ALERTS_TEMPLATE,
                    data_stream: bool = False) -> dict[str, dict[str, Any]]:
    """Composable templates, named after the index they serve.

    `priority` is above the built-in logs-*-* templates; the alerts template is one
    higher because `<index>-alerts*` also matches `<index>*`, and Elasticsearch refuses
    two overlapping templates of equal priority.
    """
    logs: dict[str, Any] = {
        "index_patterns": [f"{logs_index}*"],
        "composed_of": ["envoygeo-settings", "envoygeo-logs-mappings"],
        "priority": 200,
        "_meta": {"managed_by": "envoygeo", "ecs_version": ECS_VERSION},
    }
    if data_stream:
        logs["data_stream"] = {}
    return {
        logs_index: logs,
        alerts_index: {
            "index_patterns": [f"{alerts_index}*"],
            "composed_of": ["envoygeo-settings", "envoygeo-alerts-mappings"],
            "priority": 201,
            "_meta": {"managed_by": "envoygeo", "ecs_version": ECS_VERSION},
        },
    }


# -- JSON Schema ---------------------------------------------------------------------

_JSON_TYPES: dict[str, dict[str, Any]] = {
    "keyword": {"type": "string"},
    "text": {"type": "string"},
    "ip": {"type": "string"},
    "date": {"type": "string"},
    "long": {"type": "integer"},
    "double": {"type": "number"},
    "object": {"type": "object"},
    "flattened": {"type": "object"},
    "geo_point": {
        "type": "object",
        "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
        },
        "required": ["lat", "lon"],
        "additionalProperties": False,
    },
}


def json_schema(fields: tuple[Field, ...] = FIELDS, title: str = "envoygeo access document",
                ) -> dict[str, Any]:
    """Draft 2020-12 schema; nested objects are closed so an unlisted field fails."""
    root: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    for f in fields:
        parts = f.name.split(".") if f.name != "@timestamp" else ["@timestamp"]
        node = root
        for part in parts[:-1]:
            node = node["properties"].setdefault(
                part, {"type": "object", "properties": {}, "additionalProperties": False}
            )
        leaf = dict(_JSON_TYPES[f.es_type])
        leaf["description"] = f.doc
        if f.array:
            leaf = {"description": f.doc, "type": "array", "items": _JSON_TYPES[f.es_type]}
        if parts[-1] == "*":
            node.pop("additionalProperties", None)
            node["additionalProperties"] = leaf
        else:
            node["properties"][parts[-1]] = leaf
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://envoygeo.dev/schemas/{title.replace(' ', '-')}.json",
        "title": title,
        **root,
    }


def schema_files() -> dict[str, dict[str, Any]]:
    """File name in schemas/ -> content. The only writer of those files."""
    files: dict[str, dict[str, Any]] = {}
    for name, body in component_templates().items():
        files[f"component-template.{name}.json"] = body
    for name, body in index_templates().items():
        files[f"index-template.{name}.json"] = body
    files["document.schema.json"] = json_schema(FIELDS)
    files["alert.schema.json"] = json_schema(ALERT_FIELDS, "envoygeo alert document")
    return files
