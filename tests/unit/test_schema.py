"""The admin API's schema: today's daemon answers read back exactly, wrong shapes are one clear line."""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import answers
import pytest

from overlayd.api import schema
from overlayd.core.config import from_flat
from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import EndpointPut, Fact, NetworkPut, NodePut
from overlayd.daemon.main import Daemon


def same_json(parsed: Any, answer: object) -> None:
    """to_json() gives back the answer: equal, and equal as text (so in the same key order)."""
    assert parsed.to_json() == answer
    assert json.dumps(parsed.to_json()) == json.dumps(answer)


# --- what today's daemon returns --------------------------------------------------


def daemon(tmp_path: Path, *, store: str = "etcd://198.18.0.1:2379") -> Daemon:
    flat: dict[str, Any] = {
        "node.name": "h1",
        "underlay.address": "198.18.0.11",
        "store.url": store,
        "state.dir": str(tmp_path / "state"),
    }
    if store == "gossip":
        flat["gossip.insecure"] = True
    return Daemon(from_flat(flat))


def populate(d: Daemon) -> None:
    """A view with a network, three nodes and endpoints, as the watch would leave it."""
    facts: list[Fact] = [
        NetworkPut(Network("demo", 42, IPv4Network("10.1.0.0/24"), IPv4Address("10.1.0.1"))),
        NetworkPut(Network("flat", 43, IPv4Network("10.2.0.0/16"), mtu=1400)),
    ]
    for k in (2, 3):
        facts.append(NodePut(Node(f"h{k}", IPv4Address(f"198.18.0.1{k}"), started_at=time.time())))
    d.engine.from_own([NodePut(Node("h1", IPv4Address("198.18.0.11"), started_at=time.time()))])
    for k, owner in ((5, "h1"), (6, "h2")):
        ep = Endpoint("demo", f"ep{k}", IPv4Address(f"10.1.0.{k}"), f"02:00:00:00:00:0{k}", owner,
                      created_at=time.time(), netns=f"/run/netns/ep{k}")
        if owner == "h1":
            d.engine.from_own([EndpointPut(ep)])
        else:
            facts.append(EndpointPut(ep))
    d.engine.from_store(facts)


@pytest.mark.parametrize("store", ["etcd://198.18.0.1:2379", "gossip"])
def test_the_daemons_own_answers_read_back_exactly(tmp_path: Path, store: str) -> None:
    d = daemon(tmp_path, store=store).service
    same_json(schema.Status.from_json(d.status()), d.status())
    populate(d._daemon)
    same_json(schema.Status.from_json(d.status()), d.status())
    peers = d.peers()
    assert [p.to_json() for p in schema.Peer.list_from_json(peers)] == peers
    if store == "gossip":
        assert all(p.state is not None for p in schema.Peer.list_from_json(peers))
    networks = d.network_list()
    assert [n.to_json() for n in schema.NetworkListItem.list_from_json(networks)] == networks
    for name in ("demo", "flat"):
        same_json(schema.NetworkInspect.from_json(d.network_inspect(name)), d.network_inspect(name))
    listed = d.endpoint_list()
    assert [e.to_json() for e in schema.EndpointInfo.list_from_json(listed)] == listed
    assert schema.EndpointInfo.list_from_json(listed)[0].key == "demo/ep5"


def test_a_full_status_reads_back_and_is_typed() -> None:
    answer = answers.status_json()
    status = schema.Status.from_json(answer)
    same_json(status, answer)
    assert status.vtep == IPv4Address("198.18.0.11") and status.underlay == schema.Underlay("ul0", 1500)
    assert status.store.latency_ms == 1.234
    assert status.store.invalid_records == ("/ovl/v1/networks/x: not JSON",)
    assert status.gossip == schema.GossipStatus(7946, {"alive": 2}, False)
    assert status.last_reconcile is not None and status.last_reconcile.applied == 3
    assert status.endpoints == schema.EndpointCounts(local=1, remote=2)


