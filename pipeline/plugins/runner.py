"""Running the configured enrichment plugins over a batch, isolated from each other.

A plugin that raises (or returns what it did not declare) fails its batch only: every
record of the batch is tagged `envoygeo_plugin_failed` and indexed as usual without that
plugin's fields, or, with `plugins.on_error: dead_letter`, the caller sends the whole batch
to the dead letters (stage `plugin`) instead (`plugin_dead_letters`). Either way the failure is
counted by plugin (`errors`, exported as `envoygeo_plugin_errors_total{plugin}`) and logged
in one line (the first failure, then at most one summary line a minute per plugin). The
worker keeps running.

Whole batches, not records, because a plugin fails by raising out of `enrich(batch)`:
which of its records it could have enriched is unknown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.plugins import EnricherPlugin, PluginBatch, installed

if TYPE_CHECKING:
    from pipeline.config import Settings

FAILED_TAG = "envoygeo_plugin_failed"
LOG_EVERY_S = 60.0

log = logging.getLogger("pipeline.plugins")


def splice(doc: bytes, fragment: bytes | None) -> bytes:
    """A serialised document with a fragment written before its closing brace (the
    compiled core's `splice`, for the documents Python serialised)."""
    if fragment is None:
        return doc
    return b"".join((doc[:-1], b",", fragment, b"}"))


def merge(doc: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Dotted field names into a document dict, as Elasticsearch reads the fragment."""
    for name, value in fields.items():
        *parents, leaf = name.split(".")
        node = doc
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[leaf] = value


def plugin_dead_letters(enricher: object, settings: Settings, n: int,
                        unparsed: Sequence[tuple[int, str]],
                        ) -> tuple[str, list[int]] | None:
    """`plugins.on_error: dead_letter`, for the worker and forward direct mode alike:
    if a plugin failed on the n-record batch `enricher` just enriched, why, and the
    records that go to the dead letters with stage `plugin` (all of them but the
    `unparsed` lines already dead-lettered by `parse.unparsed: dead_letter`, whose
    `parse` stage says more); None if the batch is indexed as usual."""
    failure: str | None = getattr(enricher, "plugin_failure", None)
    if failure is None or settings.plugins.on_error != "dead_letter":
        return None
    skip = ({i for i, _ in unparsed} if settings.parse.unparsed == "dead_letter"
            else set())
    return failure, [i for i in range(n) if i not in skip]


class PluginRunner:
    def __init__(self, plugins: Sequence[EnricherPlugin], on_error: str = "index") -> None:
        self.plugins = list(plugins)
        self.on_error = on_error  # what the caller does with a failed batch (log wording)
        self.want_user_agent = any("user_agent" in p.inputs for p in self.plugins)
        self._declared = {p.name: frozenset(f.name for f in p.fields) for p in self.plugins}
        # Failures by plugin (calls that raised), cumulative: the worker exports them.
        self.errors: dict[str, int] = {p.name: 0 for p in self.plugins}
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    @classmethod
    def from_config(cls, enabled: Sequence[str], sections: Mapping[str, Any],
                    on_error: str = "index") -> PluginRunner:
        """The enabled plugins, built from their validated sections (`PluginsSettings`)."""
        classes = installed()
        plugins = []
        for name in enabled:
            plugin_cls = classes[name]
            plugin = plugin_cls(plugin_cls.Config.model_validate(sections.get(name) or {}))
            plugin.name = name  # type: ignore[misc]  # the entry point's name is the plugin's
            plugins.append(plugin)
        return cls(plugins, on_error)

    def _results(self, batch: PluginBatch,
                 ) -> tuple[list[tuple[str, Sequence[Any]]], str | None]:
        """(plugin name, its per-record results) of the plugins that succeeded; why
        the first that failed did (None: none did)."""
        n = len(batch.client_ip)
        out: list[tuple[str, Sequence[Any]]] = []
        failure = None
        for plugin in self.plugins:
            try:
                res = plugin.enrich(batch)
                if len(res) != n:
                    raise ValueError(f"returned {len(res)} results for {n} records")
                out.append((plugin.name, res))
            except Exception as exc:
                why = self._failed(plugin.name, exc)  # counted even if not the first
                failure = failure or why
        return out, failure

    def fragments(self, batch: PluginBatch) -> tuple[list[bytes | None], str | None]:
        """Per record, the plugins' fields as one `"k":v,...` fragment (None: none),
        and why a plugin failed on the batch (None: none did; else its records are to
        be tagged, or dead-lettered).

        Rendered once per distinct result object (by identity, the results being kept
        alive meanwhile): a plugin that caches by input returns the same dict for the
        same client, so most records cost one dict probe here."""
        results, failure = self._results(batch)
        n = len(batch.client_ip)
        if not results:
            return [None] * n, failure
        rendered: list[list[bytes | None]] = []
        for name, res in results:
            cache: dict[int, bytes | None] = {}
            declared = self._declared[name]
            frags: list[bytes | None] = []
            try:
                for r in res:
                    if r is None:
                        frags.append(None)
                        continue
                    f = cache.get(id(r), b"")
                    if f == b"":
                        unknown = r.keys() - declared
                        if unknown:
                            raise ValueError(f"returned undeclared fields {sorted(unknown)}")
                        # `{}` renders as nothing to add, as None does
                        f = cache[id(r)] = orjson.dumps(r)[1:-1] or None
                    frags.append(f)
            except Exception as exc:
                why = self._failed(name, exc)
                failure = failure or why
                continue
            rendered.append(frags)
        if len(rendered) == 1:
            return rendered[0], failure
        if not rendered:
            return [None] * n, failure
        joined: list[bytes | None] = []
        for parts in zip(*rendered, strict=True):
            present = [p for p in parts if p is not None]
            joined.append(b",".join(present) if present else None)
        return joined, failure

    def merge_into(self, docs: Sequence[dict[str, Any] | None], batch: PluginBatch,
                   ) -> str | None:
        """The plugins' fields merged into document dicts (the dict API); why a plugin
        failed, if one did (its records are tagged here)."""
        results, failure = self._results(batch)
        for name, res in results:
            declared = self._declared[name]
            for doc, r in zip(docs, res, strict=True):
                if doc is None or not r:
                    continue
                unknown = r.keys() - declared
                if unknown:
                    why = self._failed(name, ValueError(
                        f"returned undeclared fields {sorted(unknown)}"))
                    failure = failure or why
                    break
                merge(doc, r)
        if failure:
            for doc in docs:
                if doc is not None:
                    doc.setdefault("tags", []).append(FAILED_TAG)
        return failure

    def _failed(self, name: str, exc: Exception) -> str:
        """Count and (at most once a minute per plugin) log a failure; its reason, as
        a dead letter's `envoygeo.error` gives it."""
        reason = f"enrichment plugin {name} failed: {type(exc).__name__}: {exc}"
        self.errors[name] = self.errors.get(name, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(name)
        if last is not None and now - last < LOG_EVERY_S:
            self._unlogged[name] = self._unlogged.get(name, 0) + 1
            return reason
        more = self._unlogged.pop(name, 0)
        self._logged_at[name] = now
        outcome = ("the batch goes to the dead letters, stage plugin (plugins.on_error: "
                   "dead_letter)" if self.on_error == "dead_letter" else
                   f"its records are indexed without its fields, tagged {FAILED_TAG}")
        # The reason as text, not the exception: a handler that keeps records would
        # otherwise keep its traceback's frames (and the compiled batch in them).
        log.error("enrichment plugin %s failed on a batch (%s: %s); %s%s", name,
                  type(exc).__name__, str(exc), outcome,
                  f" ({more} more failed batches since the last line)" if more else "")
        return reason

    def close(self) -> None:
        for p in self.plugins:
            p.close()
