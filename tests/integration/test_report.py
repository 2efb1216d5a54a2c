"""`envoygeo report` against the real Elasticsearch, then rendered by headless Chromium
with the network cut off (a dead proxy), proving the page needs nothing external."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from elasticsearch import Elasticsearch

from pipeline.cli import main
from pipeline.schema import component_templates, index_templates


def _doc(ip: str, iso: str, country: str, city: str, lat: float, lon: float, rate60: int,
         status: int = 200, ip_source: str = "proxy_protocol") -> dict[str, Any]:
    return {
        "source": {"ip": ip, "geo": {"country_iso_code": iso, "country_name": country,
                                     "city_name": city, "location": {"lat": lat, "lon": lon}}},
        "http": {"response": {"status_code": status, "bytes": 512}},
        "envoygeo": {"ip_source": ip_source, "rate": {"10s": rate60 // 4, "60s": rate60,
                                                       "300s": rate60 * 3}},
        "event": {"kind": "event"},
    }


DOCS = [
    *[_doc("203.0.113.10", "DE", "Germany", "Berlin", 52.52, 13.40, 40 + i) for i in range(4)],
    *[_doc("198.51.100.7", "US", "United States", "New York", 40.71, -74.01, 12)
      for _ in range(3)],
    _doc("192.0.2.33", "JP", "Japan", "Tokyo", 35.68, 139.69, 3, 404, "x_forwarded_for"),
    _doc("2001:db8::5", "BR", "Brazil", "São Paulo", -23.55, -46.63, 1),
]


@pytest.fixture(scope="module")
def indices(es_url: str) -> Iterator[tuple[str, str]]:
    es = Elasticsearch(es_url, request_timeout=30)
    prefix = f"rpt-{uuid.uuid4().hex[:8]}"
    logs, alerts = f"{prefix}-logs", f"{prefix}-alerts"
    # The field table's mappings, under this test's own template names. Settings are
    # inlined (not the envoygeo-settings component): the local node's build lacks the
    # zstd native library that codec best_compression needs in Elasticsearch 9.
    components = component_templates()
    names = []
    for kind, body in zip(("logs", "alerts"), index_templates(logs, alerts).values(),
                          strict=True):
        names.append(f"{prefix}-{kind}")
        mappings = components[f"envoygeo-{kind}-mappings"]["template"]["mappings"]
        es.indices.put_index_template(name=names[-1], index_patterns=body["index_patterns"],
                                      priority=300, template={
                                          "settings": {"number_of_shards": 1,
                                                       "number_of_replicas": 0},
                                          "mappings": mappings})
    now = datetime.now(UTC)
    ops: list[dict[str, Any]] = []
    for i, doc in enumerate(DOCS):
        ts = (now - timedelta(minutes=5 + i)).isoformat()
        ops += [{"index": {"_index": logs}}, {"@timestamp": ts, **doc}]
    ops += [{"index": {"_index": logs}},
            {"@timestamp": now.isoformat(), "tags": ["_envoygeo_parse_failure"],
             "event": {"kind": "pipeline_error"}}]
    ops += [{"index": {"_index": alerts}}, {
        "@timestamp": (now - timedelta(minutes=6)).isoformat(), "source": {
            "ip": "203.0.113.10", "geo": {"country_iso_code": "DE"}},
        "envoygeo": {"alert": {"rule": "burst", "count": 43, "threshold": 40,
                               "window_s": 60}}}]
    # An old document outside --since must not count.
    ops += [{"index": {"_index": logs}}, {"@timestamp": (now - timedelta(days=3)).isoformat(),
                                          **_doc("192.0.2.99", "FR", "France", "Paris",
                                                 48.85, 2.35, 1)}]
    resp = es.bulk(operations=ops, refresh=True)
    assert not resp["errors"], resp
    yield logs, alerts
    es.indices.delete(index=[logs, alerts], ignore_unavailable=True)
    for name in names:
        es.indices.delete_index_template(name=name)


@pytest.fixture(scope="module")
def report_html(es_url: str, indices: tuple[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs, alerts = indices
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "report.html"
    # The worker's configuration: hosts and index names, no report-specific flags.
    cfg = tmp / "config.yaml"
    cfg.write_text(f"elasticsearch:\n  hosts: [{es_url}]\n  index: {logs}\n"
                   f"  alerts_index: {alerts}\n")
    result = CliRunner().invoke(main, ["report", "-c", str(cfg), "--since", "24h",
                                       "-o", str(out)], env={"ENVOYGEO_ES_URL": None})
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    assert (f"10 requests, 4 countries, 4 cities, 4 IPs, 1 alerts from {logs}*"
            in result.output)
    return out


def test_report_warns_when_the_index_matches_nothing(es_url: str, tmp_path: Path) -> None:
    missing = f"rpt-missing-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"elasticsearch:\n  hosts: [{es_url}]\n  index: {missing}\n")
    result = CliRunner().invoke(main, ["report", "-c", str(cfg), "-o",
                                       str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (f"warning: no index matches '{missing}*' on {es_url}, so the report is empty"
            in result.stderr)
    assert "0 requests" in result.stdout


def test_deprecated_es_url_still_works_with_a_warning(es_url: str, indices: tuple[str, str],
                                                      tmp_path: Path) -> None:
    logs, alerts = indices
    result = CliRunner().invoke(main, ["report", "--index", f"{logs}*", "--alerts-index",
                                       alerts, "-o", str(tmp_path / "r.html")],
                                env={"ENVOYGEO_ES_URL": es_url,
                                     "ENVOYGEO_ELASTICSEARCH__HOSTS": "http://127.0.0.1:9"})
    assert result.exit_code == 0, result.output
    assert "ENVOYGEO_ES_URL is deprecated" in result.stderr
    assert "10 requests" in result.stdout


def test_report_contains_countries_ips_rates_and_map(report_html: Path) -> None:
    html = report_html.read_text()
    assert "<svg" in html and 'id="world-map"' in html
    for text in ("Germany", "United States", "Japan", "Brazil", "Berlin", "São Paulo",
                 "203.0.113.10", "198.51.100.7", "2001:db8::5", "proxy_protocol",
                 "x_forwarded_for", "burst"):
        assert text in html, text
    assert "<td>France</td>" not in html and "192.0.2.99" not in html  # outside --since
    # Countries with traffic are shaded, others are not; one circle per city.
    shaded = set(re.findall(r'data-iso="(\w\w)" fill="#(?!e8ecf0)', html))
    assert shaded == {"DE", "US", "JP", "BR"}
    assert html.count('<circle class="city"') == 4
    # max envoygeo.rate.60s for the Berlin client is 43
    row = re.search(r"<tr><td>203\.0\.113\.10</td>.*?</tr>", html)
    assert row and ">43<" in row.group(0), row
    # offline: no external references at all
    assert not re.search(r"(src|href)=\"?https?:", html) and "<script" not in html


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed (apt-get install -y chromium)")


def _chromium_args(profile: Path) -> list[str]:
    # The dead proxy makes any network fetch fail: whatever renders came from the file.
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
            "--window-size=1400,1800"]


def test_chromium_renders_map_and_tables_offline(report_html: Path, tmp_path: Path) -> None:
    dom = subprocess.run([*_chromium_args(tmp_path / "p1"), "--dump-dom",
                          report_html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="world-map"' in dom.stdout and 'id="ips"' in dom.stdout
    assert "203.0.113.10" in dom.stdout
    png = tmp_path / "report.png"
    shot = subprocess.run([*_chromium_args(tmp_path / "p2"), f"--screenshot={png}",
                           report_html.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 1800)
    assert len(data) > 50_000  # a blank page compresses to a few KB
    keep = Path("/tmp/envoygeo-report-screenshot.png")
    keep.write_bytes(data)  # for a human to look at
