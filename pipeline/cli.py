"""The `envoygeo` command.

Sub-commands live in `pipeline.commands.*` and are imported only when invoked, so
`envoygeo --help` stays fast and a missing optional service library never breaks
unrelated commands.
"""

from __future__ import annotations

import importlib
import sys

import click

from pipeline import __version__

# name -> "module:attribute" of a click.Command. Add new commands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "services": (
        "pipeline.commands.services:services",
        "Show whether the local Kafka, Elasticsearch and Redis answer.",
    ),
    "enrich": (
        "pipeline.commands.enrich:enrich",
        "Parse and enrich access-log records from files/stdin to JSON on stdout (no servers).",
    ),
    "bench": ("pipeline.commands.bench:bench", "Benchmarks: parse, core pipeline, end to end."),
    "run": ("pipeline.commands.worker:run", "The worker: Kafka -> enrich -> Elasticsearch."),
    "forward": (
        "pipeline.commands.forward:forward",
        "Fluent Forward protocol server (Fluent Bit/Fluentd forward outputs) -> Kafka.",
    ),
    "setup": ("pipeline.commands.worker:setup", "Install index templates, create topics."),
    "check-config": (
        "pipeline.commands.worker:check_config",
        "Validate the configuration and print it (secrets masked).",
    ),
    "demo": (
        "pipeline.commands.demo:demo",
        "The whole chain locally: HAProxy -> Envoy -> Kafka -> ES.",
    ),
    "schema": ("pipeline.commands.schema:schema", "Write or check the schemas/ files."),
    "dashboards": (
        "pipeline.commands.dashboards:dashboards",
        "Build, validate and import Kibana / OpenSearch Dashboards objects and the rate rule.",
    ),
    "policy": (
        "pipeline.commands.policy:policy",
        "Deny alerting client IPs at the gateway: Envoy RBAC file, Istio AuthorizationPolicy.",
    ),
    "dead-letters": (
        "pipeline.commands.dead_letters:dead_letters",
        "Count the dead-letter topic's records by stage and reason; replay them.",
    ),
    "report": (
        "pipeline.commands.report:report",
        "Self-contained HTML report (world map, top countries/cities/IPs, alerts) from ES.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are resolved on first use, from a registry of
    name -> ("module:attribute", one-line help)."""

    registry: dict[str, tuple[str, str]] = COMMANDS
    section = "Commands"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.registry)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = self.registry.get(cmd_name)
        if spec is None:
            return None
        module_name, _, attr = spec[0].partition(":")
        return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]

    def invoke(self, ctx: click.Context) -> object:
        # No traceback for a configuration problem, whichever command meets it: one
        # line per problem naming the key, exit 2 (the code `check-config` documents).
        # Looked up in sys.modules so `--help` imports neither pydantic nor the config.
        try:
            return super().invoke(ctx)
        except Exception as exc:
            config = sys.modules.get("pipeline.config")
            pydantic = sys.modules.get("pydantic")
            if config is not None and isinstance(exc, config.ConfigError):
                message = str(exc)
            elif pydantic is not None and config is not None and isinstance(
                    exc, pydantic.ValidationError):
                message = config.describe_validation_error(exc)
            else:
                raise
            click.echo(f"envoygeo: {message}", err=True)
            ctx.exit(2)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing help must not import every command module.
        rows = [(name, self.registry[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section(self.section):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="envoygeo")
def main() -> None:
    """envoygeo: Envoy/Istio access logs from Kafka to Elasticsearch, with the real
    client IP (PROXY protocol first, X-Forwarded-For only through trusted hops),
    GeoIP country/city/ASN and per-IP request rates.

    \b
    Quick start (no servers needed):
      envoygeo enrich access.log            # one ECS JSON document per line
    With the local services (deploy/local/up):
      envoygeo services                     # are Kafka, Elasticsearch, Redis up?
    """


if __name__ == "__main__":  # pragma: no cover
    main()
