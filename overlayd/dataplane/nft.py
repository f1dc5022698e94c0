"""overlayd's nftables tables: what they hold, how to write them atomically, how to read them back.

Pure: no I/O. `dataplane.kernel` runs `nft -j` with what this module builds
and hands its answers back here to parse.

Why `nft -j` (the JSON API of libnftables, documented in libnftables-json(5)):
it is the interface the netfilter project keeps stable for programs; the
`nft` binary is on every host that has nftables at all, so overlayd adds no
dependency (python3-nftables is the same library behind ctypes, but it lives
only in the distribution's site-packages, not in a virtualenv); one `nft -f`
run is one kernel transaction, so a table is replaced atomically; and a
short-lived process enters a gateway namespace with `nsenter --net` without
touching the daemon's own threads. It costs a few milliseconds per call, and
overlayd calls it only when a table's content changes (a network appears or
goes on this host), after its own writes (to read them back) and on the full
verify: nftables has no rtnetlink notifications, so a table someone deleted
is repaired on the next full verify, not at once.

Ownership: overlayd writes only tables named `overlayd` (family `ip` and, in
the host namespace, `bridge`) and never looks into any other table. Writing a
table replaces it whole: add (so the delete cannot fail), delete, add again
with every chain and rule, all in one transaction.

Comparison: every rule carries a comment, its name plus a digest of its
expression; a table read back is compared chain by chain (type, hook,
priority, policy) and rule by rule (the comments, in order). A deleted,
added or reordered rule, a changed chain or a missing table is found; an
expression edited in place under an unchanged comment is not.
"""

from __future__ import annotations

import hashlib
import json
from ipaddress import IPv4Network
from typing import Any

from overlayd.dataplane.kstate import (
    BRIDGE_PREFIX,
    NFT_TABLE,
    UPLINK_PREFIX,
    VXLAN_PREFIX,
    NftChain,
    NftRule,
    NftTable,
)

PRIO_RAW = -300
PRIO_FILTER = 0
PRIO_SRCNAT = 100

JSONish = dict[str, Any]


# --- expressions ----------------------------------------------------------------------


