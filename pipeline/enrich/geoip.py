"""GeoIP enrichment on the maxminddb C extension, with a flat-tuple LRU cache and hot reload.

Why raw `maxminddb` instead of `geoip2` models: `geoip2.database.Reader.city()` builds a
tree of model objects per lookup (several microseconds) and those objects are GC-tracked,
so caching them makes every collection walk the whole cache. We decode the raw dict once
per distinct IP into a *plain* tuple of str/float/int/None, which CPython untracks from the
GC, and cache that in `functools.lru_cache` (the C implementation, the cheapest bounded LRU
available).

Result layout (`GeoResult`, a plain tuple; use the index constants below):

    0 COUNTRY_ISO   1 COUNTRY_NAME  2 CONTINENT_CODE  3 CONTINENT_NAME
    4 REGION_ISO    5 REGION_NAME   6 CITY_NAME       7 POSTAL_CODE
    8 TIMEZONE      9 LAT           10 LON            11 AS_NUMBER
    12 AS_ORG       13 TAG

TAG is None when some database answered, otherwise one of `TAG_PRIVATE` (private,
loopback, link-local, CGNAT, reserved, multicast, unspecified: no lookup is made),
`TAG_MISS` (no database knows the address) or `TAG_INVALID` (not an IP address).

Database layouts, detected per record by shape (one dict probe) so a database whose
`database_type` we do not recognise still works:
  * GeoIP2 (MaxMind GeoIP2/GeoLite2, DB-IP Lite): nested `country.iso_code`,
    `country.names.<lang>`, `subdivisions[0]`, `location.latitude`, ...
  * flat (sapics/ip-location-db): `country_code`, `city`, `state1`, `postcode`,
    `latitude`, `longitude`, `timezone`.
  * ASN (both families use the same keys): `autonomous_system_number`,
    `autonomous_system_organization`.

Hot reload: geoipupdate writes a new file and renames it over the old one. Every
`check_interval_s` (monotonic clock, checked in the lookup path, so no thread is needed)
each database path is stat()ed; when (st_ino, st_mtime_ns, st_size) changed the new file
is opened and validated (metadata + a test lookup) *before* the reader reference is
swapped, then the cache is cleared. A replacement that fails validation is logged,
counted, and remembered by its stat signature so it is not re-opened on every check; the
old reader keeps serving. Old readers are not closed explicitly: the last reference
dropping unmaps them, which stays safe if another thread is mid-lookup.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import maxminddb
import orjson
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

COUNTRY_ISO = 0
COUNTRY_NAME = 1
CONTINENT_CODE = 2
CONTINENT_NAME = 3
REGION_ISO = 4
REGION_NAME = 5
CITY_NAME = 6
POSTAL_CODE = 7
TIMEZONE = 8
LAT = 9
LON = 10
AS_NUMBER = 11
AS_ORG = 12
TAG = 13

TAG_PRIVATE = "geoip_private"
TAG_MISS = "geoip_miss"
TAG_INVALID = "geoip_invalid_ip"

# A plain tuple on purpose (see module docstring): tuple[str|float|int|None, ...] of length 14.
GeoResult = tuple[Any, ...]

_EMPTY: list[Any] = [None] * 14

# ECS names for positions 0..8 under source.geo (LAT/LON become source.geo.location).
_GEO_FIELDS: tuple[tuple[int, str], ...] = (
    (COUNTRY_ISO, "country_iso_code"),
    (COUNTRY_NAME, "country_name"),
    (CONTINENT_CODE, "continent_code"),
    (CONTINENT_NAME, "continent_name"),
    (REGION_ISO, "region_iso_code"),
    (REGION_NAME, "region_name"),
    (CITY_NAME, "city_name"),
    (POSTAL_CODE, "postal_code"),
    (TIMEZONE, "timezone"),
)

_GEO_NAMES = tuple(name for _, name in _GEO_FIELDS)
_geo_values = itemgetter(*(idx for idx, _ in _GEO_FIELDS))

# Non-global ranges, as sorted (starts, ends) integer arrays so that classifying an address
# costs one inet_pton and one bisect instead of ipaddress's dozen network containment
# tests (which took longer than the database lookup itself). IPv6 outside 2000::/3 is
# never global unicast; ::ffff:0:0/96 is handled first (looked up as IPv4).
_V4_NON_GLOBAL = (
    "0.0.0.0/8 10.0.0.0/8 100.64.0.0/10 127.0.0.0/8 169.254.0.0/16 172.16.0.0/12 "
    "192.0.0.0/24 192.0.2.0/24 192.88.99.0/24 192.168.0.0/16 198.18.0.0/15 "
    "198.51.100.0/24 203.0.113.0/24 224.0.0.0/4 240.0.0.0/4"
)
_V6_NON_GLOBAL = "::/3 2001::/23 2001:db8::/32 4000::/2 8000::/1"


def _ranges(cidrs: str) -> tuple[list[int], list[int]]:
    nets = sorted(ipaddress.ip_network(c) for c in cidrs.split())
    starts: list[int] = []
    ends: list[int] = []
    for n in nets:
        lo, hi = int(n.network_address), int(n.broadcast_address)
        if ends and lo <= ends[-1] + 1:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return starts, ends


_V4_STARTS, _V4_ENDS = _ranges(_V4_NON_GLOBAL)
_V6_STARTS, _V6_ENDS = _ranges(_V6_NON_GLOBAL)
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_from_bytes = int.from_bytes
_pton = socket.inet_pton
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6


def classify(ip: str) -> tuple[str | None, str | None]:
    """(tag, address to look up): tag is TAG_PRIVATE/TAG_INVALID or None for a public IP.

    IPv4-mapped IPv6 comes back as its IPv4 text so IPv4-only databases answer it.
    """
    try:
        packed = _pton(_AF_INET, ip)
        starts, ends = _V4_STARTS, _V4_ENDS
    except OSError:
        try:
            packed = _pton(_AF_INET6, ip)
        except (OSError, ValueError):
            return TAG_INVALID, None
        if packed[:12] == _MAPPED_PREFIX:
            packed = packed[12:]
            ip = socket.inet_ntop(_AF_INET, packed)
            starts, ends = _V4_STARTS, _V4_ENDS
        else:
            starts, ends = _V6_STARTS, _V6_ENDS
    except ValueError:  # embedded NUL and similar
        return TAG_INVALID, None
    x = _from_bytes(packed, "big")
    i = bisect_right(starts, x) - 1
    if i >= 0 and x <= ends[i]:
        return TAG_PRIVATE, None
    return None, ip


class GeoIPConfig(BaseModel):
    """Paths are optional each; with none configured every lookup is a TAG_MISS."""

    model_config = {"frozen": True}

    city: str | None = None
    country: str | None = None
    asn: str | None = None
    cache_size: int = Field(default=100_000, ge=0)
    check_interval_s: float = Field(default=5.0, ge=0)
    locale: str = "en"


class GeoIPReloadError(Exception):
    """A database file could not be opened or failed validation."""


Signature = tuple[int, int, int]


def _signature(path: str) -> Signature:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _open_validated(path: str) -> maxminddb.Reader:
    """Open fully and prove the file answers queries before anyone swaps to it."""
    try:
        reader = maxminddb.open_database(path, maxminddb.MODE_MMAP_EXT)
        meta = reader.metadata()
        if meta.node_count <= 0 or meta.ip_version not in (4, 6):
            raise GeoIPReloadError(f"{path}: implausible metadata")
        # Walks the search tree and decodes a record if present: catches a truncated
        # or scrambled tree/data section that a metadata read alone would not.
        reader.get("1.1.1.1")
        reader.get("8.8.8.8")
        if meta.ip_version == 6:
            reader.get("2001:4860:4860::8888")
    except GeoIPReloadError:
        raise
    except Exception as exc:  # InvalidDatabaseError, OSError, ValueError, ...
        raise GeoIPReloadError(f"{path}: {type(exc).__name__}: {exc}") from exc
    return reader


@dataclass
class _Database:
    """One database file plus what hot reload needs to know about it."""

    role: str
    path: str
    reader: maxminddb.Reader
    signature: Signature
    database_type: str
    rejected: Signature | None = None
    reloads: int = 0
    reload_failures: int = 0

    @classmethod
    def open(cls, role: str, path: str) -> _Database:
        sig = _signature(path)
        reader = _open_validated(path)
        return cls(role, path, reader, sig, reader.metadata().database_type)

    def maybe_reload(self) -> bool:
        """True when a new reader was swapped in."""
        try:
            sig = _signature(self.path)
        except OSError:
            # Mid-rename or deleted: keep serving what we have.
            return False
        if sig == self.signature or sig == self.rejected:
            return False
        try:
            reader = _open_validated(self.path)
        except GeoIPReloadError as exc:
            self.rejected = sig
            self.reload_failures += 1
            log.error("geoip %s reload refused, keeping the old database: %s", self.role, exc)
            return False
        self.reader = reader
        self.signature = sig
        self.database_type = reader.metadata().database_type
        self.rejected = None
        self.reloads += 1
        log.info("geoip %s reloaded from %s (%s)", self.role, self.path, self.database_type)
        return True


def _name(names: Any, locale: str) -> str | None:
    if not names:
        return None
    return names.get(locale) or names.get("en")


def _fill_location(out: list[Any], rec: dict[str, Any], locale: str) -> None:
    """Write city/country fields of one record (either layout) into `out` where unset."""
    if "country_code" in rec or "latitude" in rec:  # flat ip-location-db layout
        if out[COUNTRY_ISO] is None:
            out[COUNTRY_ISO] = rec.get("country_code")
        if out[CITY_NAME] is None:
            out[CITY_NAME] = rec.get("city")
        if out[REGION_NAME] is None:
            out[REGION_NAME] = rec.get("state1")
        if out[POSTAL_CODE] is None:
            out[POSTAL_CODE] = rec.get("postcode")
        if out[TIMEZONE] is None:
            out[TIMEZONE] = rec.get("timezone")
        if out[LAT] is None and rec.get("latitude") is not None:
            out[LAT] = float(rec["latitude"])
            out[LON] = float(rec["longitude"])
        return
    country = rec.get("country") or rec.get("registered_country")
    if country:
        if out[COUNTRY_ISO] is None:
            out[COUNTRY_ISO] = country.get("iso_code")
        if out[COUNTRY_NAME] is None:
            out[COUNTRY_NAME] = _name(country.get("names"), locale)
    continent = rec.get("continent")
    if continent and out[CONTINENT_CODE] is None:
        out[CONTINENT_CODE] = continent.get("code")
        out[CONTINENT_NAME] = _name(continent.get("names"), locale)
    subs = rec.get("subdivisions")
    if subs and out[REGION_NAME] is None:
        out[REGION_ISO] = subs[0].get("iso_code")
        out[REGION_NAME] = _name(subs[0].get("names"), locale)
    city = rec.get("city")
    if city and out[CITY_NAME] is None:
        out[CITY_NAME] = _name(city.get("names"), locale)
    postal = rec.get("postal")
    if postal and out[POSTAL_CODE] is None:
        out[POSTAL_CODE] = postal.get("code")
    loc = rec.get("location")
    if loc:
        if out[TIMEZONE] is None:
            out[TIMEZONE] = loc.get("time_zone")
        if out[LAT] is None and loc.get("latitude") is not None:
            out[LAT] = float(loc["latitude"])
            out[LON] = float(loc["longitude"])


@dataclass
class GeoIP:
    """City/Country/ASN lookups with a bounded cache and hot reload (see module doc)."""

    city: _Database | None
    country: _Database | None
    asn: _Database | None
    cache_size: int = 100_000
    check_interval_s: float = 5.0
    locale: str = "en"
    _next_check: float = field(default=0.0, repr=False)
    _cached: Callable[[str], GeoResult] = field(init=False, repr=False)
    # Bumped whenever cached answers become stale (a database was swapped), so caches
    # outside this object (the native fast path's) know to drop theirs.
    generation: int = field(default=0, repr=False)
    # Hits answered by such an outside cache, and misses it looked up itself (the
    # native path reads the same files), reported with this one's.
    external_hits: int = field(default=0, repr=False)
    external_misses: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self._next_check = time.monotonic() + self.check_interval_s
        if self.cache_size > 0:
            self._cached = functools.lru_cache(maxsize=self.cache_size)(self._resolve)
        else:
            self._cached = self._resolve

    @classmethod
    def open(
        cls,
        city: str | os.PathLike[str] | None = None,
        country: str | os.PathLike[str] | None = None,
        asn: str | os.PathLike[str] | None = None,
        *,
        cache_size: int = 100_000,
        check_interval_s: float = 5.0,
        locale: str = "en",
    ) -> GeoIP:
        """Raise GeoIPReloadError when a configured file is missing or invalid at start."""

        def _open(role: str, path: str | os.PathLike[str] | None) -> _Database | None:
            if path is None:
                return None
            try:
                return _Database.open(role, os.fspath(path))
            except OSError as exc:
                raise GeoIPReloadError(f"{path}: {exc}") from exc

        return cls(
            _open("city", city),
            _open("country", country),
            _open("asn", asn),
            cache_size=cache_size,
            check_interval_s=check_interval_s,
            locale=locale,
        )

    @classmethod
    def from_config(cls, cfg: GeoIPConfig) -> GeoIP:
        return cls.open(
            cfg.city,
            cfg.country,
            cfg.asn,
            cache_size=cfg.cache_size,
            check_interval_s=cfg.check_interval_s,
            locale=cfg.locale,
        )

    @property
    def databases(self) -> list[_Database]:
        return [d for d in (self.city, self.country, self.asn) if d is not None]

    def lookup(self, ip: str) -> GeoResult:
        """Hot path: one monotonic() read, then the C LRU cache on the IP string."""
        if time.monotonic() >= self._next_check:
            self.check_reload()
        return self._cached(ip)

    def batch_lookup(self) -> Callable[[str], GeoResult]:
        """`lookup` for the records of one batch: the reload check once, here, then the
        bare C cache per record (saves a Python call and a clock read per record)."""
        if time.monotonic() >= self._next_check:
            self.check_reload()
        return self._cached

    def check_reload(self) -> bool:
        """Stat every database now; swap in replacements. True when something changed."""
        self._next_check = time.monotonic() + self.check_interval_s
        changed = False
        for db in self.databases:
            changed |= db.maybe_reload()
        if changed:
            self.clear_cache()
        return changed

    def clear_cache(self) -> None:
        self.generation += 1
        clear = getattr(self._cached, "cache_clear", None)
        if clear is not None:
            clear()

    def _resolve(self, ip: str) -> GeoResult:
        """Cache miss path: classify, query each database, flatten."""
        tag, addr = classify(ip)
        out = list(_EMPTY)
        if addr is None:
            out[TAG] = tag
            return tuple(out)
        found = False
        for db in (self.city, self.country):
            if db is None:
                continue
            rec = _get(db.reader, addr)
            if rec:
                found = True
                _fill_location(out, rec, self.locale)
        if self.asn is not None:
            rec = _get(self.asn.reader, addr)
            if rec:
                found = True
                out[AS_NUMBER] = rec.get("autonomous_system_number")
                out[AS_ORG] = rec.get("autonomous_system_organization")
        if not found:
            out[TAG] = TAG_MISS
        return tuple(out)

    def stats(self) -> dict[str, Any]:
        info = getattr(self._cached, "cache_info", None)
        ci = info() if info is not None else None
        return {
            "cache_hits": (ci.hits if ci else 0) + self.external_hits,
            "cache_misses": (ci.misses if ci else 0) + self.external_misses,
            "cache_size": ci.currsize if ci else 0,
            "reloads": sum(d.reloads for d in self.databases),
            "reload_failures": sum(d.reload_failures for d in self.databases),
            "databases": {d.role: d.database_type for d in self.databases},
        }

    @property
    def hits(self) -> int:
        return int(self.stats()["cache_hits"])

    @property
    def misses(self) -> int:
        return int(self.stats()["cache_misses"])


def _get(reader: maxminddb.Reader, addr: str) -> dict[str, Any] | None:
    try:
        rec = reader.get(addr)
    except ValueError:
        # IPv6 address against an IPv4-only database.
        return None
    return rec if isinstance(rec, dict) else None


def apply(doc: dict[str, Any], result: GeoResult | None) -> None:
    """Write ECS `source.geo.*` / `source.as.*` and a miss/private tag into `doc`.

    Only non-None fields are written so documents stay sparse; tags go to `tags` (ECS).
    """
    if result is None:
        return
    tag = result[TAG]
    if tag is not None:
        tags = doc.get("tags")
        if tags is None:
            doc["tags"] = [tag]
        elif tag not in tags:
            tags.append(tag)
        return
    source = doc.get("source")
    if source is None:
        source = doc["source"] = {}
    # Once per record: one comprehension, and the new dict is stored as is unless the
    # document already has a `source.geo` to merge into.
    geo = {name: v for name, v in zip(_GEO_NAMES, _geo_values(result), strict=True)
           if v is not None}
    if result[LAT] is not None:
        geo["location"] = {"lat": result[LAT], "lon": result[LON]}
    if geo:
        existing = source.get("geo")
        if existing is None:
            source["geo"] = geo
        else:
            existing.update(geo)
    if result[AS_NUMBER] is not None or result[AS_ORG] is not None:
        asn: dict[str, Any] = {}
        if result[AS_NUMBER] is not None:
            asn["number"] = result[AS_NUMBER]
        if result[AS_ORG] is not None:
            asn["organization"] = {"name": result[AS_ORG]}
        source["as"] = asn


def native_spec(geo: GeoIP) -> tuple[list[tuple[str, str, Signature]], str, Any, Any]:
    """What the native core needs to read the same databases: each file as validated
    (role, path, signature), the locale, and the non-global ranges of `classify`."""
    dbs = [(d.role, d.path, d.signature) for d in geo.databases]
    return dbs, geo.locale, (_V4_STARTS, _V4_ENDS), (_V6_STARTS, _V6_ENDS)


def source_fragment(result: GeoResult | None) -> tuple[str | None, bytes | None]:
    """What `apply` would do, for the native document writer: (tag, or the serialised
    members `"geo":{...},"as":{...}` to append inside `source`)."""
    if result is None:
        return None, None
    if result[TAG] is not None:
        return result[TAG], None
    fields = geo_fields(result)
    return None, (orjson.dumps(fields)[1:-1] if fields else None)


def geo_fields(result: GeoResult | None) -> dict[str, Any]:
    """The `source`-shaped sub-dict (`{"geo": ..., "as": ...}`) for alerts and tests."""
    doc: dict[str, Any] = {}
    apply(doc, result)
    return doc.get("source", {})
