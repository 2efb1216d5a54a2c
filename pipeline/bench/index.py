"""`envoygeo bench index`: what Elasticsearch pays per document under each mapping.

The same N enriched documents (the bench corpus through the repo's Enricher, GeoIP from
DB-IP City Lite, as `bench core` and `bench e2e` build them) are indexed into a fresh
index under each candidate mapping, the candidates alternating over `--rounds` rounds
(the order rotates each round, so no candidate always follows the same one). Per
candidate and round:

* **ES CPU µs/doc**: the node's own process CPU (Linux /proc of its pid when it runs
  here, else `_nodes/_local/stats/process`) from just before the first bulk request
  to the end of the `_refresh` that follows the last one, divided by N;
* **docs/s**: N over the same wall time (client: the worker's own sink, same batch and
  concurrency as the worker);
* **store B/doc**: primary store size after `_forcemerge?max_num_segments=1`, over N;
* **query p50 ms**: the dashboards' main aggregations (top countries, top client IPs
  with their max rates, geotile grid on source.geo.location with bytes sent, requests
  over time by country), each run 20 times with the request cache off, wall time at
  the client; `n/a` where the mapping cannot answer it (no geo_point without a template).

Candidates share the index settings that are cluster choices (1 shard, 0 replicas,
refresh 5 s); the mapping and the mapping-related index settings differ:

* `envoygeo`: the shipped template (pipeline/schema.py, with its SHIPPED_LEAN choices);
* `envoygeo-plain`: the same field table without any lean choice (the template before
  issue 15), the reference for what the shipped choices save;
* `dynamic`: no template, Elasticsearch's dynamic mapping of the same documents;
* `istio-integration`: Elastic's Istio integration (elastic/integrations,
  packages/istio, data_stream access_logs, Elastic License 2.0), reproduced from its
  public field list (`fields/*.yml`) plus what Fleet composes into every integration's
  template: the `ecs@mappings` dynamic templates for ECS fields the list does not name,
  and `logs@settings`' `index.codec: best_compression`. Reproduced from facts, not
  copied: no x-pack here, so `match_only_text` is `text` without norms and positions,
  `wildcard` is `keyword`, `constant_keyword` is `keyword`. Elasticsearch 9 also turns
  `index.mode: logsdb` on for `logs-*-*` data streams where the license allows; this
  anchor is the standard-mode one;
* `optimised`: the shipped template plus `--choices` (LEAN_CHOICES in schema.py; by
  default `logsdb`, the measured opt-in); `--ablate` adds one `optimised-<choice>`
  candidate per choice of the optimised candidate (shipped ones too), without it.

Figures are medians over the rounds; ratios are against `istio-integration` measured
in the same run, each the median of the per-round ratios (see `format_table`).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pipeline import schema
from pipeline.bench.core import corpus
from pipeline.bench.e2e import _config, _cpu_seconds, _local_es_pids
from pipeline.bench.enrich_micro import default_geoip_path
from pipeline.config import DocumentSettings, load_settings
from pipeline.enricher import Enricher
from pipeline.sinks.elasticsearch import BulkItem, ElasticsearchSink, make_client

BASELINE = "istio-integration"
QUERIES = ("countries", "ips", "geotile", "over_time")
QUERY_RUNS = 20

# Cluster choices, the same for every candidate.
COMMON_SETTINGS: dict[str, Any] = {"number_of_shards": 1, "number_of_replicas": 0,
                                   "refresh_interval": "5s"}


# -- Candidate mappings (pure) ---------------------------------------------------------

def envoygeo_body(lean: frozenset[str] = schema.SHIPPED_LEAN) -> dict[str, Any]:
    """Index body (settings + mappings) of envoygeo's template with `lean` choices."""
    index = schema.index_settings(lean)
    for k in ("number_of_shards", "auto_expand_replicas", "refresh_interval"):
        index.pop(k, None)
    return {"settings": {"index": {**COMMON_SETTINGS, **index}},
            "mappings": schema.mappings(schema.FIELDS, lean)}


