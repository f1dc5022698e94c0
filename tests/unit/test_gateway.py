"""Anycast gateways, NAT egress and routed mode: desired state and the plan, as transcripts (no root).

"This view in, these kernel objects wanted" for each kind of network, then
"this kernel in, these commands out" for the new objects (gateway
namespaces, veths into them, addresses, routes, forwarding, nftables
tables), and a strict simulator that plays random changes through desired
state and the plan until the kernel matches.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlayd.core.model import Endpoint, Network, Node, ValidationError, routed_overlap, stable_mac
from overlayd.core.view import (
    ClusterView,
    Delta,
    EndpointDeleted,
    EndpointPut,
    Fact,
    NetworkDeleted,
    NetworkPut,
    NodePut,
)
from overlayd.dataplane.commands import (
    AnnounceArp,
    AppendFlood,
    Command,
    DeleteAddr,
    DeleteFdb,
    DeleteFlood,
    DeleteLink,
    DeleteNeigh,
    DeleteNetns,
    DeleteNft,
    DeleteRoute,
    EnableForwarding,
    EnsureBridge,
    EnsureNetns,
    EnsureVeth,
    EnsureVxlan,
    ReplaceAddr,
    ReplaceFdb,
    ReplaceNeigh,
    ReplaceNft,
    ReplaceRoute,
    SetInnerLink,
    SetPort,
)
from overlayd.dataplane.desired import (
    PATH_DIRECT,
    PATH_VXLAN,
    UPLINK_HOST,
    DesiredState,
    gateway_mac,
    transit_address,
)
from overlayd.dataplane.diff import diff, plan
from overlayd.dataplane.kstate import (
    GW_INNER,
    HOST_NS,
    UP_INNER,
    Dirty,
    FdbEntry,
    FloodEntry,
    InnerLinkSpec,
    KernelState,
    NeighEntry,
    RouteSpec,
    Tables,
)

A = IPv4Address
N = IPv4Network
I = IPv4Interface  # noqa: E741 (an interface address, as in the kernel's tables)

LOCAL = "host-a"
VTEP_A = A("198.18.0.11")
VTEP_B = A("198.18.0.12")  # on host-a's segment
VTEP_C = A("198.18.1.13")  # behind a router
SEGMENT = N("198.18.0.0/24")
UL = "ul0"
PREFIX = "gw"

ROUTED = Network("rt", 300, N("10.3.0.0/24"), gateway=A("10.3.0.1"), mode="routed")
NAT = Network("out", 400, N("10.4.0.0/24"), gateway=A("10.4.0.1"), egress="nat")
NAT2 = Network("out2", 401, N("10.4.0.0/24"), gateway=A("10.4.0.1"), egress="nat")  # same subnet
ROUTED_NAT = Network("rtn", 500, N("10.5.0.0/24"), gateway=A("10.5.0.1"), mode="routed", egress="nat")
PLAIN = Network("plain", 600, N("10.6.0.0/24"), gateway=A("10.6.0.1"))


def mac(n: int) -> str:
    return f"02:00:00:00:{n // 256:02x}:{n % 256:02x}"


def ep(name: str, network: Network, host_ip: int, owner: str, mac_n: int) -> Endpoint:
    ip = network.subnet.network_address + host_ip
    return Endpoint(network=network.name, name=name, ip=ip, mac=mac(mac_n), owner=owner)


def view(
    *endpoints: Endpoint, networks: tuple[Network, ...] = (ROUTED, NAT, NAT2, ROUTED_NAT, PLAIN)
) -> ClusterView:
    v = ClusterView()
    for n in networks:
        v.apply(NetworkPut(n))
    for name, vtep in ((LOCAL, VTEP_A), ("host-b", VTEP_B), ("host-c", VTEP_C)):
        v.apply(NodePut(Node(name=name, vtep=vtep, started_at=0.0)))
    for e in endpoints:
        v.apply(EndpointPut(e))
    return v


def desired(v: ClusterView, *, node: str = LOCAL, vtep: IPv4Address = VTEP_A) -> DesiredState:
    return DesiredState(
        v,
        local_node=node,
        local_vtep=vtep,
        underlay_mtu=1500,
        underlay_ifname=UL,
        underlay_network=SEGMENT,
        gateway_netns_prefix=PREFIX,
    )


def host_route(ip: IPv4Address) -> tuple[str, IPv4Network]:
    return (HOST_NS, N(f"{ip}/32"))


# --- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"egress": "nat"}, "egress nat needs a gateway"),
        ({"mode": "routed"}, "routed mode needs a gateway"),
        ({"mode": "bgp", "gateway": "10.9.0.1"}, "invalid mode 'bgp'"),
        ({"egress": "masquerade", "gateway": "10.9.0.1"}, "invalid egress 'masquerade'"),
        ({"egress": "nat", "gateway": "10.9.0.1", "vni": 2**22}, "at most 4194303"),
    ],
)
def test_bad_networks_get_one_clear_error(fields: dict[str, object], message: str) -> None:
    record = {"name": "n", "vni": 9, "subnet": "10.9.0.0/24", **fields}
    with pytest.raises(ValidationError, match=message):
        Network.from_dict(record)


def test_routed_networks_may_not_overlap_each_other_but_vxlan_ones_may() -> None:
    wider = Network("wide", 301, N("10.3.0.0/16"), gateway=A("10.3.9.1"), mode="routed")
    assert routed_overlap(wider, [ROUTED, NAT]) == ROUTED
    assert routed_overlap(NAT2, [NAT, ROUTED]) is None  # VXLAN networks: their own namespaces
    assert routed_overlap(ROUTED, [ROUTED]) is None  # itself
    old = Network.from_dict({"name": "old", "vni": 1, "subnet": "10.9.0.0/24"})
    assert (old.mode, old.egress) == ("vxlan", "none")  # records from before modes existed


# --- routed mode ----------------------------------------------------------------------------


def test_a_routed_peer_on_the_segment_gets_a_host_route_and_nothing_over_vxlan() -> None:
    local, near = ep("a", ROUTED, 2, LOCAL, 1), ep("b", ROUTED, 11, "host-b", 11)
    t = desired(view(local, near)).tables
    assert t.routes == {host_route(near.ip): RouteSpec(UL, VTEP_B)}
    assert (t.fdb, t.neigh, t.flood) == ({}, {}, set())
    bridge = t.bridges["ovbr300"]
    # The gateway lives on the bridge, with the MAC every host uses for it.
    assert bridge.routed and bridge.mac == gateway_mac(ROUTED)
    assert t.addrs == {(HOST_NS, "ovbr300", I("10.3.0.1/24"))}
    assert t.forwarding == {(HOST_NS, UL)}
    assert (t.netns, t.veths, t.inner) == ({}, {}, {})
    comments = [r.comment.split()[1] for c in t.nft[(HOST_NS, "ip")].chains[1:] for r in c.rules]
    assert comments == ["ovbr300-no-egress", "ovbr300-closed"]
    assert t.nft[(HOST_NS, "bridge")].chains[0].name == "prerouting"


def test_a_routed_peer_behind_a_router_falls_back_to_vxlan() -> None:
    local, far = ep("a", ROUTED, 2, LOCAL, 1), ep("c", ROUTED, 21, "host-c", 21)
    d = desired(view(local, far))
    t = d.tables
    assert t.routes == {}
    assert t.fdb == {("ovvx300", far.mac): VTEP_C}
    assert t.neigh == {("ovvx300", far.ip): far.mac}
    assert t.flood == {("ovvx300", VTEP_C)}
    assert (d.path_to(VTEP_B), d.path_to(VTEP_C)) == (PATH_DIRECT, PATH_VXLAN)


def test_the_path_follows_a_host_that_moves_off_the_segment() -> None:
    local, near = ep("a", ROUTED, 2, LOCAL, 1), ep("b", ROUTED, 11, "host-b", 11)
    v = view(local, near)
    d = desired(v)
    d.dirty.take()
    moved = Node(name="host-b", vtep=A("198.18.1.50"), started_at=1.0)
    d.apply(changes(v, NodePut(moved)))
    dirty = d.dirty.take()
    assert dirty.routes == {host_route(near.ip)} and host_route(near.ip) not in d.tables.routes
    assert d.tables.fdb == {("ovvx300", near.mac): moved.vtep}
    assert d.tables.flood == {("ovvx300", moved.vtep)}


def changes(v: ClusterView, *facts: Fact) -> list[Delta]:
    """The view's deltas for `facts`, applied in order."""
    return [delta for fact in facts if (delta := v.change(fact)) is not None]


