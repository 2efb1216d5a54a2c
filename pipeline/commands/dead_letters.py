"""`envoygeo dead-letters show|replay`: the work is in `pipeline.deadletters`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.commands.worker import _load, config_option
from pipeline.metrics import DEAD_LETTER_STAGES

STAGES_HELP = ("parse: no log format matched (with parse.unparsed: dead_letter); plugin: "
               "an enrichment plugin failed on the batch (plugins.on_error: dead_letter); "
               "index: Elasticsearch refused the document for good")


def _logging() -> None:
    """Warnings and errors (librdkafka's among them) as plain lines on stderr: the
    command's own output is for a terminal."""
    from pipeline.logs import setup_logging

    setup_logging("warning", json=False)


def _stages(value: str) -> list[str]:
    stages = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in stages if s not in DEAD_LETTER_STAGES]
    if bad:
        raise click.BadParameter(f"unknown stage {bad[0]!r}; stages: "
                                 f"{', '.join(DEAD_LETTER_STAGES)}", param_hint="--stage")
    return stages


@click.group("dead-letters")
def dead_letters() -> None:
    """What the worker dead-lettered (kafka.dead_letter_topic), and putting it back.

    \b
    Every dead letter is the record as it came, with headers saying why:
      envoygeo.stage   parse | plugin | index
      envoygeo.error   the reason (a parse error, the plugin's exception,
                       Elasticsearch's status and reason)
      envoygeo.source  where it was read: topic/partition/offset

    \b
    Examples:
      envoygeo dead-letters show -c config.yaml
      envoygeo dead-letters replay -c config.yaml --stage plugin --dry-run
      envoygeo dead-letters replay -c config.yaml --stage plugin
    """


@dead_letters.command()
@config_option
@click.option("--stage", "stage_list", default="", metavar="STAGES",
              help="Only these stages (comma-separated). " + STAGES_HELP + ".")
@click.option("--samples", default=5, show_default=True,
              help="Records to print (position, stage, reason, value).")
def show(config_path: Path | None, stage_list: str, samples: int) -> None:
    """Count the dead letters the topic retains, by stage and by reason."""
    from pipeline.deadletters import DeadLetterError, describe, summarise

    settings = _load(config_path)
    _logging()
    k = settings.kafka
    try:
        s = summarise(k, _stages(stage_list), samples)
    except DeadLetterError as exc:
        click.echo(f"envoygeo dead-letters: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{k.dead_letter_topic}: {s.total:,} dead letter(s)"
               + ("" if not s.total else " — " + ", ".join(
                   f"{stage} {n:,}" for stage, n in s.by_stage.most_common())))
    if s.by_error:
        click.echo("most frequent reasons:")
        for (stage, error), n in s.by_error.most_common(10):
            click.echo(f"  {n:>8,}  {stage:<6} {describe(error.encode(), 120)}")
    for source, stage, error, value in s.samples:
        click.echo(f"{source} [{stage}] {describe(error.encode(), 100)}\n    {describe(value)}")


@dead_letters.command()
@config_option
@click.option("--stage", "stage_list", default="plugin,index", show_default=True,
              metavar="STAGES", help="Stages to replay (comma-separated). " + STAGES_HELP
              + ". Parse dead letters parse again only if the log format configuration "
              "changed.")
@click.option("--to", "to_topic", default=None, metavar="TOPIC",
              help="Topic to copy them to. [default: the first of kafka.topics]")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; write nothing.")
def replay(config_path: Path | None, stage_list: str, to_topic: str | None,
           dry_run: bool) -> None:
    """Copy dead letters back into the worker's source topic, once the cause is fixed.

    Each record goes back as it came (value and key), with a header
    envoygeo.replayed_from naming its first position; the worker then indexes it
    like any other record. Each stage keeps its own position (consumer group
    <kafka.group_id>-replay-<stage>), committed only after Kafka acknowledged the
    copies: running replay again copies only what was dead-lettered since.

    Exit status: 0 done; 1 Kafka refused or the topic is missing; 2 configuration
    error.
    """
    from pipeline.deadletters import DeadLetterError, Replayed
    from pipeline.deadletters import replay as run_replay

    settings = _load(config_path)
    _logging()
    k = settings.kafka
    stages = _stages(stage_list)
    if not stages:
        raise click.BadParameter("name at least one stage", param_hint="--stage")
    target = to_topic or k.topics[0]

    def progress(r: Replayed) -> None:
        if r.replayed and r.replayed % 10_000 == 0:
            click.echo(f"  {r.stage}: {r.replayed:,} replayed so far", err=True)

    try:
        results = run_replay(k, stages, target, dry_run, progress)
    except DeadLetterError as exc:
        click.echo(f"envoygeo dead-letters: {exc}", err=True)
        sys.exit(1)
    verb = "would replay" if dry_run else "replayed"
    for r in results:
        click.echo(f"{r.stage}: {verb} {r.replayed:,} dead letter(s) from "
                   f"{k.dead_letter_topic} to {target}"
                   + (f" ({r.skipped:,} of other stages passed over)" if r.skipped else ""))
    if dry_run:
        click.echo("dry run: nothing written, no position moved")
