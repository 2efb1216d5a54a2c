"""Who really sent the request: PROXY-preserved peer first, X-Forwarded-For only
through proxies the policy trusts.

Spoofing is the attack: any client can send `X-Forwarded-For: 1.2.3.4`. So XFF is
consulted only when the address Envoy saw (the PROXY-protocol client, or the TCP peer)
is itself a trusted proxy, and then only right to left, because each trusted hop
appends the address *it* saw; the first untrusted entry is the one nobody we trust
can vouch beyond.

Address parsing is cached per distinct string: `ipaddress` costs microseconds per
call and the same few thousand addresses repeat across millions of lines.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Literal

from pipeline.decode.access_log import AccessLog

IpSource = Literal["proxy_protocol", "peer", "x_forwarded_for", "none"]
IpClass = Literal["public", "private", "loopback", "cgnat", "link_local", "multicast",
                  "reserved"]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


@dataclass(frozen=True, slots=True)
class ClientIpPolicy:
    """Which proxies may speak for their clients.

    trusted_proxies: CIDRs of load balancers / proxies whose X-Forwarded-For entry
        we believe (e.g. the LB subnet). Empty: XFF is never used.
    trusted_hops: how many X-Forwarded-For entries, counted from the right, may be
        examined at most; bounds how far a chain of trusted proxies is followed.
    envoy_use_remote_address: Envoy runs with `use_remote_address: true`, so it
        appended the address it saw to X-Forwarded-For: the rightmost entry is that
        address, not a client's claim. It is the peer when the line has no address
        field (Envoy's default format), and it is never walked as a hop.
    """

    trusted_proxies: tuple[str, ...] = ()
    trusted_hops: int = 1
    envoy_use_remote_address: bool = False

    def __post_init__(self) -> None:
        for cidr in self.trusted_proxies:
            ipaddress.ip_network(cidr, strict=False)  # ValueError early, at start-up
        if self.trusted_hops < 0:
            raise ValueError("trusted_hops must be >= 0")


@dataclass(slots=True)
class ClientIp:
    ip: str | None  # normalised (IPv4-mapped v6 -> v4), None when nothing usable
    port: int | None
    source: IpSource
    ip_class: IpClass | None
    peer_ip: str | None  # the address the TCP connection came from (direct remote)
    related: list[str] = field(default_factory=list)  # every address seen, unique
    tags: list[str] = field(default_factory=list)
    # How many of `related`, from the front, are the client side's (remote, direct,
    # X-Forwarded-For entries); the rest are upstream hosts (`privacy` masks only those).
    client_related: int = 0


class _Addr:
    """A parsed, classified address; cached and shared, so treat as immutable."""

    __slots__ = ("ip", "ip_class", "trusted")

    def __init__(self, ip: str, ip_class: IpClass, trusted: bool) -> None:
        self.ip = ip
        self.ip_class = ip_class
        self.trusted = trusted


def split_host_port(text: str) -> tuple[str, int | None] | None:
    """`1.2.3.4:80`, `[v6]:80`, bare v4 or v6 -> (host, port); None if malformed.

    Only the shape is checked here; the host is validated by the cache miss path.
    """
    s = text.strip()
    if not s:
        return None
    if s[0] == "[":
        end = s.find("]")
        if end == -1:
            return None
        host, rest = s[1:end], s[end + 1:]
        if not rest:
            return host, None
        if rest[0] != ":" or not rest[1:].isdigit():
            return None
        return host, int(rest[1:])
    host, sep, port = s.partition(":")
    if not sep or ":" in port:
        return s, None  # bare v4 (no colon) or bare v6 (several)
    if not port.isdigit():
        return None
    return host, int(port)


def classify(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> IpClass:
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.version == 4 and ip in _CGNAT:
        return "cgnat"
    if ip.is_multicast:
        return "multicast"
    if any(ip.version == n.version and ip in n for n in _PRIVATE_NETS):
        return "private"
    if ip.is_global:
        return "public"
    return "reserved"  # documentation, benchmarking, unspecified, 240/4, ...


def _class_table(version: int) -> tuple[list[int], list[IpClass]]:
    """`classify` as sorted interval starts and the class of each interval.

    `classify` depends only on membership in a fixed set of networks (ours and those
    `ipaddress` tests in its is_* properties), so it is constant between consecutive
    network boundaries. Evaluating it once per interval with `classify` itself as the
    oracle makes the table exact by construction, and a lookup is one bisect instead
    of a dozen `ipaddress` containment tests (~10 µs per new address).
    """
    consts = ipaddress._IPv4Constants if version == 4 else ipaddress._IPv6Constants  # type: ignore[attr-defined]
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        n for n in (*_PRIVATE_NETS, _CGNAT) if n.version == version]
    for value in vars(consts).values():
        for v in value if isinstance(value, list) else (value,):
            if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
                nets.append(v)
            elif isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
                nets.append(ipaddress.ip_network(v))
    top = 1 << (32 if version == 4 else 128)
    if version == 6:
        nets += [ipaddress.ip_network("::1/128"), ipaddress.ip_network("::/128")]
    points = {0}
    for n in nets:
        points.add(int(n.network_address))
        end = int(n.broadcast_address) + 1
        if end < top:
            points.add(end)
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    starts: list[int] = []
    classes: list[IpClass] = []
    for p in sorted(points):
        c = classify(make(p))
        if not classes or classes[-1] != c:
            starts.append(p)
            classes.append(c)
    return starts, classes


_V4_TABLE = _class_table(4)
_V6_TABLE = _class_table(6)


def classify_int(version: int, value: int) -> IpClass:
    """`classify` for an address given as its integer value (table lookup)."""
    starts, classes = _V4_TABLE if version == 4 else _V6_TABLE
    return classes[bisect_right(starts, value) - 1]


class ClientIpResolver:
    """Resolves `ClientIp` for access logs under one policy (and caches per policy)."""

    def __init__(self, policy: ClientIpPolicy | None = None, cache_size: int = 65536,
                 privacy: PrivacyPolicy | None = None) -> None:
        self.policy = policy or ClientIpPolicy()
        self.privacy = privacy or PrivacyPolicy()
        # How client addresses are written into documents (None: as they are).
        self.mask = AddressMask(self.privacy, self) if self.privacy.client_ip != "keep" else None
        self._nets = tuple(ipaddress.ip_network(c, strict=False)
                           for c in self.policy.trusted_proxies)
        # Trusted CIDRs as integer ranges: (version, first, last).
        self._ranges = tuple((n.version, int(n.network_address), int(n.broadcast_address))
                             for n in self._nets)
        self._cache: dict[str, _Addr | None] = {}
        # Raw field text ("10.0.7.3:8080", "-", "[2001:db8::1]:443") -> its endpoint:
        # upstream and local addresses repeat verbatim, so most fields cost one probe.
        self._endpoints: dict[str, tuple[_Addr | None, int | None, bool]] = {}
        self._cache_size = cache_size
        # Records with no address Envoy saw (`clientip_no_remote_address`): the
        # summaries name `envoy_use_remote_address` when there are any.
        self.no_remote_address = 0

    def address(self, host: str) -> _Addr | None:
        """Parsed host (no port) from the cache; None when it is not an IP address."""
        addr = self._cache.get(host, False)
        if addr is not False:
            return addr  # type: ignore[return-value]
        addr = self._parse(host)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # crude but bounded; refills within a few lines
        self._cache[host] = addr
        return addr

    def _parse(self, host: str) -> _Addr | None:
        if "." in host and ":" not in host and "%" not in host:
            # Dotted-quad fast path: inet_pton accepts exactly the strings
            # `ipaddress.IPv4Address` does (four decimal octets, no leading zeros), and
            # those are already in normal form, so `host` is its own str().
            try:
                packed = socket.inet_pton(socket.AF_INET, host)
            except (OSError, ValueError):  # ValueError: NUL or unencodable characters
                return None
            return self._addr(host, 4, int.from_bytes(packed, "big"))
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0] if "%" in host else host)
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return self._addr(str(ip), ip.version, int(ip))

    def _addr(self, text: str, version: int, value: int) -> _Addr:
        trusted = any(v == version and lo <= value <= hi for v, lo, hi in self._ranges)
        return _Addr(text, classify_int(version, value), trusted)

    def _endpoint(self, text: str | None) -> tuple[_Addr | None, int | None, bool]:
        """(address, port, malformed) for an Envoy address field; cached per raw text."""
        if text is None:
            return None, None, False
        hit = self._endpoints.get(text)
        if hit is not None:
            return hit
        if text == "-":
            out: tuple[_Addr | None, int | None, bool] = (None, None, False)
        else:
            hp = split_host_port(text)
            if hp is None:
                out = (None, None, True)
            else:
                addr = self.address(hp[0])
                out = (addr, hp[1], addr is None)
        if len(self._endpoints) >= self._cache_size:
            self._endpoints.clear()  # bounded like the address cache
        self._endpoints[text] = out
        return out

    def resolve(self, log: AccessLog) -> ClientIp:
        related: list[str] = []
        tags: list[str] = []
        remote, port, bad = self._endpoint(log.downstream_remote_address)
        if bad:
            tags.append("clientip_invalid_remote")
        direct, _, bad_direct = self._endpoint(log.downstream_direct_remote_address)
        if bad_direct:
            tags.append("clientip_invalid_direct_remote")
        if remote is not None:
            related.append(remote.ip)
        if direct is not None and direct.ip not in related:
            related.append(direct.ip)

        xff = log.x_forwarded_for
        entries: list[_Addr | None] = []
        if xff:
            for part in xff.split(","):
                a = self._endpoint(part)[0]
                entries.append(a)
                if a is None:
                    if "clientip_invalid_xff" not in tags:
                        tags.append("clientip_invalid_xff")
                elif a.ip not in related:
                    related.append(a.ip)
        # With use_remote_address Envoy appended the address it saw: Envoy's own record.
        envoy_saw = (entries.pop() if entries and self.policy.envoy_use_remote_address
                     else None)
        client_related = len(related)
        for up in (log.upstream_host, log.upstream_local_address):
            if up and up.startswith("tcp://"):
                up = up[6:]  # older Envoy wrote upstream hosts as URLs
            ua = self._endpoint(up)[0]
            if ua is not None and ua.ip not in related:
                related.append(ua.ip)

        if remote is None:
            if direct is not None:
                remote = direct
            elif envoy_saw is not None:
                remote, port = envoy_saw, None
            else:
                # Nothing Envoy itself saw (e.g. its default format): XFF alone is
                # client-written, so no address is claimed.
                if log.downstream_remote_address is None:
                    tags.append("clientip_no_remote_address")
                    self.no_remote_address += 1
                return ClientIp(None, None, "none", None, None, related, tags, client_related)
        source: IpSource = (
            "proxy_protocol" if direct is not None and direct.ip != remote.ip else "peer")
        client, client_port = remote, port
        if remote.trusted:
            chosen = self._walk_xff(entries, tags) if entries else None
            if chosen is not None:
                client, client_port, source = chosen, None, "x_forwarded_for"
            else:
                # A trusted proxy that did not say for whom: its own address is all
                # there is, and dashboards should be able to tell.
                tags.append("clientip_trusted_proxy")
        return ClientIp(client.ip, client_port, source, client.ip_class,
                        direct.ip if direct is not None else remote.ip, related, tags,
                        client_related)

    def _walk_xff(self, entries: list[_Addr | None], tags: list[str]) -> _Addr | None:
        """Right to left over at most `trusted_hops` entries; first untrusted wins."""
        last: _Addr | None = None
        for a in reversed(entries[-self.policy.trusted_hops:] if self.policy.trusted_hops
                          else []):
            if a is None:
                return None  # garbage written by a hop we trust: believe nothing past it
            if not a.trusted:
                return a
            last = a
        if last is not None:
            tags.append("clientip_xff_all_trusted")
        return last


# -- privacy: what of a client address the indexed document keeps --

PrivacyMode = Literal["keep", "truncate", "hash"]
HASH_HEX_CHARS = 32  # 128 of HMAC-SHA256's 256 bits: no collision among any real set of
# addresses (birthday bound 2^64), half the bytes in every document and index.
MIN_HASH_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """`privacy` in the configuration: how client addresses appear in the log index.

    GeoIP, rate counting and alerts always use the full address; only what is written
    into the document changes. truncate: the address with its host bits zeroed
    (`/truncate_ipv4_prefix`, `/truncate_ipv6_prefix`), still an address (`ip` fields,
    dashboards' top-address panels show networks). hash: HMAC-SHA256 under
    `hash_key`, a pseudonym, not an address (a keyed hash: an unkeyed SHA of an IPv4
    address is reversed by hashing all 2^32 of them). `extra_fields`: `envoy.extra`
    keys of a custom format that hold client addresses (e.g. `REQ(x-real-ip)`).
    """

    client_ip: PrivacyMode = "keep"
    truncate_ipv4_prefix: int = 24
    truncate_ipv6_prefix: int = 48
    hash_key: bytes | None = field(default=None, repr=False)
    extra_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.truncate_ipv4_prefix <= 32:
            raise ValueError("truncate_ipv4_prefix must be 0..32")
        if not 0 <= self.truncate_ipv6_prefix <= 128:
            raise ValueError("truncate_ipv6_prefix must be 0..128")
        if self.client_ip == "hash" and (self.hash_key is None
                                         or len(self.hash_key) < MIN_HASH_KEY_BYTES):
            raise ValueError(f"client_ip hash needs a hash_key of at least "
                             f"{MIN_HASH_KEY_BYTES} bytes")


# What may be an address inside free text (`event.original` of unparsed records): a
# dotted quad, or hex groups with at least two colons (optionally ending in a dotted
# quad), bounded by characters that cannot continue it (a letter may: `ip=x1.2.3.4`
# is still masked). A candidate is replaced only if it parses as an address, so times
# such as 01:13:00 and versions such as 1.2.3.4.5 stay as they are.
_ADDRESS_LIKE = re.compile(
    r"(?<![0-9A-Fa-f.:])(?:[0-9A-Fa-f]{0,4}:){2,8}"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})(?![0-9A-Fa-f.:])"
    r"|(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


class AddressMask:
    """Client addresses as the document shows them under a `PrivacyPolicy` (not keep).

    Built by the resolver that parses the same fields, so an address field costs one
    probe of the resolver's caches plus one of this mask's (a few thousand distinct
    addresses per worker, so masking each costs its HMAC or truncation once).
    """

    __slots__ = ("_cache", "_cache_size", "_hmac", "_resolver", "_v4_mask", "_v6_mask",
                 "extra_fields", "hashed", "policy")

    def __init__(self, policy: PrivacyPolicy, resolver: ClientIpResolver,
                 cache_size: int = 65536) -> None:
        if policy.client_ip == "keep":
            raise ValueError("keep needs no mask")
        self.policy = policy
        self.hashed = policy.client_ip == "hash"
        # Header names are case-insensitive, and the key keeps the format's spelling.
        self.extra_fields = frozenset(k.lower() for k in policy.extra_fields)
        self._resolver = resolver
        self._v4_mask = (1 << 32) - (1 << (32 - policy.truncate_ipv4_prefix))
        self._v6_mask = (1 << 128) - (1 << (128 - policy.truncate_ipv6_prefix))
        # The key's inner and outer pads hashed once; each address copies that state.
        self._hmac = (hmac.new(policy.hash_key, digestmod=hashlib.sha256)
                      if self.hashed and policy.hash_key is not None else None)
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def ip(self, ip: str) -> str:
        """A normalised address (as `ClientIp` holds it) as the document shows it."""
        out = self._cache.get(ip)
        if out is not None:
            return out
        if self._hmac is not None:
            h = self._hmac.copy()
            h.update(ip.encode())
            out = h.hexdigest()[:HASH_HEX_CHARS]
        elif ":" not in ip:
            # A dotted quad (the normal form): socket's C conversions, ~10x faster than
            # `ipaddress` objects, and their text is the same.
            value = int.from_bytes(socket.inet_aton(ip), "big") & self._v4_mask
            out = socket.inet_ntoa(value.to_bytes(4, "big"))
        else:
            # IPv6: `ipaddress` writes the RFC 5952 text (inet_ntop would differ for
            # ::a.b.c.d forms).
            out = str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(ip)) & self._v6_mask))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # bounded like the resolver's caches
        self._cache[ip] = out
        return out

    def field(self, text: str | None) -> str | None:
        """An Envoy address field (`host:port`, `[v6]:port`, bare): the masked address,
        port dropped; None (the field is left out) when it holds no address."""
        if text is None:
            return None
        addr = self._resolver._endpoint(text)[0]
        return None if addr is None else self.ip(addr.ip)

    def entries(self, text: str | None) -> str | None:
        """A comma-separated list (X-Forwarded-For): each entry masked, `-` for an
        entry that is no address (its text could be anything a client wrote)."""
        if not text:
            return text
        endpoint, ip = self._resolver._endpoint, self.ip
        return ", ".join("-" if (a := endpoint(part)[0]) is None else ip(a.ip)
                         for part in text.split(","))

    def related(self, cip: ClientIp) -> list[str]:
        """`related.ip`: client-side addresses truncated (left out when hashed: a hash
        is no `ip`), upstream hosts as they are; unique, in order."""
        out: list[str] = []
        if not self.hashed:
            for a in cip.related[:cip.client_related]:
                m = self.ip(a)
                if m not in out:
                    out.append(m)
        for a in cip.related[cip.client_related:]:
            if a not in out:
                out.append(a)
        return out

    def extra(self, extra: dict[str, object]) -> dict[str, object]:
        """`envoy.extra` with the `extra_fields` text values masked like XFF (keys
    compared without case)."""
        if not self.extra_fields:
            return extra
        return {k: self.entries(v) if isinstance(v, str) and k.lower() in self.extra_fields
                else v for k, v in extra.items()}

    def scrub(self, text: str) -> str:
        """Free text (an unparsed line) with every address in it masked."""
        return _ADDRESS_LIKE.sub(self._scrub_one, text)

    def _scrub_one(self, m: re.Match[str]) -> str:
        found = m.group()
        addr = self._resolver.address(found)
        return found if addr is None else self.ip(addr.ip)