def _meta(key: str, op: str, value: str) -> JSONish:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def _ip(field: str, op: str, subnet: IPv4Network) -> JSONish:
    prefix = {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}
    return {"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}}, "right": prefix}}


def _ether(field: str, macs: list[str]) -> JSONish:
    right: Any = macs[0] if len(macs) == 1 else {"set": macs}
    return {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": field}}, "right": right}}


_CT_NEW: JSONish = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}
_DROP: JSONish = {"drop": None}
_MASQUERADE: JSONish = {"masquerade": None}
_NOTRACK: JSONish = {"notrack": None}
_RETURN: JSONish = {"return": None}


def rule(name: str, *expr: JSONish) -> NftRule:
    text = json.dumps(list(expr), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return NftRule(comment=f"overlayd {name} {digest}", expr=text)


# --- the tables overlayd wants ------------------------------------------------------------


def host_ip_table(*, uplinks: bool, routed: list[tuple[str, IPv4Network, bool]]) -> NftTable | None:
    """The host namespace's `ip overlayd` table, or None when it has nothing to hold.

    `uplinks`: some VXLAN network has its gateway namespace here; what comes out of
    their uplinks is masqueraded to the host's address, and nothing new goes into them
    (no one opens connections into a gateway namespace, and tenants never reach each other).
    `routed`: (bridge, subnet, egress) of each routed network here. What leaves a routed
    bridge for outside its subnet is masqueraded with egress and dropped without; nothing
    from outside its subnet opens a connection into it.

    The NAT makes the kernel track connections in this namespace, and with
    br_netfilter (Docker and podman load it) that would include every frame the
    bridges carry. Traffic within a network needs no tracking: what enters from a
    bridge (bridged, or routed within its subnet) and a routed subnet's own traffic
    from other hosts is left untracked at raw priority; only what leaves a subnet
    (to be masqueraded) and what comes back is tracked.
    """
    forward: list[NftRule] = []
    nat: list[NftRule] = []
    raw = [
        rule(f"{bridge}-leaving-tracked", _meta("iifname", "==", bridge), _ip("daddr", "!=", subnet), _RETURN)
        for bridge, subnet, _ in routed
    ]
    raw.append(rule("bridged-untracked", _meta("iifname", "==", f"{BRIDGE_PREFIX}*"), _NOTRACK))
    raw += [
        rule(f"{bridge}-within-untracked", _ip("saddr", "==", subnet), _ip("daddr", "==", subnet), _NOTRACK)
        for bridge, subnet, _ in routed
    ]
    if uplinks:
        forward.append(rule("uplinks-closed", _meta("oifname", "==", f"{UPLINK_PREFIX}*"), _CT_NEW, _DROP))
        nat.append(
            rule(
                "uplinks-masquerade",
                _meta("iifname", "==", f"{UPLINK_PREFIX}*"),
                _meta("oifname", "!=", f"{UPLINK_PREFIX}*"),
                _MASQUERADE,
            )
        )
    for bridge, subnet, egress in routed:
        if egress:
            nat.append(
                rule(
                    f"{bridge}-masquerade",
                    _meta("iifname", "==", bridge),
                    _ip("daddr", "!=", subnet),
                    _MASQUERADE,
                )
            )
        else:
            forward.append(
                rule(f"{bridge}-no-egress", _meta("iifname", "==", bridge), _ip("daddr", "!=", subnet), _DROP)
            )
        forward.append(
            rule(
                f"{bridge}-closed",
                _meta("oifname", "==", bridge),
                _ip("saddr", "!=", subnet),
                _CT_NEW,
                _DROP,
            )
        )
    if not forward and not nat:
        return None
    return NftTable(
        netns="",
        family="ip",
        chains=(
            NftChain("untracked", "filter", "prerouting", PRIO_RAW, "accept", tuple(raw)),
            NftChain("forward", "filter", "forward", PRIO_FILTER, "accept", tuple(forward)),
            NftChain("postrouting", "nat", "postrouting", PRIO_SRCNAT, "accept", tuple(nat)),
        ),
    )


def host_bridge_table(gateway_macs: list[str]) -> NftTable | None:
    """The host namespace's `bridge overlayd` table: gateway frames never cross VXLAN.

    Every host has the same gateway MAC on its bridge; a frame from it or to it
    that went over VXLAN would make the other hosts' bridges learn the gateway
    behind their VXLAN port (or hand one host's traffic to another's gateway).
    Such frames are dropped on the way out to a VXLAN port (forward: from the
    gateway's port; output: from a routed bridge itself) and, should another
    host send one anyway, on the way in, before the bridge learns from it
    (prerouting runs before learning).
    """
    if not gateway_macs:
        return None
    macs = sorted(gateway_macs)
    out_vxlan = _meta("oifname", "==", f"{VXLAN_PREFIX}*")
    out = (
        rule("gateway-from-stays-local", out_vxlan, _ether("saddr", macs), _DROP),
        rule("gateway-to-stays-local", out_vxlan, _ether("daddr", macs), _DROP),
    )
    in_vxlan = _meta("iifname", "==", f"{VXLAN_PREFIX}*")
    inbound = (
        rule("remote-gateway-from", in_vxlan, _ether("saddr", macs), _DROP),
        rule("remote-gateway-to", in_vxlan, _ether("daddr", macs), _DROP),
    )
    return NftTable(
        netns="",
        family="bridge",
        chains=(
            NftChain("prerouting", "filter", "prerouting", PRIO_FILTER, "accept", inbound),
            NftChain("forward", "filter", "forward", PRIO_FILTER, "accept", out),
            NftChain("output", "filter", "output", PRIO_FILTER, "accept", out),
        ),
    )


def gateway_ip_table(netns: str, *, uplink: str, subnet: IPv4Network) -> NftTable:
    """A gateway namespace's table: the subnet leaving through the uplink is masqueraded."""
    masquerade = rule("masquerade", _meta("oifname", "==", uplink), _ip("saddr", "==", subnet), _MASQUERADE)
    return NftTable(
        netns=netns,
        family="ip",
        chains=(NftChain("postrouting", "nat", "postrouting", PRIO_SRCNAT, "accept", (masquerade,)),),
    )


# --- writing ------------------------------------------------------------------------------


def _table_ref(family: str) -> JSONish:
    return {"family": family, "name": NFT_TABLE}


def replace_commands(table: NftTable) -> JSONish:
    """One transaction that leaves exactly `table` in the kernel, whatever was there."""
    ref = _table_ref(table.family)
    commands: list[JSONish] = [{"add": {"table": ref}}, {"delete": {"table": ref}}, {"add": {"table": ref}}]
    for chain in table.chains:
        commands.append(
            {
                "add": {
                    "chain": {
                        "family": table.family,
                        "table": NFT_TABLE,
                        "name": chain.name,
                        "type": chain.type,
                        "hook": chain.hook,
                        "prio": chain.prio,
                        "policy": chain.policy,
                    }
                }
            }
        )
    for chain in table.chains:
        for r in chain.rules:
            commands.append(
                {
                    "add": {
                        "rule": {
                            "family": table.family,
                            "table": NFT_TABLE,
                            "chain": chain.name,
                            "comment": r.comment,
                            "expr": json.loads(r.expr),
                        }
                    }
                }
            )
    return {"nftables": commands}


def delete_commands(family: str) -> JSONish:
    """One transaction that removes the table if it is there (add first: a delete of nothing fails)."""
    ref = _table_ref(family)
    return {"nftables": [{"add": {"table": ref}}, {"delete": {"table": ref}}]}


# --- reading ------------------------------------------------------------------------------


class NftParseError(ValueError):
    """`nft -j` answered something that is not a listing of our table."""


def parse_tables(data: object) -> set[str]:
    """Families that have a table named `overlayd`, from `nft -j list tables`."""
    out: set[str] = set()
    for item in _items(data):
        table = item.get("table")
        if (
            isinstance(table, dict)
            and table.get("name") == NFT_TABLE
            and isinstance(table.get("family"), str)
        ):
            out.add(table["family"])
    return out


def parse_table(netns: str, family: str, data: object) -> NftTable:
    """Our table as `nft -j list table FAMILY overlayd` shows it (rules by comment)."""
    chains: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    rules: dict[str, list[NftRule]] = {}
    for item in _items(data):
        chain = item.get("chain")
        if isinstance(chain, dict) and chain.get("table") == NFT_TABLE:
            name = str(chain.get("name"))
            chains[name] = chain
            order.append(name)
            rules.setdefault(name, [])
        found = item.get("rule")
        if isinstance(found, dict) and found.get("table") == NFT_TABLE:
            rules.setdefault(str(found.get("chain")), []).append(NftRule(str(found.get("comment") or "")))
    out = []
    for name in order:
        c = chains[name]
        prio = c.get("prio")
        out.append(
            NftChain(
                name=name,
                type=str(c.get("type", "")),
                hook=str(c.get("hook", "")),
                prio=prio if isinstance(prio, int) else -1,
                policy=str(c.get("policy", "")),
                rules=tuple(rules.get(name, ())),
            )
        )
    return NftTable(netns=netns, family=family, chains=tuple(out))


def _items(data: object) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("nftables"), list):
        raise NftParseError(f"not an nft -j answer: {str(data)[:200]}")
    return [item for item in data["nftables"] if isinstance(item, dict)]


def describe(table: NftTable) -> str:
    """One line for `overlayctl diff`."""
    rules = sum(len(c.rules) for c in table.chains)
    where = f" in {table.netns}" if table.netns else ""
    return f"nft table {table.family} {NFT_TABLE}{where}: {len(table.chains)} chains, {rules} rules"
