"""Write small .mmdb files with mmdb-writer so GeoIP tests know every expected field.

Each builder returns the path it wrote. `EXPECTED` maps a probe IP to the fields the
GeoIP2-layout City database must produce for it, so tests compare against one table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmdb_writer import MmdbF64, MmdbU32, MMDBWriter
from netaddr import IPSet


def _city_record(
    iso: str,
    country: str,
    cont_code: str,
    cont_name: str,
    region_iso: str,
    region: str,
    city: str,
    postal: str,
    tz: str,
    lat: float,
    lon: float,
) -> dict[str, Any]:
    return {
        "city": {"geoname_id": MmdbU32(1), "names": {"en": city, "de": city + " (de)"}},
        "continent": {"code": cont_code, "names": {"en": cont_name}},
        "country": {"iso_code": iso, "names": {"en": country, "de": country + " (de)"}},
        "location": {"latitude": MmdbF64(lat), "longitude": MmdbF64(lon), "time_zone": tz},
        "postal": {"code": postal},
        "subdivisions": [{"iso_code": region_iso, "names": {"en": region}}],
    }


# probe ip -> (network, city-record args, asn, asn org)
PLACES: dict[str, tuple[str, tuple[Any, ...], int, str]] = {
    "81.2.69.160": (
        "81.2.69.0/24",
        (
            "GB",
            "United Kingdom",
            "EU",
            "Europe",
            "ENG",
            "England",
            "London",
            "EC1A",
            "Europe/London",
            51.5142,
            -0.0931,
        ),
        20712,
        "Andrews & Arnold Ltd",
    ),
    "175.16.199.10": (
        "175.16.199.0/24",
        (
            "CN",
            "China",
            "AS",
            "Asia",
            "JL",
            "Jilin Sheng",
            "Changchun",
            "130000",
            "Asia/Harbin",
            43.88,
            125.3228,
        ),
        4837,
        "China Unicom",
    ),
    "2a02:cf40::1": (
        "2a02:cf40::/29",
        (
            "NO",
            "Norway",
            "EU",
            "Europe",
            "03",
            "Oslo",
            "Oslo",
            "0150",
            "Europe/Oslo",
            59.9127,
            10.7461,
        ),
        29695,
        "Lyse Tele AS",
    ),
    "2001:480:10::1": (
        "2001:480::/32",
        (
            "US",
            "United States",
            "NA",
            "North America",
            "CA",
            "California",
            "San Diego",
            "92101",
            "America/Los_Angeles",
            32.7157,
            -117.1611,
        ),
        3,
        "MIT",
    ),
}


def expected(ip: str) -> dict[str, Any]:
    """ECS `source` sub-dict the City+ASN databases must yield for PLACES[ip]."""
    _, a, asn, org = PLACES[ip]
    return {
        "geo": {
            "country_iso_code": a[0],
            "country_name": a[1],
            "continent_code": a[2],
            "continent_name": a[3],
            "region_iso_code": a[4],
            "region_name": a[5],
            "city_name": a[6],
            "postal_code": a[7],
            "timezone": a[8],
            "location": {"lat": a[9], "lon": a[10]},
        },
        "as": {"number": asn, "organization": {"name": org}},
    }


def _writer(database_type: str, ip_version: int = 6) -> MMDBWriter:
    return MMDBWriter(
        ip_version=ip_version,
        ipv4_compatible=ip_version == 6,
        database_type=database_type,
        languages=["en", "de"],
        description="envoygeo test database",
    )


def _save(w: MMDBWriter, path: str | os.PathLike[str]) -> Path:
    w.to_db_file(os.fspath(path))
    return Path(path)


def write_city(path: str | os.PathLike[str], *, city_suffix: str = "") -> Path:
    """GeoIP2-City layout. `city_suffix` lets reload tests tell two versions apart."""
    w = _writer("GeoIP2-City")
    for _label, (net, a, _asn, _org) in PLACES.items():
        args = list(a)
        args[6] = args[6] + city_suffix
        w.insert_network(IPSet([net]), _city_record(*args))
    return _save(w, path)


def write_country(path: str | os.PathLike[str], *, ipv4_only: bool = False) -> Path:
    """`ipv4_only` writes an IPv4-only tree, which must answer IPv6 probes with a miss."""
    w = _writer("GeoLite2-Country", 4 if ipv4_only else 6)
    for _label, (net, a, _asn, _org) in PLACES.items():
        if ipv4_only and ":" in net:
            continue
        w.insert_network(
            IPSet([net]),
            {
                "continent": {"code": a[2], "names": {"en": a[3]}},
                "country": {"iso_code": a[0], "names": {"en": a[1]}},
            },
        )
    return _save(w, path)


def write_asn(path: str | os.PathLike[str], *, database_type: str = "GeoLite2-ASN") -> Path:
    w = _writer(database_type)
    for _label, (net, _a, asn, org) in PLACES.items():
        w.insert_network(
            IPSet([net]),
            {"autonomous_system_number": MmdbU32(asn), "autonomous_system_organization": org},
        )
    return _save(w, path)


def write_flat_city(path: str | os.PathLike[str]) -> Path:
    """sapics/ip-location-db `*-city-mmdb` layout (flat keys, no names for country)."""
    w = _writer("ip-location-db-dbip-city")
    for _label, (net, a, _asn, _org) in PLACES.items():
        w.insert_network(
            IPSet([net]),
            {
                "city": a[6],
                "country_code": a[0],
                "latitude": MmdbF64(a[9]),
                "longitude": MmdbF64(a[10]),
                "postcode": a[7],
                "state1": a[5],
                "state2": "",
                "timezone": a[8],
            },
        )
    return _save(w, path)


def write_flat_country(path: str | os.PathLike[str]) -> Path:
    w = _writer("ip-location-db-geo-whois-asn-country")
    for _label, (net, a, _asn, _org) in PLACES.items():
        w.insert_network(IPSet([net]), {"country_code": a[0]})
    return _save(w, path)
