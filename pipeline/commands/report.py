"""`envoygeo report`: a self-contained HTML page from Elasticsearch, for people without
Kibana (and for demos without network).

It reads the worker's configuration (`-c config.yaml`, ENVOYGEO_ELASTICSEARCH__*): the
same hosts, CA, API key or basic auth and index names, through the same client factory
as the worker's sink, so a report works wherever the worker does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from pipeline.commands.worker import _load, config_option

LEGACY_URL_VARIABLE = "ENVOYGEO_ES_URL"


@click.command()
@config_option
@click.option("--index", default=None,
              help="Index pattern of access documents. [default: <elasticsearch.index>*]")
@click.option("--alerts-index", default=None,
              help="Index pattern of alerts. [default: <elasticsearch.alerts_index>*]")
@click.option("--since", default="24h", show_default=True, help="Time range, e.g. 1h, 7d.")
@click.option("--top", type=click.IntRange(1, 1000), default=25, show_default=True,
              help="How many client IPs to list.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("report.html"), show_default=True)
@click.option("--es", "es_url", hidden=True,
              help="Deprecated: elasticsearch.hosts / ENVOYGEO_ELASTICSEARCH__HOSTS.")
def report(config_path: Path | None, index: str | None, alerts_index: str | None,
           since: str, top: int, output: Path, es_url: str | None) -> None:
    """Write an offline HTML report: world map, top countries/cities/IPs, rates, alerts.

    Connection and index names come from the configuration, e.g.
    `envoygeo report -c config.yaml --since 7d -o week.html`.
    """
    from elastic_transport import TransportError
    from elasticsearch import ApiError

    from pipeline.dashboards.names import IndexNames
    from pipeline.report.query import fetch, matching_indices, since_to_range
    from pipeline.report.render import render
    from pipeline.service_errors import describe_elasticsearch_error
    from pipeline.sinks.elasticsearch import make_client

    try:
        since_to_range(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    settings = _load(config_path)
    es_settings = settings.elasticsearch
    legacy = es_url or os.environ.get(LEGACY_URL_VARIABLE)
    if legacy:
        click.echo(f"warning: {'--es' if es_url else LEGACY_URL_VARIABLE} is deprecated and "
                   "will be removed: set elasticsearch.hosts in the configuration "
                   "(-c config.yaml) or ENVOYGEO_ELASTICSEARCH__HOSTS", err=True)
        es_settings = es_settings.model_copy(update={"hosts": [legacy]})
    names = IndexNames.from_settings(es_settings, settings.privacy)
    index = index or names.logs_pattern
    alerts_index = alerts_index or names.alerts_pattern
    where = ", ".join(es_settings.hosts)
    es = make_client(es_settings)
    try:
        if not matching_indices(es, index):
            click.echo(f"warning: no index matches {index!r} on {where}, so the report is "
                       "empty: is elasticsearch.index the index the worker writes "
                       "(or --index)?", err=True)
        data = fetch(es, index, alerts_index, since, top, names.client)
    except (TransportError, ApiError) as e:
        click.echo(f"error: {describe_elasticsearch_error(e, es_settings)}", err=True)
        sys.exit(1)
    finally:
        es.close()
    output.write_text(render(data), encoding="utf-8")
    click.echo(f"wrote {output}: {data.total:,} requests, {len(data.countries)} countries, "
               f"{len(data.cities)} cities, {len(data.ips)} IPs, {len(data.alerts)} alerts "
               f"from {index}")
