"""Bundled plugin `user_agent`: browser, OS and device from the User-Agent header.

Parsed by `ua-parser` (the maintained Python port of uap-core's regexes), which costs
about a millisecond for a new string: results are kept in an LRU cache by string
(`cache_size`), where real traffic (a few thousand distinct agents a day) nearly always
hits. Adds ECS `user_agent.name`, `user_agent.version`, `user_agent.os.name`,
`user_agent.os.version` and `user_agent.device.name`, each only when known (uap-core's
"Other" means unknown and is left out).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pydantic import Field as PydanticField

from pipeline.fields import Field
from pipeline.plugins import EnricherPlugin, PluginBatch, PluginConfig


class UserAgentConfig(PluginConfig):
    cache_size: int = PydanticField(10_000, ge=1, description="Distinct User-Agents kept.")


def _version(*parts: str | None) -> str | None:
    kept = []
    for p in parts:
        if p is None:
            break
        kept.append(p)
    return ".".join(kept) or None


def classify(ua: str) -> dict[str, Any] | None:
    """The fields for one User-Agent string (None when nothing is known)."""
    from ua_parser import parse  # imported on first use: ~50 ms of regex tables

    r = parse(ua)
    out: dict[str, Any] = {}
    if r.user_agent is not None and r.user_agent.family != "Other":
        out["user_agent.name"] = r.user_agent.family
        v = _version(r.user_agent.major, r.user_agent.minor, r.user_agent.patch)
        if v:
            out["user_agent.version"] = v
    if r.os is not None and r.os.family != "Other":
        out["user_agent.os.name"] = r.os.family
        v = _version(r.os.major, r.os.minor, r.os.patch)
        if v:
            out["user_agent.os.version"] = v
    if r.device is not None and r.device.family != "Other":
        out["user_agent.device.name"] = r.device.family
    return out or None


class UserAgentPlugin(EnricherPlugin):
    name = "user_agent"
    fields = (
        Field("user_agent.name", "keyword", "Browser or client (user_agent plugin)."),
        Field("user_agent.version", "keyword", "Its version (user_agent plugin).",
              search=False),
        Field("user_agent.os.name", "keyword", "Operating system (user_agent plugin)."),
        Field("user_agent.os.version", "keyword", "Its version (user_agent plugin).",
              search=False),
        Field("user_agent.device.name", "keyword", "Device (user_agent plugin)."),
    )
    Config = UserAgentConfig
    inputs = frozenset({"user_agent"})

    def __init__(self, config: UserAgentConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self._size = config.cache_size
        # The same dict for the same string: the runner renders it once per batch.
        self._cache: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self.hits = self.misses = 0

    def enrich(self, batch: PluginBatch) -> list[dict[str, Any] | None]:
        cache = self._cache
        out: list[dict[str, Any] | None] = []
        for ua in batch.user_agent:
            if ua is None:
                out.append(None)
                continue
            try:
                res = cache[ua]
                cache.move_to_end(ua)
                self.hits += 1
            except KeyError:
                res = cache[ua] = classify(ua)
                self.misses += 1
                if len(cache) > self._size:
                    cache.popitem(last=False)
            out.append(res)
        return out
