from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.clientip import ClientIpPolicy, ClientIpResolver, split_host_port
from pipeline.decode.access_log import AccessLog

pytestmark = pytest.mark.unit

LB = ClientIpPolicy(trusted_proxies=("10.0.0.0/8", "2001:db8:ffff::/48"), trusted_hops=2)


def resolve(policy: ClientIpPolicy | None = None, **fields: str | None):  # noqa: ANN201
    return ClientIpResolver(policy).resolve(AccessLog(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    ("81.2.69.142:443", ("81.2.69.142", 443)),
    ("81.2.69.142", ("81.2.69.142", None)),
    ("[2001:db8::1]:8080", ("2001:db8::1", 8080)),
    ("[2001:db8::1]", ("2001:db8::1", None)),
    ("2001:db8::1", ("2001:db8::1", None)),
    (" 1.2.3.4 ", ("1.2.3.4", None)),
    ("[2001:db8::1", None),
    ("1.2.3.4:http", None),
    ("[::1]x", None),
    ("", None),
])
def test_split_host_port(text: str, expected: tuple[str, int | None] | None) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(("remote", "ip", "port", "ip_class"), [
    ("81.2.69.142:36388", "81.2.69.142", 36388, "public"),
    ("[2001:4860:4860::8888]:36400", "2001:4860:4860::8888", 36400, "public"),
    ("[::ffff:81.2.69.142]:1", "81.2.69.142", 1, "public"),
    ("::ffff:192.168.1.1", "192.168.1.1", None, "private"),
    ("10.1.2.3:5", "10.1.2.3", 5, "private"),
    ("[fd00::1]:5", "fd00::1", 5, "private"),
    ("127.0.0.1:5", "127.0.0.1", 5, "loopback"),
    ("[::1]:5", "::1", 5, "loopback"),
    ("100.64.3.4:5", "100.64.3.4", 5, "cgnat"),
    ("169.254.1.1:5", "169.254.1.1", 5, "link_local"),
    ("[fe80::1]:5", "fe80::1", 5, "link_local"),
    ("224.0.0.1:5", "224.0.0.1", 5, "multicast"),
    ("203.0.113.9:5", "203.0.113.9", 5, "reserved"),
    ("240.0.0.1:5", "240.0.0.1", 5, "reserved"),
])
def test_remote_address_forms_and_classes(remote: str, ip: str, port: int | None,
                                          ip_class: str) -> None:
    cip = resolve(downstream_remote_address=remote)
    assert (cip.ip, cip.port, cip.ip_class, cip.source) == (ip, port, ip_class, "peer")
    assert cip.tags == []


def test_proxy_protocol_source_when_direct_differs() -> None:
    cip = resolve(downstream_remote_address="81.2.69.142:1",
                  downstream_direct_remote_address="10.0.0.5:2")
    assert (cip.ip, cip.source, cip.peer_ip) == ("81.2.69.142", "proxy_protocol", "10.0.0.5")
    assert cip.related == ["81.2.69.142", "10.0.0.5"]
    same = resolve(downstream_remote_address="81.2.69.142:1",
                   downstream_direct_remote_address="81.2.69.142:1")
    assert same.source == "peer"


def test_spoofed_xff_ignored_when_peer_untrusted() -> None:
    cip = resolve(LB, downstream_remote_address="81.2.69.142:1", x_forwarded_for="1.1.1.1")
    assert (cip.ip, cip.source) == ("81.2.69.142", "peer")
    assert "1.1.1.1" in cip.related  # seen, never believed


def test_xff_never_used_without_policy() -> None:
    cip = resolve(downstream_remote_address="10.0.0.1:1", x_forwarded_for="1.1.1.1")
    assert (cip.ip, cip.source) == ("10.0.0.1", "peer")


def test_xff_walk_right_to_left_skipping_trusted() -> None:
    cip = resolve(LB, downstream_remote_address="10.0.0.1:1",
                  x_forwarded_for="6.6.6.6, 81.2.69.142, 10.0.0.7")
    assert (cip.ip, cip.source, cip.port) == ("81.2.69.142", "x_forwarded_for", None)
    assert cip.related == ["10.0.0.1", "6.6.6.6", "81.2.69.142", "10.0.0.7"]


def test_xff_hop_bound() -> None:
    one_hop = ClientIpPolicy(("10.0.0.0/8",), trusted_hops=1)
    cip = resolve(one_hop, downstream_remote_address="10.0.0.1:1",
                  x_forwarded_for="81.2.69.142, 10.0.0.7")
    # Only the rightmost entry may be examined; it is a trusted proxy, so that is where
    # the trustworthy chain ends.
    assert (cip.ip, cip.source) == ("10.0.0.7", "x_forwarded_for")
    assert "clientip_xff_all_trusted" in cip.tags
    zero = ClientIpPolicy(("10.0.0.0/8",), trusted_hops=0)
    cip0 = resolve(zero, downstream_remote_address="10.0.0.1:1", x_forwarded_for="1.1.1.1")
    assert (cip0.ip, cip0.source) == ("10.0.0.1", "peer")
    assert cip0.tags == ["clientip_trusted_proxy"]


def test_xff_v6_and_ports_and_mapped() -> None:
    cip = resolve(LB, downstream_remote_address="[2001:db8:ffff::1]:443",
                  x_forwarded_for="[2a02:cf40::1]:5555, ::ffff:10.0.0.3")
    assert (cip.ip, cip.source) == ("2a02:cf40::1", "x_forwarded_for")


