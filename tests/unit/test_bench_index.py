"""`envoygeo bench index`'s pure parts: the candidate mappings, the Istio integration's
field list, the dashboards' searches per mapping, and the figures table."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import schema
from pipeline.bench.index import (
    BASELINE,
    ISTIO_FIELDS,
    QUERIES,
    Figures,
    candidates,
    dynamic_body,
    envoygeo_body,
    format_table,
    istio_integration_body,
    queries,
)


def _leaves(props: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, node in props.items():
        name = f"{prefix}{key}"
        if "properties" in node and "type" not in node:
            out.update(_leaves(node["properties"], name + "."))
        else:
            out[name] = node
    return out


def test_envoygeo_candidate_is_the_shipped_template() -> None:
    body = envoygeo_body()
    shipped = schema.component_templates()
    assert body["mappings"] == shipped["envoygeo-logs-mappings"]["template"]["mappings"]
    index = body["settings"]["index"]
    assert index["number_of_replicas"] == 0
    shipped_index = shipped["envoygeo-settings"]["template"]["settings"]["index"]
    assert index.get("codec") == shipped_index.get("codec")
    assert candidates(frozenset(), ablate=False)["envoygeo-plain"] == envoygeo_body(frozenset())


def test_optimised_candidate_applies_each_choice() -> None:
    lean = envoygeo_body(frozenset(schema.LEAN_CHOICES))
    index = lean["settings"]["index"]
    assert index["codec"] == "best_compression"
    assert index["mode"] == "logsdb"
    assert index["sort"] == {"field": "@timestamp", "order": "desc"}
    leaves = _leaves(lean["mappings"]["properties"])
    assert leaves["http.request.id"]["index"] is False
    assert leaves["error.message"]["norms"] is False
    rate = lean["mappings"]["dynamic_templates"][0]["envoygeo_rate"]["mapping"]
    assert rate == {"type": "long", "index": False}
    # The plain template has none of them.
    plain = _leaves(envoygeo_body(frozenset())["mappings"]["properties"])
    assert "index" not in plain["http.request.id"] and "norms" not in plain["error.message"]


def test_lean_mapping_keeps_what_dashboards_report_and_alert_rule_look_up() -> None:
    """Filtered or searched by value (term/range queries): keep the inverted index.
    Aggregated or displayed: doc_values stay on for every field but event.original."""
    leaves = _leaves(envoygeo_body(frozenset(schema.LEAN_CHOICES))["mappings"]["properties"])
    for name in ("@timestamp", "tags", "event.kind", "event.dataset", "source.ip",
                 "source.geo.country_iso_code", "source.geo.city_name",
                 "source.geo.location", "http.response.status_code", "url.path",
                 "url.domain", "envoygeo.ip_source", "envoygeo.envelope"):
        assert leaves[name].get("index", True), name
    for name, m in leaves.items():
        if name != "event.original" and m["type"] not in ("object", "flattened", "text"):
            assert m.get("doc_values", True), name


def test_ablation_candidates_drop_one_choice_each() -> None:
    choices = frozenset({"best_compression", "logsdb"})
    c = candidates(choices, ablate=True)
    assert list(c)[:5] == ["envoygeo", "envoygeo-plain", "dynamic", BASELINE, "optimised"]
    assert "codec" not in c["optimised-best_compression"]["settings"]["index"]
    assert c["optimised-best_compression"]["settings"]["index"]["mode"] == "logsdb"
    assert "mode" not in c["optimised-logsdb"]["settings"]["index"]
    # Shipped choices are ablated too.
    assert {f"optimised-{x}" for x in schema.SHIPPED_LEAN} <= set(c)


def test_dynamic_candidate_has_no_mapping() -> None:
    assert "mappings" not in dynamic_body()


def test_istio_field_list_and_mapping() -> None:
    # The integration's own group and the ECS fields its ecs.yml names.
    for name in ("istio.access.upstream.cluster", "istio.access.request.duration",
                 "istio.access.x-forwarded-for", "http.response.status_code",
                 "user_agent.original", "event.original", "@timestamp"):
        assert name in ISTIO_FIELDS, name
    body = istio_integration_body()
    leaves = _leaves(body["mappings"]["properties"])
    assert set(leaves) == set(ISTIO_FIELDS)
    assert leaves["istio.access.request.duration"] == {"type": "double"}
    assert leaves["event.original"] == {"type": "keyword", "index": False, "doc_values": False}
    assert leaves["user_agent.original"]["fields"]["text"]["type"] == "text"
    assert leaves["url.original"]["type"] == "keyword"  # wildcard is x-pack
    assert body["settings"]["index"]["codec"] == "best_compression"
    # ECS fields the list does not name map through ecs@mappings' dynamic templates.
    names = [next(iter(t)) for t in body["mappings"]["dynamic_templates"]]
    assert names[0] == "ecs_timestamp" and names[-1] == "all_strings_to_keywords"
    assert "ecs_ip" in names and "ecs_geo_point" in names


def test_queries_use_keyword_subfields_under_dynamic_mapping() -> None:
    live = {"properties": {"source": {"properties": {
        "ip": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
        "geo": {"properties": {"country_iso_code": {
            "type": "text", "fields": {"keyword": {"type": "keyword"}}}}}}}}}
    q = queries(live, geo=False)
    assert set(q) == set(QUERIES)
    assert q["geotile"] is None
    assert q["ips"] is not None and q["countries"] is not None
    assert q["ips"]["aggs"]["ip"]["terms"]["field"] == "source.ip.keyword"
    assert (q["countries"]["aggs"]["c"]["terms"]["field"]
            == "source.geo.country_iso_code.keyword")
    typed = queries(envoygeo_body()["mappings"], geo=True)
    assert typed["ips"] is not None and typed["geotile"] is not None
    assert typed["ips"]["aggs"]["ip"]["terms"]["field"] == "source.ip"
    assert typed["geotile"]["aggs"]["g"]["geotile_grid"]["field"] == "source.geo.location"


def test_format_table_rows_and_ratios() -> None:
    base = Figures([100.0, 120.0, 110.0], [1000.0], [400.0, 400.0],
                   {q: [2.0] for q in QUERIES})
    other = Figures([55.0, 66.0, 88.0], [2000.0], [200.0], {"countries": [1.0]})
    lines = format_table({BASELINE: base, "optimised": other})
    assert len(lines) == 3
    assert lines[0].split()[0] == "mapping"
    row = lines[2].split()
    assert row[0] == "optimised"
    assert row[1] == "66.0" and row[2] == "2,000" and row[3] == "200.0"
    assert row[5:8] == ["n/a", "n/a", "n/a"]  # no ips/geotile/over_time figures
    # Paired by round: 55/100, 66/120, 88/110 -> median 0.55 (a ratio of medians,
    # 66/110, would say 0.60); store 200/400 (the baseline's first round).
    assert row[-2:] == ["0.55", "0.50"]
    assert lines[1].split()[-2:] == ["1.00", "1.00"]


def test_format_table_without_baseline_has_no_ratios() -> None:
    lines = format_table({"envoygeo": Figures([10.0], [1.0], [1.0], {})})
    assert lines[1].split()[-2:] == ["n/a", "n/a"]


@pytest.mark.parametrize("name", sorted(schema.LEAN_CHOICES))
def test_every_lean_choice_changes_the_body(name: str) -> None:
    assert envoygeo_body(frozenset({name})) != envoygeo_body(frozenset())
