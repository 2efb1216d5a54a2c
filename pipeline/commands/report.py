"""`envoygeo report`: a self-contained HTML page from Elasticsearch, for people without
Kibana (and for demos without network)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--es", "es_url", default="http://127.0.0.1:9200", show_default=True,
              envvar="ENVOYGEO_ES_URL", help="Elasticsearch URL.")
@click.option("--api-key", envvar="ENVOYGEO_ELASTICSEARCH__API_KEY", help="ES API key.")
@click.option("--index", default="envoygeo-logs*", show_default=True)
@click.option("--alerts-index", default="envoygeo-alerts*", show_default=True)
@click.option("--since", default="24h", show_default=True, help="Time range, e.g. 1h, 7d.")
@click.option("--top", type=click.IntRange(1, 1000), default=25, show_default=True,
              help="How many client IPs to list.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("report.html"), show_default=True)
def report(es_url: str, api_key: str | None, index: str, alerts_index: str, since: str,
           top: int, output: Path) -> None:
    """Write an offline HTML report: world map, top countries/cities/IPs, rates, alerts."""
    from elastic_transport import TransportError
    from elasticsearch import ApiError, Elasticsearch

    from pipeline.report.query import fetch, since_to_range
    from pipeline.report.render import render

    try:
        since_to_range(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    es = Elasticsearch(es_url, api_key=api_key, request_timeout=30)
    try:
        data = fetch(es, index, alerts_index, since, top)
    except (TransportError, ApiError) as e:
        click.echo(f"error: Elasticsearch at {es_url}: {e}", err=True)
        sys.exit(1)
    output.write_text(render(data), encoding="utf-8")
    click.echo(f"wrote {output}: {data.total:,} requests, {len(data.countries)} countries, "
               f"{len(data.cities)} cities, {len(data.ips)} IPs, {len(data.alerts)} alerts")
