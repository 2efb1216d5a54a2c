"""Saved objects and the rule agree with the field table; the validator catches breakage."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.dashboards import files, kibana, osd
from pipeline.dashboards.validate import validate_file, validate_objects, validate_rule

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"


def test_committed_files_are_the_generated_ones() -> None:
    for rel, text in files.generated().items():
        assert (DASHBOARDS / rel).read_text() == text, f"run `envoygeo dashboards build` ({rel})"


@pytest.mark.parametrize("rel", sorted(files.generated()))
def test_committed_files_validate(rel: str) -> None:
    assert validate_file(DASHBOARDS / rel) == []


def test_kibana_objects_are_import_ready() -> None:
    objs = kibana.saved_objects()
    types = {o["type"] for o in objs}
    assert {"index-pattern", "lens", "map", "search", "dashboard"} <= types
    assert "tile_map" not in json.dumps(objs) and "region_map" not in json.dumps(objs)
    for o in objs:
        assert o["coreMigrationVersion"] and o["typeMigrationVersion"]
        assert isinstance(o["references"], list)
    (dash,) = [o for o in objs if o["type"] == "dashboard"]
    attrs = dash["attributes"]
    assert attrs["timeRestore"] is True and attrs["timeFrom"] == "now-24h"
    assert len(json.loads(attrs["panelsJSON"])) == len(dash["references"]) == 10
    titles = {o["attributes"]["title"] for o in objs if o["type"] == "lens"}
    assert {"Requests over time by country", "Top countries", "Top cities",
            "Top source IPs and their request rates", "Status codes by country",
            "Bytes sent by country", "How client IPs were resolved",
            "Unparsed records"} == titles


def test_map_grid_and_documents_do_not_need_ems() -> None:
    layers = kibana.map_layers()
    by_source = {layer["sourceDescriptor"]["type"]: layer for layer in layers}
    assert by_source["ES_GEO_GRID"]["sourceDescriptor"]["geoField"] == "source.geo.location"
    assert by_source["ES_SEARCH"]["sourceDescriptor"]["geoField"] == "source.geo.location"
    ems = [layer["id"] for layer in layers if "EMS" in json.dumps(layer)]
    assert ems == ["basemap", "countries"]  # only base tiles and boundaries need EMS
    join = by_source["EMS_FILE"]["joins"][0]
    assert join["leftField"] == "iso2" and join["right"]["term"] == kibana.COUNTRY


def test_osd_uses_types_it_accepts() -> None:
    objs = osd.saved_objects()
    assert {o["type"] for o in objs} == {"index-pattern", "visualization", "dashboard"}
    vis_types = {json.loads(o["attributes"]["visState"])["type"] for o in objs
                 if o["type"] == "visualization"}
    assert "tile_map" in vis_types
    assert all("typeMigrationVersion" not in o for o in objs)


def test_objects_for_a_renamed_index_name_only_it(tmp_path: Path) -> None:
    """`dashboards build -c`: data views, every panel, the map, the saved search and
    the rule read the configured indices, and nothing still names envoygeo-logs*."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("elasticsearch:\n  index: acme-edge\n  alerts_index: acme-edge-alerts\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["dashboards", "build", "-c", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    built = {rel: (out / rel).read_text() for rel in files.generated()}
    for rel, text in built.items():
        assert "envoygeo-logs" not in text and "envoygeo-alerts" not in text, rel
    for rel in (files.KIBANA_NDJSON, files.OSD_NDJSON):
        objs = [json.loads(line) for line in built[rel].splitlines()]
        views = {o["id"]: o["attributes"]["title"] for o in objs
                 if o["type"] == "index-pattern"}
        assert views == {"acme-edge": "acme-edge*", "acme-edge-alerts": "acme-edge-alerts*"}
        refs = {r["id"] for o in objs for r in o["references"]
                if r["type"] == "index-pattern"}
        assert refs == set(views), rel
    rule = json.loads(built[files.KIBANA_RULE])["rule"]
    assert rule["params"]["index"] == ["acme-edge*"]
    paths = [str(out / rel) for rel in files.generated()]
    ok = CliRunner().invoke(main, ["dashboards", "validate", "-c", str(cfg), *paths])
    assert ok.exit_code == 0, ok.output
    # Without the configuration the validator does not take them for envoygeo's.
    assert CliRunner().invoke(main, ["dashboards", "validate", *paths]).exit_code == 1


# Kibana's comparators as its rule executor applies them to a group's value
# (x-pack stack_alerts `ComparatorFns`): value first, then the threshold.
KIBANA_COMPARATORS: dict[str, Any] = {
    ">": lambda v, t: v > t, ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t, "<=": lambda v, t: v <= t,
}


@pytest.mark.parametrize("threshold", [1, 3, 600])
def test_worker_and_kibana_rule_fire_at_the_same_count(threshold: int) -> None:
    """The same threshold fires at the same count in the worker and in Kibana: one
    below does not, exactly at it does (`>=`, the worker's documented semantics)."""
    from pipeline.enrich.alerts import THRESHOLD_COMPARATOR, AlertEngine, AlertRule, reached
    from pipeline.enrich.rates.memory import MemoryRates

    rule = AlertRule(name="r", window_s=60, threshold=threshold)
    params = kibana.rate_rule(rule)["params"]
    assert params["thresholdComparator"] == THRESHOLD_COMPARATOR
    assert (params["threshold"], params["timeWindowSize"], params["timeWindowUnit"]) == (
        [threshold], 1, "m")
    kibana_fires = KIBANA_COMPARATORS[params["thresholdComparator"]]
    for count in (threshold - 1, threshold, threshold + 1):
        backend = MemoryRates((60,), 60)
        engine = AlertEngine([rule], backend)
        events = [("198.51.100.7", 1_764_000_000.0 + i * 0.01) for i in range(count)]
        worker_fires = bool(events) and bool(engine.evaluate(events,
                                                             backend.count_batch(events)))
        assert worker_fires == kibana_fires(count, params["threshold"][0]), count
        assert worker_fires == reached(count, threshold)


def test_minimum_kibana_version_is_stated_and_true() -> None:
    """The objects carry 8.8 migration versions and the root `managed` field (8.8);
    the READMEs state that minimum, and no object claims a newer one."""
    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    for o in kibana.saved_objects():
        assert version(o["coreMigrationVersion"]) <= version(kibana.MIN_KIBANA)
        assert version(o["typeMigrationVersion"]) <= version(kibana.MIN_KIBANA)
    assert kibana.MIN_KIBANA == "8.8.0"
    for readme in (ROOT / "README.md", DASHBOARDS / "README.md"):
        assert f"Kibana {kibana.MIN_KIBANA} or later" in readme.read_text(), readme


def test_rule_file_is_the_built_in_rule() -> None:
    rule = json.loads((DASHBOARDS / files.KIBANA_RULE).read_text())
    assert rule == {"id": kibana.RULE_ID, "rule": kibana.rate_rule()}
    params = rule["rule"]["params"]
    assert params["termField"] == "source.ip" and params["groupBy"] == "top"
    assert params["searchType"] == "esQuery" and rule["rule"]["rule_type_id"] == ".es-query"


# -- negative: the validator catches broken files -------------------------------------


def _mutate(objs: list[dict[str, Any]], old: str, new: str, type_: str) -> list[dict[str, Any]]:
    out = copy.deepcopy(objs)
    for o in out:
        if o["type"] == type_:
            text = json.dumps(o)
            if old in text:
                o.update(json.loads(text.replace(old, new)))
    return out


@pytest.mark.parametrize(("type_", "old", "new", "expect"), [
    ("lens", "source.geo.city_name", "source.geo.town", "not in the field table"),
    ("lens", '"sourceField": "envoygeo.rate.60s"', '"sourceField": "url.domain"',
     "metric needs double/long"),
    ("lens", '"sourceField": "http.response.bytes"', '"sourceField": "source.geo.location"',
     "metric needs"),
    ("lens", '"sourceField": "@timestamp"', '"sourceField": "event.dataset"',
     "date_histogram needs date"),
    ("lens", '"sourceField": "envoygeo.ip_source"', '"sourceField": "event.original"',
     "not indexed"),
    ("lens", '"sourceField": "source.ip"', '"sourceField": "error.message"', "terms needs"),
    ("lens", 'tags : \\"_envoygeo', 'tagz : \\"_envoygeo', "'tagz' is not in the field"),
    ("lens", '"accessors": ["n"]', '"accessors": ["zz"]', "column 'zz'"),
    ("map", '\\"geoField\\": \\"source.geo.location\\"', '\\"geoField\\": \\"source.ip\\"',
     "geo needs geo_point"),
    ("map", '\\"term\\": \\"source.geo.country_iso_code\\"', '\\"term\\": \\"source.geo\\"',
     "not in the field table"),
    ("search", "envoygeo.alert.count", "envoygeo.alert.cnt", "not in the field table"),
    ("dashboard", '"name": "panel_3"', '"name": "panel_x"', "panel panel_3 has no reference"),
])
def test_validator_catches(type_: str, old: str, new: str, expect: str) -> None:
    broken = _mutate(kibana.saved_objects(), old, new, type_)
    assert broken != kibana.saved_objects(), "mutation did not apply"
    errors = validate_objects(broken)
    assert any(expect in e for e in errors), errors


def test_validator_catches_type_mismatch_in_lens_data_type() -> None:
    broken = _mutate(kibana.saved_objects(), '"dataType": "ip"', '"dataType": "string"', "lens")
    assert any("dataType 'string'" in e for e in validate_objects(broken))


def test_validator_catches_missing_reference_and_duplicate_ids() -> None:
    objs = [o for o in kibana.saved_objects() if o["id"] != kibana.ALERTS_VIEW]
    objs.append(copy.deepcopy(objs[3]))
    errors = validate_objects(objs)
    assert any("index-pattern/envoygeo-alerts is not in the file" in e for e in errors)
    assert any("duplicate id" in e for e in errors)


def test_validator_catches_osd_field_errors() -> None:
    broken = _mutate(osd.saved_objects(), '\\"field\\": \\"source.geo.location\\"',
                     '\\"field\\": \\"source.geo.city_name\\"', "visualization")
    assert any("geo needs geo_point" in e for e in validate_objects(broken))


def test_validator_catches_broken_rules() -> None:
    rule = kibana.rate_rule()
    assert validate_rule(rule) == []
    for key, value, expect in [
        ("termField", "source.address2", "not in the field table"),
        ("termField", "source.geo.location", "terms needs"),
        ("timeField", "event.module", "date_histogram needs date"),
        ("esQuery", '{"query":{"term":{"event.knd":"event"}}}', "event.knd"),
        ("threshold", 5, "threshold must be"),
        ("index", ["logs-*"], "matches neither 'envoygeo-logs' nor 'envoygeo-alerts'"),
    ]:
        bad = copy.deepcopy(rule)
        bad["params"][key] = value
        assert any(expect in e for e in validate_rule(bad)), (key, validate_rule(bad))


def test_cli_validate_fails_on_a_broken_file(tmp_path: Path) -> None:
    broken = _mutate(kibana.saved_objects(), "source.geo.city_name", "source.geo.town", "lens")
    path = tmp_path / "broken.ndjson"
    path.write_text(files.ndjson(broken))
    good = DASHBOARDS / files.KIBANA_NDJSON
    result = CliRunner().invoke(main, ["dashboards", "validate", str(good), str(path)])
    assert result.exit_code == 1
    assert f"{good}: OK" in result.output and "source.geo.town" in result.output