def test_without_an_underlay_segment_every_pair_falls_back() -> None:
    local, near = ep("a", ROUTED, 2, LOCAL, 1), ep("b", ROUTED, 11, "host-b", 11)
    d = DesiredState(view(local, near), local_node=LOCAL, local_vtep=VTEP_A, underlay_mtu=1500)
    assert d.tables.routes == {} and d.tables.fdb == {("ovvx300", near.mac): VTEP_B}
    assert d.tables.forwarding == set()  # no underlay interface to name


def test_routed_with_egress_masquerades_on_the_host_and_drops_nothing_outbound() -> None:
    t = desired(view(ep("a", ROUTED_NAT, 2, LOCAL, 1))).tables
    rules = {c.name: [r.comment.split()[1] for r in c.rules] for c in t.nft[(HOST_NS, "ip")].chains[1:]}
    assert rules == {"forward": ["ovbr500-closed"], "postrouting": ["ovbr500-masquerade"]}
    assert t.netns == {}  # the host's own routing table: no namespace


def test_an_overlapping_routed_network_keeps_layer_2_and_says_why() -> None:
    clash = Network("rt2", 302, N("10.3.0.0/25"), gateway=A("10.3.0.100"), mode="routed")
    v = view(ep("a", ROUTED, 2, LOCAL, 1), ep("x", clash, 3, LOCAL, 3), networks=(ROUTED, clash))
    d = desired(v)
    assert d.tables.bridges["ovbr300"].routed and not d.tables.bridges["ovbr302"].routed
    assert "overlaps routed network rt" in d.problems["rt2"]
    assert {a[1] for a in d.tables.addrs} == {"ovbr300"}