def dynamic_body() -> dict[str, Any]:
    """No template: whatever Elasticsearch's dynamic mapping makes of the documents."""
    return {"settings": {"index": dict(COMMON_SETTINGS)}}


# Elastic's Istio integration, access_logs data stream: every field its fields/*.yml
# (base-fields.yml, ecs.yml, fields.yml) names, with the type it declares or, for the
# `external: ecs` ones, the type ECS gives it. Source: github.com/elastic/integrations,
# packages/istio/data_stream/access_logs/fields/ (Elastic License 2.0); facts only.
ISTIO_FIELDS: dict[str, str] = {
    # base-fields.yml (constant_keyword there; keyword here, no x-pack)
    "data_stream.type": "keyword", "data_stream.dataset": "keyword",
    "data_stream.namespace": "keyword", "@timestamp": "date",
    "event.module": "keyword", "event.dataset": "keyword",
    # ecs.yml (external: ecs)
    "ecs.version": "keyword", "error.message": "match_only_text",
    "event.ingested": "date", "agent.name": "keyword", "agent.type": "keyword",
    "agent.id": "keyword", "agent.ephemeral_id": "keyword", "agent.version": "keyword",
    "message": "match_only_text", "container.runtime": "keyword",
    "http.version": "keyword", "http.request.body.bytes": "long",
    "http.request.id": "keyword", "http.request.method": "keyword",
    "http.response.body.bytes": "long", "http.response.status_code": "long",
    "url.original": "wildcard+text", "user_agent.device.name": "keyword",
    "user_agent.name": "keyword", "user_agent.original": "keyword+text",
    "user_agent.os.full": "keyword+text", "user_agent.os.name": "keyword+text",
    "user_agent.os.version": "keyword", "user_agent.version": "keyword",
    "event.original": "keyword_unindexed", "event.category": "keyword",
    "event.created": "date", "event.kind": "keyword", "event.type": "keyword",
    "event.outcome": "keyword", "event.duration": "long", "event.id": "keyword",
    "network.transport": "keyword", "tags": "keyword",
    # fields.yml: the integration's own istio.access.* group
    "istio.access.log": "keyword", "istio.access.response.flags": "keyword",
    "istio.access.response.code.details": "keyword",
    "istio.access.response.termination_details": "keyword",
    "istio.access.authority": "keyword",
    "istio.access.downstream.address.local": "keyword",
    "istio.access.downstream.address.remote": "keyword",
    "istio.access.request.duration": "double", "istio.access.request.sni": "keyword",
    "istio.access.route_name": "keyword",
    "istio.access.upstream.address.local": "keyword",
    "istio.access.upstream.cluster": "keyword", "istio.access.upstream.host": "keyword",
    "istio.access.upstream.service_time": "double",
    "istio.access.upstream.transport_failure_reason": "keyword",
    "istio.access.x-forwarded-for": "keyword",
}

# match_only_text needs mapper-extras: text without norms, positions or frequencies is
# the closest core equivalent (what it indexes).
_MATCH_ONLY_TEXT: dict[str, Any] = {"type": "text", "norms": False, "index_options": "docs"}


def _istio_leaf(kind: str) -> dict[str, Any]:
    """ECS's mapping for one declared type; `+text` is ECS's `.text` multi-field."""
    base, _, multi = kind.partition("+")
    leaf: dict[str, Any]
    if base in ("keyword", "wildcard"):  # wildcard is x-pack: keyword
        leaf = {"type": "keyword", "ignore_above": 1024}
    elif base == "keyword_unindexed":
        leaf = {"type": "keyword", "index": False, "doc_values": False}
    elif base == "match_only_text":
        leaf = dict(_MATCH_ONLY_TEXT)
    else:
        leaf = {"type": base}
    if multi == "text":
        leaf["fields"] = {"text": dict(_MATCH_ONLY_TEXT)}
    return leaf