@pytest.mark.parametrize("xff", ["unknown", "1.2.3.999", "a, b, c", ",,,", "[::1"])
def test_garbage_xff_tagged(xff: str) -> None:
    cip = resolve(LB, downstream_remote_address="10.0.0.1:1", x_forwarded_for=xff)
    assert "clientip_invalid_xff" in cip.tags and "clientip_trusted_proxy" in cip.tags
    assert cip.ip == "10.0.0.1" and cip.source == "peer"


def test_garbage_remote_tagged() -> None:
    cip = resolve(downstream_remote_address="envoy://internal_client_address/")
    assert cip.ip is None and cip.source == "none"
    assert "clientip_invalid_remote" in cip.tags


def test_missing_remote_falls_back_to_direct() -> None:
    cip = resolve(downstream_direct_remote_address="81.2.69.142:1")
    assert cip.ip == "81.2.69.142"


def test_upstream_addresses_are_related() -> None:
    cip = resolve(downstream_remote_address="81.2.69.142:1", upstream_host="tcp://10.0.2.1:80",
                  upstream_local_address="10.0.0.9:41000")
    assert cip.related == ["81.2.69.142", "10.0.2.1", "10.0.0.9"]


def test_bad_policy_rejected() -> None:
    with pytest.raises(ValueError):
        ClientIpPolicy(("10.0.0.0/33",))
    with pytest.raises(ValueError):
        ClientIpPolicy((), trusted_hops=-1)


def test_cache_is_bounded() -> None:
    r = ClientIpResolver(cache_size=10)
    for i in range(50):
        r.resolve(AccessLog(downstream_remote_address=f"81.2.69.{i}:1"))
    assert len(r._cache) <= 10


@given(st.one_of(st.none(), st.text(max_size=60)), st.one_of(st.none(), st.text(max_size=60)),
       st.one_of(st.none(), st.text(max_size=80)))
@settings(max_examples=400, deadline=None)
def test_arbitrary_fields_never_raise(remote: str | None, direct: str | None,
                                      xff: str | None) -> None:
    resolve(LB, downstream_remote_address=remote, downstream_direct_remote_address=direct,
            x_forwarded_for=xff)


@given(st.ip_addresses(), st.lists(st.ip_addresses(), max_size=4))
@settings(max_examples=300, deadline=None)
def test_untrusted_peer_always_wins(peer, xff) -> None:  # noqa: ANN001
    if peer.version == 6:
        remote = f"[{peer}]:1"
    else:
        remote = f"{peer}:1"
    policy = ClientIpPolicy(("10.0.0.0/8",), 3)
    cip = resolve(policy, downstream_remote_address=remote,
                  x_forwarded_for=", ".join(map(str, xff)) or None)
    trusted = peer.version == 4 and peer in __import__("ipaddress").ip_network("10.0.0.0/8")
    mapped = peer.version == 6 and peer.ipv4_mapped is not None
    if not trusted and not mapped:
        assert cip.ip == str(peer) and cip.source == "peer"


def test_no_remote_address_logged() -> None:
    cip = resolve(LB, x_forwarded_for="81.2.69.142")
    assert cip.ip is None and cip.source == "none"
    assert cip.tags == ["clientip_no_remote_address"] and cip.related == ["81.2.69.142"]


# -- client_ip.envoy_use_remote_address ---------------------------------------------

_USE_REMOTE = dict(envoy_use_remote_address=True)


def test_default_format_has_no_client_without_the_option() -> None:
    cip = resolve(ClientIpPolicy(), x_forwarded_for="203.0.113.50,89.160.20.112")
    assert cip.ip is None and "clientip_no_remote_address" in cip.tags


def test_rightmost_xff_entry_is_the_peer_with_the_option() -> None:
    cip = resolve(ClientIpPolicy(**_USE_REMOTE), x_forwarded_for="203.0.113.50, 89.160.20.112")
    assert (cip.ip, cip.source, cip.port) == ("89.160.20.112", "peer", None)
    assert "clientip_no_remote_address" not in cip.tags


def test_the_walk_continues_left_of_envoys_entry() -> None:
    """Envoy saw a trusted LB (its entry, rightmost); the LB's entry left of it names
    the client."""
    policy = ClientIpPolicy(("10.0.0.0/8",), 1, envoy_use_remote_address=True)
    cip = resolve(policy, x_forwarded_for="6.6.6.6, 203.0.113.50, 10.0.0.2")
    assert (cip.ip, cip.source) == ("203.0.113.50", "x_forwarded_for")


def test_envoys_entry_is_never_a_hop_when_the_line_has_the_address() -> None:
    """With use_remote_address Envoy appended the remote address it logs: without the
    option that entry uses up trusted_hops=1 and the client is never reached."""
    fields = dict(downstream_remote_address="10.0.0.2:5555",
                  x_forwarded_for="203.0.113.50, 10.0.0.2")
    without = resolve(ClientIpPolicy(("10.0.0.0/8",), 1), **fields)
    assert without.ip == "10.0.0.2" and "clientip_xff_all_trusted" in without.tags
    opted = resolve(ClientIpPolicy(("10.0.0.0/8",), 1, envoy_use_remote_address=True), **fields)
    assert (opted.ip, opted.source) == ("203.0.113.50", "x_forwarded_for")


def test_the_option_never_overrides_an_untrusted_peer() -> None:
    cip = resolve(ClientIpPolicy(("10.0.0.0/8",), 2, envoy_use_remote_address=True),
                  x_forwarded_for="10.0.0.9, 89.160.20.112")
    assert (cip.ip, cip.source) == ("89.160.20.112", "peer")  # a spoofed hop is ignored
