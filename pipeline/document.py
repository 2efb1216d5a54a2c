"""Build the ECS document for one record: envelope metadata + AccessLog + ClientIp.

Plain dict building on purpose: this runs once per record, so no field tables, no
reflection. Keys are left out when their value is unknown rather than written as null,
which keeps documents small. A later stage adds geo/rate fields to the returned dict.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipeline.clientip import AddressMask, ClientIp, split_host_port
from pipeline.decode.access_log import AccessLog
from pipeline.decode.envelope import Envelope

PARSE_FAILURE_TAG = "_envoygeo_parse_failure"
# Limits (`limits.max_line_bytes`, `limits.max_field_bytes`): what was cut is tagged,
# and `envoygeo.truncated` names the fields.
LINE_TRUNCATED_TAG = "envoygeo_line_truncated"
FIELD_TRUNCATED_TAG = "envoygeo_field_truncated"


def ingested_now() -> str:
    """Now, in the `@timestamp` text form (`event.ingested`, the last `@timestamp` resort)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def timestamp_of(log_ts: float | None, env: Envelope, kafka_ts: float | None,
                 ingested: str | None) -> tuple[str, str]:
    """(`@timestamp` text, `envoygeo.timestamp_source`): the first time known of the
    request's start (log), the collector's (envelope), the Kafka record's (kafka),
    and when envoygeo read it (ingest).

    Why a fallback at all: a document without `@timestamp` is invisible to every
    time-filtered view (dashboards, the report, alert rules). Why say which: a Kafka
    or ingest time is when the line travelled, not when the request ran.
    """
    if log_ts is not None:
        return iso_timestamp(log_ts), "log"
    if env.timestamp is not None:
        return iso_timestamp(env.timestamp), "envelope"
    if kafka_ts is not None:
        return iso_timestamp(kafka_ts), "kafka"
    return ingested or ingested_now(), "ingest"


_second_prefix: dict[int, str] = {}