# The part of `ecs@mappings` (Fleet composes it into every integration's template) that
# maps the ECS fields of these documents which the Istio list does not name.
ECS_DYNAMIC_TEMPLATES: list[dict[str, Any]] = [
    {"ecs_timestamp": {"match": "@timestamp", "mapping": {"type": "date",
                                                         "ignore_malformed": False}}},
    {"ecs_ip": {"path_match": ["ip", "*.ip", "*_ip"], "match_mapping_type": "string",
                "mapping": {"type": "ip"}}},
    {"ecs_geo_point": {"path_match": ["location", "*.location"],
                       "mapping": {"type": "geo_point"}}},
    {"ecs_date": {"path_match": ["*.timestamp", "*_timestamp", "*.not_after",
                                 "*.not_before", "*.accessed", "created", "*.created",
                                 "*.installed", "*.creation_date", "*.ctime", "*.mtime",
                                 "ingested", "*.ingested", "*.start", "*.end"],
                  "unmatch_mapping_type": "object", "mapping": {"type": "date"}}},
    {"ecs_path_match_keyword_and_match_only_text": {
        "path_match": ["*.body.content", "*url.full", "*url.original", "*.title",
                       "*.executable", "*.name", "*.working_directory",
                       "*.full_name", "*file.path", "*file.target_path",
                       "*.os.full", "*.command_line", "*.user_agent.original"],
        "unmatch_mapping_type": "object",
        "mapping": {"type": "keyword", "fields": {"text": dict(_MATCH_ONLY_TEXT)}}}},
    {"all_strings_to_keywords": {"match_mapping_type": "string",
                                 "mapping": {"type": "keyword", "ignore_above": 1024}}},
]


def istio_integration_body() -> dict[str, Any]:
    """The Istio integration's access-log mapping, from its field list (see ISTIO_FIELDS)."""
    props: dict[str, Any] = {}
    for name, kind in ISTIO_FIELDS.items():
        parts = [name] if name == "@timestamp" else name.split(".")
        node = props
        for part in parts[:-1]:
            node = node.setdefault(part, {"properties": {}})["properties"]
        node[parts[-1]] = _istio_leaf(kind)
    return {
        "settings": {"index": {**COMMON_SETTINGS, "codec": "best_compression",
                               "mapping": {"ignore_malformed": True}}},
        # logs@mappings: no date detection on strings; everything else is dynamic.
        "mappings": {"date_detection": False, "dynamic_templates": ECS_DYNAMIC_TEMPLATES,
                     "properties": props},
    }


# The candidate whose documents are `document.profile: lean` (pipeline/omit.py).
LEAN_DOCS = "envoygeo-lean"


def candidates(choices: frozenset[str], ablate: bool) -> dict[str, dict[str, Any]]:
    """Candidate name -> index body, in the order of the first round."""
    out = {"envoygeo": envoygeo_body(), "envoygeo-plain": envoygeo_body(frozenset()),
           "dynamic": dynamic_body(), BASELINE: istio_integration_body(),
           "optimised": envoygeo_body(schema.SHIPPED_LEAN | choices),
           # The shipped template with `document.profile: lean` documents (LEAN_DOCS).
           LEAN_DOCS: envoygeo_body()}
    if ablate:  # every choice of the optimised candidate, shipped ones too
        full = schema.SHIPPED_LEAN | choices
        for c in sorted(full):
            out[f"optimised-{c}"] = envoygeo_body(full - {c})
    return out


# -- The dashboards' aggregations ----------------------------------------------------------

