"""Desired kernel state (overlayd.dataplane.desired): cluster view in, KernelState out."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlayd.core.model import Endpoint, Network, Node, stable_mac
from overlayd.core.view import ClusterView, EndpointDeleted, EndpointPut, NetworkPut, NodePut
from overlayd.dataplane.desired import DesiredState, desired_state, overlay_mtu
from overlayd.dataplane.kstate import (
    VXLAN_PORT,
    BridgeSpec,
    FdbEntry,
    FloodEntry,
    KernelState,
    NeighEntry,
    PortSpec,
    VxlanSpec,
    bridge_name,
    is_ours,
    link_alias,
    veth_name,
    vxlan_name,
)

A = IPv4Address

LOCAL = "host-a"
LOCAL_VTEP = A("198.18.0.1")
VTEP_B = A("198.18.0.2")
VTEP_C = A("198.18.0.3")

BLUE = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24"))
RED = Network(name="red", vni=200, subnet=IPv4Network("10.2.0.0/24"))


def mac(n: int) -> str:
    return f"02:00:00:00:{n // 256:02x}:{n % 256:02x}"


def ep(
    name: str,
    ip: str,
    owner: str,
    mac_n: int,
    network: str = "blue",
    created_at: float = 0.0,
) -> Endpoint:
    return Endpoint(network=network, name=name, ip=A(ip), mac=mac(mac_n), owner=owner, created_at=created_at)


def view(*, networks: tuple[Network, ...] = (BLUE,), endpoints: tuple[Endpoint, ...] = ()) -> ClusterView:
    v = ClusterView()
    for n in networks:
        v.apply(NetworkPut(n))
    v.apply(NodePut(Node(name="host-a", vtep=LOCAL_VTEP, started_at=0.0)))
    v.apply(NodePut(Node(name="host-b", vtep=VTEP_B, started_at=0.0)))
    v.apply(NodePut(Node(name="host-c", vtep=VTEP_C, started_at=0.0)))
    for e in endpoints:
        v.apply(EndpointPut(e))
    return v


def want(v: ClusterView, underlay_mtu: int = 1500) -> KernelState:
    return desired_state(v, local_node=LOCAL, local_vtep=LOCAL_VTEP, underlay_mtu=underlay_mtu)


# --- overlay_mtu ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network_mtu", "underlay", "expected"),
    [
        (None, 1500, 1450),
        (None, 9000, 8950),
        (None, 1280, 1230),
        (1400, 1500, 1400),  # network asks for less: honoured
        (1450, 1500, 1450),
        (1500, 1500, 1450),  # network asks for more than the underlay carries: capped
        (9000, 1500, 1450),
        (9000, 9000, 8950),
        (1400, 9000, 1400),
    ],
)
def test_overlay_mtu(network_mtu: int | None, underlay: int, expected: int) -> None:
    n = Network(name="n", vni=1, subnet=IPv4Network("10.0.0.0/24"), mtu=network_mtu)
    assert overlay_mtu(n, underlay) == expected


# --- which networks a host instantiates -------------------------------------------------------


def test_empty_view_wants_nothing() -> None:
    assert want(ClusterView()) == KernelState()
    assert want(view()) == KernelState()


def test_no_local_endpoint_means_nothing_for_that_network() -> None:
    v = view(endpoints=(ep("b1", "10.1.0.2", "host-b", 1), ep("c1", "10.1.0.3", "host-c", 2)))
    assert want(v) == KernelState()


def test_endpoint_of_unknown_network_is_ignored() -> None:
    v = view(endpoints=(ep("a1", "10.9.0.2", LOCAL, 1, network="green"),))
    assert want(v) == KernelState()


def test_single_local_endpoint() -> None:
    v = view(endpoints=(ep("a1", "10.1.0.2", LOCAL, 1),))
    port = veth_name("blue", "a1")
    assert want(v) == KernelState(
        bridges={
            "ovbr100": BridgeSpec(ifname="ovbr100", network="blue", mac=stable_mac(LOCAL, "100"), mtu=1450)
        },
        vxlans={
            "ovvx100": VxlanSpec(
                ifname="ovvx100",
                network="blue",
                vni=100,
                local=LOCAL_VTEP,
                mtu=1450,
                bridge="ovbr100",
                port=VXLAN_PORT,
            )
        },
        ports={port: PortSpec(ifname=port, network="blue", bridge="ovbr100", mtu=1450)},
    )
    assert VXLAN_PORT == 4789


def test_several_local_endpoints_one_bridge_one_vxlan() -> None:
    v = view(
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("a2", "10.1.0.3", LOCAL, 2),
            ep("a3", "10.1.0.4", LOCAL, 3),
        )
    )
    w = want(v)
    assert list(w.bridges) == ["ovbr100"]
    assert list(w.vxlans) == ["ovvx100"]
    assert set(w.ports) == {veth_name("blue", n) for n in ("a1", "a2", "a3")}
    assert all(p.bridge == "ovbr100" and p.mtu == 1450 for p in w.ports.values())
    assert w.entry_count() == 0


@pytest.mark.parametrize(
    ("network_mtu", "underlay", "expected"),
    [(None, 1500, 1450), (1400, 1500, 1400), (9000, 1500, 1450), (None, 9000, 8950)],
)
def test_mtu_applies_to_bridge_vxlan_and_ports(network_mtu: int | None, underlay: int, expected: int) -> None:
    n = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24"), mtu=network_mtu)
    w = want(view(networks=(n,), endpoints=(ep("a1", "10.1.0.2", LOCAL, 1),)), underlay)
    assert w.bridges["ovbr100"].mtu == expected
    assert w.vxlans["ovvx100"].mtu == expected
    assert [p.mtu for p in w.ports.values()] == [expected]


def test_bridge_mac_differs_per_host() -> None:
    v = view(endpoints=(ep("a1", "10.1.0.2", LOCAL, 1), ep("b1", "10.1.0.3", "host-b", 2)))
    mine = want(v).bridges["ovbr100"].mac
    theirs = desired_state(v, local_node="host-b", local_vtep=VTEP_B, underlay_mtu=1500)
    assert theirs.bridges["ovbr100"].mac == stable_mac("host-b", "100")
    assert mine != theirs.bridges["ovbr100"].mac


# --- remote endpoints -------------------------------------------------------------------------


def test_remote_endpoints_give_fdb_neigh_flood() -> None:
    v = view(
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("b1", "10.1.0.3", "host-b", 2),
            ep("c1", "10.1.0.4", "host-c", 3),
        )
    )
    w = want(v)
    assert w.fdb == {
        FdbEntry("ovvx100", mac(2), VTEP_B),
        FdbEntry("ovvx100", mac(3), VTEP_C),
    }
    assert w.neigh == {
        NeighEntry("ovvx100", A("10.1.0.3"), mac(2)),
        NeighEntry("ovvx100", A("10.1.0.4"), mac(3)),
    }
    assert w.flood == {FloodEntry("ovvx100", VTEP_B), FloodEntry("ovvx100", VTEP_C)}
    # Remote endpoints never get ports here.
    assert set(w.ports) == {veth_name("blue", "a1")}


def test_one_flood_entry_per_remote_vtep() -> None:
    v = view(
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("b1", "10.1.0.3", "host-b", 2),
            ep("b2", "10.1.0.4", "host-b", 3),
            ep("b3", "10.1.0.5", "host-b", 4),
        )
    )
    w = want(v)
    assert w.flood == {FloodEntry("ovvx100", VTEP_B)}
    assert len(w.fdb) == 3
    assert len(w.neigh) == 3
    assert w.entry_count() == 7


def test_two_node_records_on_one_vtep_share_a_flood_entry() -> None:
    v = view(endpoints=(ep("a1", "10.1.0.2", LOCAL, 1), ep("b1", "10.1.0.3", "host-b", 2)))
    v.apply(NodePut(Node(name="host-b2", vtep=VTEP_B, started_at=1.0)))
    v.apply(EndpointPut(ep("x1", "10.1.0.9", "host-b2", 9)))
    assert want(v).flood == {FloodEntry("ovvx100", VTEP_B)}


def test_endpoint_without_node_record_is_skipped() -> None:
    v = view(
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("b1", "10.1.0.3", "host-b", 2),
            ep("g1", "10.1.0.4", "ghost", 3),
        )
    )
    w = want(v)
    assert w.fdb == {FdbEntry("ovvx100", mac(2), VTEP_B)}
    assert w.neigh == {NeighEntry("ovvx100", A("10.1.0.3"), mac(2))}
    assert w.flood == {FloodEntry("ovvx100", VTEP_B)}
    # ... and appears as soon as the node record does.
    v.apply(NodePut(Node(name="ghost", vtep=A("198.18.0.9"), started_at=0.0)))
    w = want(v)
    assert FdbEntry("ovvx100", mac(3), A("198.18.0.9")) in w.fdb
    assert NeighEntry("ovvx100", A("10.1.0.4"), mac(3)) in w.neigh
    assert FloodEntry("ovvx100", A("198.18.0.9")) in w.flood


def test_remote_record_on_our_own_vtep_is_skipped() -> None:
    # E.g. this host's previous name: never point an entry at ourselves.
    v = view(endpoints=(ep("a1", "10.1.0.2", LOCAL, 1),))
    v.apply(NodePut(Node(name="host-a-old", vtep=LOCAL_VTEP, started_at=0.0)))
    v.apply(EndpointPut(ep("o1", "10.1.0.3", "host-a-old", 2)))
    assert want(v).entry_count() == 0


# --- IP / MAC held by two records ---------------------------------------------------------------
# Which record holds an address is the admission's decision (tests/unit/test_admission.py);
# the view it builds never holds two. Desired state only stays sound if one ever does.


@pytest.mark.parametrize("old_first", [True, False])
def test_two_records_on_one_ip_the_first_holds_and_the_second_waits(old_first: bool) -> None:
    old = ep("old", "10.1.0.7", "host-b", 10, created_at=100.0)
    new = ep("new", "10.1.0.7", "host-c", 11, created_at=200.0)
    first, second = (old, new) if old_first else (new, old)
    v = view(endpoints=(ep("a1", "10.1.0.2", LOCAL, 1),))
    d = DesiredState(v, local_node=LOCAL, local_vtep=LOCAL_VTEP, underlay_mtu=1500)
    for record in (first, second):
        d.apply([v.change(EndpointPut(record))])  # type: ignore[list-item]
    assert d.tables.neigh == {("ovvx100", A("10.1.0.7")): first.mac}
    d.apply([v.change(EndpointDeleted(first.key))])  # type: ignore[list-item]
    assert d.tables.neigh == {("ovvx100", A("10.1.0.7")): second.mac}
    d.apply([v.change(EndpointDeleted(second.key))])  # type: ignore[list-item]
    assert d.tables.neigh == {}


def test_ip_reused_by_remote_after_local_release() -> None:
    old = ep("old", "10.1.0.7", LOCAL, 10, created_at=100.0)
    new = ep("new", "10.1.0.7", "host-b", 11, created_at=200.0)
    w = want(view(endpoints=(new, old)))
    assert w.neigh == {NeighEntry("ovvx100", A("10.1.0.7"), mac(11))}


def test_record_with_unknown_owner_gives_no_entries() -> None:
    old = ep("old", "10.1.0.7", "ghost", 10, created_at=100.0)
    new = ep("new", "10.1.0.8", "host-b", 11, created_at=200.0)
    w = want(view(endpoints=(ep("a1", "10.1.0.2", LOCAL, 1), new, old)))
    assert w.neigh == {NeighEntry("ovvx100", A("10.1.0.8"), mac(11))}


def test_same_ip_in_two_networks_is_not_a_conflict() -> None:
    v = view(
        networks=(BLUE, Network(name="green", vni=300, subnet=IPv4Network("10.1.0.0/24"))),
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("a2", "10.1.0.2", LOCAL, 2, network="green"),
            ep("b1", "10.1.0.5", "host-b", 3, created_at=1.0),
            ep("b2", "10.1.0.5", "host-c", 4, network="green", created_at=2.0),
        ),
    )
    assert want(v).neigh == {
        NeighEntry("ovvx100", A("10.1.0.5"), mac(3)),
        NeighEntry("ovvx300", A("10.1.0.5"), mac(4)),
    }


# --- several networks -------------------------------------------------------------------------


def test_networks_are_isolated() -> None:
    v = view(
        networks=(BLUE, RED),
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("a2", "10.2.0.2", LOCAL, 2, network="red"),
            ep("b1", "10.1.0.3", "host-b", 3),
            ep("c1", "10.2.0.3", "host-c", 4, network="red"),
        ),
    )
    w = want(v)
    assert set(w.bridges) == {"ovbr100", "ovbr200"}
    assert w.vxlans["ovvx100"].vni == 100
    assert w.vxlans["ovvx200"].vni == 200
    assert w.vxlans["ovvx200"].bridge == "ovbr200"
    assert w.ports[veth_name("blue", "a1")].bridge == "ovbr100"
    assert w.ports[veth_name("red", "a2")].bridge == "ovbr200"
    assert w.fdb == {FdbEntry("ovvx100", mac(3), VTEP_B), FdbEntry("ovvx200", mac(4), VTEP_C)}
    assert w.neigh == {
        NeighEntry("ovvx100", A("10.1.0.3"), mac(3)),
        NeighEntry("ovvx200", A("10.2.0.3"), mac(4)),
    }
    assert w.flood == {FloodEntry("ovvx100", VTEP_B), FloodEntry("ovvx200", VTEP_C)}


def test_only_networks_with_local_endpoints_are_instantiated() -> None:
    v = view(
        networks=(BLUE, RED),
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("b1", "10.1.0.3", "host-b", 3),
            ep("c1", "10.2.0.3", "host-c", 4, network="red"),
        ),
    )
    w = want(v)
    assert set(w.bridges) == {"ovbr100"}
    assert set(w.vxlans) == {"ovvx100"}
    assert w.flood == {FloodEntry("ovvx100", VTEP_B)}
    assert {e.device for e in w.fdb} | {e.device for e in w.neigh} | {e.device for e in w.flood} == {
        "ovvx100"
    }


def test_pure_and_deterministic() -> None:
    v = view(
        networks=(BLUE, RED),
        endpoints=(
            ep("a1", "10.1.0.2", LOCAL, 1),
            ep("b1", "10.1.0.3", "host-b", 3),
            ep("a2", "10.2.0.2", LOCAL, 2, network="red"),
        ),
    )
    before = copy.deepcopy(v)
    first = want(v)
    assert want(v) == first
    assert v == before


# --- kstate naming helpers --------------------------------------------------------------------


def test_link_names() -> None:
    assert bridge_name(100) == "ovbr100"
    assert vxlan_name(16777215) == "ovvx16777215"
    assert len(vxlan_name(16777215)) <= 15


def test_veth_name_stable_unique_short() -> None:
    assert veth_name("blue", "a1") == veth_name("blue", "a1")
    assert veth_name("blue", "a1") != veth_name("blue", "a2")
    assert veth_name("blue", "a1") != veth_name("red", "a1")
    name = veth_name("n" * 63, "e" * 63)
    assert name.startswith("ovep")
    assert len(name) == 14


def test_is_ours() -> None:
    assert is_ours("ovbr100", link_alias("blue", "bridge"))
    assert link_alias("blue", "bridge") == "overlayd:bridge:blue"
    assert is_ours("ovvx100", "overlayd:vxlan:blue")
    assert is_ours("ovep0123456789", "overlayd:port:blue")
    assert not is_ours("ovbr100", None)
    assert not is_ours("ovbr100", "")
    assert not is_ours("ovbr100", "someone else")
    assert not is_ours("eth0", "overlayd:bridge:blue")
    assert not is_ours("docker0", None)
