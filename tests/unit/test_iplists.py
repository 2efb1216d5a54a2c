"""pipeline.iplists: the list-file format both `policy` and the IP-list plugin read."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pipeline.iplists import IpList, IpListError, parse_lines, parse_network


def test_comments_blanks_v4_v6_and_single_addresses(tmp_path: Path) -> None:
    f = tmp_path / "deny.txt"
    f.write_text("# scanners\n\n203.0.113.7   # one host\n198.51.100.0/24\n"
                 "2001:db8::/32\n2001:db8:1::5\n::ffff:192.0.2.1\n  \t\n203.0.113.7\n")
    lst = IpList.load([f])
    assert [str(n) for n in lst] == ["203.0.113.7/32", "198.51.100.0/24", "2001:db8::/32",
                                     "2001:db8:1::5/128", "192.0.2.1/32"]  # duplicate dropped
    assert lst.sources == (str(f),)


@pytest.mark.parametrize(("line", "why"), [
    ("10.1.2.3/8", "has host bits set: write 10.0.0.0/8 for the network or 10.1.2.3"),
    ("example.com", "is not an IPv4/IPv6 address or CIDR network"),
    ("10.0.0.0/33", "10.0.0.0/33"),
    ("1.2.3.4 5.6.7.8", "holds more than one entry: one per line"),
    ("2001:db8::/129", "2001:db8::/129"),
])
def test_bad_line_names_file_and_line(line: str, why: str) -> None:
    with pytest.raises(IpListError) as exc:
        parse_lines(["# ok", "192.0.2.0/24", line], "lists/deny.txt")
    assert str(exc.value).startswith(f"lists/deny.txt:3: {line!r} ")
    assert why in str(exc.value)
    assert exc.value.line_no == 3


def test_covering_and_overlapping() -> None:
    lst = IpList(tuple(parse_lines(["192.0.2.0/24", "2001:db8::/32"])))
    assert str(lst.covering("192.0.2.77")) == "192.0.2.0/24"
    assert str(lst.covering("::ffff:192.0.2.77")) == "192.0.2.0/24"
    assert str(lst.covering("2001:db8:5::1")) == "2001:db8::/32"
    assert lst.covering("192.0.3.1") is None
    assert lst.covering("not an ip") is None
    assert str(lst.covering(ipaddress.ip_network("192.0.2.128/25"))) == "192.0.2.0/24"
    assert lst.covering(ipaddress.ip_network("192.0.0.0/16")) is None  # wider than the entry
    assert [str(n) for n in lst.overlapping(ipaddress.ip_network("192.0.0.0/16"))] == [
        "192.0.2.0/24"]


def test_mapped_v6_network_is_v4() -> None:
    assert str(parse_network("::ffff:192.0.2.0/120")) == "192.0.2.0/24"


def test_unreadable_file_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        IpList.load([tmp_path / "missing.txt"])


def test_covering_is_exact_at_every_prefix_length() -> None:
    """The prefix-bucket lookup agrees with ipaddress' own subnet test."""
    import random

    rng = random.Random(7)
    nets = [ipaddress.ip_network((rng.getrandbits(32), p), strict=False)
            for p in (8, 12, 16, 20, 24, 28, 32) for _ in range(30)]
    lst = IpList(tuple(nets))
    for _ in range(3000):
        probe = ipaddress.ip_network((rng.getrandbits(32), rng.choice((16, 24, 32))),
                                     strict=False)
        want = [n for n in nets if probe.subnet_of(n)]
        got = lst.covering(probe)
        assert (got is None) == (not want)
        if got is not None:
            assert got.prefixlen == min(n.prefixlen for n in want)
    # Draw probes from inside the listed networks too, so hits are tested, not only misses.
    for n in nets:
        assert lst.covering(n) is not None and lst.covering(str(n.network_address)) is not None
