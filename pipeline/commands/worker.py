"""`envoygeo run`, `setup` and `check-config`: the Kafka -> Elasticsearch worker."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
import yaml

from pipeline.config import ConfigError, Settings, load_settings, masked

CONFIG_HELP = (
    "YAML configuration file; ENVOYGEO_<SECTION>__<KEY> variables override it "
    "(e.g. ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS)."
)
config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="ENVOYGEO_CONFIG", help=CONFIG_HELP,
)


def _load(config_path: Path | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        click.echo(f"envoygeo: {exc}", err=True)
        sys.exit(2)


@click.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration and print the effective values (secrets masked).

    Exits 2 with every offending key named if the configuration is invalid.
    """
    settings = _load(config_path)
    click.echo(yaml.safe_dump(masked(settings), sort_keys=False), nl=False)


@click.command()
@config_option
@click.option("--no-topics", is_flag=True, help="Do not create Kafka topics.")
def setup(config_path: Path | None, no_topics: bool) -> None:
    """Install the Elasticsearch index templates and create the Kafka topics envoygeo owns.

    \b
    Elasticsearch: component templates envoygeo-settings, envoygeo-logs-mappings,
      envoygeo-alerts-mappings and the composable templates envoygeo-logs and
      envoygeo-alerts (for <index>* and <alerts_index>*). Safe to re-run.
    Kafka: the dead-letter and alerts topics, and the source topic(s) if missing.
    """
    from pipeline.setup import ensure_topics, install_templates
    from pipeline.sinks.elasticsearch import make_client

    settings = _load(config_path)
    try:
        with make_client(settings.elasticsearch) as es:
            for line in install_templates(es, settings):
                click.echo(f"installed {line}")
    except Exception as exc:  # report which service and why, not a traceback
        click.echo(f"envoygeo setup: Elasticsearch {settings.elasticsearch.hosts}: {exc}", err=True)
        sys.exit(3)
    if not no_topics:
        try:
            created = ensure_topics(settings)
        except Exception as exc:
            click.echo(f"envoygeo setup: Kafka {settings.kafka.bootstrap_servers}: {exc}", err=True)
            sys.exit(3)
        click.echo(f"created topics: {', '.join(created)}" if created else "topics already exist")


@click.command()
@config_option
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--plain-logs", is_flag=True, help="Human-readable logs instead of JSON lines.")
def run(config_path: Path | None, log_level: str, plain_logs: bool) -> None:
    """Consume access logs from Kafka, enrich them and index them into Elasticsearch.

    \b
    Delivery: at-least-once from Kafka, effectively-once in Elasticsearch (document
    ids come from the Kafka position). Offsets are committed only after every record
    up to them is indexed or dead-lettered. SIGTERM/SIGINT: stop fetching, flush,
    commit, exit 0 within worker.shutdown_grace_s.
    Metrics: http://<metrics.host>:<metrics.port>/metrics, /healthz, /readyz.
    Refuses to start if `envoygeo setup` has not installed the index templates.
    """
    # A stop requested while starting up (imports, template check, GeoIP open) is
    # honoured once the worker exists, instead of killing the process half-started.
    early_stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early_stop.append(signum))

    from pipeline.enricher import Enricher
    from pipeline.logs import setup_logging
    from pipeline.metrics import Metrics
    from pipeline.setup import missing_templates
    from pipeline.sinks.elasticsearch import make_client
    from pipeline.worker import Worker

    settings = _load(config_path)
    setup_logging(log_level, json=not plain_logs)
    try:
        with make_client(settings.elasticsearch) as es:
            missing = missing_templates(es, settings)
    except Exception as exc:  # unreachable cluster: say so plainly, exit non-zero
        click.echo(f"envoygeo: cannot reach Elasticsearch at {settings.elasticsearch.hosts}: "
                   f"{exc}", err=True)
        sys.exit(3)
    if missing:
        click.echo(f"envoygeo: no envoygeo index template covers {', '.join(missing)} "
                   "(source.ip would not be an `ip` field); run `envoygeo setup` first.", err=True)
        sys.exit(3)
    metrics = Metrics()
    try:
        enricher = Enricher.from_settings(settings, on_rates=metrics.rate_seconds.observe)
    except Exception as exc:
        click.echo(f"envoygeo: cannot start enrichment: {exc}", err=True)
        sys.exit(2)
    worker = Worker(settings, enricher, metrics=metrics)
    worker.install_signal_handlers()
    if early_stop:
        worker.stop(f"signal {signal.Signals(early_stop[0]).name} during start-up")
    sys.exit(worker.run())