def iso_timestamp(epoch: float) -> str:
    """Epoch seconds -> `2026-11-29T01:13:00.665Z` (what Elasticsearch `date` parses).

    Consecutive records share their second, so the calendar formatting is cached per
    second and only the milliseconds are formatted per record.
    """
    sec = int(epoch // 1)
    prefix = _second_prefix.get(sec)
    if prefix is None:
        prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        if len(_second_prefix) > 4096:
            _second_prefix.clear()
        _second_prefix[sec] = prefix
    ms = int((epoch - sec) * 1000 + 0.5)
    if ms >= 1000:
        return iso_timestamp(float(sec + 1))
    return f"{prefix}.{ms:03d}Z"


_endpoints: dict[str, tuple[str, int | None] | None] = {}


def _endpoint(text: str | None) -> tuple[str, int | None] | None:
    """(host, port) of a local address or authority; few distinct values, so cached."""
    if not text:
        return None
    hit = _endpoints.get(text, False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    hp = split_host_port(text)
    if hp is not None and hp[0][:7].lower() == "::ffff:" and "." in hp[0]:
        hp = (hp[0][7:], hp[1])  # IPv4-mapped: index the IPv4 form, as for source.ip
    if len(_endpoints) > 4096:
        _endpoints.clear()
    _endpoints[text] = hp
    return hp


def renders_endpoint(text: str, host: str, port: int | None) -> bool:
    """Whether an address as logged is exactly `host[:port]` as the document writes it.

    Then the logged field is left out: it would only repeat `source`/`destination`.
    Anything else (another address, an IPv4-mapped or bracketed form, a port written
    differently) is kept as logged, so nothing the line said is lost.
    """
    if port is None:
        return text == host
    if ":" in host:  # IPv6: [host]:port
        n = len(host)
        return (text[:1] == "[" and text[1:n + 1] == host and text[n + 1:n + 3] == "]:"
                and text[n + 3:] == str(port))
    n = len(host)
    return text[:n] == host and text[n:n + 1] == ":" and text[n + 1:] == str(port)


def _common(env: Envelope, doc: dict[str, Any]) -> None:
    if env.kubernetes is not None:
        doc["kubernetes"] = env.kubernetes
    if env.stream is not None:
        doc.setdefault("envoygeo", {})["stream"] = env.stream


def build_document(env: Envelope, log: AccessLog, cip: ClientIp, kafka_ts: float | None = None,
                   ingested: str | None = None, truncated: list[str] | None = None,
                   line_cut: bool = False, mask: AddressMask | None = None) -> dict[str, Any]:
    """The ECS document for a parsed access log.

    Runs once per record: each AccessLog attribute is read once into a local, and
    keys are inserted in the same order as always (documents stay byte-identical).
    `kafka_ts`, `ingested`: the `@timestamp` fallbacks (`timestamp_of`); `truncated`:
    the fields cut to `limits.max_field_bytes`; `line_cut`: the line was cut;
    `mask`: `privacy.client_ip` other than keep (every client address masked: `source`
    keeps no port, hashed addresses are no `ip` and go to `envoygeo.client_id`).
    """
    if (ts := log.start_time) is not None:
        stamp, stamp_source = iso_timestamp(ts), "log"
    else:
        stamp, stamp_source = timestamp_of(None, env, kafka_ts, ingested)
    doc: dict[str, Any] = {"@timestamp": stamp}

    ip = cip.ip
    if ip is not None:
        if mask is None:
            port = cip.port
            doc["source"] = {"ip": ip} if port is None else {"ip": ip, "port": port}
        elif mask.hashed:
            doc["source"] = {}  # source.geo / source.as only (`_enrich` drops it if empty)
        else:
            doc["source"] = {"ip": mask.ip(ip)}
    dest = _endpoint(log.downstream_local_address)
    if dest is not None:
        doc["destination"] = ({"ip": dest[0]} if dest[1] is None
                              else {"ip": dest[0], "port": dest[1]})

    request: dict[str, Any] = {}
    if (method := log.method) is not None:
        request["method"] = method
    if (request_id := log.request_id) is not None:
        request["id"] = request_id
    if (received := log.bytes_received) is not None:
        request["bytes"] = received
    response: dict[str, Any] = {}
    status = log.response_code
    if status:  # 0 means no HTTP response (TCP proxy, reset)
        response["status_code"] = status
    if (sent := log.bytes_sent) is not None:
        response["bytes"] = sent
    # No empty objects: a TCP proxy line has no request or response (issue 15).
    http: dict[str, Any] = {}
    if request:
        http["request"] = request
    if response:
        http["response"] = response
    protocol = log.protocol
    if protocol is not None and protocol.startswith("HTTP/"):
        http["version"] = protocol[5:]
        protocol = None  # http.version says it: envoy.protocol only for other values
    if http:
        doc["http"] = http

    url: dict[str, Any] = {}
    if (original := log.path) is not None:
        path, sep, query = original.partition("?")
        url["original"] = original
        url["path"] = path
        if sep:
            url["query"] = query
    if (authority := log.authority) is not None:
        host = _endpoint(authority)
        url["domain"] = host[0] if host is not None else authority
    if url:
        doc["url"] = url
    if (agent := log.user_agent) is not None:
        doc["user_agent"] = {"original": agent}

    event: dict[str, Any] = {"kind": "event", "category": ["web"]}
    if (duration := log.duration_ms) is not None:
        event["duration"] = duration * 1_000_000
    if status:
        event["outcome"] = "failure" if status >= 500 else "success"
    doc["event"] = event
    if (sni := log.requested_server_name) is not None:
        doc["tls"] = {"client": {"server_name": sni}}

    envoy: dict[str, Any] = {"log_format": log.log_format}
    # Explicit tests, not a table loop: in 3.11 a comprehension or getattr loop costs
    # more than these (measured).
    if (v := log.response_flags) is not None:
        envoy["response_flags"] = v
    if (v := log.response_code_details) is not None:
        envoy["response_code_details"] = v
    if (v := log.connection_termination_details) is not None:
        envoy["connection_termination_details"] = v
    if (v := log.upstream_transport_failure_reason) is not None:
        envoy["upstream_transport_failure_reason"] = v
    if (v := log.route_name) is not None:
        envoy["route_name"] = v
    # The addresses "as logged" are written only where they say more than source and
    # destination already do (an XFF-derived client, an IPv4-mapped form, no port):
    # the same value under two names cost the node ~12 % more CPU per document.
    remote = log.downstream_remote_address
    if remote is not None and ip is not None and renders_endpoint(remote, ip, cip.port):
        remote = None
    if mask is None:
        xff = log.x_forwarded_for
        direct = log.downstream_direct_remote_address
    else:
        xff = mask.entries(log.x_forwarded_for)
        remote = mask.field(remote)
        direct = mask.field(log.downstream_direct_remote_address)
    if xff is not None:
        envoy["x_forwarded_for"] = xff
    if remote is not None:
        envoy["downstream_remote_address"] = remote
    if direct is not None:
        envoy["downstream_direct_remote_address"] = direct
    if (v := log.downstream_local_address) is not None and (
            dest is None or not renders_endpoint(v, dest[0], dest[1])):
        envoy["downstream_local_address"] = v
    if protocol is not None:
        envoy["protocol"] = protocol
    upstream: dict[str, Any] = {}
    if (v := log.upstream_host) is not None:
        upstream["host"] = v
    if (v := log.upstream_cluster) is not None:
        upstream["cluster"] = v
    if (v := log.upstream_local_address) is not None:
        upstream["local_address"] = v
    if (service_time := log.upstream_service_time) is not None:
        upstream["service_time_ms"] = service_time
    if upstream:
        envoy["upstream"] = upstream
    if log.extra:
        envoy["extra"] = log.extra if mask is None else mask.extra(log.extra)
    doc["envoy"] = envoy

    envoygeo: dict[str, Any] = {"ip_source": cip.source, "envelope": env.kind,
                                "timestamp_source": stamp_source}
    if cip.ip_class is not None:
        envoygeo["ip_class"] = cip.ip_class
    if ip is not None and mask is not None and mask.hashed:
        envoygeo["client_id"] = mask.ip(ip)
    if env.stream is not None:
        envoygeo["stream"] = env.stream
    if truncated:
        envoygeo["truncated"] = truncated
    doc["envoygeo"] = envoygeo
    if cip.related:
        if mask is None:
            doc["related"] = {"ip": cip.related}
        elif related := mask.related(cip):
            doc["related"] = {"ip": related}
    tags = env.tags + cip.tags if cip.tags else env.tags
    if line_cut or truncated:
        tags = [*tags, *([LINE_TRUNCATED_TAG] if line_cut else ()),
                *([FIELD_TRUNCATED_TAG] if truncated else ())]
    if tags:
        doc["tags"] = tags
    if env.kubernetes is not None:
        doc["kubernetes"] = env.kubernetes
    return doc


def build_failure_document(env: Envelope, reason: str, kafka_ts: float | None = None,
                           ingested: str | None = None, original: str | None = None,
                           line_cut: bool = False, mask: AddressMask | None = None,
                           ) -> dict[str, Any]:
    """A record that could not be parsed: kept, searchable, dated and saying why.

    `original`: the record as `event.original` holds it (the caller bounds it to
    `limits.max_line_bytes`, `line_cut` saying it did cut); default: the line, or the
    whole record when it has no line. `mask`: `privacy.client_ip` other than keep;
    nothing says where an unparsed line holds its addresses, so every address found
    in it (and in the reason) is masked.
    """
    stamp, stamp_source = timestamp_of(None, env, kafka_ts, ingested)
    if original is None:
        original = env.payload if env.payload is not None else env.original
    if mask is not None:
        original, reason = mask.scrub(original), mask.scrub(reason)
    doc: dict[str, Any] = {
        "@timestamp": stamp,
        "event": {"kind": "pipeline_error", "original": original},
        "error": {"message": reason},
        "tags": [*env.tags, PARSE_FAILURE_TAG, *([LINE_TRUNCATED_TAG] if line_cut else ())],
        "envoygeo": {"envelope": env.kind, "timestamp_source": stamp_source},
    }
    _common(env, doc)
    return doc