def _text_fields(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted field name -> aggregatable name (`.keyword` under a dynamic text field)."""
    out: dict[str, str] = {}
    for name, m in mapping.get("properties", {}).items():
        full = f"{prefix}{name}"
        if "properties" in m:
            out.update(_text_fields(m, f"{full}."))
        elif m.get("type") == "text" and "keyword" in m.get("fields", {}):
            out[full] = f"{full}.keyword"
    return out


def queries(mapping: dict[str, Any], geo: bool) -> dict[str, dict[str, Any] | None]:
    """The dashboards' main searches against an index with this live mapping (from
    `GET <index>/_mapping`); None where the mapping cannot answer (geo without geo_point).

    Top countries and bytes (report, Kibana top countries / bytes by country), top client
    IPs with their max rates (report, top IPs table), the map's geotile grid with
    bytes sent, requests over time by country (Kibana's date histogram split by the
    top 8 countries)."""
    agg = _text_fields(mapping)

    def f(name: str) -> str:
        return agg.get(name, name)

    country = f("source.geo.country_iso_code")
    rates = {f"r{w}": {"max": {"field": f"envoygeo.rate.{w}"}} for w in ("10s", "60s", "300s")}
    return {
        "countries": {"size": 0, "aggs": {"c": {
            "terms": {"field": country, "size": 15},
            "aggs": {"b": {"sum": {"field": "http.response.bytes"}}}}}},
        "ips": {"size": 0, "aggs": {"ip": {
            "terms": {"field": f("source.ip"), "size": 25}, "aggs": rates}}},
        "geotile": ({"size": 0, "aggs": {"g": {
            "geotile_grid": {"field": "source.geo.location", "precision": 4},
            "aggs": {"b": {"sum": {"field": "http.response.bytes"}}}}}} if geo else None),
        "over_time": {"size": 0, "aggs": {"t": {
            "date_histogram": {"field": "@timestamp", "fixed_interval": "1s",
                               "min_doc_count": 1},
            "aggs": {"c": {"terms": {"field": country, "size": 8}}}}}},
    }


# -- Measuring ----------------------------------------------------------------------------

@dataclass
class Figures:
    """One candidate's figures, one value per round."""

    es_cpu_us: list[float] = field(default_factory=list)
    docs_per_s: list[float] = field(default_factory=list)
    store_bytes: list[float] = field(default_factory=list)
    query_ms: dict[str, list[float]] = field(default_factory=dict)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def format_table(results: dict[str, Figures], baseline: str = BASELINE) -> list[str]:
    """One row per candidate: medians, then CPU and store as ratios to the baseline.

    A ratio is the median of the rounds' own ratios (candidate / baseline of the same
    round): on a shared machine the node's CPU per document drifts between rounds far
    more than between two candidates indexed minutes apart, so pairing by round cancels
    the drift a ratio of medians would keep.
    """
    base = results.get(baseline)

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    def ratio(values: list[float], base_values: list[float] | None) -> str:
        pairs = [v / b for v, b in zip(values, base_values or (), strict=False) if b]
        return f"{statistics.median(pairs):.2f}" if pairs else "n/a"

    head = (f"{'mapping':<34} {'ES CPU us/doc':>13} {'docs/s':>8} {'store B/doc':>11} "
            + " ".join(f"{q + ' ms':>12}" for q in QUERIES)
            + f" {'CPU x':>6} {'store x':>7}")
    rows = [head]
    for name, r in results.items():
        cpu, store = _median(r.es_cpu_us), _median(r.store_bytes)
        rows.append(
            f"{name:<34} {num(cpu, '.1f'):>13} {num(_median(r.docs_per_s), ',.0f'):>8} "
            f"{num(store, '.1f'):>11} "
            + " ".join(f"{num(_median(r.query_ms.get(q, [])), '.2f'):>12}" for q in QUERIES)
            + f" {ratio(r.es_cpu_us, base.es_cpu_us if base else None):>6}"
            f" {ratio(r.store_bytes, base.store_bytes if base else None):>7}")
    return rows


class _NodeCpu:
    """CPU seconds of the Elasticsearch node so far: /proc when it runs here (finer),
    else the node's own `process.cpu.total_in_millis`."""

    def __init__(self, es: Any, es_url: str) -> None:
        self.es, self.pids = es, _local_es_pids(es, es_url)

    def __call__(self) -> float:
        if self.pids:
            cpu = _cpu_seconds(self.pids)
            if cpu is not None:
                return cpu
        nodes = self.es.nodes.stats(node_id="_local", metric="process")["nodes"]
        return float(next(iter(nodes.values()))["process"]["cpu"]["total_in_millis"]) / 1e3


