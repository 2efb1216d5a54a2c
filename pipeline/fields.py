"""`Field`: one row of the output field table (`pipeline.schema`).

A module of its own so that enrichment plugins can declare their fields without
importing `pipeline.schema`, whose table is completed with theirs when it is imported.
"""

from __future__ import annotations

from typing import NamedTuple


class Field(NamedTuple):
    name: str  # dotted path; a trailing ".*" means "any key below, all of this type"
    es_type: str  # Elasticsearch mapping type
    doc: str
    array: bool = False  # ECS arrays (tags, related.ip, event.category)
    indexed: bool = True  # False: kept in _source only (event.original)
    # False: aggregated, sorted or displayed but never looked up by value in the
    # dashboards, the report, the alert rule or the documented queries: the lean
    # template keeps its doc_values and drops its inverted index / BKD tree (term and
    # range queries on it still work, by scanning doc values). See LEAN_CHOICES.
    search: bool = True
