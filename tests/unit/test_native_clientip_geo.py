"""The compiled fast path against the Python reference under random client-IP
policies and X-Forwarded-For chains, and random GeoIP lookups.

Each example runs both paths (`run_both`) and states that the core wrote every
record, so the comparison is never Python against Python.
"""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mmdb_writer import MmdbF64, MmdbU32, MMDBWriter
from netaddr import IPSet

from pipeline.clientip import ClientIpPolicy
from pipeline.decode.envoy_format import compile_format
from pipeline.enrich.geoip import GeoIP
from tests.unit.test_native import _need_native, run_both  # noqa: F401 - autouse fixture
from tests.unit.test_samples_in_envelopes import WRAPPERS

pytestmark = pytest.mark.unit

# The client address first (a digit, `[` or `-` starts the line), the TCP peer, then XFF
# as the rest of the line, so a chain may hold any characters but a newline.
ADDRESSES = compile_format(
    "%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%|%START_TIME%|"
    "%RESPONSE_CODE%|%REQ(X-FORWARDED-FOR)%\n")

# Addresses in and around the CIDRs a policy may trust, besides random ones.
_NEAR = ["10.0.0.1", "10.255.1.2", "11.0.0.0", "9.255.255.255", "192.168.7.7", "172.16.0.1",
         "172.32.0.1", "2001:db8::5", "2001:db8:ffff::1", "2001:db9::", "fd12::3",
         "198.51.100.9", "203.0.113.7", "203.0.113.8", "::ffff:10.1.2.3",
         "::ffff:198.51.100.4", "127.0.0.1", "::1", "::", "0.0.0.0", "100.64.0.1",
         "169.254.1.1", "fe80::1", "224.0.0.1", "ff02::1", "8.8.8.8", "2a00:1450::1"]
_TRUSTED = ["10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12", "2001:db8::/32", "fd00::/8",
            "198.51.100.0/24", "203.0.113.7/32", "::ffff:10.0.0.0/104", "0.0.0.0/0", "::/0"]
_GARBAGE = ["-", "unknown", "1.2.3", "[::1", "1.2.3.4:x", "01.2.3.4", "[1.2.3.4]:80",
            "::ffff:1.2.3.4:80", "1.2.3.4:", "[2001:db8::1]x", "a:b:c", "1.2.3.4:99999",
            "[::1]:", "256.1.1.1", "2001:db8::1::2", "[]:80", "[2001:DB8::A]:443"]

_host = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                  st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"), st.sampled_from(_NEAR))


def _endpoint(host: str, port: int, form: int) -> str:
    """One way Envoy or a proxy writes an address: bare, with a port, bracketed."""
    v6 = ":" in host
    if form == 0:
        return host
    if form == 1:
        return f"[{host}]:{port}" if v6 else f"{host}:{port}"
    return f"[{host}]" if v6 or form == 2 else f"[{host}]:{port}"


_address = st.one_of(st.builds(_endpoint, _host, st.integers(0, 65535), st.integers(0, 3)),
                     st.sampled_from(_GARBAGE))
_xff = st.lists(st.one_of(_address, _host, st.just(""), _address.map(lambda a: f" {a} ")),
                max_size=6).flatmap(
    lambda parts: st.sampled_from([",", ", ", " ,"]).map(lambda sep: sep.join(parts)))


# Half the clients in ranges some policy trusts, so XFF chains get walked often.
_remote = st.one_of(_address, st.builds(_endpoint, st.sampled_from(
    ["10.0.0.1", "192.168.7.7", "2001:db8::5", "::ffff:10.1.2.3", "198.51.100.9",
     "203.0.113.7"]), st.integers(0, 65535), st.integers(0, 3)))


