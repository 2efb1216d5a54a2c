"""World map as inline SVG: equirectangular projection of the shipped country shapes,
shaded by requests, with a circle per city.

Why equirectangular in Python: it is one multiplication per coordinate, needs no
projection library and no script in the page, and a 1:110m world in ~140 KB of
shapes is plenty for "where does the traffic come from".
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from functools import cache
from html import escape
from pathlib import Path
from typing import Any

WIDTH, LAT_TOP, LAT_BOTTOM = 1000.0, 84.0, -60.0  # Antarctica cropped
SCALE = WIDTH / 360.0
HEIGHT = (LAT_TOP - LAT_BOTTOM) * SCALE
NO_DATA = "#e8ecf0"
# Light to dark blue; index by log-scaled share of the busiest country.
RAMP = ("#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")


@cache
def world() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(__file__).with_name("world.json").read_text())
    return data["countries"]


def project(lon: float, lat: float) -> tuple[float, float]:
    return (lon + 180.0) * SCALE, (LAT_TOP - lat) * SCALE


def _unwrap(ring: list[list[float]]) -> list[tuple[float, float]]:
    """Make a ring crossing the antimeridian continuous (lon may leave [-180, 180])."""
    out: list[tuple[float, float]] = []
    shift = 0.0
    for lon, lat in ring:
        if out:
            prev = out[-1][0] - shift
            if lon - prev > 180:
                shift -= 360
            elif prev - lon > 180:
                shift += 360
        out.append((lon + shift, lat))
    return out


def _path(rings: Iterable[list[list[float]]]) -> str:
    """Rings crossing the antimeridian (Russia, Fiji, the Aleutians) would draw a
    stripe across the whole map; they are unwrapped and drawn once more shifted by a
    full turn, and the SVG viewport clips whatever falls outside."""
    parts = []
    for ring in rings:
        pts = _unwrap(ring)
        lons = [lon for lon, _ in pts]
        offsets = [0.0]
        if min(lons) < -180:
            offsets.append(360.0)
        if max(lons) > 180:
            offsets.append(-360.0)
        for off in offsets:
            xy = [project(lon + off, lat) for lon, lat in pts]
            parts.append("M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in xy) + "Z")
    return "".join(parts)


def shade(value: int, peak: int) -> str:
    if value <= 0 or peak <= 0:
        return NO_DATA
    level = math.log1p(value) / math.log1p(peak)
    return RAMP[min(len(RAMP) - 1, int(level * (len(RAMP) - 1) + 0.5))]


def render(country_counts: dict[str, int], cities: list[tuple[str, float, float, int]],
           ) -> str:
    """SVG markup. country_counts: ISO alpha-2 -> requests; cities: (label, lat, lon, n)."""
    peak = max(country_counts.values(), default=0)
    shapes = []
    for iso, entry in world().items():
        n = country_counts.get(iso, 0)
        title = f"{entry['name']} ({iso}): {n:,} requests" if n else entry["name"]
        shapes.append(f'<path class="country" data-iso="{iso}" fill="{shade(n, peak)}" '
                      f'd="{_path(entry["rings"])}"><title>{escape(title)}</title></path>')
    city_peak = max((c[3] for c in cities), default=0)
    dots = []
    for label, lat, lon, n in cities:
        x, y = project(lon, lat)
        r = 2.5 + 9.5 * math.sqrt(n / city_peak) if city_peak else 3
        dots.append(f'<circle class="city" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}">'
                    f"<title>{escape(label)}: {n:,} requests</title></circle>")
    legend = "".join(f'<rect x="{12 + i * 26}" y="{HEIGHT - 22:.0f}" width="26" height="10" '
                     f'fill="{c}"/>' for i, c in enumerate(RAMP))
    return (f'<svg id="world-map" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {WIDTH:.0f} {HEIGHT:.0f}" role="img" '
            f'aria-label="Requests by country and city">'
            f'<rect width="{WIDTH:.0f}" height="{HEIGHT:.0f}" fill="#f7fbff"/>'
            f'<g stroke="#ffffff" stroke-width="0.4">{"".join(shapes)}</g>'
            f'<g fill="#e6550d" fill-opacity="0.75" stroke="#7f2704" stroke-width="0.6">'
            f'{"".join(dots)}</g>'
            f'<g>{legend}<text x="12" y="{HEIGHT - 26:.0f}" font-size="10" fill="#333">'
            f"fewer → more requests (log scale)</text></g></svg>")
