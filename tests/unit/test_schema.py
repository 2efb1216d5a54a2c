"""The field table, the files in schemas/ and the document builder must agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from pipeline.commands.schema import render
from pipeline.schema import ALERT_FIELDS, FIELDS, field_map, json_schema, mappings, schema_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(schema_files()))
def test_committed_schema_files_match_the_field_table(name: str) -> None:
    path = ROOT / "schemas" / name
    assert path.exists(), f"{path} missing: run `envoygeo schema`"
    stale = f"{name} is stale: run `envoygeo schema`"
    assert path.read_text() == render(schema_files()[name]), stale


def _leaves(props: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, node in props.items():
        name = f"{prefix}{key}"
        if "properties" in node and "type" not in node:
            out.update(_leaves(node["properties"], name + "."))
        else:
            out[name] = node["type"]
    return out


def test_mapping_types_follow_the_table() -> None:
    leaves = _leaves(mappings(FIELDS)["properties"])
    assert leaves["source.ip"] == "ip"
    assert leaves["related.ip"] == "ip"
    assert leaves["source.geo.location"] == "geo_point"
    assert leaves["@timestamp"] == "date"
    assert leaves["event.duration"] == "long"
    assert leaves["source.geo.country_iso_code"] == "keyword"
    exact = {f.name: f.es_type for f in FIELDS if not f.name.endswith(".*")}
    assert leaves == exact


def test_alert_fields_reuse_the_geo_definitions() -> None:
    logs, alerts = field_map(FIELDS), field_map(ALERT_FIELDS)
    for name, f in alerts.items():
        if name in logs:
            assert logs[name].es_type == f.es_type, name


def test_schema_rejects_unknown_and_mistyped_fields() -> None:
    validator = Draft202012Validator(json_schema(FIELDS))
    good = {"@timestamp": "2026-01-01T00:00:00.000Z", "source": {"ip": "1.2.3.4",
            "geo": {"location": {"lat": 1.0, "lon": 2.0}}}, "envoygeo": {"rate": {"10s": 3}}}
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors({"source": {"ipp": "1.2.3.4"}}))
    assert list(validator.iter_errors({"http": {"response": {"status_code": "200"}}}))
    assert list(validator.iter_errors({"envoygeo": {"rate": {"10s": "x"}}}))


def document_validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads((ROOT / "schemas" / "document.schema.json").read_text()))