# Envoy's default format logs no address Envoy saw: only XFF (client_ip.
# envoy_use_remote_address reads Envoy's own entry from it).
XFF_ONLY = compile_format("%START_TIME%|%RESPONSE_CODE%|%REQ(X-FORWARDED-FOR)%\n")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_remote, _address, _xff), min_size=1, max_size=8),
       st.lists(st.sampled_from(_TRUSTED), max_size=5, unique=True), st.integers(0, 4),
       st.booleans())
def test_client_ip_policies_identical(requests: list[tuple[str, str, str]],
                                      trusted: list[str], hops: int, use_remote: bool) -> None:
    records = [ADDRESSES.render({
        "DOWNSTREAM_REMOTE_ADDRESS": remote, "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": peer,
        "START_TIME": "2026-11-29T01:13:00.665Z", "RESPONSE_CODE": "200",
        "REQ(X-FORWARDED-FOR)": xff}).encode() + b"\n" for remote, peer, xff in requests]
    docs, _, _ = run_both(records, batch=3, log_format=ADDRESSES.source,
                          policy=ClientIpPolicy(tuple(trusted), hops, use_remote),
                          native=len(records))
    for d in docs:  # what the examples reached (--hypothesis-show-statistics)
        event(f"ip_source {orjson.loads(d.document)['envoygeo'].get('ip_source')}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_xff, min_size=1, max_size=8),
       st.lists(st.sampled_from(_TRUSTED), max_size=5, unique=True), st.integers(0, 4),
       st.booleans())
def test_default_format_envoy_use_remote_address_identical(
        chains: list[str], trusted: list[str], hops: int, use_remote: bool) -> None:
    """No address field in the line: with the option the rightmost XFF entry is the
    peer (then the walk), without it no client at all; both paths alike, counted alike."""
    records = [XFF_ONLY.render({"START_TIME": "2026-11-29T01:13:00.665Z",
                                "RESPONSE_CODE": "200", "REQ(X-FORWARDED-FOR)": xff}).encode()
               + b"\n" for xff in chains]
    docs, _, e = run_both(records, batch=3, log_format=XFF_ONLY.source,
                          policy=ClientIpPolicy(tuple(trusted), hops, use_remote),
                          native=len(records))
    missing = 0
    for d in docs:
        doc = orjson.loads(d.document)
        missing += "clientip_no_remote_address" in doc.get("tags", [])
        if not use_remote:
            assert "source" not in doc
        event(f"use_remote {use_remote} ip_source {doc['envoygeo'].get('ip_source')}")
    assert e.no_remote_address == e._fast.no_remote_address == missing


# -- GeoIP --

_LOCALES = ["en", "de", "ja"]
_NAMES = ["London", "Zürich", "東京", "São Paulo", 'Quote " and \\ backslash', ""]


def _random_networks(rng: random.Random, count: int) -> list[ipaddress.IPv4Network |
                                                              ipaddress.IPv6Network]:
    """Disjoint random networks, IPv4 and IPv6, of many sizes (some adjacent)."""
    nets: list[Any] = []
    while len(nets) < count:
        if rng.random() < 0.6:
            prefix = rng.randint(8, 32)
            net: Any = ipaddress.IPv4Network((rng.getrandbits(32) >> (32 - prefix) << (32 - prefix),
                                              prefix))
        else:
            prefix = rng.randint(16, 128)
            net = ipaddress.IPv6Network((((0x2 << 124) | rng.getrandbits(124))
                                         >> (128 - prefix) << (128 - prefix), prefix))
        if not any(net.version == n.version and net.overlaps(n) for n in nets):
            nets.append(net)
    return nets


