"""`envoygeo run`, `setup` and `check-config`: the Kafka -> Elasticsearch worker."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
import yaml

from pipeline.config import ConfigError, Settings, load_settings, masked

CONFIG_HELP = (
    "YAML configuration file (${VAR} and ${VAR:-default} are expanded); "
    "ENVOYGEO_<SECTION>__<KEY> variables override it (e.g. ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS)."
)
config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="ENVOYGEO_CONFIG", help=CONFIG_HELP,
)


def _load(config_path: Path | None, for_run: bool = False) -> Settings:
    """`for_run`: also what `run` needs of the machine (GeoIP files, CA file, librdkafka
    settings); `run` and `check-config` both load this way, so they reject the same."""
    from pipeline.preflight import load_for_run

    try:
        return load_for_run(config_path) if for_run else load_settings(config_path)
    except ConfigError as exc:
        click.echo(f"envoygeo: {exc}", err=True)
        sys.exit(2)


@click.command("check-config")
@config_option
@click.option("--connect", is_flag=True,
              help="Also ask Kafka, Elasticsearch and Redis (when rates.backend is redis) "
                   "with the configured credentials; one line per service instead of the "
                   "configuration.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True, help="Seconds each service gets to answer (--connect).")
def check_config(config_path: Path | None, connect: bool, timeout_s: float) -> None:
    """Check the configuration exactly as `run` would, and print the effective
    values (secrets masked).

    \b
    What is read, in order (later wins):
      1. the YAML file (-c, or ENVOYGEO_CONFIG), with ${VAR}, ${VAR:-default}
         (unset or empty) and ${VAR-default} (unset) expanded; $$ is a literal $
      2. ENVOYGEO_<SECTION>__<KEY> variables; list keys take JSON or commas,
         mappings and whole sections take JSON, an empty value unsets an optional key
    What is rejected, every problem on one line naming its key: unknown or
    misspelt keys and variables (with "did you mean"), bad values, URLs and
    format strings, unset ${VAR}s, GeoIP files that are missing or unreadable,
    a CA file that does not load, librdkafka properties librdkafka refuses.

    \b
    Examples:
      envoygeo check-config -c config.yaml
      ENVOYGEO_ELASTICSEARCH__HOSTS=https://es-0:9200,https://es-1:9200 \\
        envoygeo check-config -c config.yaml
      BROKERS=kafka-0:9092 envoygeo check-config -c config.yaml   # bootstrap_servers: ${BROKERS}
      envoygeo check-config -c config.yaml --connect --timeout 3

    \b
    --connect prints one line per service, e.g.
      kafka          ok       127.0.0.1:9092: 1 broker(s); topics envoy-access-logs ...
      elasticsearch  ok       http://127.0.0.1:9200: cluster ...; index templates cover ...
      redis          skipped  rates.backend is not redis

    \b
    Exit status: 0 ready to run; 2 the configuration is invalid; 3 (--connect)
    a service did not answer, refused the credentials, or lacks the topics /
    index templates `envoygeo setup` creates.
    """
    settings = _load(config_path, for_run=True)
    if not connect:
        click.echo(yaml.safe_dump(masked(settings), sort_keys=False), nl=False)
        return
    from pipeline.preflight import probe_services

    results = probe_services(settings, timeout_s)
    for check in results:
        click.echo(f"{check.service:<14} {check.status:<8} {check.detail}")
    sys.exit(3 if any(c.status == "FAILED" for c in results) else 0)


@click.command()
@config_option
@click.option("--no-topics", is_flag=True, help="Do not create Kafka topics.")
def setup(config_path: Path | None, no_topics: bool) -> None:
    """Install the Elasticsearch index templates and create the Kafka topics envoygeo owns.

    \b
    Elasticsearch (safe to re-run; schemas/ holds the same bodies as JSON files):
      component templates  envoygeo-settings, envoygeo-logs-mappings,
                           envoygeo-alerts-mappings
      index templates      named after the indices they serve:
                           <elasticsearch.index> for <elasticsearch.index>*
                             (default envoygeo-logs, for envoygeo-logs*)
                           <elasticsearch.alerts_index> for <elasticsearch.alerts_index>*
                             (default envoygeo-alerts, for envoygeo-alerts*)
    Kafka: the dead-letter and alerts topics, and the source topic(s) if missing
      (kafka.topic_partitions partitions each).

    \b
    Example:
      envoygeo setup -c config.yaml && envoygeo check-config -c config.yaml --connect
    """
    from pipeline.service_errors import describe_elasticsearch_error
    from pipeline.setup import ensure_topics, install_templates
    from pipeline.sinks.elasticsearch import make_client

    settings = _load(config_path)
    try:
        with make_client(settings.elasticsearch) as es:
            for line in install_templates(es, settings):
                click.echo(f"installed {line}")
    except Exception as exc:  # report which service and why, not a traceback
        click.echo(f"envoygeo setup: "
                   f"{describe_elasticsearch_error(exc, settings.elasticsearch)}", err=True)
        sys.exit(3)
    if not no_topics:
        try:
            created = ensure_topics(settings)
        except Exception as exc:
            said = str(exc)  # a refusal names the broker and the cause itself
            where = "" if said.startswith("kafka: ") else \
                f"Kafka {settings.kafka.bootstrap_servers}: "
            click.echo(f"envoygeo setup: {where}{said}", err=True)
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

    \b
    Exit status: 2 the configuration is invalid (every check of `envoygeo
    check-config`, one line per problem); 3 Elasticsearch cannot be reached,
    refuses the TLS handshake or the credentials, or lacks the index templates, or
    Redis (rates.backend: redis) refuses the connection (one line naming the key to
    fix).
    """
    # A stop requested while starting up (imports, template check, GeoIP open) is
    # honoured once the worker exists, instead of killing the process half-started.
    early_stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early_stop.append(signum))

    from pipeline.enricher import Enricher
    from pipeline.logs import setup_logging
    from pipeline.metrics import Metrics
    from pipeline.service_errors import describe_elasticsearch_error
    from pipeline.setup import missing_templates
    from pipeline.sinks.elasticsearch import make_client
    from pipeline.worker import Worker

    settings = _load(config_path, for_run=True)
    setup_logging(log_level, json=not plain_logs)
    try:
        with make_client(settings.elasticsearch) as es:
            missing = missing_templates(es, settings)
    except Exception as exc:  # unreachable or refusing cluster: one line, exit non-zero
        click.echo(f"envoygeo: {describe_elasticsearch_error(exc, settings.elasticsearch)}",
                   err=True)
        sys.exit(3)
    if missing:
        click.echo(f"envoygeo: no envoygeo index template covers {', '.join(missing)} "
                   "(source.ip would not be an `ip` field); run `envoygeo setup` first.", err=True)
        sys.exit(3)
    redis_refused = _redis_refusal(settings)
    if redis_refused:
        click.echo(f"envoygeo: {redis_refused}", err=True)
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


def _redis_refusal(settings: Settings) -> str | None:
    """With rates.backend: redis, one PING before the worker starts: a wrong password or
    an untrusted certificate would otherwise fail the first batch, after Kafka joined."""
    if not (settings.rates.enabled and settings.rates.backend == "redis"):
        return None
    import redis

    from pipeline.enrich.rates.redis import connect
    from pipeline.service_errors import describe_redis_error

    client = connect(settings.rates, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        return describe_redis_error(exc, settings.rates)
    finally:
        client.close()
    return None
