"""Build the ECS document for one record: envelope metadata + AccessLog + ClientIp.

Plain dict building on purpose: this runs once per record, so no field tables, no
reflection. Keys are left out when their value is unknown rather than written as null,
which keeps documents small. A later stage adds geo/rate fields to the returned dict.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipeline.clientip import ClientIp, split_host_port
from pipeline.decode.access_log import AccessLog
from pipeline.decode.envelope import Envelope

PARSE_FAILURE_TAG = "_envoygeo_parse_failure"


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


def _common(env: Envelope, doc: dict[str, Any]) -> None:
    if env.kubernetes is not None:
        doc["kubernetes"] = env.kubernetes
    if env.stream is not None:
        doc.setdefault("envoygeo", {})["stream"] = env.stream


def build_document(env: Envelope, log: AccessLog, cip: ClientIp) -> dict[str, Any]:
    """The ECS document for a parsed access log."""
    ts = log.start_time if log.start_time is not None else env.timestamp
    doc: dict[str, Any] = {}
    if ts is not None:
        doc["@timestamp"] = iso_timestamp(ts)

    if cip.ip is not None:
        source: dict[str, Any] = {"ip": cip.ip, "address": cip.ip}
        if cip.port is not None:
            source["port"] = cip.port
        doc["source"] = source
    dest = _endpoint(log.downstream_local_address)
    if dest is not None:
        doc["destination"] = {"ip": dest[0], "port": dest[1]} if dest[1] is not None \
            else {"ip": dest[0]}

    request: dict[str, Any] = {}
    if log.method is not None:
        request["method"] = log.method
    if log.request_id is not None:
        request["id"] = log.request_id
    if log.bytes_received is not None:
        request["bytes"] = log.bytes_received
    http: dict[str, Any] = {"request": request}
    response: dict[str, Any] = {}
    if log.response_code:  # 0 means no HTTP response (TCP proxy, reset)
        response["status_code"] = log.response_code
    if log.bytes_sent is not None:
        response["bytes"] = log.bytes_sent
    http["response"] = response
    if log.protocol is not None and log.protocol.startswith("HTTP/"):
        http["version"] = log.protocol[5:]
    doc["http"] = http

    url: dict[str, Any] = {}
    if log.path is not None:
        url["original"] = log.path
        path, sep, query = log.path.partition("?")
        url["path"] = path
        if sep:
            url["query"] = query
    if log.authority is not None:
        host = _endpoint(log.authority)
        url["domain"] = host[0] if host is not None else log.authority
    if url:
        doc["url"] = url
    if log.user_agent is not None:
        doc["user_agent"] = {"original": log.user_agent}

    event: dict[str, Any] = {"kind": "event", "category": ["web"]}
    if log.duration_ms is not None:
        event["duration"] = log.duration_ms * 1_000_000
    if log.response_code:
        event["outcome"] = "failure" if log.response_code >= 500 else "success"
    doc["event"] = event
    if log.requested_server_name is not None:
        doc["tls"] = {"client": {"server_name": log.requested_server_name}}

    envoy: dict[str, Any] = {"log_format": log.log_format}
    # Explicit tests, not a getattr loop: this is per record.
    if log.response_flags is not None:
        envoy["response_flags"] = log.response_flags
    if log.response_code_details is not None:
        envoy["response_code_details"] = log.response_code_details
    if log.connection_termination_details is not None:
        envoy["connection_termination_details"] = log.connection_termination_details
    if log.upstream_transport_failure_reason is not None:
        envoy["upstream_transport_failure_reason"] = log.upstream_transport_failure_reason
    if log.route_name is not None:
        envoy["route_name"] = log.route_name
    if log.x_forwarded_for is not None:
        envoy["x_forwarded_for"] = log.x_forwarded_for
    if log.downstream_remote_address is not None:
        envoy["downstream_remote_address"] = log.downstream_remote_address
    if log.downstream_direct_remote_address is not None:
        envoy["downstream_direct_remote_address"] = log.downstream_direct_remote_address
    if log.downstream_local_address is not None:
        envoy["downstream_local_address"] = log.downstream_local_address
    if log.protocol is not None:
        envoy["protocol"] = log.protocol
    upstream: dict[str, Any] = {}
    if log.upstream_host is not None:
        upstream["host"] = log.upstream_host
    if log.upstream_cluster is not None:
        upstream["cluster"] = log.upstream_cluster
    if log.upstream_local_address is not None:
        upstream["local_address"] = log.upstream_local_address
    if log.upstream_service_time is not None:
        upstream["service_time_ms"] = log.upstream_service_time
    if upstream:
        envoy["upstream"] = upstream
    if log.extra:
        envoy["extra"] = log.extra
    doc["envoy"] = envoy

    envoygeo: dict[str, Any] = {"ip_source": cip.source, "envelope": env.kind}
    if cip.ip_class is not None:
        envoygeo["ip_class"] = cip.ip_class
    doc["envoygeo"] = envoygeo
    if cip.related:
        doc["related"] = {"ip": cip.related}
    tags = env.tags + cip.tags if cip.tags else env.tags
    if tags:
        doc["tags"] = tags
    _common(env, doc)
    return doc


def build_failure_document(env: Envelope, reason: str) -> dict[str, Any]:
    """A record that could not be parsed: kept, searchable, and saying why."""
    doc: dict[str, Any] = {
        "event": {"kind": "pipeline_error",
                  "original": env.payload if env.payload is not None else env.original},
        "error": {"message": reason},
        "tags": [*env.tags, PARSE_FAILURE_TAG],
        "envoygeo": {"envelope": env.kind},
    }
    if env.timestamp is not None:
        doc["@timestamp"] = iso_timestamp(env.timestamp)
    _common(env, doc)
    return doc
