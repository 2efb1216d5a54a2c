"""Check saved objects against envoygeo's field table before anyone imports them.

Why: Kibana imports a panel that names a field the index does not have (or has with
another type) without complaint; the panel then shows "field not found" or an empty
chart on the day someone needs it. This module finds every field a Lens column, map
layer, saved search, legacy visualization, KQL query or alert rule uses, resolves the
data view it runs against, and checks the field exists in `pipeline.schema` with a type
that suits the use. It also checks ids are unique and every reference resolves.
Works on Kibana 8 and OpenSearch Dashboards exports alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline import schema
from pipeline.dashboards.names import DEFAULT, IndexNames

Obj = dict[str, Any]

NUMERIC = frozenset({"long", "double"})
# What each use accepts. `terms` takes numbers too (status codes); Lens columns are
# additionally checked for a dataType consistent with the field (below).
USES: dict[str, frozenset[str]] = {
    "terms": frozenset({"keyword", "ip"}) | NUMERIC,
    "date_histogram": frozenset({"date"}),
    "geo": frozenset({"geo_point"}),
    "metric": NUMERIC,
    "sort": frozenset({"date", "keyword", "ip"}) | NUMERIC,
    "show": frozenset({"date", "keyword", "ip", "text", "geo_point", "flattened"}) | NUMERIC,
}
_AGG_USE = {
    "terms": "terms", "significant_terms": "terms", "date_histogram": "date_histogram",
    "geohash_grid": "geo", "geotile_grid": "geo", "geo_centroid": "geo", "geo_bounds": "geo",
    "sum": "metric", "avg": "metric", "average": "metric", "min": "metric",
    "max": "metric", "median": "metric", "percentile": "metric",
    "standard_deviation": "metric", "cardinality": "sort", "unique_count": "sort",
    "last_value": "show", "count": "show",
}
LENS_DATA_TYPE = {"keyword": "string", "ip": "ip", "long": "number", "double": "number",
                   "date": "date"}
_KQL_FIELD = re.compile(r"(?<![\w.@\"])([A-Za-z_@][\w.@]*)\s*:")


def field_table(pattern: str, names: IndexNames = DEFAULT) -> tuple[schema.Field, ...] | None:
    """The field table an index pattern reads: logs or alerts, by the configured names."""
    return names.fields_for(pattern)


def lookup(fields: tuple[schema.Field, ...], name: str) -> schema.Field | None:
    for f in fields:
        if f.name == name:
            return f
        if f.name.endswith(".*") and name.startswith(f.name[:-1]) and name != f.name[:-1]:
            return f
        if f.es_type == "flattened" and name.startswith(f.name + "."):
            return schema.Field(name, "keyword", f.doc)
    return None


def check_field(fields: tuple[schema.Field, ...], pattern: str, name: str, use: str,
                ) -> str | None:
    f = lookup(fields, name)
    if f is None:
        return f"field {name!r} is not in the field table for {pattern}"
    if f.es_type not in USES[use]:
        return (f"field {name!r} is {f.es_type} in the field table for {pattern}; "
                f"{use} needs {'/'.join(sorted(USES[use]))}")
    if use != "show" and not f.indexed:
        return f"field {name!r} is not indexed, so it cannot be used for {use}"
    return None


def kql_fields(query: str) -> list[str]:
    return _KQL_FIELD.findall(query or "")


def load_ndjson(path: Path) -> list[Obj]:
    objs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        if "exportedCount" in obj:  # the summary line of a Kibana export
            continue
        objs.append(obj)
    return objs


# -- field uses per object type ------------------------------------------------------
# Each yields (reference name of the data view, field, use, extra check or None).

Use = tuple[str, str, str, str | None]


def _lens_uses(obj: Obj) -> Iterator[Use]:
    state = obj["attributes"].get("state", {})
    sources = state.get("datasourceStates", {})
    layers = {**sources.get("formBased", {}).get("layers", {}),
              **sources.get("indexpattern", {}).get("layers", {})}
    query = state.get("query", {}).get("query", "")
    for layer_id, layer in layers.items():
        ref = f"indexpattern-datasource-layer-{layer_id}"
        for col in layer.get("columns", {}).values():
            field = col.get("sourceField")
            if not field or field == "___records___":
                continue
            use = _AGG_USE.get(col.get("operationType", ""), "show")
            yield ref, field, use, col.get("dataType")
        for field in kql_fields(query):
            yield ref, field, "show", None


def _map_uses(obj: Obj) -> Iterator[Use]:
    for layer in json.loads(obj["attributes"].get("layerListJSON", "[]")):
        src = layer.get("sourceDescriptor") or {}
        ref = src.get("indexPatternRefName")
        if ref:
            if src.get("geoField"):
                yield ref, src["geoField"], "geo", None
            for field in src.get("tooltipProperties", []):
                yield ref, field, "show", None
            if src.get("sortField"):
                yield ref, src["sortField"], "sort", None
            if src.get("topHitsSplitField"):
                yield ref, src["topHitsSplitField"], "terms", None
            for m in src.get("metrics", []):
                if m.get("field"):
                    yield ref, m["field"], _AGG_USE.get(m["type"], "metric"), None
        for join in layer.get("joins", []):
            right = join.get("right", {})
            jref = right.get("indexPatternRefName", "")
            if right.get("term"):
                yield jref, right["term"], "terms", None
            for m in right.get("metrics", []):
                if m.get("field"):
                    yield jref, m["field"], _AGG_USE.get(m["type"], "metric"), None


def _search_source(obj: Obj) -> Obj:
    meta = obj["attributes"].get("kibanaSavedObjectMeta", {})
    return json.loads(meta.get("searchSourceJSON") or "{}")


def _search_uses(obj: Obj) -> Iterator[Use]:
    source = _search_source(obj)
    ref = source.get("indexRefName", "")
    for field in obj["attributes"].get("columns", []):
        yield ref, field, "show", None
    for sort in obj["attributes"].get("sort", []):
        yield ref, sort[0], "sort", None
    for field in kql_fields(source.get("query", {}).get("query", "")):
        yield ref, field, "show", None


def _visualization_uses(obj: Obj) -> Iterator[Use]:
    source = _search_source(obj)
    ref = source.get("indexRefName", "")
    vis = json.loads(obj["attributes"].get("visState") or "{}")
    for a in vis.get("aggs", []):
        field = a.get("params", {}).get("field")
        if field:
            yield ref, field, _AGG_USE.get(a["type"], "show"), None
    for field in kql_fields(source.get("query", {}).get("query", "")):
        yield ref, field, "show", None


_USES = {"lens": _lens_uses, "map": _map_uses, "search": _search_uses,
         "visualization": _visualization_uses}


def _panel_ref_names(obj: Obj) -> list[str]:
    panels = json.loads(obj["attributes"].get("panelsJSON") or "[]")
    return [p["panelRefName"] for p in panels if "panelRefName" in p]


# -- checks --------------------------------------------------------------------------


def validate_objects(objs: list[Obj], names: IndexNames = DEFAULT) -> list[str]:
    errors: list[str] = []
    seen: set[tuple[str, str]] = set()
    for obj in objs:
        key = (obj.get("type", ""), obj.get("id", ""))
        if not all(key):
            errors.append(f"object without type or id: {json.dumps(obj)[:80]}")
        if key in seen:
            errors.append(f"{key[0]}/{key[1]}: duplicate id")
        seen.add(key)
    patterns = {o["id"]: o["attributes"].get("title", "") for o in objs
                if o.get("type") == "index-pattern"}
    for obj in objs:
        label = f"{obj.get('type')}/{obj.get('id')}"
        refs = {r["name"]: r for r in obj.get("references", [])}
        for r in refs.values():
            if (r["type"], r["id"]) not in seen:
                errors.append(f"{label}: reference {r['name']} -> {r['type']}/{r['id']} "
                              "is not in the file")
        if obj.get("type") == "dashboard":
            errors += [f"{label}: panel {n} has no reference" for n in _panel_ref_names(obj)
                       if n not in refs]
        if obj.get("type") == "lens":
            errors += [f"{label}: {e}" for e in _lens_accessors(obj)]
        extractor = _USES.get(obj.get("type", ""))
        if extractor is None:
            continue
        try:
            uses = list(extractor(obj))
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            errors.append(f"{label}: cannot read: {e!r}")
            continue
        for ref_name, field, use, data_type in uses:
            ref = refs.get(ref_name)
            if ref is None or ref["type"] != "index-pattern":
                errors.append(f"{label}: data view reference {ref_name!r} is missing")
                continue
            pattern = patterns.get(ref["id"], "")
            fields = field_table(pattern, names)
            if fields is None:
                errors.append(f"{label}: data view {ref['id']} ({pattern!r}) matches "
                              f"neither {names.logs!r} nor {names.alerts!r} "
                              "(elasticsearch.index / alerts_index)")
                continue
            problem = check_field(fields, pattern, field, use)
            if problem is None and data_type and use in ("terms", "date_histogram"):
                f = lookup(fields, field)
                want = LENS_DATA_TYPE.get(f.es_type) if f else None
                if want != data_type:
                    problem = (f"column on {field!r} has dataType {data_type!r} but the "
                               f"field is {f.es_type if f else '?'} ({want!r})")
            if problem:
                errors.append(f"{label}: {problem}")
    return errors


def _lens_accessors(obj: Obj) -> Iterable[str]:
    """Visualization accessors must name columns that exist in the layer."""
    state = obj["attributes"].get("state", {})
    layers = state.get("datasourceStates", {}).get("formBased", {}).get("layers", {})
    columns = {c for layer in layers.values() for c in layer.get("columns", {})}
    vis = state.get("visualization", {})
    named: list[str] = []
    for layer in vis.get("layers", [vis]):
        for key in ("xAccessor", "splitAccessor"):
            if layer.get(key):
                named.append(layer[key])
        for key in ("accessors", "primaryGroups", "metrics"):
            named += layer.get(key, [])
        named += [c["columnId"] for c in layer.get("columns", [])]
    return [f"visualization uses column {c!r}, not in the layer" for c in named
            if c not in columns]


def _query_fields(node: Any) -> Iterator[str]:
    """Field names in an Elasticsearch query DSL tree (term, range, match, exists...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("term", "terms", "range", "match", "match_phrase", "prefix",
                       "wildcard") and isinstance(value, dict):
                yield from (k for k in value if k != "boost")
            elif key == "exists" and isinstance(value, dict):
                yield value.get("field", "")
            else:
                yield from _query_fields(value)
    elif isinstance(node, list):
        for item in node:
            yield from _query_fields(item)


def validate_rule(rule: Obj, names: IndexNames = DEFAULT) -> list[str]:
    """An `.es-query` rule body as sent to POST /api/alerting/rule/<id>."""
    errors: list[str] = []
    p = rule.get("params", {})
    if rule.get("rule_type_id") != ".es-query":
        errors.append(f"rule_type_id is {rule.get('rule_type_id')!r}, expected .es-query")
    if p.get("searchType") != "esQuery":
        errors.append("params.searchType must be esQuery (index + query DSL)")
    if p.get("thresholdComparator") not in (">", ">=", "<", "<=", "between", "notBetween"):
        errors.append(f"params.thresholdComparator {p.get('thresholdComparator')!r} invalid")
    if not (isinstance(p.get("threshold"), list) and p["threshold"]
            and all(isinstance(t, (int, float)) for t in p["threshold"])):
        errors.append("params.threshold must be a non-empty list of numbers")
    if p.get("timeWindowUnit") not in ("s", "m", "h", "d"):
        errors.append("params.timeWindowUnit must be s, m, h or d")
    if not isinstance(p.get("timeWindowSize"), int) or p["timeWindowSize"] < 1:
        errors.append("params.timeWindowSize must be a positive integer")
    if p.get("groupBy") == "top" and not p.get("termField"):
        errors.append("params.groupBy top needs params.termField")
    try:
        query = json.loads(p.get("esQuery", ""))
    except json.JSONDecodeError as e:
        errors.append(f"params.esQuery is not JSON: {e}")
        query = {}
    indices = p.get("index") or []
    if not indices:
        errors.append("params.index is empty")
    for pattern in indices:
        fields = field_table(pattern, names)
        if fields is None:
            errors.append(f"params.index {pattern!r} matches neither {names.logs!r} nor "
                          f"{names.alerts!r} (elasticsearch.index / alerts_index)")
            continue
        uses = [(p.get("timeField", ""), "date_histogram")]
        if p.get("groupBy") == "top" and p.get("termField"):
            uses.append((p["termField"], "terms"))
        if p.get("aggType", "count") != "count":
            uses.append((p.get("aggField", ""), "metric"))
        uses += [(f, "show") for f in _query_fields(query)]
        for field, use in uses:
            problem = check_field(fields, pattern, field, use)
            if problem:
                errors.append(f"rule: {problem}")
    return errors


def validate_file(path: Path, names: IndexNames = DEFAULT) -> list[str]:
    """ndjson saved objects, or a rule file (.json: {"id", "rule"} or a bare rule)."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return validate_rule(data.get("rule", data), names)
        return validate_objects(load_ndjson(path), names)
    except (OSError, ValueError) as e:
        return [str(e)]
