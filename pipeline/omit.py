"""Fields left out of access-log documents (`document.profile`, `document.omit`).

Why this exists: Elasticsearch's CPU per document is roughly a fixed part plus about a
microsecond per field, whatever the mapping (issue 15's measurements, LEAN_CHOICES in
pipeline/schema.py), and the cluster is most of what this pipeline costs to run. A
field nobody reads is the one lever that moves that cost, so users choose which.

Both paths leave the same fields out the same way: the Python path deletes them from
the document dict before it is serialised (`apply`), the compiled core filters the
serialised bytes (native/src/omit.rs) with the same tree; objects left empty go too.
Plugin fields are spliced in after either, so they are never left out here.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pipeline.schema import CORE_FIELDS, LEAN_OMIT, READ_BY

Profile = Literal["full", "lean"]
PROFILES: tuple[str, ...] = get_args(Profile)
# A tree of what to leave out: key -> True (the whole value) or a subtree.
Tree = dict[str, Any]

_LEAVES = tuple(f.name for f in CORE_FIELDS)


def check(entry: str) -> str | None:
    """Why `entry` cannot be left out, or None when it can.

    An entry is a field of the table (`source.geo.timezone`) or an object holding some
    (`kubernetes`); it may not be, or hold, a field in READ_BY.
    """
    covered = [f for f in _LEAVES if f == entry or f.startswith(entry + ".")]
    if not covered:
        return "is not a field of envoygeo's documents (see schemas/document.schema.json)"
    for f in covered:
        if f in READ_BY:
            what = "is" if f == entry else f"holds {f}, which is"
            return f"{what} read by {READ_BY[f]}"
    return None


def refusal(entries: tuple[str, ...] | list[str]) -> str | None:
    """One line naming every entry that cannot be left out and why (`check`), or None;
    what `document.omit` and `envoygeo enrich --omit` say."""
    problems = [f"{entry!r}: it {why}" for entry in entries
                if (why := check(entry)) is not None]
    return "cannot leave out " + "; ".join(problems) if problems else None


def paths(profile: Profile, omit: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The fields to leave out, in the table's order: the profile's, then `omit`'s."""
    chosen = (*(LEAN_OMIT if profile == "lean" else ()), *omit)
    return tuple(dict.fromkeys(chosen))


def tree(entries: tuple[str, ...]) -> Tree:
    """`("a.b", "a.c.d")` -> `{"a": {"b": True, "c": {"d": True}}}`; a path under one
    already left out whole adds nothing."""
    root: Tree = {}
    for entry in entries:
        node = root
        *parents, last = entry.split(".") if entry != "@timestamp" else [entry]
        for part in parents:
            child = node.setdefault(part, {})
            if child is True:
                break
            node = child
        else:
            node[last] = True
    return root


def apply(doc: dict[str, Any], omit: Tree) -> None:
    """Leave `omit`'s fields out of `doc`, in place, and the objects that end up empty.

    Runs once per document on the Python path: a walk of the (small) tree, not of
    the document.
    """
    for key, sub in omit.items():
        value = doc.get(key)
        if value is None:
            continue
        if sub is True:
            del doc[key]
        elif isinstance(value, dict):
            apply(value, sub)
            if not value:
                del doc[key]
