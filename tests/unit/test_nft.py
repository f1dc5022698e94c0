"""overlayd's nftables tables (overlayd.dataplane.nft): what they hold, how they are written and read back.

The real `nft` takes every kind of table in tests/integration/test_egress.py.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from typing import Any

import pytest

from overlayd.dataplane import nft
from overlayd.dataplane.kstate import NftTable

S = IPv4Network("10.7.0.0/24")
MAC = "02:aa:00:00:00:01"


def names(table: NftTable) -> dict[str, list[str]]:
    return {c.name: [r.comment.split()[1] for r in c.rules] for c in table.chains}


def test_nothing_to_hold_means_no_table() -> None:
    assert nft.host_ip_table(uplinks=False, routed=[]) is None
    assert nft.host_bridge_table([]) is None


def test_host_table_for_uplinks_and_routed_bridges() -> None:
    table = nft.host_ip_table(
        uplinks=True, routed=[("ovbr7", S, False), ("ovbr8", IPv4Network("10.8.0.0/24"), True)]
    )
    assert table is not None and (table.netns, table.family) == ("", "ip")
    assert names(table) == {
        # What stays within a network is never tracked; what leaves a routed subnet is.
        "untracked": [
            "ovbr7-leaving-tracked",
            "ovbr8-leaving-tracked",
            "bridged-untracked",
            "ovbr7-within-untracked",
            "ovbr8-within-untracked",
        ],
        "forward": ["uplinks-closed", "ovbr7-no-egress", "ovbr7-closed", "ovbr8-closed"],
        "postrouting": ["uplinks-masquerade", "ovbr8-masquerade"],
    }
    raw, forward, nat = table.chains
    assert (raw.type, raw.hook, raw.prio) == ("filter", "prerouting", -300)
    assert (forward.type, forward.hook, forward.prio, forward.policy) == ("filter", "forward", 0, "accept")
    assert (nat.type, nat.hook, nat.prio, nat.policy) == ("nat", "postrouting", 100, "accept")


def test_a_rules_comment_changes_with_its_expression() -> None:
    one = nft.gateway_ip_table("ns", uplink="up0", subnet=S)
    other = nft.gateway_ip_table("ns", uplink="up0", subnet=IPv4Network("10.9.0.0/24"))
    assert one.chains[0].rules[0].comment != other.chains[0].rules[0].comment
    assert one == nft.gateway_ip_table("ns", uplink="up0", subnet=S)
    assert json.loads(one.chains[0].rules[0].expr)[-1] == {"masquerade": None}


def test_the_bridge_table_keeps_gateway_frames_off_vxlan_both_ways() -> None:
    table = nft.host_bridge_table([MAC, "02:aa:00:00:00:02"])
    assert table is not None
    assert [c.hook for c in table.chains] == ["prerouting", "forward", "output"]
    exprs = [json.loads(r.expr) for c in table.chains for r in c.rules]
    assert all(e[0]["match"]["right"] == "ovvx*" for e in exprs)
    assert {e[1]["match"]["left"]["payload"]["field"] for e in exprs} == {"saddr", "daddr"}
    assert exprs[0][1]["match"]["right"] == {"set": sorted([MAC, "02:aa:00:00:00:02"])}


def test_replacing_is_one_transaction_that_leaves_exactly_the_table() -> None:
    table = nft.host_ip_table(uplinks=True, routed=[("ovbr7", S, True)])
    assert table is not None
    commands = nft.replace_commands(table)["nftables"]
    ref = {"family": "ip", "name": "overlayd"}
    assert commands[:3] == [{"add": {"table": ref}}, {"delete": {"table": ref}}, {"add": {"table": ref}}]
    chains = [c["add"]["chain"] for c in commands if "chain" in c.get("add", {})]
    assert [(c["name"], c["hook"], c["prio"]) for c in chains] == [
        ("untracked", "prerouting", -300),
        ("forward", "forward", 0),
        ("postrouting", "postrouting", 100),
    ]
    rules = [c["add"]["rule"] for c in commands if "rule" in c.get("add", {})]
    assert [r["comment"] for r in rules] == [r.comment for c in table.chains for r in c.rules]
    assert nft.delete_commands("bridge")["nftables"][1] == {
        "delete": {"table": {"family": "bridge", "name": "overlayd"}}
    }


def listing(table: NftTable) -> dict[str, Any]:
    """What `nft -j list table` answers for `table` (handles and all)."""
    items: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": table.family, "name": "overlayd", "handle": 3}},
    ]
    handle = 1
    for c in table.chains:
        items.append(
            {
                "chain": {
                    "family": table.family,
                    "table": "overlayd",
                    "name": c.name,
                    "handle": handle,
                    "type": c.type,
                    "hook": c.hook,
                    "prio": c.prio,
                    "policy": c.policy,
                }
            }
        )
        handle += 1
    for c in table.chains:
        for r in c.rules:
            items.append(
                {
                    "rule": {
                        "family": table.family,
                        "table": "overlayd",
                        "chain": c.name,
                        "handle": handle,
                        "comment": r.comment,
                        "expr": json.loads(r.expr),
                    }
                }
            )
            handle += 1
    return {"nftables": items}


def test_a_listing_reads_back_equal_and_drift_shows() -> None:
    table = nft.host_ip_table(uplinks=True, routed=[("ovbr7", S, False)])
    assert table is not None
    assert nft.parse_table("", "ip", listing(table)) == table
    data = listing(table)
    data["nftables"] = [
        i for i in data["nftables"] if "ovbr7-closed" not in i.get("rule", {}).get("comment", "")
    ]
    assert nft.parse_table("", "ip", data) != table  # a rule deleted behind our back
    data = listing(table)
    data["nftables"][2]["chain"]["policy"] = "drop"
    assert nft.parse_table("", "ip", data) != table  # a chain changed
    tables = {
        "nftables": [
            {"table": {"family": "ip", "name": "overlayd"}},
            {"table": {"family": "inet", "name": "filter"}},
        ]
    }
    assert nft.parse_tables(tables) == {"ip"}
    with pytest.raises(nft.NftParseError):
        nft.parse_table("", "ip", {"error": "no such table"})
