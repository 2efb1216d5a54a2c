"""Enrichment plugins: fields of your own, added to every document, on both paths.

A plugin is a class registered under the entry-point group `envoygeo.enrichers`
(`[project.entry-points."envoygeo.enrichers"]` in its package's pyproject.toml; the
entry point's name is the plugin's name and its config section's). It declares:

* `fields`: the fields it adds (`pipeline.fields.Field`); they join the field table, so
  `envoygeo schema` maps them in the index template and the dashboards validator knows
  them. Names are dotted paths (`user_agent.name`); a core field is refused.
* `Config`: a pydantic model for its section `plugins.<name>` of the configuration,
  validated at start (`envoygeo check-config` names the key of an error).
* `inputs`: which per-record values it reads: `client_ip` (the address the rate stage
  counts, after `privacy`), `user_agent` (the logged User-Agent).
* `enrich(batch)`: one call per batch; returns, per record, None or a dict of its
  declared dotted field names to JSON values.

Why this shape: with the compiled core a document never exists as a Python dict; it is
bytes. So a plugin does not see documents; it sees the few per-record values the core
exposes as two plain lists (`PluginBatch`), and what it returns is rendered once per
distinct dict (plugins that cache return the same dict for the same input, so a batch
of 2000 records renders a few dozen) to a `"user_agent.name":"Chrome",...` fragment
that the core splices before each document's closing brace. Elasticsearch reads the
dotted keys as the same object fields as nested ones, so `user_agent.name` sits beside
`user_agent.original`. The Python path splices the same fragment into its serialised
document, so both paths write the same bytes; `Enricher.enrich_records` (documents as
dicts) merges the fields into the dicts instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict

from pipeline.fields import Field

GROUP = "envoygeo.enrichers"
INPUTS = frozenset({"client_ip", "user_agent"})

log = logging.getLogger(__name__)


class PluginBatch(NamedTuple):
    """A batch as a plugin sees it: one entry per record, None where a record has no
    such value. `user_agent` holds only None unless the plugin asked for it."""

    client_ip: Sequence[str | None]
    user_agent: Sequence[str | None]


class PluginConfig(BaseModel):
    """Base of a plugin's config section: unknown keys are errors, as everywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EnricherPlugin:
    """Base class of an enrichment plugin (see the module docstring)."""

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[Field, ...]] = ()
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    inputs: ClassVar[frozenset[str]] = frozenset({"client_ip"})

    def __init__(self, config: PluginConfig) -> None:
        self.config = config

    def enrich(self, batch: PluginBatch) -> Sequence[Mapping[str, Any] | None]:
        """Per record: None, or {declared dotted field name: JSON value}."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files, threads; called when the enricher closes."""


def installed() -> dict[str, type[EnricherPlugin]]:
    """Every plugin class registered under `envoygeo.enrichers`, by name.

    A registration that cannot be imported, or is not an EnricherPlugin with valid
    inputs, raises ValueError naming it: a plugin that silently vanishes would leave
    documents without the fields the dashboards expect."""
    out: dict[str, type[EnricherPlugin]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            raise ValueError(f"enrichment plugin {ep.name!r} ({ep.value}) cannot be "
                             f"loaded: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, EnricherPlugin)):
            raise ValueError(f"enrichment plugin {ep.name!r} ({ep.value}) is not an "
                             "EnricherPlugin subclass")
        unknown = cls.inputs - INPUTS
        if unknown:
            raise ValueError(f"enrichment plugin {ep.name!r} asks for unknown inputs "
                             f"{sorted(unknown)} (known: {sorted(INPUTS)})")
        out[ep.name] = cls
    return out


def plugin_fields(core: Iterable[Field]) -> tuple[Field, ...]:
    """The fields of every installed plugin, for the field table (`pipeline.schema`)."""
    taken = {f.name: "the core" for f in core}
    out: list[Field] = []
    for name, cls in sorted(installed().items()):
        for f in cls.fields:
            if f.name in taken:
                raise ValueError(f"enrichment plugin {name!r} declares field {f.name!r}, "
                                 f"which {taken[f.name]} already writes")
            taken[f.name] = f"plugin {name!r}"
            out.append(f)
    return tuple(out)
