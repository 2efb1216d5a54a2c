"""envoygeo: Envoy/Istio access logs -> true client IP, GeoIP, per-IP rates -> Elasticsearch.

The public Python API (README, "Python API and enrichment plugins") is what this module
exports; everything else in the package is internal and may change in any release.
Imported lazily, so `import pipeline` (and the `envoygeo` command) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Enricher", "EnricherPlugin", "Field", "PluginBatch", "PluginConfig",
           "Settings", "__version__", "load_settings"]

_EXPORTS = {
    "Enricher": "pipeline.enricher",
    "EnricherPlugin": "pipeline.plugins",
    "PluginBatch": "pipeline.plugins",
    "PluginConfig": "pipeline.plugins",
    "Field": "pipeline.fields",
    "Settings": "pipeline.config",
    "load_settings": "pipeline.config",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