def _city(rng: random.Random) -> dict[str, Any]:
    """A City record with a random subset of its parts (as real databases have)."""
    name = rng.choice(_NAMES)
    rec: dict[str, Any] = {
        "country": {"iso_code": rng.choice(["GB", "DE", "JP", "BR"]),
                    "names": {loc: f"{name} {loc}" for loc in rng.sample(_LOCALES, 2)}},
    }
    if rng.random() < 0.7:
        rec["city"] = {"geoname_id": MmdbU32(rng.randint(1, 10**6)),
                       "names": {loc: name for loc in rng.sample(_LOCALES, rng.randint(0, 3))}}
    if rng.random() < 0.7:
        rec["location"] = {"latitude": MmdbF64(rng.uniform(-90, 90)),
                           "longitude": MmdbF64(rng.uniform(-180, 180))}
        if rng.random() < 0.5:
            rec["location"]["time_zone"] = "Europe/London"
    if rng.random() < 0.5:
        rec["continent"] = {"code": "EU", "names": {"en": "Europe"}}
    if rng.random() < 0.5:
        rec["subdivisions"] = [{"iso_code": "ENG", "names": {"en": name}}]
    if rng.random() < 0.3:
        rec["postal"] = {"code": "EC1A"}
    return rec


@pytest.fixture(scope="module")
def random_geo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Any]]:
    """City and ASN databases over the same 300 random networks, written with mmdb-writer."""
    rng = random.Random(11)
    nets = _random_networks(rng, 300)
    d = tmp_path_factory.mktemp("random-mmdb")
    city = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City",
                      languages=_LOCALES, description="envoygeo random test database")
    asn = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-ASN",
                     languages=["en"], description="envoygeo random test database")
    for net in nets:
        city.insert_network(IPSet([str(net)]), _city(rng))
        if rng.random() < 0.8:
            asn.insert_network(IPSet([str(net)]), {
                "autonomous_system_number": MmdbU32(rng.randint(1, 2**32 - 1)),
                "autonomous_system_organization": rng.choice(_NAMES)})
    city.to_db_file(str(d / "city.mmdb"))
    asn.to_db_file(str(d / "asn.mmdb"))
    return d / "city.mmdb", d / "asn.mmdb", nets


def _in_or_near(nets: list[Any]) -> st.SearchStrategy[str]:
    """An address inside one of the networks, or just outside its ends."""
    def pick(net: Any, where: int, offset: int) -> str:
        first, last = int(net.network_address), int(net.broadcast_address)
        top = (1 << net.max_prefixlen) - 1
        value = [first + offset % (last - first + 1), first - 1, last + 1][where]
        return str(ipaddress.ip_address(min(max(value, 0), top)) if net.version == 4
                   else ipaddress.IPv6Address(min(max(value, 0), top)))
    return st.builds(pick, st.sampled_from(nets), st.integers(0, 2), st.integers(0, 2**128))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_geoip_over_random_addresses_identical(random_geo: tuple[Path, Path, list[Any]],
                                               data: st.DataObject) -> None:
    city, asn, nets = random_geo
    addrs = data.draw(st.lists(st.one_of(
        st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
        st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"), _in_or_near(nets)),
        min_size=1, max_size=12))
    locale = data.draw(st.sampled_from(_LOCALES))
    records = [WRAPPERS["fluent-bit"](_line(a))[0] for a in addrs]
    geo = GeoIP.open(city=city, asn=asn, cache_size=4, locale=locale)  # tiny: evictions
    docs, _, e = run_both(records, batch=5, geo=geo, native=len(records))
    for d in docs:
        source = orjson.loads(d.document)["source"]
        event(f"geo {'geo' in source} as {'as' in source}")
    assert e.native_geo_status == "on"
    # every cache miss was answered by the core's own reader, none by Python's
    assert e._fast.geo_native_lookups == e._fast.geo_misses > 0


def _line(addr: str) -> str:
    client = f"[{addr}]:443" if ":" in addr else f"{addr}:443"
    return (f'[2026-11-29T01:13:00.665Z] "GET / HTTP/1.1" 200 - via_upstream - "-" 0 20 3 2 '
            f'"-" "curl/8" "id-1" "shop.example.com" "10.0.7.2:8080" outbound|8080||shop '
            f"10.0.7.1:40000 10.0.0.5:8080 {client} - default")