# --- VXLAN mode with egress -----------------------------------------------------------------


def test_a_vxlan_network_with_egress_gets_its_gateway_namespace() -> None:
    local, near = ep("a", NAT, 2, LOCAL, 1), ep("b", NAT, 11, "host-b", 11)
    d = desired(view(local, near))
    t = d.tables
    ns = "gw400"
    assert d.gateway_netns_of("out") == ns and set(t.netns) == {ns}
    gw, up = t.veths["ovgw400"], t.veths["ovup400"]
    assert (gw.role, gw.bridge, gw.netns, gw.peer, gw.peer_mac, gw.mtu) == (
        "gw",
        "ovbr400",
        ns,
        GW_INNER,
        gateway_mac(NAT),
        1450,
    )
    assert (up.role, up.bridge, up.forwarding, up.peer, up.mtu) == ("uplink", "", True, UP_INNER, 1500)
    assert t.inner[(ns, GW_INNER)] == InnerLinkSpec(ns, GW_INNER, gateway_mac(NAT), 1450)
    transit = transit_address(400)
    assert t.addrs == {
        (ns, GW_INNER, I("10.4.0.1/24")),
        (ns, UP_INNER, I(f"{transit}/32")),
        (HOST_NS, "ovup400", I(f"{UPLINK_HOST}/32")),
    }
    assert t.routes == {
        (ns, N("0.0.0.0/0")): RouteSpec(UP_INNER, UPLINK_HOST),
        host_route(transit): RouteSpec("ovup400", None),
    }
    assert set(t.nft) == {(ns, "ip"), (HOST_NS, "ip"), (HOST_NS, "bridge")}
    # Remote endpoints are VXLAN as ever; the bridge keeps this host's own MAC.
    assert t.fdb == {("ovvx400", near.mac): VTEP_B}
    assert t.bridges["ovbr400"].mac == stable_mac(LOCAL, "400") and not t.bridges["ovbr400"].routed
    assert t.forwarding == {(HOST_NS, UL)}


