"""GeoIP against .mmdb files written by tests/mmdb_fixtures.py (every field checked)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mmdb_fixtures as fx  # noqa: E402

from pipeline.enrich import geoip  # noqa: E402
from pipeline.enrich.geoip import GeoIP, GeoIPConfig, GeoIPReloadError  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mmdb")
    return {
        "city": fx.write_city(d / "city.mmdb"),
        "country": fx.write_country(d / "country.mmdb"),
        "country4": fx.write_country(d / "country4.mmdb", ipv4_only=True),
        "asn": fx.write_asn(d / "asn.mmdb"),
        "flat_city": fx.write_flat_city(d / "flat-city.mmdb"),
        "flat_country": fx.write_flat_country(d / "flat-country.mmdb"),
        "flat_asn": fx.write_asn(d / "flat-asn.mmdb", database_type="ip-location-db-asn"),
    }


def source_of(g: GeoIP, ip: str) -> dict:
    doc: dict = {}
    geoip.apply(doc, g.lookup(ip))
    return doc


@pytest.mark.parametrize("ip", sorted(fx.PLACES))
def test_geoip2_city_and_asn_every_field(dbs: dict[str, Path], ip: str) -> None:
    g = GeoIP.open(city=dbs["city"], asn=dbs["asn"], check_interval_s=3600)
    assert source_of(g, ip) == {"source": fx.expected(ip)}


@pytest.mark.parametrize("ip", sorted(fx.PLACES))
def test_country_only(dbs: dict[str, Path], ip: str) -> None:
    g = GeoIP.open(country=dbs["country"])
    exp = fx.expected(ip)["geo"]
    assert source_of(g, ip) == {
        "source": {
            "geo": {
                k: exp[k]
                for k in ("country_iso_code", "country_name", "continent_code", "continent_name")
            }
        }
    }


def test_ipv6_probe_against_ipv4_only_database_is_a_miss(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(country=dbs["country4"])
    assert g.lookup("2a02:cf40::1")[geoip.TAG] == geoip.TAG_MISS
    assert g.lookup("81.2.69.160")[geoip.COUNTRY_ISO] == "GB"


@pytest.mark.parametrize("ip", sorted(fx.PLACES))
def test_flat_layout(dbs: dict[str, Path], ip: str) -> None:
    g = GeoIP.open(city=dbs["flat_city"], asn=dbs["flat_asn"])
    exp = fx.expected(ip)
    geo = exp["geo"]
    assert source_of(g, ip) == {
        "source": {
            "geo": {
                "country_iso_code": geo["country_iso_code"],
                "region_name": geo["region_name"],
                "city_name": geo["city_name"],
                "postal_code": geo["postal_code"],
                "timezone": geo["timezone"],
                "location": geo["location"],
            },
            "as": exp["as"],
        }
    }


def test_flat_country(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(country=dbs["flat_country"])
    assert source_of(g, "2001:480:10::1") == {"source": {"geo": {"country_iso_code": "US"}}}


def test_city_wins_country_fills_gaps(dbs: dict[str, Path]) -> None:
    # Flat city has no country/continent names; the GeoIP2 country DB supplies them.
    g = GeoIP.open(city=dbs["flat_city"], country=dbs["country"])
    geo = source_of(g, "81.2.69.160")["source"]["geo"]
    assert geo["city_name"] == "London"
    assert geo["country_name"] == "United Kingdom"
    assert geo["continent_name"] == "Europe"


def test_locale(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(city=dbs["city"], locale="de")
    r = g.lookup("81.2.69.160")
    assert r[geoip.CITY_NAME] == "London (de)"
    assert r[geoip.CONTINENT_NAME] == "Europe"  # no "de" name: falls back to "en"


@pytest.mark.parametrize(
    "ip",
    [
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.5",
        "127.0.0.1",
        "100.64.0.1",
        "100.127.255.254",
        "169.254.1.1",
        "0.0.0.0",
        "240.0.0.1",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00::1",
        "::",
        "::ffff:10.0.0.1",
    ],
)
def test_private_and_reserved_are_tagged_not_looked_up(dbs: dict[str, Path], ip: str) -> None:
    g = GeoIP.open(city=dbs["city"])
    r = g.lookup(ip)
    assert r[geoip.TAG] == geoip.TAG_PRIVATE
    assert all(v is None for v in r[: geoip.TAG])
    assert source_of(g, ip) == {"tags": [geoip.TAG_PRIVATE]}


def test_miss_and_invalid(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(city=dbs["city"], asn=dbs["asn"])
    assert source_of(g, "1.1.1.1") == {"tags": [geoip.TAG_MISS]}
    assert source_of(g, "2600::1") == {"tags": [geoip.TAG_MISS]}
    assert source_of(g, "not-an-ip") == {"tags": [geoip.TAG_INVALID]}
    doc: dict = {"tags": ["x"]}
    geoip.apply(doc, g.lookup("1.1.1.1"))
    geoip.apply(doc, g.lookup("1.1.1.1"))
    assert doc == {"tags": ["x", geoip.TAG_MISS]}
    geoip.apply(doc, None)
    assert doc == {"tags": ["x", geoip.TAG_MISS]}


def test_no_databases_is_all_miss() -> None:
    g = GeoIP.open()
    assert g.lookup("8.8.8.8")[geoip.TAG] == geoip.TAG_MISS


def test_ipv4_mapped_ipv6_uses_the_ipv4_record(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(city=dbs["city"])
    assert g.lookup("::ffff:81.2.69.160")[geoip.CITY_NAME] == "London"


def test_cache_counts_and_bounds(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(city=dbs["city"], cache_size=2, check_interval_s=3600)
    for ip in ["81.2.69.160", "81.2.69.160", "2a02:cf40::1", "81.2.69.160", "1.1.1.1"]:
        g.lookup(ip)
    s = g.stats()
    assert (s["cache_hits"], s["cache_misses"], s["cache_size"]) == (2, 3, 2)
    assert g.hits == 2 and g.misses == 3


def test_cached_results_are_plain_untracked_tuples(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(city=dbs["city"], asn=dbs["asn"])
    r = g.lookup("81.2.69.160")
    assert type(r) is tuple and len(r) == geoip.TAG + 1
    gc.collect()
    assert not gc.is_tracked(r)  # the GC never walks the cache contents


def test_cache_disabled(dbs: dict[str, Path]) -> None:
    g = GeoIP.open(city=dbs["city"], cache_size=0)
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London"
    assert g.stats()["cache_hits"] == 0


def test_from_config(dbs: dict[str, Path]) -> None:
    g = GeoIP.from_config(GeoIPConfig(city=str(dbs["city"]), cache_size=10))
    assert g.lookup("2001:480:10::1")[geoip.CITY_NAME] == "San Diego"


def test_open_refuses_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(GeoIPReloadError):
        GeoIP.open(city=tmp_path / "absent.mmdb")
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(GeoIPReloadError):
        GeoIP.open(city=bad)


# -- hot reload ---------------------------------------------------------------------------


def _replace_atomically(src_writer, dst: Path, **kw) -> None:  # type: ignore[no-untyped-def]
    tmp = dst.with_suffix(".tmp")
    src_writer(tmp, **kw)
    os.replace(tmp, dst)


def test_hot_reload_new_data_after_atomic_replace(tmp_path: Path) -> None:
    path = fx.write_city(tmp_path / "city.mmdb", city_suffix=" v1")
    g = GeoIP.open(city=path, check_interval_s=0)
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v1"
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v1"  # cached
    _replace_atomically(fx.write_city, path, city_suffix=" v2")
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v2"
    assert g.lookup("2a02:cf40::1")[geoip.CITY_NAME] == "Oslo v2"
    assert g.stats()["reloads"] == 1


def test_hot_reload_waits_for_the_check_interval(tmp_path: Path) -> None:
    path = fx.write_city(tmp_path / "city.mmdb", city_suffix=" v1")
    g = GeoIP.open(city=path, check_interval_s=3600)
    g.lookup("81.2.69.160")
    _replace_atomically(fx.write_city, path, city_suffix=" v2")
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v1"
    assert g.check_reload() is True  # what the interval timer would do
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v2"


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "scrambled_tree"])
def test_corrupt_replacement_is_refused_and_old_data_served(
    tmp_path: Path, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = fx.write_city(tmp_path / "city.mmdb", city_suffix=" v1")
    good = path.read_bytes()
    g = GeoIP.open(city=path, check_interval_s=0)
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v1"
    if corruption == "garbage":
        data = os.urandom(len(good))
    elif corruption == "truncated":
        data = good[: len(good) // 2]
    elif corruption == "empty":
        data = b""
    else:  # keep the metadata section, zero the search tree
        data = b"\xff" * (len(good) // 2) + good[len(good) // 2 :]
    tmp = tmp_path / "new.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    with caplog.at_level(logging.ERROR, logger="pipeline.enrich.geoip"):
        for _ in range(5):
            assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v1"
            assert g.lookup("2a02:cf40::1")[geoip.CITY_NAME] == "Oslo v1"
    s = g.stats()
    assert s["reload_failures"] == 1, "the same bad file must not be retried on every lookup"
    assert s["reloads"] == 0
    assert any("reload refused" in r.message for r in caplog.records)
    # A later good replacement is picked up.
    _replace_atomically(fx.write_city, path, city_suffix=" v3")
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London v3"


def test_deleted_file_keeps_serving(tmp_path: Path) -> None:
    path = fx.write_city(tmp_path / "city.mmdb")
    g = GeoIP.open(city=path, check_interval_s=0)
    path.unlink()
    assert g.lookup("81.2.69.160")[geoip.CITY_NAME] == "London"
    assert g.stats()["reload_failures"] == 0


def test_reload_under_concurrent_lookups(tmp_path: Path) -> None:
    """A thread keeps looking up while the file is swapped: no error, no pause, new data."""
    import threading

    path = fx.write_city(tmp_path / "city.mmdb", city_suffix=" v1")
    g = GeoIP.open(city=path, check_interval_s=0, cache_size=100)
    seen: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.add(g.lookup("81.2.69.160")[geoip.CITY_NAME])
                g.lookup("2a02:cf40::1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(2, 6):
            _replace_atomically(fx.write_city, path, city_suffix=f" v{v}")
    finally:
        # give the reader a moment on the final version
        deadline = time.monotonic() + 5
        while "London v5" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        t.join()
    assert not errors
    assert "London v5" in seen
    assert seen <= {f"London v{v}" for v in range(1, 6)}
