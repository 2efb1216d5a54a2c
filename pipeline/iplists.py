"""CIDR list files: allow lists, deny lists, known scanners, customer ranges.

One format for every consumer (`envoygeo policy` today, the IP-list enrichment plugin
later), so a file an operator wrote for one works for the other:

    # comment lines and trailing comments are ignored, as are blank lines
    203.0.113.7            # one address: a /32 (or /128 for IPv6)
    198.51.100.0/24
    2001:db8::/32

A wrong line is an error naming the file and line, never skipped: a deny list that
silently loses an entry is a hole, an allow list that loses one locks a customer out.
A network written with host bits set (`10.1.2.3/8`) is refused for the same reason:
the writer meant either the address or the network, and guessing is worse than asking.
IPv4-mapped IPv6 (`::ffff:192.0.2.1`) is stored as the IPv4 address it is, because
that is how Envoy and the worker report such a client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class IpListError(ValueError):
    """A line of a list file that is not an address or network; says file and line."""

    def __init__(self, source: str, line_no: int, text: str, why: str) -> None:
        super().__init__(f"{source}:{line_no}: {text!r} {why}")
        self.source = source
        self.line_no = line_no


def parse_network(text: str) -> Network:
    """One address or CIDR, strictly (no host bits), IPv4-mapped IPv6 as IPv4.
    Raises ValueError with the reason."""
    if "/" not in text:
        addr = ipaddress.ip_address(text)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return ipaddress.ip_network(addr)
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"has host bits set: write {loose} for the network or "
                             f"{text.split('/')[0]} for the address") from None
        raise
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None \
            and net.prefixlen >= 96:
        v4 = net.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{v4}/{net.prefixlen - 96}")
    return net


def parse_lines(lines: Iterable[str], source: str = "<text>") -> list[Network]:
    """Networks in file order; the first bad line raises IpListError."""
    out: list[Network] = []
    for no, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        if any(c.isspace() for c in text):
            raise IpListError(source, no, text, "holds more than one entry: one per line")
        try:
            out.append(parse_network(text))
        except ValueError as exc:
            why = str(exc)
            if "does not appear to be" in why:
                why = "is not an IPv4/IPv6 address or CIDR network"
            raise IpListError(source, no, text, why) from None
    return out


@dataclass(frozen=True)
class IpList:
    """A parsed list; `networks` keep file order (and duplicates are dropped)."""

    networks: tuple[Network, ...] = ()
    sources: tuple[str, ...] = field(default=())

    @classmethod
    def load(cls, paths: Iterable[Path | str]) -> IpList:
        """Every file, in order; an unreadable file or bad line raises (IpListError is a
        ValueError, OSError for the file)."""
        nets: dict[Network, None] = {}
        names: list[str] = []
        for path in paths:
            p = Path(path)
            names.append(str(p))
            with p.open(encoding="utf-8") as f:
                for net in parse_lines(f, str(p)):
                    nets.setdefault(net, None)
        return cls(tuple(nets), tuple(names))

    def __len__(self) -> int:
        return len(self.networks)

    def __iter__(self) -> Iterator[Network]:
        return iter(self.networks)

    @cached_property
    def _by_prefix(self) -> dict[int, list[tuple[int, dict[int, Network]]]]:
        """version -> [(prefix length, {network bits: network})], the longest-listed
        first in file order of lengths. A lookup costs one dict probe per distinct
        prefix length, not one comparison per network: lists of thousands of ranges
        (threat feeds) stay cheap."""
        out: dict[int, dict[int, dict[int, Network]]] = {}
        for net in self.networks:
            bits = net.max_prefixlen - net.prefixlen
            by_len = out.setdefault(net.version, {}).setdefault(net.prefixlen, {})
            by_len.setdefault(int(net.network_address) >> bits, net)
        return {v: sorted(d.items()) for v, d in out.items()}

    def covering(self, ip: str | Network) -> Network | None:
        """The widest network of the list that contains `ip` (an address or a
        network), or None."""
        try:
            target = parse_network(ip) if isinstance(ip, str) else ip
        except ValueError:
            return None
        addr = int(target.network_address)
        width = target.max_prefixlen
        for plen, nets in self._by_prefix.get(target.version, ()):
            if plen > target.prefixlen:
                break
            hit = nets.get(addr >> (width - plen))
            if hit is not None:
                return hit
        return None

    def overlapping(self, net: Network) -> list[Network]:
        """The list's networks that share any address with `net`."""
        return [n for n in self.networks if n.version == net.version and n.overlaps(net)]  # type: ignore[arg-type]
