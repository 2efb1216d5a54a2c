"""The fast paths give exactly what the reference implementations give."""

from __future__ import annotations

import ipaddress
import random

import pytest

from pipeline.clientip import (
    _V4_TABLE,
    _V6_TABLE,
    ClientIpPolicy,
    ClientIpResolver,
    classify,
    classify_int,
)
from pipeline.decode.envoy_format import _NUMERIC, compile_format
from pipeline.decode.presets import TEXT_PRESETS


@pytest.mark.parametrize("version", [4, 6])
def test_class_table_matches_ipaddress(version: int) -> None:
    starts, _ = _V4_TABLE if version == 4 else _V6_TABLE
    top = 1 << (32 if version == 4 else 128)
    rng = random.Random(7)
    values = [rng.randrange(top) for _ in range(5000)]
    values += [v for s in starts for v in (s - 1, s, s + 1) if 0 <= v < top]
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    for v in values:
        assert classify_int(version, v) == classify(make(v)), make(v)


@pytest.mark.parametrize("host", [
    "1.2.3.4", "01.2.3.4", "1.2.3", "256.1.1.1", "1.2.3.4%eth0", "10.1.2.3", "100.64.0.1",
    "::ffff:10.0.0.1", "2001:db8::1", "fe80::1%eth0", "::1", "a.b.c.d", "", " 1.2.3.4",
    ".\x00", "1.2.3.\u0664",
])
def test_parse_fast_path_matches_ipaddress(host: str) -> None:
    r = ClientIpResolver(ClientIpPolicy(("10.0.0.0/8", "2001:db8::/32")))
    got = r._parse(host)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        assert got is None
        return
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    assert got is not None
    assert (got.ip, got.ip_class, got.trusted) == (
        str(ip), classify(ip), any(ip in n for n in r._nets if n.version == ip.version))


@pytest.mark.parametrize("fmt", [
    *TEXT_PRESETS.values(),
    '%START_TIME(%s)% %REQ(:PATH)% %BYTES_RETRANSMITTED% "%REQ(USER-AGENT)%" %REQ(FOO)%',
    '%START_TIME% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %UPSTREAM_HOST% %REQ(:PATH)% '
    '%REQ(:PATH)%',
])
def test_fast_build_matches_general(fmt: str) -> None:
    compiled = compile_format(fmt)
    values: dict[str, str] = {}
    for cmd in compiled.commands():
        if cmd.name in _NUMERIC:
            values[cmd.key] = "12"
        elif cmd.name == "START_TIME":
            values[cmd.key] = "1700000000" if cmd.argument == "%s" else "2026-11-29T01:13:00.665Z"
        elif "ADDRESS" in cmd.name or cmd.name == "UPSTREAM_HOST":
            values[cmd.key] = "10.0.0.1:5"
        else:
            values[cmd.key] = "v"
    values["RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)"] = "7"
    matched = 0
    rejected = {**values, "RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)": "junk"}  # -> `_raw` extra
    for variant in (values, {k: "-" for k in values}, rejected):
        m = compiled.match(compiled.render(variant))
        if m is None:
            continue
        matched += 1
        fast, general = compiled.build(m), compiled._build_general(m)
        assert fast == general
        assert list(fast.extra) == list(general.extra)
    assert matched >= 2
