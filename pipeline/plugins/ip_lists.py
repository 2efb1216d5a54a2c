"""Bundled plugin `ip_lists`: which of your CIDR lists hold each client.

    plugins:
      enabled: [ip_lists]
      ip_lists:
        lists:
          deny: [/etc/envoygeo/deny.txt]
          scanners: [/etc/envoygeo/scanners.txt]
          customers: [/etc/envoygeo/customers-a.txt, /etc/envoygeo/customers-b.txt]

adds `envoygeo.ip_lists: ["customers", "deny"]` (sorted names; absent when none holds the
client). The files are the format `envoygeo policy` reads (pipeline/iplists.py: one
address or CIDR a line, `#` comments; a bad line is an error naming file:line).

Hot reload as for the GeoIP databases: every `check_interval_s` each file is stat()ed;
a list whose files changed (inode, mtime, size: an atomic rename included) is read again
and swapped in whole. A new version that cannot be read or parsed is refused with one
log line and the old one kept, so a half-written file never empties a deny list.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field as PydanticField
from pydantic import field_validator

from pipeline.fields import Field
from pipeline.iplists import IpList
from pipeline.plugins import EnricherPlugin, PluginBatch, PluginConfig

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int], ...]
CACHE_MAX = 100_000  # client IPs remembered between reloads (cleared when full)


class IpListsConfig(PluginConfig):
    lists: dict[str, list[Path]] = PydanticField(
        description="List name -> CIDR list files (read in order, merged).")
    check_interval_s: float = PydanticField(
        5.0, ge=0, description="How often the files are checked for changes.")

    @field_validator("lists")
    @classmethod
    def _readable(cls, v: dict[str, list[Path]]) -> dict[str, list[Path]]:
        if not v:
            raise ValueError("name at least one list")
        for name, paths in v.items():
            if not paths:
                raise ValueError(f"{name}: no files")
            for p in paths:
                try:
                    IpList.load([p])  # a bad line names file:line; checked at start
                except OSError as exc:
                    raise ValueError(f"{name}: {p}: {exc.strerror or exc}") from None
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        return v


def _signature(paths: Sequence[Path]) -> Signature:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class IpListsPlugin(EnricherPlugin):
    name = "ip_lists"
    fields = (Field("envoygeo.ip_lists", "keyword",
                    "Names of the ip_lists plugin's CIDR lists that hold the client "
                    "(allow, deny, scanners, customers...).", array=True),)
    Config = IpListsConfig
    inputs = frozenset({"client_ip"})

    def __init__(self, config: IpListsConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self.paths = {name: list(paths) for name, paths in config.lists.items()}
        self.lists = {name: IpList.load(paths) for name, paths in self.paths.items()}
        self.signatures = {name: _signature(p) for name, p in self.paths.items()}
        self.rejected: dict[str, Signature] = {}
        self.reloads = 0
        self.reload_failures = 0
        self._interval = config.check_interval_s
        self._checked = time.monotonic()
        self._cache: dict[str, dict[str, Any] | None] = {}
        self._results: dict[tuple[str, ...], dict[str, Any]] = {}

    def maybe_reload(self) -> bool:
        """Re-read the lists whose files changed; True when one was swapped in."""
        swapped = False
        for name, paths in self.paths.items():
            try:
                sig = _signature(paths)
            except OSError:
                continue  # mid-rename or deleted: keep serving what we have
            if sig == self.signatures[name] or sig == self.rejected.get(name):
                continue
            try:
                new = IpList.load(paths)
            except (OSError, ValueError) as exc:
                self.rejected[name] = sig
                self.reload_failures += 1
                log.error("ip_lists %s reload refused, keeping the old list: %s", name, exc)
                continue
            self.lists[name], self.signatures[name] = new, sig
            self.rejected.pop(name, None)
            self.reloads += 1
            swapped = True
            log.info("ip_lists %s reloaded: %d networks from %s", name, len(new),
                     ", ".join(map(str, paths)))
        if swapped:
            self._cache.clear()
        return swapped

    def enrich(self, batch: PluginBatch) -> list[dict[str, Any] | None]:
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._checked = now
            self.maybe_reload()
        cache = self._cache
        if len(cache) > CACHE_MAX:
            cache.clear()
        out: list[dict[str, Any] | None] = []
        for ip in batch.client_ip:
            if ip is None:
                out.append(None)
                continue
            hit = cache.get(ip, False)
            if hit is False:
                hit = cache[ip] = self._lookup(ip)
            out.append(hit)  # type: ignore[arg-type]
        return out

    def _lookup(self, ip: str) -> dict[str, Any] | None:
        names = tuple(sorted(n for n, lst in self.lists.items() if lst.covering(ip) is not None))
        if not names:
            return None
        # One dict per distinct answer: the runner renders each once per batch.
        res = self._results.get(names)
        if res is None:
            res = self._results[names] = {"envoygeo.ip_lists": list(names)}
        return res
