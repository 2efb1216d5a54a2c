"""`envoygeo schema`: regenerate (or verify) the files in schemas/ from pipeline/schema.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.schema import schema_files


def render(body: object) -> str:
    return json.dumps(body, indent=2, sort_keys=False) + "\n"


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("schemas"), show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 if a file differs instead of writing it.")
def schema(directory: Path, check: bool) -> None:
    """Write the Elasticsearch templates and JSON Schemas derived from the field table."""
    stale = []
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in schema_files().items():
        path = directory / name
        text = render(body)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not check:
            path.write_text(text)
    verb = "out of date" if check else "written"
    for name in stale:
        click.echo(f"{verb}: {directory / name}")
    if check and stale:
        sys.exit(1)