def test_two_networks_with_one_subnet_each_get_a_namespace_and_an_uplink_address() -> None:
    t = desired(view(ep("a", NAT, 2, LOCAL, 1), ep("a", NAT2, 2, LOCAL, 2))).tables
    assert set(t.netns) == {"gw400", "gw401"}
    gateways = sorted(a for a in t.addrs if a[1] == GW_INNER)
    assert gateways == [("gw400", GW_INNER, I("10.4.0.1/24")), ("gw401", GW_INNER, I("10.4.0.1/24"))]
    assert host_route(transit_address(400)) in t.routes and host_route(transit_address(401)) in t.routes
    # The subnet itself appears in no table of the host's own namespace.
    assert not any(k[0] == HOST_NS and k[1].overlaps(NAT.subnet) for k in t.routes)
    assert [r.comment.split()[1] for r in t.nft[(HOST_NS, "ip")].chains[2].rules] == ["uplinks-masquerade"]


def test_the_gateway_is_the_same_on_every_host_and_never_an_entry_towards_another() -> None:
    endpoints = (ep("a", NAT, 2, LOCAL, 1), ep("b", NAT, 11, "host-b", 11), ep("c", NAT, 21, "host-c", 21))
    here, there = desired(view(*endpoints)), desired(view(*endpoints), node="host-b", vtep=VTEP_B)
    assert here.tables.inner[("gw400", GW_INNER)].mac == there.tables.inner[("gw400", GW_INNER)].mac
    for t in (here.tables, there.tables):
        assert gateway_mac(NAT) not in {m for _, m in t.fdb} | set(t.neigh.values())
        assert NAT.gateway not in {ip for _, ip in t.neigh}


def test_a_network_without_egress_or_routing_has_no_layer_3() -> None:
    t = desired(view(ep("a", PLAIN, 2, LOCAL, 1), ep("b", PLAIN, 11, "host-b", 11))).tables
    assert (t.netns, t.veths, t.addrs, t.routes, t.forwarding, t.nft) == ({}, {}, set(), {}, set(), {})


@pytest.mark.parametrize("network", [ROUTED, NAT, ROUTED_NAT])
def test_the_last_local_endpoint_going_takes_everything_back(network: Network) -> None:
    local, remote = ep("a", network, 2, LOCAL, 1), ep("b", network, 11, "host-b", 11)
    v = view(local, remote)
    d = desired(v)
    before = copy.deepcopy(d.tables)
    d.dirty.take()
    d.apply(changes(v, EndpointDeleted(local.key)))
    assert d.tables == Tables()
    dirty = d.dirty.take()
    # Everything it had is marked, so the reconciler compares (and removes) it.
    assert dirty.netns == set(before.netns) and dirty.addrs == before.addrs
    assert dirty.routes == set(before.routes) and dirty.nft == set(before.nft)
    assert dirty.forwarding == before.forwarding


# --- the plan -------------------------------------------------------------------------------


def fresh_plan(*endpoints: Endpoint) -> list[Command]:
    want = desired(view(*endpoints)).tables
    everything = Dirty()
    everything.add_tables(want)
    return plan(want, Tables(), everything).commands


def test_a_new_gateway_namespace_is_built_in_order() -> None:
    cmds = fresh_plan(ep("a", NAT, 2, LOCAL, 1))
    kinds = [type(c).__name__ for c in cmds]
    first = {k: kinds.index(k) for k in dict.fromkeys(kinds)}
    order = ["EnsureNetns", "EnsureBridge", "EnsureVxlan", "EnsureVeth", "SetInnerLink", "ReplaceAddr"]
    order += ["ReplaceRoute", "EnableForwarding", "ReplaceNft"]
    assert [first[k] for k in order] == sorted(first[k] for k in order)
    # The gateway port needs its bridge; addresses before the routes through them.
    veths = [c for c in cmds if isinstance(c, EnsureVeth)]
    assert [v.spec.ifname for v in veths] == ["ovgw400", "ovup400"]
    assert not any(isinstance(c, Delete) for c in cmds for Delete in (DeleteAddr, DeleteRoute, DeleteNft))


