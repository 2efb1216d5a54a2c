"""The report page: map + tables, plain HTML and CSS, no scripts or external links."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from pipeline.report import svgmap
from pipeline.report.query import ReportData

CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1a1a1a}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#555;margin-bottom:16px}.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:140px}
.card b{display:block;font-size:20px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:24px}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #eee;
text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
#world-map{width:100%;height:auto;border:1px solid #d0d7de;border-radius:6px}
.empty{color:#777;font-style:italic}
"""


def _table(table_id: str, headers: Sequence[str], rows: Iterable[Sequence[Any]],
           numeric: set[int]) -> str:
    rows = list(rows)
    if not rows:
        return f'<p class="empty" id="{table_id}">No data in this time range.</p>'
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="n"' if i in numeric else ""
        text = f"{v:,}" if i in numeric and isinstance(v, int) else escape(str(v))
        return f"<{tag}{cls}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>"
                   for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render(data: ReportData, generated_at: datetime | None = None) -> str:
    generated_at = generated_at or datetime.now(UTC)
    names = {c.iso: c.name for c in data.countries}
    svg = svgmap.render({c.iso: c.requests for c in data.countries},
                        [(f"{c.name}, {c.iso}", c.lat, c.lon, c.requests)
                         for c in data.cities if c.lat is not None and c.lon is not None])
    cards = [("Requests", f"{data.total:,}"), ("Countries", f"{len(data.countries):,}"),
             ("Cities", f"{len(data.cities):,}"), ("Unparsed", f"{data.parse_failures:,}"),
             ("Alerts", f"{len(data.alerts):,}")]
    windows = data.rate_windows
    sections = [
        ("Top countries", _table("countries", ["Country", "ISO", "Requests", "Bytes sent"],
                                 ((c.name, c.iso, c.requests, c.bytes)
                                  for c in data.countries[:25]), {2, 3})),
        ("Top cities", _table("cities", ["City", "Country", "Requests"],
                              ((c.name, names.get(c.iso, c.iso), c.requests)
                               for c in data.cities[:25]), {2})),
        ("Top client IPs and request rates",
         _table("ips", ["Client IP" if data.client_field == "source.ip"
                        else "Client (pseudonym)", "Country", "City", "Requests",
                        *[f"max / {w}" for w in windows]],
                ((i.ip, i.iso, i.city, i.requests, *[i.rates.get(w, "") for w in windows])
                 for i in data.ips), {3, *range(4, 4 + len(windows))})),
        ("How client IPs were resolved", _table("ip-sources", ["envoygeo.ip_source",
                                                               "Requests"],
                                                data.ip_sources, {1})),
    ]
    alerts = _table("alerts", ["Time", "Rule", "Client IP", "Country", "Count", "Threshold",
                               "Window (s)"],
                    ((a.get("@timestamp", ""), a.get("envoygeo", {}).get("alert", {})
                      .get("rule", a.get("rule", {}).get("name", "")),
                      a.get("source", {}).get("ip", ""),
                      a.get("source", {}).get("geo", {}).get("country_iso_code", ""),
                      *[a.get("envoygeo", {}).get("alert", {}).get(k, "")
                        for k in ("count", "threshold", "window_s")])
                     for a in data.alerts), {4, 5, 6})
    grid = "".join(f"<section><h2>{escape(t)}</h2>{body}</section>" for t, body in sections)
    card_html = "".join(f'<div class="card">{escape(k)}<b>{v}</b></div>' for k, v in cards)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>envoygeo report: last {escape(data.since)}</title><style>{CSS}</style></head>
<body><h1>envoygeo: where requests came from</h1>
<div class="meta">Index <code>{escape(data.index)}</code>, last {escape(data.since)},
generated {generated_at:%Y-%m-%d %H:%M} UTC. Client addresses are the resolved true
client (PROXY protocol, then trusted X-Forwarded-For hops).</div>
<div class="cards">{card_html}</div>
<h2>Requests by country and city</h2>{svg}
<div class="grid">{grid}</div>
<h2>Per-IP rate alerts</h2>{alerts}
<p class="meta">Country shapes: Natural Earth via world-atlas (ISC).</p>
</body></html>
"""