def _index_once(es: Any, sink: ElasticsearchSink, name: str, body: dict[str, Any],
                docs: list[bytes], batch: int, concurrency: int, node_cpu: _NodeCpu,
                figures: Figures | None) -> None:
    """Create, fill, refresh, force-merge, measure, query; the index is left for the
    caller to delete."""
    es.indices.create(index=name, **body)
    items = [BulkItem(name, f"bench-{i % 6}-{i // 6}", d) for i, d in enumerate(docs)]
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    cpu0, t0 = node_cpu(), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rejected = sum(len(r) for r in pool.map(lambda c: sink.write(c), chunks))
    es.indices.refresh(index=name)
    elapsed, cpu = time.perf_counter() - t0, node_cpu() - cpu0
    if rejected:
        raise click.ClickException(f"{name}: {rejected} documents rejected")
    if figures is None:
        return
    figures.es_cpu_us.append(cpu / len(docs) * 1e6)
    figures.docs_per_s.append(len(docs) / elapsed)
    es.options(request_timeout=1800).indices.forcemerge(index=name, max_num_segments=1)
    es.indices.refresh(index=name)
    stats = es.indices.stats(index=name, metric="store")
    figures.store_bytes.append(stats["_all"]["primaries"]["store"]["size_in_bytes"]
                               / len(docs))
    live = es.indices.get_mapping(index=name)[name]["mappings"]
    geo = es.field_caps(index=name, fields="source.geo.location")["fields"]
    for q, search in queries(live, "geo_point" in geo.get("source.geo.location", {})).items():
        if search is None:
            continue
        took = []
        for _ in range(QUERY_RUNS):
            t = time.perf_counter()
            es.search(index=name, request_cache=False, **search)
            took.append((time.perf_counter() - t) * 1e3)
        figures.query_ms.setdefault(q, []).append(statistics.median(took))


