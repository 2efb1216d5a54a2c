"""`document.profile` / `document.omit` (issue 15): fields left out of the documents the
same way on both paths, never one that something envoygeo ships reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import omit as omit_mod
from pipeline.bench.core import corpus
from pipeline.config import ConfigError, load_settings
from pipeline.enrich.geoip import GeoIP
from pipeline.schema import CORE_FIELDS, LEAN_OMIT, READ_BY
from tests.mmdb_fixtures import write_asn, write_city
from tests.unit.decode_samples import sample_lines
from tests.unit.test_native import _bulk_both, _need_native, run_both  # noqa: F401
from tests.unit.test_samples_in_envelopes import WRAPPERS
from tests.unit.test_schema import document_validator

REPO = Path(__file__).resolve().parents[2]
OMITTABLE = sorted(f.name for f in CORE_FIELDS
                   if omit_mod.check(f.name) is None and not f.name.endswith(".*"))


def leaves(doc: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in doc.items():
        name = prefix + k
        if isinstance(v, dict) and v and name not in ("kubernetes.labels",
                                                      "kubernetes.annotations", "envoy.extra"):
            out |= leaves(v, name + ".")
        else:
            out.add(name)
    return out


def empty_objects(doc: Any) -> bool:
    if isinstance(doc, dict):
        return not doc or any(empty_objects(v) for v in doc.values())
    return isinstance(doc, list) and any(empty_objects(v) for v in doc)


@pytest.fixture(scope="module")
def geo(tmp_path_factory: pytest.TempPathFactory) -> GeoIP:
    d = tmp_path_factory.mktemp("mmdb")
    return GeoIP.open(city=write_city(d / "city.mmdb"), asn=write_asn(d / "asn.mmdb"))


def test_lean_profile_on_both_paths(geo: GeoIP) -> None:
    records, _ = corpus(2000, 300)
    full, _, _ = run_both(records, batch=250, geo=geo, native=2000)
    lean, _, e = run_both(records, batch=250, geo=geo, native=2000, omit=LEAN_OMIT)
    assert e.omit == LEAN_OMIT
    dropped: set[str] = set()
    for whole, part in zip(full, lean, strict=True):
        fd, ld = orjson.loads(whole.document), orjson.loads(part.document)
        gone = leaves(fd) - leaves(ld)
        assert not leaves(ld) - leaves(fd)
        for name in gone:  # only what was asked for, whole objects included
            assert any(name == p or name.startswith(p + ".") for p in LEAN_OMIT), name
        for p in LEAN_OMIT:
            assert not any(n == p or n.startswith(p + ".") for n in leaves(ld)), p
        assert not empty_objects(ld)
        dropped |= gone
    # The corpus has these, so the profile did leave them out (not a vacuous pass).
    for name in ("ecs.version", "event.ingested", "related.ip", "url.original",
                 "kubernetes.pod_name", "kubernetes.labels", "envoygeo.stream"):
        assert name in dropped
    assert len(lean[0].document) < 0.8 * len(full[0].document)
    validator = document_validator()  # lean documents are still envoygeo documents
    for d in lean[::50]:
        assert list(validator.iter_errors(orjson.loads(d.document))) == []


@pytest.mark.parametrize("wrapper", ["bare", "fluent-bit", "fluentd", "docker", "cri"])
def test_shared_samples_identical_with_objects_left_out(wrapper: str) -> None:
    lines = sample_lines()
    records = [r for _, line in lines for r in WRAPPERS[wrapper](line)]
    text = sum(not line.lstrip().startswith("{") for _, line in lines)
    expected = {"bare": text, "fluent-bit": text, "fluentd": text}.get(wrapper, 0)
    omit = ("kubernetes", "envoy", "http.request", "user_agent", "event.type")
    docs, _, _ = run_both(records, batch=5, native=expected, omit=omit)
    for d in docs:
        if d.document is not None:
            doc = orjson.loads(d.document)
            assert "kubernetes" not in doc and "envoy" not in doc and "user_agent" not in doc
            assert "request" not in doc.get("http", {})
            assert not empty_objects(doc)


@pytest.mark.parametrize("drop_errors", [False, True])
def test_bulk_body_with_lean_profile_identical(drop_errors: bool) -> None:
    records, _ = corpus(300, 40)
    mixed = [*records[:150], b"not an access log", *records[150:],
             orjson.dumps({"log": "no format here", "kubernetes": {"pod_name": "p"}})]
    compared, errors, e = _bulk_both(mixed, drop_errors, omit=LEAN_OMIT)
    assert e.records_native == 300 and errors == 2
    assert compared == (300 if drop_errors else 302)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(OMITTABLE), min_size=1, max_size=12))
def test_any_omittable_set_identical_on_both_paths(omit: list[str]) -> None:
    records, _ = corpus(120, 60, seed=3)
    docs, _, _ = run_both(records, batch=40, native=120, omit=tuple(omit))
    for d in docs:
        names = leaves(orjson.loads(d.document))
        assert not any(n == p or n.startswith(p + ".") for p in omit for n in names)


@pytest.mark.parametrize(("entry", "why"), [
    ("source.geo", "holds source.geo.country_iso_code, which is read by the dashboards"),
    ("source.ip", "is read by the dashboards, the report, the alert rules"),
    ("envoygeo.rate", "holds envoygeo.rate.*, which is read by the dashboards"),
    ("event.original", "is read by unparsed lines"),
    ("kubernetes.pod", "is not a field of envoygeo's documents"),
    ("@timestamp", "is read by every dashboard"),
])
def test_config_refuses_what_is_read(entry: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"ENVOYGEO_DOCUMENT__OMIT": orjson.dumps([entry]).decode()})
    text = str(err.value)
    assert "document.omit" in text and f"cannot leave out {entry!r}: it {why}" in text


def test_config_profile_and_omit_combine() -> None:
    s = load_settings(None, {"ENVOYGEO_DOCUMENT__PROFILE": "lean",
                             "ENVOYGEO_DOCUMENT__OMIT": '["user_agent", "ecs.version"]'})
    assert s.document.paths() == (*LEAN_OMIT, "user_agent")
    assert load_settings(None, {}).document.paths() == ()
    with pytest.raises(ConfigError, match="document.profile"):
        load_settings(None, {"ENVOYGEO_DOCUMENT__PROFILE": "tiny"})


def test_lean_profile_leaves_out_only_what_may_go() -> None:
    for entry in LEAN_OMIT:
        assert omit_mod.check(entry) is None, entry


# What the shipped consumers of documents read: the bundled dashboards and rules, the
# report and envoygeo policy. A field they name that READ_BY does not list could be
# left out by document.omit and blank a panel.
CONSUMERS = ("dashboards", "pipeline/report", "pipeline/policy")


def test_read_by_lists_every_field_the_shipped_consumers_read() -> None:
    text = "\n".join(p.read_text(errors="ignore") for c in CONSUMERS
                     for p in sorted((REPO / c).rglob("*")) if p.is_file()
                     and p.suffix in (".py", ".ndjson", ".json", ".yaml", ".yml"))
    found = set()
    for f in CORE_FIELDS:
        name = f.name[:-2] if f.name.endswith(".*") else f.name
        if re.search(r"(?<![\w.])" + re.escape(name) + r"(?![\w])", text):
            found.add(f.name)
    assert found, "the consumers name no field at all: the scan is broken"
    # Alert documents share some names (event.dataset, related.ip) with access logs;
    # policy reads those from the alerts index, not from access-log documents.
    alerts_only = {"event.dataset", "related.ip"}
    assert found - alerts_only <= set(READ_BY), sorted(found - alerts_only - set(READ_BY))


def test_enrich_command_leaves_out_and_refuses(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main
    records, _ = corpus(5, 5)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(records) + b"\n")
    run = CliRunner().invoke(main, ["enrich", str(src), "--profile", "lean",
                                    "--omit", "user_agent"])
    assert run.exit_code == 0, run.output
    docs = [orjson.loads(x) for x in run.stdout.splitlines()]
    assert len(docs) == 5
    for d in docs:
        assert "user_agent" not in d and "ecs" not in d and "related" not in d
        assert d["source"]["ip"] and d["url"]["path"]
    bad = CliRunner().invoke(main, ["enrich", str(src), "--omit", "source.ip"])
    assert bad.exit_code == 2
    assert "cannot leave out 'source.ip': it is read by the dashboards" in bad.output


def test_readme_says_what_the_code_does() -> None:
    """README's "Leaner documents": the refusal it quotes is the one given, and every
    field the lean profile leaves out is named there (as itself or under its object)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Leaner documents", 1)[1].split("\n### ", 1)[0]
    flat = " ".join(section.split())
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"ENVOYGEO_DOCUMENT__OMIT": '["source.geo"]'})
    quoted = re.search(r"`(cannot leave out 'source.geo'[^`]*)`", flat)
    assert quoted is not None and quoted.group(1) in " ".join(str(err.value).split())
    for name in LEAN_OMIT:
        parent, _, leaf = name.rpartition(".")
        assert (f"`{name}`" in flat or f"`{leaf}`" in flat
                or re.search(re.escape(f"`{parent}.") + r"[a-z_]*\*`", flat)), name
