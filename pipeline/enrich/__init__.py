"""Enrichment stages that need state: GeoIP lookups, per-IP rate counters, alerts.

Each submodule is usable alone; the document builder only sees flat tuples and
plain dicts so it never depends on a database library's object model.
"""
