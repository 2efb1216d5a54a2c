"""Which networks to deny now, and why.

An address that raised an alert is denied until `expire_after_s` after its latest
alert; a new alert pushes the release back. The allow list always wins: an alerting
address inside it is not denied at all, and a deny-list network that overlaps it is
rendered with the allowed part carved out (see `render`). The deny list's own entries
never expire and are never cut: they are the operator's decision. What does not fit
under `max_entries` is cut, smallest offenders first, and said.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.iplists import IpList, Network, parse_network


@dataclass(frozen=True)
class Offence:
    """One alert document, reduced to what a decision needs."""

    ip: str
    alert_id: str
    rule: str
    ts: float  # the alert's @timestamp (event time of the threshold crossing), epoch s
    count: int  # requests counted in the rule's window when it fired


@dataclass
class Entry:
    """One denied network."""

    cidr: str
    origin: str  # "alert" or "deny_list"
    expires_at: float | None = None  # epoch s; None: until removed from the deny list
    alert_ids: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    score: int = 0  # sum of the alerts' counts: how big an offender
    last_alert: float | None = None

    def to_json(self) -> dict[str, object]:
        return {"cidr": self.cidr, "origin": self.origin, "expires_at": self.expires_at,
                "alert_ids": self.alert_ids, "rules": self.rules, "score": self.score,
                "last_alert": self.last_alert}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Entry:
        return cls(cidr=str(d["cidr"]), origin=str(d.get("origin", "alert")),
                   expires_at=d.get("expires_at"),  # type: ignore[arg-type]
                   alert_ids=list(d.get("alert_ids") or []),  # type: ignore[call-overload]
                   rules=list(d.get("rules") or []),  # type: ignore[call-overload]
                   score=int(d.get("score") or 0),  # type: ignore[call-overload]
                   last_alert=d.get("last_alert"))  # type: ignore[arg-type]


@dataclass
class Decision:
    deny: list[Entry]  # what the gateway enforces, deny-list entries first
    allow: list[str]  # allow-list networks (carved out of every deny; allow_only: the only way in)
    allowlisted: list[Entry] = field(default_factory=list)  # alerting, but allowed
    cut: list[Entry] = field(default_factory=list)  # over max_entries, not enforced
    invalid: list[Offence] = field(default_factory=list)  # alert with no usable address


class PolicyError(ValueError):
    """A policy that cannot be enforced as configured (said, not guessed around)."""


def decide(offences: Iterable[Offence], deny_list: IpList, allow_list: IpList, *,
           now: float, expire_after_s: float, max_entries: int,
           rules: Iterable[str] = ()) -> Decision:
    """The deny set for `now`. `offences` may hold alerts older than the expiry (they are
    ignored) and of other rules (kept only if `rules` is empty or names them)."""
    wanted = set(rules)
    if len(deny_list) > max_entries:
        raise PolicyError(f"the deny list alone has {len(deny_list)} entries, over "
                          f"policy.max_entries ({max_entries})")
    by_net: dict[Network, Entry] = {}
    invalid: list[Offence] = []
    for o in offences:
        if wanted and o.rule not in wanted:
            continue
        if o.ts + expire_after_s <= now:
            continue
        try:
            net = parse_network(o.ip)
        except ValueError:
            invalid.append(o)
            continue
        e = by_net.get(net)
        if e is None:
            e = by_net[net] = Entry(cidr=str(net), origin="alert")
        if o.alert_id not in e.alert_ids:
            e.alert_ids.append(o.alert_id)
            e.score += o.count
        if o.rule not in e.rules:
            e.rules.append(o.rule)
        if e.last_alert is None or o.ts > e.last_alert:
            e.last_alert = o.ts
            e.expires_at = o.ts + expire_after_s
    static = {n: Entry(cidr=str(n), origin="deny_list") for n in deny_list}
    allowlisted: list[Entry] = []
    dynamic: list[Entry] = []
    for net, e in by_net.items():
        if allow_list.covering(net) is not None:
            allowlisted.append(e)
            continue
        covering = deny_list.covering(net)
        if covering is not None:
            # Denied anyway, for good; keep the alert ids on the static entry for the audit.
            static[covering].alert_ids.extend(e.alert_ids)
            static[covering].score += e.score
        else:
            dynamic.append(e)
    # Largest offenders first; ties: the most recent, then the address (stable output).
    dynamic.sort(key=lambda e: (-e.score, -(e.last_alert or 0), e.cidr))
    room = max_entries - len(static)
    kept, cut = dynamic[:room], dynamic[room:]
    kept.sort(key=lambda e: _net_key(e.cidr))
    return Decision(deny=list(static.values()) + kept, allow=[str(n) for n in allow_list],
                    allowlisted=allowlisted, cut=cut, invalid=invalid)


def _net_key(cidr: str) -> tuple[int, int, int]:
    n = parse_network(cidr)
    return (n.version, int(n.network_address), n.prefixlen)
