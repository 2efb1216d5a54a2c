"""`envoygeo dashboards`: build, validate and import the Kibana / OpenSearch Dashboards
saved objects and the per-IP rate rules, for the index names and alert rules of the
configuration (`-c config.yaml`), so dashboards, rules and worker read one truth."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
from pydantic import SecretStr

from pipeline.commands.worker import _load, config_option
from pipeline.config import KibanaSettings, Settings
from pipeline.dashboards import files, kibana
from pipeline.dashboards.client import (
    DashboardsError,
    Flavour,
    Target,
    import_saved_objects,
    upsert_rule,
)
from pipeline.dashboards.names import IndexNames
from pipeline.dashboards.validate import validate_file, validate_rule
from pipeline.enrich.alerts import THRESHOLD_COMPARATOR, AlertRule


@click.group()
def dashboards() -> None:
    """Kibana 8.8+ / OpenSearch Dashboards objects for envoygeo's indices.

    With -c config.yaml the objects and rules read `elasticsearch.index` /
    `alerts_index` and the rules of `rates.alerts`; without it, the defaults
    (envoygeo-logs*, envoygeo-alerts*), which are the files committed under dashboards/.
    """


def _names(config_path: Path | None) -> IndexNames:
    if config_path is None:
        return IndexNames()
    settings = _load(config_path)
    return IndexNames.from_settings(settings.elasticsearch, settings.privacy)


@dashboards.command()
@config_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("dashboards"), show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 if a file differs instead of writing.")
def build(config_path: Path | None, out: Path, check: bool) -> None:
    """Write the generated ndjson and rule files (for the configured index names).

    \b
    Examples:
      envoygeo dashboards build --check                   # committed files up to date?
      envoygeo dashboards build -c config.yaml --out my-dashboards
    """
    names = _names(config_path)
    generated = files.generated(names)
    stale = [rel for rel, text in generated.items()
             if not (out / rel).exists() or (out / rel).read_text() != text]
    if check:
        for rel in stale:
            click.echo(f"out of date: {out / rel}")
        sys.exit(1 if stale else 0)
    for path in files.write(out, names):
        click.echo(f"written: {path}")
    click.echo(f"data views: {names.logs_pattern}, {names.alerts_pattern}")


@dashboards.command()
@config_option
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(config_path: Path | None, paths: tuple[Path, ...]) -> None:
    """Check ndjson saved objects (or a rule .json) against the field table."""
    names = _names(config_path)
    failed = False
    for path in paths:
        errors = validate_file(path, names)
        failed |= bool(errors)
        click.echo(f"{path}: {'OK' if not errors else f'{len(errors)} problem(s)'}")
        for e in errors:
            click.echo(f"  {e}")
    sys.exit(1 if failed else 0)


_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _window_s(value: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if not m or int(m.group(1)) < 1:
        raise click.BadParameter(f"{value!r}: use a number and s/m/h/d, e.g. 60s or 5m",
                                 param_hint="--window")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def _rules(settings: Settings, threshold: int | None, window: str | None) -> list[AlertRule]:
    """--threshold/--window make one rule; else the configured `rates.alerts`; else
    the built-in default (600 requests in 60 s)."""
    if threshold is not None or window is not None:
        d = kibana.DEFAULT_RULE
        return [AlertRule(name=d.name, threshold=threshold or d.threshold,
                          window_s=_window_s(window) if window else d.window_s)]
    return list(settings.rates.alerts) or [kibana.DEFAULT_RULE]


def _target(k: KibanaSettings, flavour: Flavour, insecure: bool) -> Target:
    return Target(url=k.url or "", flavour=flavour, space=k.space,
                  api_key=k.api_key_value(), username=k.username,
                  password=k.password_value(),
                  verify_tls=k.verify_certs and not insecure,
                  ca_certs=str(k.ca_certs) if k.ca_certs else None)


@dashboards.command(name="import")
@config_option
@click.option("--kibana", "kibana_url", metavar="URL",
              help="Kibana base URL (overrides kibana.url).")
@click.option("--opensearch-dashboards", "osd_url", metavar="URL",
              help="OpenSearch Dashboards base URL.")
@click.option("--space", help="Kibana space id (overrides kibana.space).")
@click.option("--api-key", help="Encoded API key (overrides kibana.api_key; "
              "env ENVOYGEO_KIBANA__API_KEY).")
@click.option("--username", help="Basic auth user (overrides kibana.username).")
@click.option("--password", help="Basic auth password (overrides kibana.password; "
              "env ENVOYGEO_KIBANA__PASSWORD).")
@click.option("--file", "ndjson_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="ndjson to import instead of the generated objects.")
@click.option("--no-rule", is_flag=True, help="Do not create/update the Kibana rules.")
@click.option("--threshold", type=click.IntRange(min=1), default=None,
              help="One rule: alert when one source.ip makes at least this many requests "
                   "... [default: the rules of rates.alerts, else 600]")
@click.option("--window", "window", default=None,
              help="... within this window (s/m/h/d). [default: 60s]")
@click.option("--term-size", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="Rule: how many top source IPs are checked per run.")
@click.option("--interval", default="1m", show_default=True, help="Rule: check schedule.")
@click.option("--insecure", is_flag=True, help="Do not verify TLS certificates.")
def import_(config_path: Path | None, kibana_url: str | None, osd_url: str | None,
            space: str | None, api_key: str | None, username: str | None,
            password: str | None, ndjson_file: Path | None, no_rule: bool,
            threshold: int | None, window: str | None, term_size: int, interval: str,
            insecure: bool) -> None:
    """Import the saved objects (overwrite) and create or update one Kibana rule per
    alert rule of the configuration, with the worker's comparison (count >= threshold).

    Connection settings come from the `kibana` section of the configuration
    (ENVOYGEO_KIBANA__URL, ENVOYGEO_KIBANA__API_KEY, ...), options override them.

    \b
    Examples:
      envoygeo dashboards import -c config.yaml
      envoygeo dashboards import -c config.yaml --kibana https://kibana:5601 --space ops
      envoygeo dashboards import --opensearch-dashboards https://osd:5601 --username admin
    """
    settings = _load(config_path)
    if window is not None:
        _window_s(window)  # a usage error before any request
    if kibana_url and osd_url:
        raise click.UsageError("give one of --kibana URL or --opensearch-dashboards URL")
    flavour: Flavour = "osd" if osd_url else "kibana"
    given = {"url": kibana_url or osd_url, "space": space, "username": username,
             "api_key": SecretStr(api_key) if api_key else None,
             "password": SecretStr(password) if password else None}
    conn = settings.kibana.model_copy(update={k: v for k, v in given.items() if v})
    if not conn.url:
        raise click.UsageError("no Kibana URL: set kibana.url in the configuration "
                               "(ENVOYGEO_KIBANA__URL) or give --kibana URL")
    if conn.space and flavour == "osd":
        raise click.UsageError("--space is a Kibana feature")
    names = IndexNames.from_settings(settings.elasticsearch, settings.privacy)
    target = _target(conn, flavour, insecure)
    if ndjson_file:
        content, name = ndjson_file.read_bytes(), ndjson_file.name
    else:
        rel = files.KIBANA_NDJSON if flavour == "kibana" else files.OSD_NDJSON
        content, name = files.generated(names)[rel].encode(), Path(rel).name
    try:
        imported = import_saved_objects(target, content, name)
        click.echo(f"imported {len(imported)} saved object(s) into {target.base()}:")
        for line in imported:
            click.echo(f"  {line}")
        if flavour == "kibana" and not no_rule:
            for alert_rule in _rules(settings, threshold, window):
                rule = kibana.rate_rule(alert_rule, names, term_size, interval)
                problems = validate_rule(rule, names)
                if problems:
                    raise DashboardsError("rule: " + "; ".join(problems))
                rid = kibana.rule_id(alert_rule)
                action = upsert_rule(target, rid, rule)
                p = rule["params"]
                click.echo(f"rule {rid} {action}: {THRESHOLD_COMPARATOR} "
                           f"{alert_rule.threshold} requests per source.ip in "
                           f"{p['timeWindowSize']}{p['timeWindowUnit']} on "
                           f"{names.logs_pattern}, top {term_size} IPs, every {interval}")
    except DashboardsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
