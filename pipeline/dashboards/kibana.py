"""Kibana 8.x saved objects: data views, Lens panels, a map, a saved search, a dashboard,
and the per-IP rate rule.

Why generate instead of exporting from a Kibana: no Kibana runs where this is built,
and a generator keeps ids, reference names and field names consistent by construction;
the validator then proves they also agree with `pipeline.schema`.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import schema
from pipeline.dashboards.names import DEFAULT, IndexNames
from pipeline.dashboards.validate import LENS_DATA_TYPE, lookup
from pipeline.enrich.alerts import THRESHOLD_COMPARATOR, AlertRule

CORE_MIGRATION_VERSION = "8.8.0"
# The oldest Kibana that imports these objects: `coreMigrationVersion` and
# `typeMigrationVersion` (which replaced `migrationVersion`) exist from 8.8.0, and a
# Kibana older than an object's coreMigrationVersion refuses it. The README states it.
MIN_KIBANA = CORE_MIGRATION_VERSION
# Oldest versions these shapes are valid for; Kibana migrates them forward on import.
TYPE_MIGRATION_VERSION = {
    "index-pattern": "8.0.0",
    "lens": "8.6.0",
    "map": "8.4.0",
    "search": "8.0.0",
    "dashboard": "8.7.0",
}

# Data view ids are the configured index names (these are the defaults), so objects
# built for a renamed index name only it, and re-importing replaces them in place.
LOGS_VIEW = DEFAULT.logs
ALERTS_VIEW = DEFAULT.alerts
PARSE_FAILURE_TAG = "_envoygeo_parse_failure"
RULE_ID = "envoygeo-per-ip-rate"

Obj = dict[str, Any]


def saved_object(type_: str, id_: str, attributes: Obj, references: list[Obj]) -> Obj:
    return {
        "type": type_,
        "id": id_,
        "attributes": attributes,
        "references": references,
        "coreMigrationVersion": CORE_MIGRATION_VERSION,
        "typeMigrationVersion": TYPE_MIGRATION_VERSION[type_],
        "managed": False,
    }


def data_view(id_: str, pattern: str, name: str) -> Obj:
    # allowNoIndex: the objects can be imported before the first document arrives.
    return saved_object("index-pattern", id_, {
        "title": pattern, "name": name, "timeFieldName": "@timestamp", "allowNoIndex": True,
    }, [])


# -- Lens columns --------------------------------------------------------------------

def _field_type(field: str, view: str) -> str:
    """`view` is "logs" or "alerts": which field table the column reads."""
    f = lookup(schema.FIELDS if view == "logs" else schema.ALERT_FIELDS, field)
    if f is None:
        raise KeyError(f"{field} is not in the {view} field table")
    return f.es_type


def date_col(label: str = "@timestamp") -> Obj:
    return {"label": label, "dataType": "date", "operationType": "date_histogram",
            "sourceField": "@timestamp", "isBucketed": True, "scale": "interval",
            "params": {"interval": "auto", "includeEmptyRows": True, "dropPartials": False}}


def terms_col(field: str, label: str, order_by: str, size: int = 10,
              view: str = "logs") -> Obj:
    return {"label": label, "dataType": LENS_DATA_TYPE[_field_type(field, view)],
            "operationType": "terms", "sourceField": field, "isBucketed": True,
            "scale": "ordinal",
            "params": {"size": size, "orderBy": {"type": "column", "columnId": order_by},
                       "orderDirection": "desc", "otherBucket": False,
                       "missingBucket": False, "parentFormat": {"id": "terms"}}}


def count_col(label: str = "Requests") -> Obj:
    return {"label": label, "dataType": "number", "operationType": "count",
            "sourceField": "___records___", "isBucketed": False, "scale": "ratio",
            "params": {"emptyAsNull": True}}


def metric_col(op: str, field: str, label: str) -> Obj:
    return {"label": label, "dataType": "number", "operationType": op, "sourceField": field,
            "isBucketed": False, "scale": "ratio", "params": {"emptyAsNull": True}}


def lens(id_: str, title: str, vis_type: str, columns: dict[str, Obj], visualization: Obj,
         query: str = "", view: str = LOGS_VIEW) -> Obj:
    """`view` is the id of the data view the layer reads."""
    """One Lens panel with a single form-based layer `layer1` over `view`."""
    layer = "layer1"
    visualization = json.loads(json.dumps(visualization).replace("$L", layer))
    return saved_object("lens", id_, {
        "title": title,
        "description": "",
        "visualizationType": vis_type,
        "state": {
            "datasourceStates": {"formBased": {"layers": {layer: {
                "columnOrder": list(columns), "columns": columns, "incompleteColumns": {},
            }}}},
            "visualization": visualization,
            "query": {"query": query, "language": "kuery"},
            "filters": [],
            "internalReferences": [],
            "adHocDataViews": {},
        },
    }, [{"type": "index-pattern", "id": view, "name": f"indexpattern-datasource-layer-{layer}"}])


def xy(series: str, x: str, ys: list[str], split: str | None = None) -> Obj:
    layer: Obj = {"layerId": "$L", "layerType": "data", "seriesType": series,
                  "xAccessor": x, "accessors": ys}
    if split:
        layer["splitAccessor"] = split
    return {"legend": {"isVisible": True, "position": "right"}, "valueLabels": "hide",
            "preferredSeriesType": series, "fittingFunction": "None", "layers": [layer]}


def table(cols: list[str]) -> Obj:
    return {"layerId": "$L", "layerType": "data", "columns": [{"columnId": c} for c in cols]}


def pie(group: str, metric: str) -> Obj:
    return {"shape": "donut", "layers": [{
        "layerId": "$L", "layerType": "data", "primaryGroups": [group], "metrics": [metric],
        "numberDisplay": "percent", "categoryDisplay": "default", "legendDisplay": "default",
        "nestedLegend": False}]}


COUNTRY = "source.geo.country_iso_code"


def lens_panels(names: IndexNames = DEFAULT) -> list[Obj]:
    panels = [
        lens("envoygeo-requests-over-time", "Requests over time by country", "lnsXY",
             {"t": date_col(), "c": terms_col(COUNTRY, "Country", "n", 8), "n": count_col()},
             xy("bar_stacked", "t", ["n"], "c")),
        lens("envoygeo-top-countries", "Top countries", "lnsXY",
             {"c": terms_col(COUNTRY, "Country", "n", 15), "n": count_col()},
             xy("bar_horizontal", "c", ["n"])),
        lens("envoygeo-top-cities", "Top cities", "lnsDatatable",
             {"city": terms_col("source.geo.city_name", "City", "n", 20),
              "c": terms_col(COUNTRY, "Country", "n", 1), "n": count_col()},
             table(["city", "c", "n"])),
        lens("envoygeo-top-ips", "Top source IPs and their request rates", "lnsDatatable",
             {"ip": terms_col(names.client, names.client_label, "n", 25), "n": count_col(),
              "r10": metric_col("max", "envoygeo.rate.10s", "Max req / 10s"),
              "r60": metric_col("max", "envoygeo.rate.60s", "Max req / 60s"),
              "r300": metric_col("max", "envoygeo.rate.300s", "Max req / 300s")},
             table(["ip", "n", "r10", "r60", "r300"])),
        lens("envoygeo-status-by-country", "Status codes by country", "lnsXY",
             {"c": terms_col(COUNTRY, "Country", "n", 10),
              "s": terms_col("http.response.status_code", "Status", "n", 8),
              "n": count_col()},
             xy("bar_stacked", "c", ["n"], "s")),
        lens("envoygeo-bytes-by-country", "Bytes sent by country", "lnsXY",
             {"c": terms_col(COUNTRY, "Country", "b", 10),
              "b": metric_col("sum", "http.response.bytes", "Bytes sent")},
             xy("bar_horizontal", "c", ["b"])),
        lens("envoygeo-ip-source", "How client IPs were resolved", "lnsPie",
             {"s": terms_col("envoygeo.ip_source", "IP source", "n", 5), "n": count_col()},
             pie("s", "n")),
        lens("envoygeo-parse-failures", "Unparsed records", "lnsXY",
             {"t": date_col(), "e": terms_col("envoygeo.envelope", "Envelope", "n", 5),
              "n": count_col("Unparsed records")},
             xy("bar_stacked", "t", ["n"], "e"),
             query=f'tags : "{PARSE_FAILURE_TAG}"'),
    ]
    for p in panels:
        p["references"][0]["id"] = names.logs
    return panels


def recent_alerts(names: IndexNames = DEFAULT) -> Obj:
    """A saved search: the alert documents themselves, newest first."""
    search_source = {"query": {"query": "", "language": "kuery"}, "filter": [],
                     "indexRefName": "kibanaSavedObjectMeta.searchSourceJSON.index"}
    return saved_object("search", "envoygeo-recent-alerts", {
        "title": "Recent per-IP rate alerts",
        "description": "",
        "columns": ["source.ip", "source.geo.country_iso_code", "source.geo.city_name",
                    "envoygeo.alert.rule", "envoygeo.alert.count",
                    "envoygeo.alert.threshold", "envoygeo.alert.window_s"],
        "sort": [["@timestamp", "desc"]],
        "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(search_source)},
    }, [{"type": "index-pattern", "id": names.alerts,
         "name": "kibanaSavedObjectMeta.searchSourceJSON.index"}])


# -- Map -----------------------------------------------------------------------------

def _vector_style(color: str, size: Obj) -> Obj:
    return {"type": "VECTOR", "properties": {
        "icon": {"type": "STATIC", "options": {"value": "marker"}},
        "fillColor": {"type": "STATIC", "options": {"color": color}},
        "lineColor": {"type": "STATIC", "options": {"color": "#FFFFFF"}},
        "lineWidth": {"type": "STATIC", "options": {"size": 1}},
        "iconSize": size,
        "symbolizeAs": {"options": {"value": "circle"}},
    }, "isTimeAware": True}


def map_layers(names: IndexNames = DEFAULT) -> list[Obj]:
    """Layer order is drawing order. Only layers 0 and 1 need the Elastic Maps Service
    (base tiles, country boundaries); layers 2 and 3 read Elasticsearch alone, so the
    grid and the documents still draw, on an empty background, when EMS is unreachable
    (air-gapped clusters: set map.includeElasticMapsService: false or a local EMS)."""
    common = {"visible": True, "minZoom": 0, "maxZoom": 24, "includeInFitToBounds": True}
    join_id = "countries-join"
    return [
        {**common, "id": "basemap", "label": "Basemap (EMS)", "type": "EMS_VECTOR_TILE",
         "alpha": 1,
         "sourceDescriptor": {"type": "EMS_TMS", "isAutoSelect": True,
                              "lightModeDefault": "road_map_desaturated"},
         "style": {"type": "EMS_VECTOR_TILE", "color": ""}},
        {**common, "id": "countries", "label": "Requests by country (EMS boundaries)",
         "type": "GEOJSON_VECTOR", "alpha": 0.6,
         "sourceDescriptor": {"type": "EMS_FILE", "id": "world_countries",
                              "tooltipProperties": ["name", "iso2"]},
         "joins": [{"leftField": "iso2", "right": {
             "type": "ES_TERM_SOURCE", "id": join_id, "term": COUNTRY, "size": 250,
             "metrics": [{"type": "count", "label": "Requests"}],
             "applyGlobalQuery": True, "applyGlobalTime": True, "applyForceRefresh": True,
             "indexPatternRefName": "layer_1_join_0_index_pattern"}}],
         "style": {"type": "VECTOR", "properties": {
             "fillColor": {"type": "DYNAMIC", "options": {
                 "color": "Blues", "type": "ORDINAL",
                 "field": {"name": f"__kbnjoin__count__{join_id}", "origin": "join"},
                 "fieldMetaOptions": {"isEnabled": True, "sigma": 3}}},
             "lineColor": {"type": "STATIC", "options": {"color": "#FFFFFF"}},
             "lineWidth": {"type": "STATIC", "options": {"size": 1}}}}},
        {**common, "id": "clusters", "label": "Request clusters", "type": "GEOJSON_VECTOR",
         "alpha": 0.8,
         "sourceDescriptor": {"type": "ES_GEO_GRID", "id": "clusters-src",
                              "geoField": "source.geo.location", "requestType": "point",
                              "resolution": "COARSE",
                              "metrics": [{"type": "count", "label": "Requests"},
                                          {"type": "sum", "field": "http.response.bytes",
                                           "label": "Bytes sent"}],
                              "applyGlobalQuery": True, "applyGlobalTime": True,
                              "applyForceRefresh": True,
                              "indexPatternRefName": "layer_2_source_index_pattern"},
         "style": _vector_style("#E7664C", {"type": "DYNAMIC", "options": {
             "field": {"name": "doc_count", "origin": "source"}, "minSize": 6,
             "maxSize": 32, "fieldMetaOptions": {"isEnabled": True, "sigma": 3}}})},
        {**common, "id": "documents", "label": "Requests (documents)",
         "type": "GEOJSON_VECTOR", "alpha": 0.9, "minZoom": 5,
         "sourceDescriptor": {"type": "ES_SEARCH", "id": "documents-src",
                              "geoField": "source.geo.location", "scalingType": "LIMIT",
                              "sortField": "@timestamp", "sortOrder": "desc",
                              "tooltipProperties": [names.client, "source.geo.city_name",
                                                    COUNTRY, "url.domain",
                                                    "http.response.status_code",
                                                    "envoygeo.rate.60s"],
                              "filterByMapBounds": True, "topHitsSize": 1,
                              "applyGlobalQuery": True, "applyGlobalTime": True,
                              "applyForceRefresh": True,
                              "indexPatternRefName": "layer_3_source_index_pattern"},
         "style": _vector_style("#6092C0", {"type": "STATIC", "options": {"size": 5}})},
    ]


def geo_map(names: IndexNames = DEFAULT) -> Obj:
    layers = map_layers(names)
    map_state = {"zoom": 1.5, "center": {"lat": 20, "lon": 0},
                 "timeFilters": {"from": "now-24h", "to": "now"},
                 "refreshConfig": {"isPaused": True, "interval": 0},
                 "query": {"query": "", "language": "kuery"}, "filters": [],
                 "settings": {"autoFitToDataBounds": False, "showSpatialFilters": True}}
    refs = [{"type": "index-pattern", "id": names.logs, "name": name} for name in (
        "layer_1_join_0_index_pattern", "layer_2_source_index_pattern",
        "layer_3_source_index_pattern")]
    return saved_object("map", "envoygeo-map", {
        "title": "Client locations",
        "description": "Grid and documents from Elasticsearch; basemap and country "
                       "boundaries from the Elastic Maps Service when reachable.",
        "mapStateJSON": json.dumps(map_state),
        "layerListJSON": json.dumps(layers),
        "uiStateJSON": json.dumps({"isLayerTOCOpen": True, "openTOCDetails": []}),
    }, refs)


# -- Dashboard -----------------------------------------------------------------------

def layout(panels: list[tuple[Obj, int, int]], version: str) -> tuple[list[Obj], list[Obj]]:
    """(object, width, height) in the 48-column dashboard grid, placed left to right and
    wrapped into rows -> (panelsJSON entries, references). Shared with the OSD export,
    whose dashboards use the same by-reference panel format."""
    panel_list, refs = [], []
    x = y = row_h = 0
    for i, (obj, w, h) in enumerate(panels):
        if x + w > 48:
            x, y, row_h = 0, y + row_h, 0
        ref = f"panel_{i}"
        panel_list.append({"version": version, "type": obj["type"],
                           "gridData": {"x": x, "y": y, "w": w, "h": h, "i": str(i)},
                           "panelIndex": str(i), "embeddableConfig": {},
                           "panelRefName": ref})
        refs.append({"type": obj["type"], "id": obj["id"], "name": ref})
        x, row_h = x + w, max(row_h, h)
    return panel_list, refs


def dashboard_defaults() -> Obj:
    """Last 24 hours, restored with the dashboard; refresh every minute."""
    return {"timeRestore": True, "timeFrom": "now-24h", "timeTo": "now",
            "refreshInterval": {"pause": False, "value": 60000},
            "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(
                {"query": {"query": "", "language": "kuery"}, "filter": []})}}


def dashboard(panels: list[tuple[Obj, int, int]]) -> Obj:
    panel_list, refs = layout(panels, CORE_MIGRATION_VERSION)
    return saved_object("dashboard", "envoygeo-overview", {
        "title": "envoygeo: client geography and rates",
        "description": "Where requests come from (true client IP), how fast each IP is "
                       "going, and what could not be parsed.",
        "panelsJSON": json.dumps(panel_list),
        "optionsJSON": json.dumps({"useMargins": True, "syncColors": True,
                                   "syncTooltips": True, "hidePanelTitles": False}),
        **dashboard_defaults(),
    }, refs)


def saved_objects(names: IndexNames = DEFAULT) -> list[Obj]:
    """Dependencies first: Kibana resolves references within one import file."""
    views = [data_view(names.logs, names.logs_pattern, "envoygeo access logs"),
             data_view(names.alerts, names.alerts_pattern, "envoygeo alerts")]
    panels = lens_panels(names)
    by_id = {p["id"]: p for p in panels}
    the_map, alerts = geo_map(names), recent_alerts(names)
    layout = [
        (the_map, 32, 20), (by_id["envoygeo-top-countries"], 16, 20),
        (by_id["envoygeo-requests-over-time"], 48, 12),
        (by_id["envoygeo-top-ips"], 24, 16), (by_id["envoygeo-top-cities"], 24, 16),
        (by_id["envoygeo-status-by-country"], 24, 14),
        (by_id["envoygeo-bytes-by-country"], 24, 14),
        (by_id["envoygeo-ip-source"], 16, 14), (by_id["envoygeo-parse-failures"], 32, 14),
        (alerts, 48, 14),
    ]
    return [*views, *panels, the_map, alerts, dashboard(layout)]


# -- Alert rule ----------------------------------------------------------------------

DEFAULT_RULE = AlertRule(name="per-ip-rate", window_s=60, threshold=600)


def rule_id(rule: AlertRule) -> str:
    """The built-in / command-line rule keeps its historical id; each rule from
    `rates.alerts` gets its own, so re-importing updates it in place."""
    return RULE_ID if rule.name == DEFAULT_RULE.name else f"{RULE_ID}-{rule.name}"


def rate_rule(rule: AlertRule = DEFAULT_RULE, names: IndexNames = DEFAULT,
              term_size: int = 100, interval: str = "1m") -> Obj:
    """Kibana `.es-query` rule: one alert per source.ip whose request count in the
    rule's window reaches its threshold, with the worker's own comparison
    (`THRESHOLD_COMPARATOR`, ">=") so one threshold means the same in both places.
    Complements envoygeo's own alerts (which fire in the worker, per event) with one a
    Kibana operator can route to connectors."""
    es_query = {"query": {"bool": {"filter": [{"term": {"event.kind": "event"}}]}}}
    window, unit = _window_unit(rule.window_s)
    return {
        "name": f"envoygeo: {rule.name}: requests per client IP reaching "
                f"{rule.threshold} in {window}{unit}",
        "rule_type_id": ".es-query",
        "consumer": "stackAlerts",
        "schedule": {"interval": interval},
        "tags": ["envoygeo"],
        "actions": [],
        "params": {
            "searchType": "esQuery",
            "index": [names.logs_pattern],
            "timeField": "@timestamp",
            "esQuery": json.dumps(es_query),
            "size": 0,
            "aggType": "count",
            "groupBy": "top",
            "termField": names.client,
            "termSize": term_size,
            "threshold": [rule.threshold],
            "thresholdComparator": THRESHOLD_COMPARATOR,
            "timeWindowSize": window,
            "timeWindowUnit": unit,
            "excludeHitsFromPreviousRun": False,
        },
    }


def _window_unit(seconds: int) -> tuple[int, str]:
    """Seconds in the largest whole unit Kibana offers (its UI shows 5m, not 300s)."""
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return seconds // size, unit
    return seconds, "s"


def rule_file(rule: AlertRule = DEFAULT_RULE, names: IndexNames = DEFAULT) -> Obj:
    return {"id": rule_id(rule), "rule": rate_rule(rule, names)}
