"""The report page from fixed data (no Elasticsearch): escaping, empty ranges, map shapes."""

from __future__ import annotations

import re

import pytest

from pipeline.report import svgmap
from pipeline.report.query import City, ClientIP, Country, ReportData, since_to_range
from pipeline.report.render import render


def test_world_shapes_are_keyed_by_iso_alpha2() -> None:
    world = svgmap.world()
    assert len(world) > 170
    assert all(re.fullmatch(r"[A-Z]{2}", iso) for iso in world)
    assert world["DE"]["name"] == "Germany" and world["US"]["rings"]


def test_antimeridian_rings_do_not_stripe_across_the_map() -> None:
    """Russia and Fiji cross 180°: no subpath may jump more than half the map width."""
    for iso in ("RU", "FJ", "US"):
        path = svgmap._path(svgmap.world()[iso]["rings"])
        for sub in path.split("M")[1:]:
            xs = [float(p.split(",")[0]) for p in sub.rstrip("Z").split("L")]
            jumps = [abs(b - a) for a, b in zip(xs, xs[1:], strict=False)]
            assert max(jumps, default=0) < svgmap.WIDTH / 2, iso


def test_projection_corners() -> None:
    assert svgmap.project(-180, svgmap.LAT_TOP) == (0, 0)
    x, y = svgmap.project(180, svgmap.LAT_BOTTOM)
    assert (round(x), round(y)) == (svgmap.WIDTH, round(svgmap.HEIGHT))


def test_values_from_the_index_are_escaped() -> None:
    data = ReportData(since="1h", index="envoygeo-logs*", total=1,
                      countries=[Country("DE", "Germany", 1, 10)],
                      cities=[City("<script>alert(1)</script>", "DE", 1, 52.5, 13.4)],
                      ips=[ClientIP("203.0.113.1", "DE", "<b>x</b>", 1, {"60s": 1})],
                      rate_windows=["60s"])
    html = render(data)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>x</b>" not in html


def test_empty_range_renders_a_map_and_says_so() -> None:
    html = render(ReportData(since="15m", index="envoygeo-logs*", total=0))
    assert 'id="world-map"' in html and "No data in this time range." in html
    assert 'fill="#e8ecf0"' in html and "<circle" not in html


@pytest.mark.parametrize("bad", ["24", "h", "1y", "now-1h", "24h; rm"])
def test_since_is_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        since_to_range(bad)
    assert since_to_range("7d") == "now-7d"
