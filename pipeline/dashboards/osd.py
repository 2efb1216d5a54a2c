"""OpenSearch Dashboards saved objects (index-pattern, visualization, dashboard).

Why a second set: OpenSearch Dashboards forked from Kibana 7.10 and does not know
Kibana 8's `lens`, `map` or `typeMigrationVersion`; it still has the legacy
`visualization` type, including the `tile_map` coordinate map, which is what is used.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from pipeline.dashboards.kibana import (
    COUNTRY,
    LOGS_VIEW,
    dashboard_defaults,
    layout,
)
from pipeline.dashboards.names import DEFAULT, IndexNames

Obj = dict[str, Any]
MIGRATION = {"index-pattern": "7.6.0", "visualization": "7.10.0", "dashboard": "7.9.3"}
INDEX_REF = "kibanaSavedObjectMeta.searchSourceJSON.index"


def _obj(type_: str, id_: str, attributes: Obj, references: list[Obj]) -> Obj:
    return {"type": type_, "id": id_, "attributes": attributes, "references": references,
            "migrationVersion": {type_: MIGRATION[type_]}}


def index_pattern(id_: str, pattern: str) -> Obj:
    return _obj("index-pattern", id_, {"title": pattern, "timeFieldName": "@timestamp"}, [])


def agg(id_: str, type_: str, schema_: str, **params: Any) -> Obj:
    return {"id": id_, "enabled": True, "type": type_, "schema": schema_, "params": params}


def terms(id_: str, field: str, size: int, schema_: str = "bucket") -> Obj:
    return agg(id_, "terms", schema_, field=field, size=size, order="desc", orderBy="1",
               otherBucket=False, missingBucket=False)


def visualization(id_: str, title: str, vis_type: str, aggs: list[Obj], params: Obj,
                  view: str = LOGS_VIEW, query: str = "") -> Obj:
    vis_state = {"title": title, "type": vis_type, "params": params, "aggs": aggs}
    search = {"query": {"query": query, "language": "kuery"}, "filter": [],
              "indexRefName": INDEX_REF}
    return _obj("visualization", id_, {
        "title": title, "description": "", "version": 1,
        "visState": json.dumps(vis_state), "uiStateJSON": "{}",
        "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(search)},
    }, [{"type": "index-pattern", "id": view, "name": INDEX_REF}])


def _table_params() -> Obj:
    return {"perPage": 20, "showPartialRows": False, "showMetricsAtAllLevels": False,
            "showTotal": False, "totalFunc": "sum", "percentageCol": ""}


def _histogram_params() -> Obj:
    return {"type": "histogram", "addTooltip": True, "addLegend": True,
            "legendPosition": "right", "times": [], "addTimeMarker": False}


def visualizations(names: IndexNames = DEFAULT) -> list[Obj]:
    count = agg("1", "count", "metric")
    vis = partial(visualization, view=names.logs)  # the alerts table overrides `view`
    return [
        vis("envoygeo-osd-map", "Client locations (coordinate map)", "tile_map",
                      [count, agg("2", "geohash_grid", "segment", field="source.geo.location",
                                  autoPrecision=True, precision=2, useGeocentroid=True,
                                  isFilteredByCollar=True)],
                      {"mapType": "Scaled Circle Markers", "isDesaturated": True,
                       "addTooltip": True, "heatClusterSize": 1.5,
                       "legendPosition": "bottomright", "mapZoom": 2, "mapCenter": [20, 0],
                       "wms": {"enabled": False}}),
        vis("envoygeo-osd-requests-over-time", "Requests over time by country",
                      "histogram",
                      [count, agg("2", "date_histogram", "segment", field="@timestamp",
                                  interval="auto", min_doc_count=1, extended_bounds={}),
                       terms("3", COUNTRY, 8, "group")], _histogram_params()),
        vis("envoygeo-osd-top-countries", "Top countries", "table",
                      [count, terms("2", COUNTRY, 20)], _table_params()),
        vis("envoygeo-osd-top-cities", "Top cities", "table",
                      [count, terms("2", "source.geo.city_name", 20)], _table_params()),
        vis("envoygeo-osd-top-ips", "Top source IPs and their request rates",
                      "table",
                      [count, terms("2", names.client, 25),
                       agg("3", "max", "metric", field="envoygeo.rate.10s"),
                       agg("4", "max", "metric", field="envoygeo.rate.60s"),
                       agg("5", "max", "metric", field="envoygeo.rate.300s")],
                      _table_params()),
        vis("envoygeo-osd-status-by-country", "Status codes by country",
                      "histogram",
                      [count, terms("2", COUNTRY, 10, "segment"),
                       terms("3", "http.response.status_code", 8, "group")],
                      _histogram_params()),
        vis("envoygeo-osd-bytes-by-country", "Bytes sent by country", "table",
                      [agg("1", "sum", "metric", field="http.response.bytes"),
                       terms("2", COUNTRY, 20)], _table_params()),
        vis("envoygeo-osd-ip-source", "How client IPs were resolved", "pie",
                      [count, terms("2", "envoygeo.ip_source", 5, "segment")],
                      {"type": "pie", "addTooltip": True, "addLegend": True,
                       "legendPosition": "right", "isDonut": True}),
        vis("envoygeo-osd-parse-failures", "Unparsed records", "histogram",
                      [count, agg("2", "date_histogram", "segment", field="@timestamp",
                                  interval="auto", min_doc_count=1, extended_bounds={})],
                      _histogram_params(), query='tags : "_envoygeo_parse_failure"'),
        vis("envoygeo-osd-alerts", "Rate alerts by client IP", "table",
                      [agg("1", "max", "metric", field="envoygeo.alert.count"),
                       terms("2", "source.ip", 25), terms("3", "envoygeo.alert.rule", 5)],
                      _table_params(), view=names.alerts),
    ]


def dashboard(panels: list[Obj]) -> Obj:
    sizes = [(obj, 48 if i < 2 else 24, 15) for i, obj in enumerate(panels)]
    panel_list, refs = layout(sizes, "7.10.2")
    return _obj("dashboard", "envoygeo-osd-overview", {
        "title": "envoygeo: client geography and rates", "description": "", "version": 1,
        "panelsJSON": json.dumps(panel_list), "optionsJSON": json.dumps({"useMargins": True}),
        **dashboard_defaults(),
    }, refs)


def saved_objects(names: IndexNames = DEFAULT) -> list[Obj]:
    vis = visualizations(names)
    return [index_pattern(names.logs, names.logs_pattern),
            index_pattern(names.alerts, names.alerts_pattern), *vis, dashboard(vis)]
