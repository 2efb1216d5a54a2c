"""Elasticsearch aggregations behind the report: one search for access documents, one
for alerts. Kept apart from rendering so the HTML can be tested from fixed data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from elasticsearch import Elasticsearch, NotFoundError

PARSE_FAILURE_TAG = "_envoygeo_parse_failure"
RATE_PREFIX = "envoygeo.rate."


@dataclass
class Country:
    iso: str
    name: str
    requests: int
    bytes: int


@dataclass
class City:
    name: str
    iso: str
    requests: int
    lat: float | None
    lon: float | None


@dataclass
class ClientIP:
    ip: str
    iso: str
    city: str
    requests: int
    rates: dict[str, int]  # rate field window ("60s") -> max seen


@dataclass
class ReportData:
    since: str
    index: str
    total: int
    countries: list[Country] = field(default_factory=list)
    cities: list[City] = field(default_factory=list)
    ips: list[ClientIP] = field(default_factory=list)
    ip_sources: list[tuple[str, int]] = field(default_factory=list)
    parse_failures: int = 0
    rate_windows: list[str] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    client_field: str = "source.ip"  # envoygeo.client_id under privacy.client_ip: hash


def since_to_range(since: str) -> str:
    """`24h` -> `now-24h`; anything else is a usage error, not an ES 400."""
    if not re.fullmatch(r"\d+[smhdw]", since):
        raise ValueError(f"{since!r}: use a number and s/m/h/d/w, e.g. 24h or 7d")
    return f"now-{since}"


def rate_windows(es: Elasticsearch, index: str) -> list[str]:
    """Rate fields are dynamic (`envoygeo.rate.<window>s`): ask which ones exist."""
    caps = es.field_caps(index=index, fields=f"{RATE_PREFIX}*", ignore_unavailable=True,
                         allow_no_indices=True)
    names = [n for n in caps.get("fields", {}) if n.startswith(RATE_PREFIX)]
    return sorted((n[len(RATE_PREFIX):] for n in names),
                  key=lambda w: (int(re.sub(r"\D", "", w) or 0), w))


def matching_indices(es: Elasticsearch, pattern: str) -> list[str]:
    """Indices (a data stream's backing indices included) the pattern matches; empty
    when none does. Searches over no index answer 0 hits without complaint, so the
    caller says so instead of writing an empty report that looks like no traffic."""
    resp = es.indices.get(index=pattern, ignore_unavailable=True, allow_no_indices=True,
                          expand_wildcards="open")
    return sorted(resp.body)


def _first_key(bucket: dict[str, Any], agg: str, default: str = "") -> str:
    buckets = bucket.get(agg, {}).get("buckets", [])
    return str(buckets[0]["key"]) if buckets else default


def fetch(es: Elasticsearch, index: str, alerts_index: str, since: str,
          top: int = 25, client_field: str = "source.ip") -> ReportData:
    """`client_field`: the log index's field naming a client (`IndexNames.client`)."""
    gte = since_to_range(since)
    windows = rate_windows(es, index)
    time_filter = {"range": {"@timestamp": {"gte": gte}}}
    one = {"size": 1}
    aggs: dict[str, Any] = {
        "countries": {"terms": {"field": "source.geo.country_iso_code", "size": 250},
                      "aggs": {"name": {"terms": {"field": "source.geo.country_name", **one}},
                               "bytes": {"sum": {"field": "http.response.bytes"}}}},
        "cities": {"terms": {"field": "source.geo.city_name", "size": 100},
                   "aggs": {"centroid": {"geo_centroid": {"field": "source.geo.location"}},
                            "country": {"terms": {"field": "source.geo.country_iso_code",
                                                  **one}}}},
        "ips": {"terms": {"field": client_field, "size": top},
                "aggs": {"country": {"terms": {"field": "source.geo.country_iso_code", **one}},
                         "city": {"terms": {"field": "source.geo.city_name", **one}},
                         **{f"rate_{w}": {"max": {"field": f"{RATE_PREFIX}{w}"}}
                            for w in windows}}},
        "ip_source": {"terms": {"field": "envoygeo.ip_source", "size": 10}},
        "failures": {"filter": {"term": {"tags": PARSE_FAILURE_TAG}}},
    }
    resp = es.search(index=index, size=0, query={"bool": {"filter": [time_filter]}},
                     aggs=aggs, track_total_hits=True, ignore_unavailable=True,
                     allow_no_indices=True)
    a = resp.get("aggregations", {})
    data = ReportData(since=since, index=index, total=resp["hits"]["total"]["value"],
                      rate_windows=windows, client_field=client_field)
    if not a:
        return data
    data.countries = [Country(b["key"], _first_key(b, "name", b["key"]), b["doc_count"],
                              int(b["bytes"]["value"] or 0))
                      for b in a["countries"]["buckets"]]
    for b in a["cities"]["buckets"]:
        loc = b["centroid"].get("location") or {}
        data.cities.append(City(b["key"], _first_key(b, "country"), b["doc_count"],
                                loc.get("lat"), loc.get("lon")))
    for b in a["ips"]["buckets"]:
        rates = {w: int(b[f"rate_{w}"]["value"]) for w in windows
                 if b[f"rate_{w}"]["value"] is not None}
        data.ips.append(ClientIP(b["key"], _first_key(b, "country"), _first_key(b, "city"),
                                 b["doc_count"], rates))
    data.ip_sources = [(b["key"], b["doc_count"]) for b in a["ip_source"]["buckets"]]
    data.parse_failures = a["failures"]["doc_count"]
    data.alerts = fetch_alerts(es, alerts_index, gte)
    return data


def fetch_alerts(es: Elasticsearch, alerts_index: str, gte: str, size: int = 50,
                 ) -> list[dict[str, Any]]:
    try:
        resp = es.search(index=alerts_index, size=size, sort=[{"@timestamp": "desc"}],
                         query={"range": {"@timestamp": {"gte": gte}}},
                         ignore_unavailable=True, allow_no_indices=True)
    except NotFoundError:
        return []
    return [h["_source"] for h in resp["hits"]["hits"]]