def build_documents(n: int, geoip_path: str | None, settings: Any) -> list[bytes]:
    """n enriched documents of the bench corpus, as the worker would index them."""
    records, _ = corpus(n, max(n // 4, 1000))
    docs = [r.document for r in Enricher.from_settings(settings).enrich_batch(records)[0]
            if r.document is not None]
    if not docs:
        raise click.ClickException("the corpus enriched to no documents")
    return docs


@click.command()
@click.option("--docs", "-n", "n", default=200_000, show_default=True,
              help="Documents indexed per candidate and round.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--batch", default=2000, show_default=True, help="Documents per bulk request.")
@click.option("--concurrency", default=2, show_default=True, help="Bulk requests in flight.")
@click.option("--es", "es_url", default="http://127.0.0.1:9200", show_default=True)
@click.option("--geoip", "geoip_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--choices", default="logsdb", show_default=True,
              help="Lean choices the optimised candidate adds to the shipped template: "
                   + ", ".join(schema.LEAN_CHOICES) + ".")
@click.option("--ablate", is_flag=True,
              help="Also measure the optimised candidate without each choice in turn.")
@click.option("--only", default="", help="Comma-separated candidate names to measure.")
def command(n: int, rounds: int, batch: int, concurrency: int, es_url: str,
            geoip_path: str | None, choices: str, ablate: bool, only: str) -> None:
    """Elasticsearch CPU, bulk rate, store and dashboard query latency per document,
    under envoygeo's template (shipped and plain), dynamic mapping, the Istio
    integration's and an optimised one."""
    chosen = frozenset(c for c in choices.split(",") if c)
    unknown = chosen - set(schema.LEAN_CHOICES)
    if unknown:
        raise click.BadParameter(f"unknown: {', '.join(sorted(unknown))}; choose from "
                                 f"{', '.join(schema.LEAN_CHOICES)}", param_hint="--choices")
    bodies = candidates(chosen, ablate)
    if only:
        wanted = [c for c in only.split(",") if c]
        missing = [c for c in wanted if c not in bodies]
        if missing:
            raise click.BadParameter(f"unknown: {', '.join(missing)}; candidates are "
                                     f"{', '.join(bodies)}", param_hint="--only")
        bodies = {k: v for k, v in bodies.items() if k in wanted}
    run_id = uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix="envoygeo-bench-index-"))
    settings = load_settings(_config(work / "bench.yaml", "127.0.0.1:9092", es_url,
                                     "bench-index", "bench-index", "bench-index",
                                     geoip_path or default_geoip_path(), batch, concurrency))
    es = make_client(settings.elasticsearch).options(request_timeout=600)
    sink = ElasticsearchSink(settings.elasticsearch)
    node_cpu = _NodeCpu(es, es_url)
    args = sys.argv[sys.argv.index("index") + 1:] if "index" in sys.argv else []
    click.echo(f"command: envoygeo bench index {' '.join(args)}".rstrip(), err=True)
    click.echo(f"{n:,} documents per candidate and round, {rounds} round(s), batch {batch}, "
               f"concurrency {concurrency}, Elasticsearch {es_url} (node CPU from "
               f"{'/proc' if node_cpu.pids else '_nodes/_local/stats/process'}); "
               f"optimised = shipped + {', '.join(sorted(chosen)) or 'nothing'}", err=True)
    docs = build_documents(n, geoip_path, settings)
    click.echo(f"corpus: {len(docs):,} documents, {sum(map(len, docs)) / len(docs):.0f} "
               "bytes of JSON each on average", err=True)
    docs_of = {name: docs for name in bodies}
    if LEAN_DOCS in bodies:
        lean = settings.model_copy(update={"document": DocumentSettings(profile="lean")})
        docs_of[LEAN_DOCS] = build_documents(n, geoip_path, lean)
        click.echo(f"{LEAN_DOCS}: the same records with document.profile lean, "
                   f"{sum(map(len, docs_of[LEAN_DOCS])) / len(docs):.0f} bytes each", err=True)
    results = {name: Figures() for name in bodies}
    names = list(bodies)
    created: list[str] = []

    def drop(index: str) -> None:
        es.options(ignore_status=404).indices.delete(index=index)

    try:
        # Untimed: a node that has not indexed for a while speeds up over its first pass.
        created.append(f"bench-index-{run_id}-warmup")
        _index_once(es, sink, created[-1], bodies[names[0]], docs[:50_000], batch,
                    concurrency, node_cpu, None)
        drop(created[-1])
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                created.append(f"bench-index-{run_id}-{r}-{name}")
                _index_once(es, sink, created[-1], bodies[name], docs_of[name], batch,
                            concurrency, node_cpu, results[name])
                # Its merges must not run in the background of the next candidate.
                drop(created[-1])
                f = results[name]
                click.echo(f"round {r + 1}/{rounds} {name}: {f.es_cpu_us[-1]:.1f} us/doc, "
                           f"{f.docs_per_s[-1]:,.0f} docs/s, {f.store_bytes[-1]:.1f} B/doc",
                           err=True)
    finally:
        for index in created:
            drop(index)
        sink.close()
    click.echo(f"envoygeo bench index: {len(docs):,} docs, {rounds} round(s); medians; "
               f"query p50 of {QUERY_RUNS} runs; CPU x / store x: median of each round's "
               f"ratio to {BASELINE}")
    for line in format_table(results):
        click.echo(line)
    spread = {k: (min(v.es_cpu_us), max(v.es_cpu_us)) for k, v in results.items()
              if len(v.es_cpu_us) > 1}
    if spread:
        click.echo("ES CPU us/doc range over rounds (noise): " + ", ".join(
            f"{k} {lo:.1f}-{hi:.1f}" for k, (lo, hi) in spread.items()))

