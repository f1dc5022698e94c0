"""Desired vs observed kernel state (overlayd.dataplane.diff), as transcripts.

Each test states a cluster view before and after ("this in") and the exact
command list the reconciler must give the kernel ("these out"). A property
test at the end plays random views through a small pure kernel simulator.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlayd.core.admission import Admission
from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import (
    ClusterView,
    EndpointDeleted,
    EndpointPut,
    Fact,
    NetworkDeleted,
    NetworkPut,
    NodeDeleted,
    NodePut,
)
from overlayd.dataplane.announce import Removed
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
    Op,
    ReplaceAddr,
    ReplaceFdb,
    ReplaceNeigh,
    ReplaceNft,
    ReplaceRoute,
    SetInnerLink,
    SetPort,
    describe,
)
from overlayd.dataplane.desired import DesiredState, desired_state
from overlayd.dataplane.diff import diff, plan
from overlayd.dataplane.kstate import (
    BridgeSpec,
    Dirty,
    FdbEntry,
    FloodEntry,
    InnerLinkSpec,
    KernelState,
    NeighEntry,
    NetnsSpec,
    NftChain,
    NftTable,
    PortSpec,
    RouteSpec,
    Tables,
    VethSpec,
    VxlanSpec,
    veth_name,
)

A = IPv4Address

LOCAL = "host-a"
VTEP_A = A("198.18.0.1")
VTEP_B = A("198.18.0.2")
VTEP_C = A("198.18.0.3")
VTEP_D = A("198.18.0.4")
VX = "ovvx100"
BR = "ovbr100"

BLUE = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24"))
RED = Network(name="red", vni=200, subnet=IPv4Network("10.2.0.0/24"))


def mac(n: int) -> str:
    return f"02:00:00:00:{n // 256:02x}:{n % 256:02x}"


def ep(
    name: str, ip: str, owner: str, mac_n: int, network: str = "blue", created_at: float = 0.0
) -> Endpoint:
    return Endpoint(network=network, name=name, ip=A(ip), mac=mac(mac_n), owner=owner, created_at=created_at)


A1 = ep("a1", "10.1.0.2", LOCAL, 1)
B1 = ep("b1", "10.1.0.11", "host-b", 11)
B2 = ep("b2", "10.1.0.12", "host-b", 12)
C1 = ep("c1", "10.1.0.21", "host-c", 21)


def base_view(*endpoints: Endpoint, networks: tuple[Network, ...] = (BLUE,)) -> ClusterView:
    v = ClusterView()
    for n in networks:
        v.apply(NetworkPut(n))
    for name, vtep in (("host-a", VTEP_A), ("host-b", VTEP_B), ("host-c", VTEP_C), ("host-d", VTEP_D)):
        v.apply(NodePut(Node(name=name, vtep=vtep, started_at=0.0)))
    for e in endpoints:
        v.apply(EndpointPut(e))
    return v


def want(v: ClusterView, *, vtep: IPv4Address = VTEP_A, underlay_mtu: int = 1500) -> KernelState:
    return desired_state(v, local_node=LOCAL, local_vtep=vtep, underlay_mtu=underlay_mtu)


def converged(v: ClusterView, **kw: object) -> KernelState:
    """What the kernel holds after a full reconcile of `v` (ports exist: the API made them)."""
    return copy.deepcopy(want(v, **kw))  # type: ignore[arg-type]


def bridge(mtu: int = 1450) -> BridgeSpec:
    return want(base_view(A1), underlay_mtu=mtu + 50).bridges[BR]


def vxlan(mtu: int = 1450, local: IPv4Address = VTEP_A) -> VxlanSpec:
    return want(base_view(A1), vtep=local, underlay_mtu=mtu + 50).vxlans[VX]


PORT_A1 = veth_name("blue", "a1")


def neigh_and_announce(ip: str, mac_n: int, device: str = VX, bridge: str = BR) -> list[Command]:
    """A new or changed neighbour entry, then the gratuitous ARP for it on the local bridge."""
    return [ReplaceNeigh(NeighEntry(device, A(ip), mac(mac_n))), AnnounceArp(bridge, A(ip), mac(mac_n))]


# --- transcripts ------------------------------------------------------------------------------


def test_empty_kernel_to_full() -> None:
    w = want(base_view(A1, B1, C1))
    w.ports.clear()  # ports are made by the API; a missing one is not the diff's business
    assert diff(w, KernelState()) == [
        EnsureBridge(bridge()),
        EnsureVxlan(vxlan()),
        ReplaceFdb(FdbEntry(VX, mac(11), VTEP_B)),
        ReplaceFdb(FdbEntry(VX, mac(21), VTEP_C)),
        AppendFlood(FloodEntry(VX, VTEP_B)),
        AppendFlood(FloodEntry(VX, VTEP_C)),
        *neigh_and_announce("10.1.0.11", 11),
        *neigh_and_announce("10.1.0.21", 21),
    ]


def test_empty_kernel_order_is_bridge_vxlan_fdb_flood_neigh_announce() -> None:
    w = want(base_view(A1, B1, B2, C1))
    ops = [c.op for c in diff(w, KernelState())]
    assert ops == [
        Op.ENSURE_BRIDGE,
        Op.ENSURE_VXLAN,
        Op.REPLACE_FDB,
        Op.REPLACE_FDB,
        Op.REPLACE_FDB,
        Op.APPEND_FLOOD,
        Op.APPEND_FLOOD,
        Op.REPLACE_NEIGH,
        Op.ANNOUNCE_ARP,
        Op.REPLACE_NEIGH,
        Op.ANNOUNCE_ARP,
        Op.REPLACE_NEIGH,
        Op.ANNOUNCE_ARP,
    ]


def test_missing_port_yields_nothing() -> None:
    w = want(base_view(A1))
    have = converged(base_view(A1))
    del have.ports[PORT_A1]
    assert PORT_A1 in w.ports
    assert diff(w, have) == []
    # No command (only the admin API builds a veth), but the plan names it for the report.
    wt, ht = Tables.of(w), Tables.of(have)
    everything = Dirty()
    everything.add_tables(wt)
    everything.add_tables(ht)
    missing = plan(wt, ht, everything).missing_ports
    assert [p.ifname for p in missing] == [PORT_A1]


@pytest.mark.parametrize(
    "endpoints",
    [(), (A1,), (A1, B1), (A1, B1, B2, C1)],
)
def test_converged_yields_nothing(endpoints: tuple[Endpoint, ...]) -> None:
    v = base_view(*endpoints)
    assert diff(want(v), converged(v)) == []


def test_converged_two_networks_yields_nothing() -> None:
    v = base_view(A1, B1, ep("r1", "10.2.0.2", LOCAL, 40, network="red"), networks=(BLUE, RED))
    assert diff(want(v), converged(v)) == []


def test_new_remote_endpoint_on_known_vtep() -> None:
    before = base_view(A1, B1)
    after = base_view(A1, B1, B2)
    assert diff(want(after), converged(before)) == [
        ReplaceFdb(FdbEntry(VX, mac(12), VTEP_B)),
        *neigh_and_announce("10.1.0.12", 12),
    ]


def test_new_remote_endpoint_on_new_vtep() -> None:
    before = base_view(A1, B1)
    after = base_view(A1, B1, C1)
    assert diff(want(after), converged(before)) == [
        ReplaceFdb(FdbEntry(VX, mac(21), VTEP_C)),
        AppendFlood(FloodEntry(VX, VTEP_C)),
        *neigh_and_announce("10.1.0.21", 21),
    ]


def test_endpoint_moves_to_vtep_that_has_endpoints_old_vtep_keeps_some() -> None:
    before = base_view(A1, B1, B2, C1)
    moved = replace(B1, owner="host-c", version=2)
    after = base_view(A1, moved, B2, C1)
    assert diff(want(after), converged(before)) == [ReplaceFdb(FdbEntry(VX, mac(11), VTEP_C))]


def test_endpoint_moves_and_old_vtep_is_left_empty() -> None:
    before = base_view(A1, B1, C1)
    after = base_view(A1, replace(B1, owner="host-c", version=2), C1)
    assert diff(want(after), converged(before)) == [
        ReplaceFdb(FdbEntry(VX, mac(11), VTEP_C)),
        DeleteFlood(FloodEntry(VX, VTEP_B)),
    ]


def test_endpoint_moves_to_new_vtep_and_old_vtep_is_left_empty() -> None:
    before = base_view(A1, B1)
    after = base_view(A1, replace(B1, owner="host-d", version=2))
    assert diff(want(after), converged(before)) == [
        ReplaceFdb(FdbEntry(VX, mac(11), VTEP_D)),
        AppendFlood(FloodEntry(VX, VTEP_D)),
        DeleteFlood(FloodEntry(VX, VTEP_B)),
    ]


def test_node_vtep_change_moves_its_endpoints() -> None:
    before = base_view(A1, B1, B2)
    after = base_view(A1, B1, B2)
    after.apply(NodePut(Node(name="host-b", vtep=A("198.18.0.99"), started_at=1.0)))
    new = A("198.18.0.99")
    assert diff(want(after), converged(before)) == [
        ReplaceFdb(FdbEntry(VX, mac(11), new)),
        ReplaceFdb(FdbEntry(VX, mac(12), new)),
        AppendFlood(FloodEntry(VX, new)),
        DeleteFlood(FloodEntry(VX, VTEP_B)),
    ]


def test_ip_reused_with_new_mac_on_another_host() -> None:
    # b1 (10.1.0.11) released on host-b; the IP is reused on host-c with a fresh MAC.
    before = base_view(A1, B1, B2, C1)
    reused = ep("c9", "10.1.0.11", "host-c", 99, created_at=5.0)
    after = base_view(A1, B2, C1, reused)
    assert diff(want(after), converged(before)) == [
        ReplaceFdb(FdbEntry(VX, mac(99), VTEP_C)),
        *neigh_and_announce("10.1.0.11", 99),
        DeleteFdb(FdbEntry(VX, mac(11), VTEP_B)),
    ]


def test_ip_reuse_in_flight_then_release() -> None:
    """Transcript: the reuse arrives before the release; no neighbour flaps back."""
    admission = Admission(node=LOCAL, authority=True)
    admission.from_own([EndpointPut(A1), NodePut(Node(name=LOCAL, vtep=VTEP_A, started_at=0.0))])
    admission.from_store(
        [
            NetworkPut(BLUE),
            NodePut(Node(name="host-b", vtep=VTEP_B, started_at=0.0)),
            NodePut(Node(name="host-c", vtep=VTEP_C, started_at=0.0)),
            EndpointPut(replace(B1, created_at=1.0)),
            EndpointPut(B2),
            EndpointPut(C1),
        ]
    )
    v = admission.view
    kernel = converged(v)
    reused = ep("c9", "10.1.0.11", "host-c", 99, created_at=5.0)

    admission.from_store([EndpointPut(reused)])
    step1 = diff(want(v), kernel)
    assert step1 == [
        ReplaceFdb(FdbEntry(VX, mac(99), VTEP_C)),
        *neigh_and_announce("10.1.0.11", 99),
        DeleteFdb(FdbEntry(VX, mac(11), VTEP_B)),
    ]
    kernel = simulate(kernel, step1)

    admission.from_store([EndpointDeleted("blue/b1")])
    assert diff(want(v), kernel) == []


@pytest.mark.parametrize(
    "endpoints",
    [(A1,), (A1, B1), (A1, B1, B2, C1)],
)
def test_converged_announces_nothing(endpoints: tuple[Endpoint, ...]) -> None:
    r1 = ep("r1", "10.2.0.2", LOCAL, 40, network="red")
    r2 = ep("r2", "10.2.0.3", "host-b", 41, network="red")
    v = base_view(*endpoints, r1, r2, networks=(BLUE, RED))
    w = want(v)
    assert w.neigh  # there is something that could be announced
    cmds = diff(w, converged(v))
    assert not [c for c in cmds if isinstance(c, AnnounceArp)]
    assert cmds == []


@pytest.mark.parametrize(
    "moved",
    [
        # Same owner, new MAC (endpoint recreated in place).
        ep("b1", "10.1.0.11", "host-b", 88, created_at=5.0),
        # The IP reused by an endpoint on another host.
        ep("c9", "10.1.0.11", "host-c", 88, created_at=5.0),
    ],
)
def test_ip_moving_to_new_mac_is_replaced_and_announced_once(moved: Endpoint) -> None:
    before = base_view(A1, B1, B2, C1)
    after = base_view(A1, B2, C1, moved)
    cmds = diff(want(after), converged(before))
    neigh_cmds = [c for c in cmds if isinstance(c, ReplaceNeigh | DeleteNeigh | AnnounceArp)]
    assert neigh_cmds == [
        ReplaceNeigh(NeighEntry(VX, A("10.1.0.11"), mac(88))),
        AnnounceArp(BR, A("10.1.0.11"), mac(88)),
    ]
    i = cmds.index(neigh_cmds[0])
    assert cmds[i + 1] == neigh_cmds[1]
    simulate(converged(before), cmds)


def test_ip_moving_to_new_mac_in_second_network_is_announced_on_its_bridge() -> None:
    r1 = ep("r1", "10.2.0.2", LOCAL, 40, network="red")
    r2 = ep("r2", "10.2.0.3", "host-b", 41, network="red")
    r9 = ep("r9", "10.2.0.3", "host-c", 49, network="red", created_at=5.0)
    before = base_view(A1, B1, r1, r2, networks=(BLUE, RED))
    after = base_view(A1, B1, r1, r9, networks=(BLUE, RED))
    cmds = diff(want(after), converged(before))
    assert cmds == [
        ReplaceFdb(FdbEntry("ovvx200", mac(49), VTEP_C)),
        AppendFlood(FloodEntry("ovvx200", VTEP_C)),
        *neigh_and_announce("10.2.0.3", 49, device="ovvx200", bridge="ovbr200"),
        DeleteFdb(FdbEntry("ovvx200", mac(41), VTEP_B)),
        DeleteFlood(FloodEntry("ovvx200", VTEP_B)),
    ]
    simulate(converged(before), cmds)


def test_remote_endpoint_removed_vtep_keeps_others() -> None:
    before = base_view(A1, B1, B2)
    after = base_view(A1, B2)
    assert diff(want(after), converged(before)) == [
        DeleteNeigh(NeighEntry(VX, A("10.1.0.11"), mac(11))),
        DeleteFdb(FdbEntry(VX, mac(11), VTEP_B)),
    ]


def test_last_remote_endpoint_at_vtep_removed() -> None:
    before = base_view(A1, B1, C1)
    after = base_view(A1, C1)
    assert diff(want(after), converged(before)) == [
        DeleteNeigh(NeighEntry(VX, A("10.1.0.11"), mac(11))),
        DeleteFdb(FdbEntry(VX, mac(11), VTEP_B)),
        DeleteFlood(FloodEntry(VX, VTEP_B)),
    ]


def test_node_record_lost_removes_its_entries() -> None:
    before = base_view(A1, B1, B2, C1)
    after = base_view(A1, B1, B2, C1)
    after.nodes.pop("host-b")
    assert diff(want(after), converged(before)) == [
        DeleteNeigh(NeighEntry(VX, A("10.1.0.11"), mac(11))),
        DeleteNeigh(NeighEntry(VX, A("10.1.0.12"), mac(12))),
        DeleteFdb(FdbEntry(VX, mac(11), VTEP_B)),
        DeleteFdb(FdbEntry(VX, mac(12), VTEP_B)),
        DeleteFlood(FloodEntry(VX, VTEP_B)),
    ]


def test_last_local_endpoint_gone_deletes_links_only() -> None:
    before = base_view(A1, B1, B2, C1)
    after = base_view(B1, B2, C1)
    assert diff(want(after), converged(before)) == [DeleteLink(VX), DeleteLink(BR)]


def test_last_local_endpoint_gone_in_one_of_two_networks() -> None:
    r1 = ep("r1", "10.2.0.2", LOCAL, 40, network="red")
    r2 = ep("r2", "10.2.0.3", "host-b", 41, network="red")
    before = base_view(A1, B1, r1, r2, networks=(BLUE, RED))
    after = base_view(A1, B1, r2, networks=(BLUE, RED))
    assert diff(want(after), converged(before)) == [DeleteLink("ovvx200"), DeleteLink("ovbr200")]


def test_local_endpoint_added_to_existing_network() -> None:
    a2 = ep("a2", "10.1.0.3", LOCAL, 2)
    before = base_view(A1, B1)
    after = base_view(A1, a2, B1)
    # Its veth is not there yet (the API builds it), so nothing to do.
    assert diff(want(after), converged(before)) == []
    have = converged(before)
    port = veth_name("blue", "a2")
    have.ports[port] = PortSpec(ifname=port, network="blue", bridge="", mtu=1500)
    assert diff(want(after), have) == [SetPort(PortSpec(ifname=port, network="blue", bridge=BR, mtu=1450))]


@pytest.mark.parametrize(
    "changed",
    [
        {"vni": 4242},
        {"local": A("198.18.0.77")},
        {"port": 8472},
    ],
)
def test_vxlan_with_immutable_change_is_recreated_with_all_entries(changed: dict[str, object]) -> None:
    v = base_view(A1, B1, C1)
    have = converged(v)
    have.vxlans[VX] = replace(have.vxlans[VX], **changed)  # type: ignore[arg-type]
    assert diff(want(v), have) == [
        DeleteLink(VX),
        EnsureVxlan(vxlan()),
        ReplaceFdb(FdbEntry(VX, mac(11), VTEP_B)),
        ReplaceFdb(FdbEntry(VX, mac(21), VTEP_C)),
        AppendFlood(FloodEntry(VX, VTEP_B)),
        AppendFlood(FloodEntry(VX, VTEP_C)),
        *neigh_and_announce("10.1.0.11", 11),
        *neigh_and_announce("10.1.0.21", 21),
    ]


def test_local_vtep_address_change_recreates_vxlan_not_bridge() -> None:
    v = base_view(A1, B1)
    new_vtep = A("198.18.0.50")
    assert diff(want(v, vtep=new_vtep), converged(v)) == [
        DeleteLink(VX),
        EnsureVxlan(vxlan(local=new_vtep)),
        ReplaceFdb(FdbEntry(VX, mac(11), VTEP_B)),
        AppendFlood(FloodEntry(VX, VTEP_B)),
        *neigh_and_announce("10.1.0.11", 11),
    ]


def test_recreated_vxlan_drops_stale_entries_without_deleting_them() -> None:
    v = base_view(A1, B1)
    have = converged(v)
    have.vxlans[VX] = replace(have.vxlans[VX], vni=7)
    have.fdb.add(FdbEntry(VX, mac(77), VTEP_D))
    have.neigh.add(NeighEntry(VX, A("10.1.0.77"), mac(77)))
    have.flood.add(FloodEntry(VX, VTEP_D))
    cmds = diff(want(v), have)
    assert not [c for c in cmds if isinstance(c, DeleteFdb | DeleteNeigh | DeleteFlood)]
    assert cmds[:2] == [DeleteLink(VX), EnsureVxlan(vxlan())]


def test_mtu_only_change_updates_links_in_place() -> None:
    v = base_view(A1, B1)
    assert diff(want(v, underlay_mtu=9000), converged(v)) == [
        EnsureBridge(bridge(mtu=8950)),
        EnsureVxlan(vxlan(mtu=8950)),
        SetPort(PortSpec(ifname=PORT_A1, network="blue", bridge=BR, mtu=8950)),
    ]


def test_mtu_only_change_without_port() -> None:
    v = base_view(A1, B1)
    have = converged(v)
    have.ports.clear()
    assert diff(want(v, underlay_mtu=1400), have) == [
        EnsureBridge(bridge(mtu=1350)),
        EnsureVxlan(vxlan(mtu=1350)),
    ]


def test_network_mtu_change() -> None:
    v = base_view(A1, B1)
    have = converged(v)
    v.apply(NetworkPut(replace(BLUE, mtu=1300)))
    cmds = diff(want(v), have)
    assert [c.op for c in cmds] == [Op.ENSURE_BRIDGE, Op.ENSURE_VXLAN, Op.SET_PORT]
    assert {c.spec.mtu for c in cmds if isinstance(c, EnsureBridge | EnsureVxlan | SetPort)} == {1300}


def test_bridge_mac_wrong() -> None:
    v = base_view(A1)
    have = converged(v)
    have.bridges[BR] = replace(have.bridges[BR], mac="02:11:11:11:11:11")
    assert diff(want(v), have) == [EnsureBridge(bridge())]


def test_vxlan_on_wrong_master_is_fixed_in_place() -> None:
    v = base_view(A1, B1)
    have = converged(v)
    have.vxlans[VX] = replace(have.vxlans[VX], bridge="")
    assert diff(want(v), have) == [EnsureVxlan(vxlan())]


def test_port_on_wrong_bridge() -> None:
    v = base_view(A1)
    have = converged(v)
    have.ports[PORT_A1] = replace(have.ports[PORT_A1], bridge="ovbr999")
    assert diff(want(v), have) == [SetPort(PortSpec(ifname=PORT_A1, network="blue", bridge=BR, mtu=1450))]


def test_port_with_wrong_mtu() -> None:
    v = base_view(A1)
    have = converged(v)
    have.ports[PORT_A1] = replace(have.ports[PORT_A1], mtu=1500)
    assert diff(want(v), have) == [SetPort(PortSpec(ifname=PORT_A1, network="blue", bridge=BR, mtu=1450))]


def test_unwanted_port_is_left_alone() -> None:
    # Veths belong to the admin API, which deletes them with their endpoint.
    v = base_view(A1)
    have = converged(v)
    have.ports["ovep0000000000"] = PortSpec(ifname="ovep0000000000", network="blue", bridge=BR, mtu=1450)
    assert diff(want(v), have) == []


def test_stale_entries_on_kept_device_are_deleted() -> None:
    v = base_view(A1, B1)
    have = converged(v)
    have.fdb.add(FdbEntry(VX, mac(77), VTEP_D))
    have.neigh.add(NeighEntry(VX, A("10.1.0.77"), mac(77)))
    have.flood.add(FloodEntry(VX, VTEP_D))
    assert diff(want(v), have) == [
        DeleteNeigh(NeighEntry(VX, A("10.1.0.77"), mac(77))),
        DeleteFdb(FdbEntry(VX, mac(77), VTEP_D)),
        DeleteFlood(FloodEntry(VX, VTEP_D)),
    ]


def test_wrong_values_are_replaced_not_deleted() -> None:
    v = base_view(A1, B1)
    have = converged(v)
    have.fdb = {FdbEntry(VX, mac(11), VTEP_D)}
    have.neigh = {NeighEntry(VX, A("10.1.0.11"), mac(77))}
    assert diff(want(v), have) == [
        ReplaceFdb(FdbEntry(VX, mac(11), VTEP_B)),
        *neigh_and_announce("10.1.0.11", 11),
    ]


def test_missing_entries_are_repaired() -> None:
    v = base_view(A1, B1, C1)
    have = converged(v)
    have.fdb.discard(FdbEntry(VX, mac(21), VTEP_C))
    have.flood.discard(FloodEntry(VX, VTEP_B))
    have.neigh.discard(NeighEntry(VX, A("10.1.0.11"), mac(11)))
    assert diff(want(v), have) == [
        ReplaceFdb(FdbEntry(VX, mac(21), VTEP_C)),
        AppendFlood(FloodEntry(VX, VTEP_B)),
        *neigh_and_announce("10.1.0.11", 11),
    ]


def test_orphan_network_devices_deleted_last_vxlan_before_bridge() -> None:
    v = base_view(A1, B1)
    have = converged(v)
    have.bridges["ovbr300"] = BridgeSpec("ovbr300", "gone", "02:33:33:33:33:33", 1450)
    have.vxlans["ovvx300"] = VxlanSpec("ovvx300", "gone", 300, VTEP_A, 1450, "ovbr300")
    have.vxlans["ovvx400"] = VxlanSpec("ovvx400", "gone2", 400, VTEP_A, 1450, "")
    have.fdb.add(FdbEntry("ovvx300", mac(90), VTEP_B))
    have.neigh.add(NeighEntry("ovvx300", A("10.3.0.9"), mac(90)))
    have.flood.add(FloodEntry("ovvx300", VTEP_B))
    have.fdb.add(FdbEntry(VX, mac(77), VTEP_D))  # stale on a kept device
    assert diff(want(v), have) == [
        DeleteFdb(FdbEntry(VX, mac(77), VTEP_D)),
        DeleteLink("ovvx300"),
        DeleteLink("ovvx400"),
        DeleteLink("ovbr300"),
    ]


def test_full_order_links_adds_removals_stale_links() -> None:
    v = base_view(A1, B1, C1)
    have = converged(v)
    have.bridges[BR] = replace(have.bridges[BR], mtu=1500)
    have.fdb.discard(FdbEntry(VX, mac(21), VTEP_C))
    have.neigh.add(NeighEntry(VX, A("10.1.0.77"), mac(77)))
    have.bridges["ovbr300"] = BridgeSpec("ovbr300", "gone", "02:33:33:33:33:33", 1450)
    assert diff(want(v), have) == [
        EnsureBridge(bridge()),
        ReplaceFdb(FdbEntry(VX, mac(21), VTEP_C)),
        DeleteNeigh(NeighEntry(VX, A("10.1.0.77"), mac(77))),
        DeleteLink("ovbr300"),
    ]


def test_diff_does_not_mutate_inputs() -> None:
    v = base_view(A1, B1, C1)
    w = want(v)
    have = converged(base_view(A1, B2))
    w_copy, have_copy = copy.deepcopy(w), copy.deepcopy(have)
    first = diff(w, have)
    assert (w, have) == (w_copy, have_copy)
    assert diff(w, have) == first


# --- describe ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "line"),
    [
        (
            EnsureBridge(BridgeSpec("ovbr100", "blue", "02:00:00:00:00:aa", 1450)),
            "ensure bridge ovbr100 mac 02:00:00:00:00:aa mtu 1450 (blue)",
        ),
        (
            EnsureVxlan(VxlanSpec("ovvx100", "blue", 100, VTEP_A, 1450, "ovbr100")),
            "ensure vxlan ovvx100 vni 100 local 198.18.0.1 mtu 1450 master ovbr100",
        ),
        (
            SetPort(PortSpec("ovep0123456789", "blue", "ovbr100", 1450)),
            "set port ovep0123456789 master ovbr100 mtu 1450",
        ),
        (DeleteLink("ovvx100"), "delete link ovvx100"),
        (
            ReplaceFdb(FdbEntry(VX, "02:00:00:00:00:0b", VTEP_B)),
            "replace fdb 02:00:00:00:00:0b dev ovvx100 dst 198.18.0.2",
        ),
        (
            DeleteFdb(FdbEntry(VX, "02:00:00:00:00:0b", VTEP_B)),
            "delete fdb 02:00:00:00:00:0b dev ovvx100 dst 198.18.0.2",
        ),
        (AppendFlood(FloodEntry(VX, VTEP_C)), "append flood dev ovvx100 dst 198.18.0.3"),
        (DeleteFlood(FloodEntry(VX, VTEP_C)), "delete flood dev ovvx100 dst 198.18.0.3"),
        (
            ReplaceNeigh(NeighEntry(VX, A("10.1.0.11"), "02:00:00:00:00:0b")),
            "replace neigh 10.1.0.11 lladdr 02:00:00:00:00:0b dev ovvx100",
        ),
        (
            DeleteNeigh(NeighEntry(VX, A("10.1.0.11"), "02:00:00:00:00:0b")),
            "delete neigh 10.1.0.11 lladdr 02:00:00:00:00:0b dev ovvx100",
        ),
        (
            AnnounceArp(BR, A("10.1.0.11"), "02:00:00:00:00:0b"),
            "announce arp 10.1.0.11 is-at 02:00:00:00:00:0b on ovbr100",
        ),
        (EnsureNetns(NetnsSpec("ovgw100", "blue")), "ensure netns ovgw100 (blue)"),
        (DeleteNetns("ovgw100"), "delete netns ovgw100"),
        (
            EnsureVeth(VethSpec("ovgw100", "blue", "gw", 1450, BR, netns="ovgw100", peer="gw0")),
            "ensure veth ovgw100 peer gw0 in ovgw100 mtu 1450 master ovbr100 (gw)",
        ),
        (
            SetInnerLink(InnerLinkSpec("ovgw100", "gw0", "02:00:00:00:00:0b", 1450)),
            "set link gw0 in ovgw100 mac 02:00:00:00:00:0b mtu 1450 up",
        ),
        (
            ReplaceAddr(("ovgw100", "gw0", IPv4Interface("10.1.0.1/24"))),
            "replace address 10.1.0.1/24 dev gw0 in ovgw100",
        ),
        (DeleteAddr(("", BR, IPv4Interface("10.1.0.1/24"))), "delete address 10.1.0.1/24 dev ovbr100"),
        (
            ReplaceRoute(("", IPv4Network("10.1.0.11/32")), RouteSpec("ul0", VTEP_B)),
            "replace route 10.1.0.11/32 via 198.18.0.2 onlink dev ul0",
        ),
        (DeleteRoute(("", IPv4Network("10.1.0.11/32"))), "delete route 10.1.0.11/32"),
        (EnableForwarding("", "ul0"), "enable forwarding on ul0"),
        (
            ReplaceNft(NftTable("ovgw100", "ip", (NftChain("p", "nat", "postrouting", 100, "accept"),))),
            "replace nft table ip overlayd in ovgw100 (0 rules)",
        ),
        (DeleteNft("", "bridge"), "delete nft table bridge overlayd"),
    ],
)
def test_describe(cmd: Command, line: str) -> None:
    assert describe(cmd) == line
    assert "\n" not in describe(cmd)


def test_describe_covers_every_op() -> None:
    ops: dict[type[Command], Op] = {
        EnsureBridge: Op.ENSURE_BRIDGE,
        EnsureVxlan: Op.ENSURE_VXLAN,
        SetPort: Op.SET_PORT,
        DeleteLink: Op.DELETE_LINK,
        ReplaceFdb: Op.REPLACE_FDB,
        DeleteFdb: Op.DELETE_FDB,
        AppendFlood: Op.APPEND_FLOOD,
        DeleteFlood: Op.DELETE_FLOOD,
        ReplaceNeigh: Op.REPLACE_NEIGH,
        DeleteNeigh: Op.DELETE_NEIGH,
        AnnounceArp: Op.ANNOUNCE_ARP,
        EnsureNetns: Op.ENSURE_NETNS,
        DeleteNetns: Op.DELETE_NETNS,
        EnsureVeth: Op.ENSURE_VETH,
        SetInnerLink: Op.SET_INNER_LINK,
        ReplaceAddr: Op.REPLACE_ADDR,
        DeleteAddr: Op.DELETE_ADDR,
        ReplaceRoute: Op.REPLACE_ROUTE,
        DeleteRoute: Op.DELETE_ROUTE,
        EnableForwarding: Op.ENABLE_FORWARDING,
        ReplaceNft: Op.REPLACE_NFT,
        DeleteNft: Op.DELETE_NFT,
    }
    assert {cls.op for cls in ops} == set(Op)
    assert all(cls.op is op for cls, op in ops.items())
    assert str(Op.REPLACE_FDB) == "replace_fdb"
    assert str(Op.ANNOUNCE_ARP) == "announce_arp"


def test_describe_rejects_unknown() -> None:
    with pytest.raises(TypeError, match="unknown command"):
        describe("delete everything")  # type: ignore[arg-type]


# --- a pure kernel simulator and the property test --------------------------------------------


class KernelRefused(Exception):
    """What the real kernel would answer with an error (ENOENT, EEXIST, ...)."""


def announced_by(k: KernelState, cmd: AnnounceArp) -> list[NeighEntry]:
    """Neighbour entries in `k` the announcement stands for: same (ip, mac), on a VXLAN
    device whose master is the bridge it goes out of."""
    return [
        n
        for n in k.neigh
        if (n.ip, n.mac) == (cmd.ip, cmd.mac)
        and n.device in k.vxlans
        and k.vxlans[n.device].bridge == cmd.bridge
    ]


def simulate(start: KernelState, cmds: list[Command]) -> KernelState:
    """Apply commands as the kernel would, strictly: anything it would refuse raises.

    An announcement changes no state, but it must tell the truth: the bridge exists and
    the announced (ip, mac) is a neighbour entry on the VXLAN device enslaved to that
    bridge, both when it is given and after the whole pass.
    """
    k = copy.deepcopy(start)
    announcements: list[AnnounceArp] = []

    def need_vxlan(dev: str) -> None:
        if dev not in k.vxlans:
            raise KernelRefused(f"no device {dev}")

    for cmd in cmds:
        match cmd:
            case EnsureBridge(spec):
                k.bridges[spec.ifname] = spec
            case EnsureVxlan(spec):
                old = k.vxlans.get(spec.ifname)
                if old is not None and (old.vni, old.local, old.port) != (
                    spec.vni,
                    spec.local,
                    spec.port,
                ):
                    raise KernelRefused(f"cannot change vni/local/port of {spec.ifname}")
                if spec.bridge not in k.bridges:
                    raise KernelRefused(f"no master {spec.bridge}")
                k.vxlans[spec.ifname] = spec
            case SetPort(spec):
                if spec.ifname not in k.ports:
                    raise KernelRefused(f"no port {spec.ifname}")
                if spec.bridge not in k.bridges:
                    raise KernelRefused(f"no master {spec.bridge}")
                k.ports[spec.ifname] = spec
            case DeleteLink(name):
                if name in k.vxlans:
                    del k.vxlans[name]
                    k.fdb = {e for e in k.fdb if e.device != name}
                    k.flood = {e for e in k.flood if e.device != name}
                    k.neigh = {e for e in k.neigh if e.device != name}
                elif name in k.bridges:
                    del k.bridges[name]
                    # Enslaved links survive, without a master.
                    k.ports = {
                        n: replace(p, bridge="") if p.bridge == name else p for n, p in k.ports.items()
                    }
                    k.vxlans = {
                        n: replace(x, bridge="") if x.bridge == name else x for n, x in k.vxlans.items()
                    }
                elif name in k.ports:
                    del k.ports[name]
                else:
                    raise KernelRefused(f"no link {name}")
            case ReplaceFdb(e):
                need_vxlan(e.device)
                k.fdb = {f for f in k.fdb if (f.device, f.mac) != (e.device, e.mac)} | {e}
            case DeleteFdb(e):
                if e not in k.fdb:
                    raise KernelRefused(f"no fdb {e}")
                k.fdb.discard(e)
            case AppendFlood(e):
                need_vxlan(e.device)
                if e in k.flood:
                    raise KernelRefused(f"flood exists {e}")
                k.flood.add(e)
            case DeleteFlood(e):
                if e not in k.flood:
                    raise KernelRefused(f"no flood {e}")
                k.flood.discard(e)
            case ReplaceNeigh(e):
                need_vxlan(e.device)
                k.neigh = {n for n in k.neigh if (n.device, n.ip) != (e.device, e.ip)} | {e}
            case DeleteNeigh(e):
                if e not in k.neigh:
                    raise KernelRefused(f"no neigh {e}")
                k.neigh.discard(e)
            case AnnounceArp(bridge_name, _, _):
                if bridge_name not in k.bridges:
                    raise KernelRefused(f"no bridge {bridge_name}")
                if not announced_by(k, cmd):
                    raise AssertionError(f"{describe(cmd)}: no such neighbour behind that bridge")
                announcements.append(cmd)
            case _:
                raise TypeError(f"unknown command {cmd!r}")
    for a in announcements:
        assert announced_by(k, a), f"{describe(a)}: neighbour gone by the end of the pass"
    return k


def test_simulator_is_strict() -> None:
    with pytest.raises(KernelRefused):
        simulate(KernelState(), [ReplaceFdb(FdbEntry(VX, mac(1), VTEP_B))])
    with pytest.raises(KernelRefused):
        simulate(KernelState(), [DeleteLink(VX)])
    k = converged(base_view(A1, B1))
    with pytest.raises(KernelRefused):
        simulate(k, [AppendFlood(FloodEntry(VX, VTEP_B))])
    with pytest.raises(KernelRefused):
        simulate(k, [EnsureVxlan(replace(vxlan(), vni=5))])
    assert simulate(k, [DeleteLink(VX)]).entry_count() == 0


def test_simulator_checks_announcements() -> None:
    k = converged(base_view(A1, B1))
    ok = AnnounceArp(BR, A("10.1.0.11"), mac(11))
    assert simulate(k, [ok]) == k  # no state change
    with pytest.raises(KernelRefused):
        simulate(k, [AnnounceArp("ovbr999", A("10.1.0.11"), mac(11))])
    for wrong in (
        AnnounceArp(BR, A("10.1.0.11"), mac(12)),  # stale MAC
        AnnounceArp(BR, A("10.1.0.99"), mac(11)),  # no such neighbour
    ):
        with pytest.raises(AssertionError, match="no such neighbour"):
            simulate(k, [wrong])
    # Bridge exists, but the VXLAN device holding the entry is not its slave.
    k2 = copy.deepcopy(k)
    k2.bridges["ovbr300"] = BridgeSpec("ovbr300", "other", "02:33:33:33:33:33", 1450)
    with pytest.raises(AssertionError, match="no such neighbour"):
        simulate(k2, [AnnounceArp("ovbr300", A("10.1.0.11"), mac(11))])
    # True when given, false by the end of the pass.
    with pytest.raises(AssertionError, match="gone by the end"):
        simulate(k, [ok, DeleteNeigh(NeighEntry(VX, A("10.1.0.11"), mac(11)))])


NODES = {
    "host-a": VTEP_A,
    "host-b": VTEP_B,
    "host-c": VTEP_C,
    "host-d": VTEP_D,
}
NETWORKS = [
    Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24")),
    Network(name="red", vni=200, subnet=IPv4Network("10.2.0.0/24"), mtu=1400),
    Network(name="green", vni=300, subnet=IPv4Network("10.3.0.0/24"), mtu=9000),
]


def random_view(rng: random.Random) -> ClusterView:
    v = ClusterView()
    for n in NETWORKS:
        if rng.random() < 0.8:
            v.apply(NetworkPut(n))
    for name, vtep in NODES.items():
        if name == LOCAL or rng.random() < 0.85:
            v.apply(NodePut(Node(name=name, vtep=vtep, started_at=0.0)))
    owners = [*NODES, "ghost"]
    for i in range(rng.randrange(0, 14)):
        n = rng.choice(NETWORKS)
        third = n.vni // 100
        v.apply(
            EndpointPut(
                Endpoint(
                    network=n.name,
                    name=f"e{i}",
                    # Small pools, so IPs and MACs collide now and then.
                    ip=A(f"10.{third}.0.{rng.randrange(2, 10)}"),
                    mac=mac(rng.randrange(1, 20)),
                    owner=rng.choice(owners),
                    created_at=float(rng.randrange(0, 5)),
                )
            )
        )
    return v


def random_have(rng: random.Random, w: KernelState) -> KernelState:
    """Some earlier converged state, then drift: anything the kernel might hold."""
    vtep = VTEP_A if rng.random() < 0.8 else A("198.18.0.50")
    have = desired_state(
        random_view(rng),
        local_node=LOCAL,
        local_vtep=vtep,
        underlay_mtu=rng.choice([1500, 1500, 9000, 1400]),
    )
    # Ports of the wanted endpoints mostly exist (the API made them), sometimes misplaced.
    for name, port in w.ports.items():
        r = rng.random()
        if r < 0.6:
            have.ports[name] = port
        elif r < 0.8:
            have.ports[name] = replace(port, bridge=rng.choice(["", "ovbr999", *have.bridges]))
    for name in list(have.bridges):
        if rng.random() < 0.15:
            have.bridges[name] = replace(have.bridges[name], mtu=1234)
    for name in list(have.vxlans):
        r = rng.random()
        if r < 0.1:
            have.vxlans[name] = replace(have.vxlans[name], vni=rng.randrange(1, 99))
        elif r < 0.2:
            have.vxlans[name] = replace(have.vxlans[name], bridge="")
    if rng.random() < 0.2:
        have.vxlans["ovvx777"] = VxlanSpec("ovvx777", "old", 777, VTEP_A, 1450, "")
    devices = sorted(have.vxlans)
    have.fdb = {e for e in have.fdb if rng.random() < 0.85}
    have.flood = {e for e in have.flood if rng.random() < 0.85}
    have.neigh = {e for e in have.neigh if rng.random() < 0.85}
    if devices:
        for _ in range(rng.randrange(0, 4)):
            dev = rng.choice(devices)
            m = mac(rng.randrange(1, 40))
            # One FDB entry per (device, MAC) and one neighbour per (device, IP): the kernel key.
            have.fdb = {f for f in have.fdb if (f.device, f.mac) != (dev, m)}
            have.fdb.add(FdbEntry(dev, m, rng.choice(list(NODES.values()))))
            ip = A(f"10.1.0.{rng.randrange(2, 10)}")
            have.neigh = {n for n in have.neigh if (n.device, n.ip) != (dev, ip)}
            have.neigh.add(NeighEntry(dev, ip, m))
            have.flood.add(FloodEntry(dev, rng.choice(list(NODES.values()))))
    return have


def check_round(w: KernelState, have: KernelState) -> list[Command]:
    cmds = diff(w, have)
    result = simulate(have, cmds)

    assert result.bridges == w.bridges
    assert result.vxlans == w.vxlans
    assert result.fdb == w.fdb
    assert result.flood == w.flood
    assert result.neigh == w.neigh
    for name, port in w.ports.items():
        if name in have.ports:
            assert result.ports[name] == port
        else:
            assert name not in result.ports  # never invented
    assert diff(w, result) == []

    # No duplicates, and no entry-by-entry deletes on a device that goes anyway.
    assert len(cmds) == len(set(cmds))
    deleted = {c.ifname for c in cmds if isinstance(c, DeleteLink)}
    for c in cmds:
        if isinstance(c, DeleteFdb | DeleteNeigh | DeleteFlood):
            assert c.entry.device not in deleted
    # A replace and a delete never target the same kernel key.
    replaced_fdb = {(c.entry.device, c.entry.mac) for c in cmds if isinstance(c, ReplaceFdb)}
    deleted_fdb = {(c.entry.device, c.entry.mac) for c in cmds if isinstance(c, DeleteFdb)}
    assert not replaced_fdb & deleted_fdb
    replaced_neigh = {(c.entry.device, c.entry.ip) for c in cmds if isinstance(c, ReplaceNeigh)}
    deleted_neigh = {(c.entry.device, c.entry.ip) for c in cmds if isinstance(c, DeleteNeigh)}
    assert not replaced_neigh & deleted_neigh
    # Each changed neighbour is announced right after it is written, on its device's
    # bridge, and nothing else is announced.
    for i, c in enumerate(cmds):
        if isinstance(c, ReplaceNeigh):
            assert cmds[i + 1] == AnnounceArp(w.vxlans[c.entry.device].bridge, c.entry.ip, c.entry.mac)
        if isinstance(c, AnnounceArp):
            prev = cmds[i - 1]
            assert isinstance(prev, ReplaceNeigh)
            assert (prev.entry.ip, prev.entry.mac) == (c.ip, c.mac)
    return cmds


def test_property_diff_then_apply_converges() -> None:
    rng = random.Random(20240611)
    non_trivial = 0
    for _ in range(400):
        w = desired_state(
            random_view(rng),
            local_node=LOCAL,
            local_vtep=VTEP_A,
            underlay_mtu=rng.choice([1500, 9000, 1400]),
        )
        have = random_have(rng, w)
        if check_round(w, have):
            non_trivial += 1
        # From empty, and from converged.
        check_round(w, KernelState())
        assert diff(w, copy.deepcopy(w)) == []
    # The generator must actually exercise the diff.
    assert non_trivial > 300


def test_property_sequence_of_views_converges_step_by_step() -> None:
    """A host living through a stream of cluster changes stays converged after each reconcile."""
    rng = random.Random(7)
    for _ in range(50):
        kernel = KernelState()
        for _ in range(8):
            w = desired_state(random_view(rng), local_node=LOCAL, local_vtep=VTEP_A, underlay_mtu=1500)
            # The API made the ports of local endpoints before the reconcile ran.
            for name, port in w.ports.items():
                kernel.ports.setdefault(name, replace(port, bridge=""))
            check_round(w, kernel)
            kernel = simulate(kernel, diff(w, kernel))
            assert diff(w, kernel) == []


def test_property_incremental_desired_and_dirty_plan_track_the_view() -> None:
    """The path a daemon runs: facts -> admission -> view deltas -> desired deltas -> a plan over
    the dirty keys only. After every step the kernel equals what a from-scratch computation of
    the same view wants, and the incremental desired state equals the from-scratch one."""
    rng = random.Random(11)
    for _ in range(40):
        admission = Admission(node=LOCAL, authority=True)
        admission.from_own([NodePut(Node(name=LOCAL, vtep=VTEP_A, started_at=0.0))])
        v = admission.view
        desired = DesiredState(v, local_node=LOCAL, local_vtep=VTEP_A, underlay_mtu=1500)
        kernel = KernelState()
        for step in range(60):
            facts: list[Fact] = []
            r = rng.random()
            if r < 0.1:
                n = rng.choice(NETWORKS)
                facts.append(NetworkPut(n) if rng.random() < 0.7 else NetworkDeleted(n.name))
            elif r < 0.2:
                name = rng.choice(["host-b", "host-c", "host-d"])
                vtep = rng.choice([VTEP_B, VTEP_C, VTEP_D, VTEP_A])
                facts.append(
                    NodePut(Node(name=name, vtep=vtep, started_at=0.0))
                    if rng.random() < 0.8
                    else NodeDeleted(name)
                )
            else:
                n = rng.choice(NETWORKS)
                owner = rng.choice([LOCAL, "host-b", "host-c", "host-d", "ghost"])
                record = Endpoint(
                    network=n.name,
                    name=f"e{rng.randrange(10)}",
                    ip=A(f"10.{n.vni // 100}.0.{rng.randrange(2, 8)}"),
                    mac=mac(rng.randrange(1, 12)),
                    owner=owner,
                    created_at=float(step),
                )
                put = rng.random() < 0.75
                if owner == LOCAL:
                    outcome = admission.from_own(
                        [EndpointPut(record) if put else EndpointDeleted(record.key)]
                    )
                    desired.apply(outcome.deltas)
                    facts = []
                else:
                    facts.append(EndpointPut(record) if put else EndpointDeleted(record.key))
            if facts:
                desired.apply(admission.from_store(facts).deltas)
            scratch = desired_state(v, local_node=LOCAL, local_vtep=VTEP_A, underlay_mtu=1500)
            assert desired.tables.state() == scratch
            # The API makes local ports before the reconciler sees them.
            for name, port in desired.tables.ports.items():
                kernel.ports.setdefault(name, replace(port, bridge=""))
            steps = plan(desired.tables, Tables.of(kernel), desired.dirty.take()).commands
            kernel = simulate(kernel, steps)
            for name in [p for p in kernel.ports if p not in scratch.ports]:
                del kernel.ports[name]  # the API removed it
            expected = copy.deepcopy(scratch)
            assert (kernel.bridges, kernel.vxlans, kernel.fdb, kernel.neigh, kernel.flood) == (
                expected.bridges,
                expected.vxlans,
                expected.fdb,
                expected.neigh,
                expected.flood,
            )
            assert diff(scratch, kernel) == []


# --- announcements given what was removed lately (the reconciler's rule) ---


def announcements(cmds: list[Command]) -> list[AnnounceArp]:
    return [c for c in cmds if isinstance(c, AnnounceArp)]


def plan_all(after: ClusterView, have: KernelState, previous: Removed) -> list[Command]:
    """`plan` over every key, as the reconciler calls it (with its memory of removals)."""
    w, h = Tables.of(want(after)), Tables.of(have)
    everything = Dirty()
    everything.add_tables(w)
    everything.add_tables(h)
    return plan(w, h, everything, previous=previous).commands


def test_new_addresses_nobody_had_are_not_announced() -> None:
    before = base_view(A1)
    after = base_view(A1, B1, B2, C1)
    cmds = plan_all(after, converged(before), Removed())
    assert [c for c in cmds if isinstance(c, ReplaceNeigh)] == [
        ReplaceNeigh(NeighEntry(VX, A("10.1.0.11"), mac(11))),
        ReplaceNeigh(NeighEntry(VX, A("10.1.0.12"), mac(12))),
        ReplaceNeigh(NeighEntry(VX, A("10.1.0.21"), mac(21))),
    ]
    assert announcements(cmds) == []


def test_an_address_whose_mac_changed_is_announced() -> None:
    before = base_view(A1, B1, B2)
    after = base_view(A1, B2, ep("c9", "10.1.0.11", "host-c", 88, created_at=5.0))
    cmds = plan_all(after, converged(before), Removed())
    assert announcements(cmds) == [AnnounceArp(BR, A("10.1.0.11"), mac(88))]


def test_an_address_removed_lately_and_back_with_another_mac_is_announced() -> None:
    removed = Removed()
    removed.removed(A("10.1.0.11"), mac(11))
    removed.removed(A("10.1.0.12"), mac(12))
    before = base_view(A1)
    # 10.1.0.11 comes back with another MAC (reused), 10.1.0.12 with its own (same endpoint).
    after = base_view(A1, ep("c9", "10.1.0.11", "host-c", 88), B2)
    cmds = plan_all(after, converged(before), removed)
    assert announcements(cmds) == [AnnounceArp(BR, A("10.1.0.11"), mac(88))]
    i = cmds.index(ReplaceNeigh(NeighEntry(VX, A("10.1.0.11"), mac(88))))
    assert cmds[i + 1] == AnnounceArp(BR, A("10.1.0.11"), mac(88))


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("with_previous", [False, True])
def test_a_plan_of_entries_only_is_what_the_whole_plan_gives(hold: bool, with_previous: bool) -> None:
    # `plan` takes a shorter way when only entries are dirty (every remote change): it
    # must give what the way through links, layer 3 and tables gives.
    removed = Removed()
    removed.removed(A("10.1.0.11"), mac(11))
    before = base_view(A1, B1, B2)
    after = base_view(A1, B2, ep("c9", "10.1.0.11", "host-c", 88), C1)
    w, h = Tables.of(want(after)), Tables.of(converged(before))
    h.neigh[(VX, A("10.1.0.99"))] = mac(99)  # stale
    h.fdb[(VX, mac(12))] = VTEP_D  # wrong value
    # A device no longer wanted: its entries go with it, not one by one.
    h.vxlans["ovvx77"] = replace(vxlan(), ifname="ovvx77")
    h.fdb[("ovvx77", mac(5))] = VTEP_B
    h.neigh[("ovvx77", A("10.7.0.5"))] = mac(5)
    entries = Dirty(
        fdb=w.fdb.keys() | h.fdb.keys(), neigh=w.neigh.keys() | h.neigh.keys(), flood=w.flood | h.flood
    )
    previous = removed if with_previous else None
    fast = plan(w, h, entries, hold_deletions=hold, previous=previous)
    through_links = copy.deepcopy(entries)
    through_links.links.add("no-such-link")  # in neither table: no command of its own
    whole = plan(w, h, through_links, hold_deletions=hold, previous=previous)
    assert (fast.commands, fast.held) == (whole.commands, whole.held)
    assert any(isinstance(c, DeleteNeigh) for c in whole.commands) != hold
    assert announcements(fast.commands)


def test_taking_dirty_keys_with_another_set_of_them_empties_both_in_place() -> None:
    mine = Dirty(fdb={(VX, mac(1))}, links={"ovbr100"})
    theirs = Dirty(fdb={(VX, mac(2))}, neigh={(VX, A("10.1.0.2"))})
    held = mine.fdb, theirs.neigh  # desired state writes into its sets: they must stay
    taken = mine.take(theirs)
    assert taken == Dirty(fdb={(VX, mac(1)), (VX, mac(2))}, neigh={(VX, A("10.1.0.2"))}, links={"ovbr100"})
    assert not mine and not theirs
    assert (mine.fdb, theirs.neigh) == held and mine.fdb is held[0] and theirs.neigh is held[1]
    assert mine.take() == Dirty()