def test_optional_keys_are_left_out_as_the_daemon_does() -> None:
    plain = {"name": "h2", "vtep": "198.18.0.12", "started_at": 1.5, "endpoints": 3, "self": False}
    same_json(schema.Peer.from_json(plain), plain)
    gossip = {**plain, "state": "alive", "rtt_ms": None, "clock_offset": None}
    same_json(schema.Peer.from_json(gossip), gossip)
    member = {**gossip, "started_at": None, "rtt_ms": 0.5, "clock_offset": -0.25}
    same_json(schema.Peer.from_json(member), member)
    with pytest.raises(schema.SchemaError, match="missing field 'rtt_ms'"):
        schema.Peer.from_json({**plain, "state": "alive"})

    endpoint = answers_endpoint()
    same_json(schema.EndpointInfo.from_json(endpoint), endpoint)
    withdrawn = {**endpoint, "conflict": "IP 10.1.0.5 is h2's"}
    assert schema.EndpointInfo.from_json(withdrawn).conflict == "IP 10.1.0.5 is h2's"
    same_json(schema.EndpointInfo.from_json(withdrawn), withdrawn)

    inspect = {"name": "demo", "vni": 42, "subnet": "10.1.0.0/24", "gateway": None, "mtu": None,
               "mode": "vxlan", "egress": "none", "endpoints": [endpoint]}
    same_json(schema.NetworkInspect.from_json(inspect), inspect)
    with_mtu = {**inspect, "host_mtu": 1450, "endpoints": [endpoint]}
    with_mtu = {k: with_mtu[k] for k in ("name", "vni", "subnet", "gateway", "mtu", "mode", "egress",
                                           "host_mtu", "endpoints")}
    same_json(schema.NetworkInspect.from_json(with_mtu), with_mtu)
    routed = {k: v for k, v in inspect.items() if k != "endpoints"}
    routed |= {"mode": "routed", "egress": "nat", "gateway": "10.1.0.1", "host_mtu": 1450,
               "gateway_netns": "ovgw42",
               "paths": [{"node": "h2", "vtep": "198.18.0.12", "path": "direct"},
                         {"node": "h3", "vtep": "198.18.1.13", "path": "vxlan"}],
               "endpoints": [endpoint]}
    read = schema.NetworkInspect.from_json(routed)
    assert read.paths is not None and [p.path for p in read.paths] == ["direct", "vxlan"]
    same_json(read, routed)
    with_path = {**plain, "path": "direct"}
    assert schema.Peer.from_json(with_path).path == "direct"
    same_json(schema.Peer.from_json(with_path), with_path)


def answers_endpoint() -> dict[str, Any]:
    return Endpoint("demo", "web", IPv4Address("10.1.0.5"), "02:00:00:00:00:05", "h1",
                    created_at=1_700_000_000.5, netns="/run/netns/web").to_dict()


def test_operation_answers_read_back() -> None:
    probe = {"url": "etcd://198.18.0.1:2379", "ok": False, "latency_ms": None, "error": "no answer within 5s"}
    same_json(schema.StoreProbe.from_json(probe), probe)
    teardown = {"node": "h1", "endpoints_removed": ["demo/web"], "links_removed": ["ovbr42", "ovvx42"],
                "lease_released": True, "errors": [], "stopping": True}
    same_json(schema.TeardownResult.from_json(teardown), teardown)
    diff = ["ReplaceFdb demo 02:00:00:00:00:01 -> 198.18.0.2"]
    assert schema.Diff.from_json(diff).to_json() == diff
    check = {"network": "demo", "name": "web", "netns": "/run/netns/web", "ifname": "eth0", "found": True,
             "mac": "02:00:00:00:00:05", "up": True, "addresses": ["10.1.0.5/24"], "error": None}
    parsed = schema.EndpointCheck.from_json(check)
    assert parsed.addresses == (IPv4Interface("10.1.0.5/24"),)
    same_json(parsed, check)


# --- wrong shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ready": "yes"}, "status.ready: must be true or false, got a string"),
        ({"pid": True}, "status.pid: must be an integer, got true or false"),
        ({"vtep": "198.18.0.300"}, "status.vtep: must be an IPv4 address, got '198.18.0.300'"),
        ({"store": answers.store_json(pending_writes=None)},
         "status.store.pending_writes: must be an integer, got null"),
        ({"endpoints": {"local": 1}}, "status.endpoints: missing field 'remote'"),
        ({"errors": "none"}, "status.errors: must be a list of strings, got a string"),
        ({"gossip": {"port": 7946, "members": {"alive": "2"}, "insecure": False}},
         "status.gossip.members: must be an object of integers, got an object"),
        ({"clock": 1}, "status: unknown field 'clock'"),
    ],
)
def test_a_wrong_field_is_one_line_naming_it(change: dict[str, Any], message: str) -> None:
    with pytest.raises(schema.SchemaError) as info:
        schema.Status.from_json(answers.status_json(**change))
    assert str(info.value) == message


def test_wrong_containers_name_the_place() -> None:
    with pytest.raises(schema.SchemaError, match=r"^status: must be an object, got a list$"):
        schema.Status.from_json([])
    bad = [answers_endpoint(), {**answers_endpoint(), "ip": 5}]
    with pytest.raises(schema.SchemaError, match=r"^endpoints\[1\]\.ip: must be a string, got an integer$"):
        schema.EndpointInfo.list_from_json(bad)
    with pytest.raises(schema.SchemaError, match=r"must be an IPv4 subnet, got '10\.1\.0\.1/24'"):
        schema.NetworkInfo.from_json({"name": "n", "vni": 1, "subnet": "10.1.0.1/24", "gateway": None,
                                      "mtu": None})
    with pytest.raises(schema.SchemaError, match="diff: must be a list of strings"):
        schema.Diff.from_json({"changes": []})
