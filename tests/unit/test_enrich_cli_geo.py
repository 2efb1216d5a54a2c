"""`envoygeo enrich` with GeoIP, rates and alerts: the worker's enrichment without servers."""

from __future__ import annotations

from pathlib import Path

import orjson
from click.testing import CliRunner

from pipeline.commands.enrich import enrich
from tests.mmdb_fixtures import PLACES, expected, write_asn, write_city

LINE = ('[2026-11-29T01:13:{s:02d}.000Z] "GET /x HTTP/1.1" 200 - via_upstream - "-" 0 5 1 1 '
        '"-" "curl/8" "id-{i}" "shop" "10.0.0.9:80" out 10.0.0.1:5 10.0.0.5:80 {ip}:4000 - -')


def test_geo_rates_and_alerts(tmp_path: Path) -> None:
    city, asn = write_city(tmp_path / "c.mmdb"), write_asn(tmp_path / "a.mmdb")
    ip = next(iter(PLACES))
    lines = [LINE.format(s=i // 4, i=i, ip=ip) for i in range(12)]  # 4 per second
    lines.append(LINE.format(s=3, i=99, ip="10.1.2.3"))  # private: tagged, not looked up
    src = tmp_path / "in.log"
    src.write_text("\n".join(lines) + "\n")
    alerts = tmp_path / "alerts.jsonl"
    result = CliRunner().invoke(enrich, [
        "--geoip-city", str(city), "--geoip-asn", str(asn), "--rate-window", "10",
        "--rate-window", "60", "--alert", "burst:10:10", "--alerts-out", str(alerts), str(src)])
    assert result.exit_code == 0, result.output
    docs = [orjson.loads(x) for x in result.stdout.splitlines()]
    assert len(docs) == 13
    assert docs[0]["source"]["geo"] == expected(ip)["geo"]
    assert docs[0]["source"]["as"] == expected(ip)["as"]
    assert [d["envoygeo"]["rate"]["10s"] for d in docs[:12]] == list(range(1, 13))
    assert docs[12]["source"]["ip"] == "10.1.2.3" and "geo" not in docs[12]["source"]
    assert "geoip_private" in docs[12]["tags"]
    fired = [orjson.loads(x) for x in alerts.read_text().splitlines()]
    assert len(fired) == 1 and fired[0]["envoygeo"]["alert"]["count"] == 10
    assert "1 alerts" in result.stderr


def test_bad_alert_spec_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "in.log"
    src.write_text("x\n")
    result = CliRunner().invoke(enrich, ["--alert", "burst-10", str(src)])
    assert result.exit_code == 2
    assert "NAME:WINDOW_S:THRESHOLD" in result.output