def test_a_namespace_deleted_behind_our_back_is_made_anew_with_its_veths() -> None:
    want = desired(view(ep("a", NAT, 2, LOCAL, 1))).tables
    have = copy.deepcopy(want)
    del have.netns["gw400"]  # its pin is gone; the host sides of the veths still stand
    dirty = Dirty(netns={"gw400"}, links={"ovgw400", "ovup400"})
    dirty.add_netns(want, "gw400")
    cmds = plan(want, have, dirty).commands
    assert cmds[0] == EnsureNetns(want.netns["gw400"])
    assert cmds[1:5] == [
        DeleteLink("ovgw400"),
        EnsureVeth(want.veths["ovgw400"]),
        DeleteLink("ovup400"),
        EnsureVeth(want.veths["ovup400"]),
    ]
    inside = {type(c) for c in cmds[5:]}
    assert inside == {SetInnerLink, ReplaceAddr, ReplaceRoute, ReplaceNft}


def test_a_network_going_away_removes_the_namespace_not_its_contents() -> None:
    have = desired(view(ep("a", NAT, 2, LOCAL, 1))).tables
    want = Tables()
    dirty = Dirty()
    dirty.add_tables(have)
    cmds = plan(want, have, dirty).commands
    assert cmds == [
        DeleteNft(HOST_NS, "bridge"),
        DeleteNft(HOST_NS, "ip"),
        DeleteLink("ovvx400"),
        DeleteLink("ovgw400"),
        DeleteLink("ovup400"),  # its address and the route through it go with it
        DeleteLink("ovbr400"),
        DeleteNetns("gw400"),  # everything inside goes with it
    ]
    held = plan(want, have, dirty, hold_deletions=True)
    assert (held.commands, held.held) == ([], len(cmds))


def test_forwarding_is_only_ever_switched_on() -> None:
    want, have = Tables(forwarding={(HOST_NS, "ul0")}), Tables(forwarding={(HOST_NS, "eth9")})
    dirty = Dirty(forwarding={(HOST_NS, "ul0"), (HOST_NS, "eth9")})
    assert plan(want, have, dirty).commands == [EnableForwarding(HOST_NS, "ul0")]


def test_a_route_that_changes_host_is_one_replace() -> None:
    local, near = ep("a", ROUTED, 2, LOCAL, 1), ep("b", ROUTED, 11, "host-b", 11)
    want = desired(view(local, near)).tables
    have = copy.deepcopy(want)
    have.routes[host_route(near.ip)] = RouteSpec(UL, A("198.18.0.99"))
    cmds = plan(want, have, Dirty(routes={host_route(near.ip)})).commands
    assert cmds == [
        ReplaceRoute(host_route(near.ip), RouteSpec(UL, VTEP_B)),
        # Local endpoints may have cached another MAC for it: the gateway answers now.
        AnnounceArp("ovbr300", near.ip, gateway_mac(ROUTED)),
    ]
    gone = Tables(routes={host_route(near.ip): RouteSpec(UL, VTEP_B)})
    assert plan(Tables(), gone, Dirty(routes={host_route(near.ip)})).commands == [
        DeleteRoute(host_route(near.ip))
    ]


def test_an_address_back_from_behind_the_router_is_announced_at_the_gateway() -> None:
    # Behind the router the endpoint was reached over VXLAN, and local endpoints cached its own
    # MAC; on the segment it is routed, and they must learn that the gateway answers for it.
    local = ep("a", ROUTED, 2, LOCAL, 1)
    far, near = ep("x", ROUTED, 11, "host-c", 11), ep("x", ROUTED, 11, "host-b", 12)
    v = view(local, far)
    d = desired(v)
    have = copy.deepcopy(d.tables)
    d.dirty.take()
    d.apply(changes(v, EndpointDeleted(far.key), EndpointPut(near)))
    cmds = plan(d.tables, have, d.dirty.take()).commands
    assert cmds == [
        ReplaceRoute(host_route(near.ip), RouteSpec(UL, VTEP_B)),
        AnnounceArp("ovbr300", near.ip, gateway_mac(ROUTED)),
        DeleteNeigh(NeighEntry("ovvx300", far.ip, far.mac)),
        DeleteFdb(FdbEntry("ovvx300", far.mac, VTEP_C)),
        DeleteFlood(FloodEntry("ovvx300", VTEP_C)),
    ]


