"""One-time converter: world-atlas TopoJSON + ISO codes -> `world.json` (committed).

Why a converted copy: the report must render offline, so the country shapes ship with
the package, keyed the way GeoIP reports countries (ISO 3166-1 alpha-2). Sources, both
from npm under permissive licences (see WORLD_LICENSE.txt):
  world-atlas@2.0.2 countries-110m.json (ISC; Natural Earth data, public domain)
  i18n-iso-countries@7.14.0 codes.json (MIT): numeric -> alpha-2
Run: python -m pipeline.report.build_world countries-110m.json codes.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("world.json")
# Natural Earth units without an ISO numeric code, as GeoIP databases name them.
BY_NAME = {"Kosovo": "XK", "N. Cyprus": "CY", "Somaliland": "SO"}


def decode_arcs(topo: dict[str, Any]) -> list[list[tuple[float, float]]]:
    """Undo TopoJSON quantization and delta encoding: absolute lon/lat per arc."""
    (sx, sy), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((x * sx + tx, y * sy + ty))
        arcs.append(points)
    return arcs


def ring(arcs: list[list[tuple[float, float]]], indexes: list[int]) -> list[list[float]]:
    out: list[list[float]] = []
    for i in indexes:
        points = arcs[i] if i >= 0 else arcs[~i][::-1]
        for k, (lon, lat) in enumerate(points):
            if out and k == 0:  # consecutive arcs share their joining point
                continue
            p = [round(lon, 1), round(lat, 1)]
            if not out or out[-1] != p:
                out.append(p)
    return out


def convert(topo: dict[str, Any], codes: list[list[str]]) -> dict[str, Any]:
    numeric = {row[2]: row[0] for row in codes}
    arcs = decode_arcs(topo)
    countries: dict[str, Any] = {}
    for geom in topo["objects"]["countries"]["geometries"]:
        name = geom.get("properties", {}).get("name", "")
        iso2 = numeric.get(str(geom.get("id", ""))) or BY_NAME.get(name)
        if not iso2 or geom["type"] not in ("Polygon", "MultiPolygon"):
            continue
        polygons = geom["arcs"] if geom["type"] == "MultiPolygon" else [geom["arcs"]]
        rings = [r for poly in polygons for r in (ring(arcs, idx) for idx in poly) if len(r) > 2]
        entry = countries.setdefault(iso2, {"name": name, "rings": []})
        entry["rings"].extend(rings)
    return {"source": "world-atlas 2.0.2 countries-110m (Natural Earth), keys ISO alpha-2",
            "countries": dict(sorted(countries.items()))}


def main(argv: list[str]) -> int:
    topo = json.loads(Path(argv[0]).read_text())
    codes = json.loads(Path(argv[1]).read_text())
    OUT.write_text(json.dumps(convert(topo, codes), separators=(",", ":")))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
