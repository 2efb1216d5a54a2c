"""`envoygeo dashboards`: build, validate and import the Kibana / OpenSearch Dashboards
saved objects and the per-IP rate rule."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from pipeline.dashboards import files, kibana
from pipeline.dashboards.client import (
    DashboardsError,
    Flavour,
    Target,
    import_saved_objects,
    upsert_rule,
)
from pipeline.dashboards.validate import validate_file, validate_rule


@click.group()
def dashboards() -> None:
    """Kibana 8 / OpenSearch Dashboards objects for envoygeo's indices."""


@dashboards.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("dashboards"), show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 if a file differs instead of writing.")
def build(out: Path, check: bool) -> None:
    """Write the generated ndjson and rule files."""
    stale = [rel for rel, text in files.generated().items()
             if not (out / rel).exists() or (out / rel).read_text() != text]
    if check:
        for rel in stale:
            click.echo(f"out of date: {out / rel}")
        sys.exit(1 if stale else 0)
    for path in files.write(out):
        click.echo(f"written: {path}")


@dashboards.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(paths: tuple[Path, ...]) -> None:
    """Check ndjson saved objects (or a rule .json) against the field table."""
    failed = False
    for path in paths:
        errors = validate_file(path)
        failed |= bool(errors)
        click.echo(f"{path}: {'OK' if not errors else f'{len(errors)} problem(s)'}")
        for e in errors:
            click.echo(f"  {e}")
    sys.exit(1 if failed else 0)


def _window(value: str) -> tuple[int, str]:
    m = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if not m or int(m.group(1)) < 1:
        raise click.BadParameter(f"{value!r}: use a number and s/m/h/d, e.g. 60s or 5m")
    return int(m.group(1)), m.group(2)


@dashboards.command(name="import")
@click.option("--kibana", "kibana_url", metavar="URL", help="Kibana base URL.")
@click.option("--opensearch-dashboards", "osd_url", metavar="URL",
              help="OpenSearch Dashboards base URL.")
@click.option("--space", help="Kibana space id (default space when omitted).")
@click.option("--api-key", envvar="ENVOYGEO_KIBANA_API_KEY",
              help="Encoded API key (Authorization: ApiKey ...). Env: ENVOYGEO_KIBANA_API_KEY.")
@click.option("--username", envvar="ENVOYGEO_KIBANA_USERNAME", help="Basic auth user.")
@click.option("--password", envvar="ENVOYGEO_KIBANA_PASSWORD", help="Basic auth password.")
@click.option("--file", "ndjson_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="ndjson to import instead of the built-in objects.")
@click.option("--no-rule", is_flag=True, help="Do not create/update the Kibana rule.")
@click.option("--threshold", type=click.IntRange(min=1), default=600, show_default=True,
              help="Rule: alert when one source.ip makes more requests than this ...")
@click.option("--window", "window", default="60s", show_default=True,
              help="Rule: ... within this window (s/m/h/d).")
@click.option("--term-size", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="Rule: how many top source IPs are checked per run.")
@click.option("--interval", default="1m", show_default=True, help="Rule: check schedule.")
@click.option("--insecure", is_flag=True, help="Do not verify TLS certificates.")
def import_(kibana_url: str | None, osd_url: str | None, space: str | None,
            api_key: str | None, username: str | None, password: str | None,
            ndjson_file: Path | None, no_rule: bool, threshold: int, window: str,
            term_size: int, interval: str, insecure: bool) -> None:
    """Import the saved objects (overwrite) and create or update the per-IP rate rule."""
    if bool(kibana_url) == bool(osd_url):
        raise click.UsageError("give exactly one of --kibana URL or --opensearch-dashboards URL")
    flavour: Flavour = "kibana" if kibana_url else "osd"
    if space and flavour == "osd":
        raise click.UsageError("--space is a Kibana feature")
    size, unit = _window(window)
    target = Target(url=kibana_url or osd_url or "", flavour=flavour, space=space,
                    api_key=api_key, username=username, password=password,
                    verify_tls=not insecure)
    if ndjson_file:
        content, name = ndjson_file.read_bytes(), ndjson_file.name
    else:
        rel = files.KIBANA_NDJSON if flavour == "kibana" else files.OSD_NDJSON
        content, name = files.generated()[rel].encode(), Path(rel).name
    try:
        imported = import_saved_objects(target, content, name)
        click.echo(f"imported {len(imported)} saved object(s) into {target.base()}:")
        for line in imported:
            click.echo(f"  {line}")
        if flavour == "kibana" and not no_rule:
            rule = kibana.rate_rule(threshold, size, unit, term_size, interval)
            problems = validate_rule(rule)
            if problems:
                raise DashboardsError("rule: " + "; ".join(problems))
            action = upsert_rule(target, kibana.RULE_ID, rule)
            click.echo(f"rule {kibana.RULE_ID} {action}: > {threshold} requests per "
                       f"source.ip in {size}{unit}, top {term_size} IPs, every {interval}")
    except DashboardsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