def test_a_changed_nft_table_is_replaced_whole_and_a_stale_one_deleted() -> None:
    want = desired(view(ep("a", ROUTED, 2, LOCAL, 1))).tables
    table = want.nft[(HOST_NS, "ip")]
    edited = replace(
        table, chains=(replace(table.chains[0], rules=table.chains[0].rules[:1]), table.chains[1])
    )
    have = Tables(nft={(HOST_NS, "ip"): edited, ("gwold", "ip"): table})
    dirty = Dirty(nft={(HOST_NS, "ip"), ("gwold", "ip")})
    assert plan(want, have, dirty).commands == [ReplaceNft(table), DeleteNft("gwold", "ip")]


# --- a strict kernel simulator: random changes converge -------------------------------------


class Refused(Exception):
    pass


def simulate(start: KernelState, cmds: list[Command]) -> KernelState:
    """Apply commands as the kernel would; anything it would refuse raises."""
    k = copy.deepcopy(start)

    def device_exists(netns: str, name: str) -> bool:
        if netns == HOST_NS:
            return name == UL or name in k.bridges or name in k.veths or name in k.vxlans
        return (netns, name) in k.inner

    def drop_device(netns: str, name: str) -> None:
        k.addrs = {a for a in k.addrs if (a[0], a[1]) != (netns, name)}
        k.routes = {key: r for key, r in k.routes.items() if (key[0], r.device) != (netns, name)}

    for cmd in cmds:
        match cmd:
            case EnsureBridge(spec):
                k.bridges[spec.ifname] = spec
            case EnsureVxlan(spec):
                if spec.bridge not in k.bridges:
                    raise Refused(f"no master {spec.bridge}")
                k.vxlans[spec.ifname] = spec
            case SetPort(spec):
                k.ports[spec.ifname] = spec
            case EnsureNetns(spec):
                if spec.name in k.netns:
                    raise Refused(f"{spec.name} exists")
                k.netns[spec.name] = spec
            case DeleteNetns(name):
                if name not in k.netns:
                    raise Refused(f"no netns {name}")
                del k.netns[name]
                k.inner = {key: v for key, v in k.inner.items() if key[0] != name}
                k.addrs = {a for a in k.addrs if a[0] != name}
                k.routes = {key: r for key, r in k.routes.items() if key[0] != name}
                k.nft = {key: t for key, t in k.nft.items() if key[0] != name}
                for veth in [v for v in k.veths.values() if v.netns == name]:
                    del k.veths[veth.ifname]
                    drop_device(HOST_NS, veth.ifname)
            case EnsureVeth(spec):
                if spec.netns not in k.netns:
                    raise Refused(f"no netns {spec.netns}")
                if spec.bridge and spec.bridge not in k.bridges:
                    raise Refused(f"no master {spec.bridge}")
                if spec.ifname not in k.veths:
                    k.inner[(spec.netns, spec.peer)] = InnerLinkSpec(
                        spec.netns, spec.peer, spec.peer_mac, spec.mtu, up=False, forwarding=False
                    )
                k.veths[spec.ifname] = spec
            case SetInnerLink(spec):
                if (spec.netns, spec.ifname) not in k.inner:
                    raise Refused(f"no {spec.ifname} in {spec.netns}")
                k.inner[(spec.netns, spec.ifname)] = spec
            case DeleteLink(name):
                if name in k.veths:
                    veth = k.veths.pop(name)
                    k.inner.pop((veth.netns, veth.peer), None)
                    drop_device(veth.netns, veth.peer)
                elif name in k.vxlans:
                    del k.vxlans[name]
                    k.fdb = {e for e in k.fdb if e.device != name}
                    k.flood = {e for e in k.flood if e.device != name}
                    k.neigh = {e for e in k.neigh if e.device != name}
                elif name in k.bridges:
                    del k.bridges[name]
                elif name in k.ports:
                    del k.ports[name]
                else:
                    raise Refused(f"no link {name}")
                drop_device(HOST_NS, name)
            case ReplaceAddr(key):
                if not device_exists(key[0], key[1]):
                    raise Refused(f"no device {key[1]} in {key[0]!r}")
                k.addrs.add(key)
            case DeleteAddr(key):
                if key not in k.addrs:
                    raise Refused(f"no address {key}")
                k.addrs.discard(key)
            case ReplaceRoute(key, route):
                if not device_exists(key[0], route.device):
                    raise Refused(f"no device {route.device} in {key[0]!r}")
                k.routes[key] = route
            case DeleteRoute(key):
                if key not in k.routes:
                    raise Refused(f"no route {key}")
                del k.routes[key]
            case EnableForwarding(netns, device):
                k.forwarding.add((netns, device))
            case ReplaceNft(table):
                if table.netns and table.netns not in k.netns:
                    raise Refused(f"no netns {table.netns}")
                k.nft[(table.netns, table.family)] = table
            case DeleteNft(netns, family):
                if (netns, family) not in k.nft:
                    raise Refused(f"no table {family} in {netns!r}")
                del k.nft[(netns, family)]
            case ReplaceFdb(e):
                k.fdb = {f for f in k.fdb if (f.device, f.mac) != (e.device, e.mac)} | {e}
            case DeleteFdb(e):
                k.fdb.discard(e)
            case AppendFlood(e):
                k.flood.add(e)
            case DeleteFlood(e):
                k.flood.discard(e)
            case ReplaceNeigh(e):
                k.neigh = {n for n in k.neigh if (n.device, n.ip) != (e.device, e.ip)} | {e}
            case DeleteNeigh(e):
                k.neigh = {n for n in k.neigh if (n.device, n.ip) != (e.device, e.ip)}
            case AnnounceArp():
                pass
    return k


def comparable(state: KernelState) -> KernelState:
    """What the kernel keeps of the desired state: ports are made by the admin API, not the plan."""
    out = copy.deepcopy(state)
    out.ports = {}
    return out


@pytest.mark.parametrize("seed", range(40))
def test_random_changes_converge_through_the_plan(seed: int) -> None:
    rng = random.Random(seed)
    networks = (ROUTED, NAT, NAT2, ROUTED_NAT, PLAIN)
    v = view(networks=networks)
    d = desired(v)
    kernel = KernelState()
    endpoints = [
        ep(f"{n.name}-{owner}-{i}", n, 2 + i + 10 * k, owner, 100 * k + i)
        for k, n in enumerate(networks)
        for i, owner in enumerate((LOCAL, "host-b", "host-c", LOCAL))
    ]
    for _ in range(25):
        deltas: list[Delta] = []
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            if choice < 0.75:
                e = rng.choice(endpoints)
                fact: Fact = EndpointPut(e) if e.key not in v.endpoints else EndpointDeleted(e.key)
                deltas += changes(v, fact)
            elif choice < 0.9:
                old_node = v.nodes["host-b"]
                vtep = VTEP_B if old_node.vtep != VTEP_B else A("198.18.1.77")
                deltas += changes(v, NodePut(Node("host-b", vtep, old_node.started_at + 1)))
            else:
                # Someone deletes a gateway namespace behind our back.
                gone = sorted(kernel.netns)
                if gone:
                    kernel = simulate(kernel, [DeleteNetns(rng.choice(gone))])
        d.apply(deltas)
        wanted = comparable(d.tables.state())
        kernel = simulate(kernel, diff(wanted, kernel))
        # Forwarding is switched on and left on: the kernel's may be more than wanted.
        assert wanted.forwarding <= kernel.forwarding
        assert replace(kernel, forwarding=wanted.forwarding) == wanted, seed
        assert diff(wanted, kernel) == []
    # Everything removed: nothing is left.
    for key in list(v.endpoints):
        d.apply(changes(v, EndpointDeleted(key)))
    kernel = simulate(kernel, diff(comparable(d.tables.state()), kernel))
    assert replace(kernel, forwarding=set()) == KernelState()


def test_network_record_changes_go_through_as_a_remove_and_an_add() -> None:
    v = view(ep("a", NAT, 2, LOCAL, 1))
    d = desired(v)
    d.apply(changes(v, NetworkDeleted("out")))
    assert d.tables.netns == {} and d.gateway_netns_of("out") is None
    d.apply(changes(v, NetworkPut(NAT)))
    assert set(d.tables.netns) == {"gw400"}
