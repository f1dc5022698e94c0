"""The gateway side against a real kernel, without daemons: desired -> plan -> executor -> observe.

A host namespace with an underlay interface; desired state for a VXLAN network
with egress and a routed network (one local endpoint each, remote endpoints
on and off the segment). Executing the plan must leave a kernel that reads
back exactly as desired (a second plan is empty); then a view without them
must leave nothing of theirs behind, with no foreign object touched.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from conftest import new_prefix

from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import ClusterView, EndpointPut, NetworkPut, NodePut
from overlayd.dataplane.desired import DesiredState
from overlayd.dataplane.diff import diff
from overlayd.dataplane.kernel import Kernel
from overlayd.dataplane.kstate import KernelState
from overlayd.lab import netns as nsutil

pytestmark = pytest.mark.root

A = IPv4Address
VTEP = A("198.18.6.1")
NAT = Network("out", 4401, IPv4Network("10.44.0.0/24"), gateway=A("10.44.0.1"), egress="nat")
ROUTED = Network("rt", 4402, IPv4Network("10.45.0.0/24"), gateway=A("10.45.0.1"), mode="routed", egress="nat")


@pytest.fixture
def host() -> Iterator[str]:
    ns = new_prefix()
    nsutil.add_netns(ns)
    try:
        nsutil.ip("link", "add", "ul0", "type", "veth", "peer", "name", "ul1", netns=ns)
        nsutil.add_address(ns, "ul0", f"{VTEP}/24")
        nsutil.set_up(ns, "ul0")
        nsutil.set_up(ns, "ul1")
        yield ns
    finally:
        for name in nsutil.list_netns():
            if name.startswith(f"{ns}gw"):
                subprocess.run(["ip", "netns", "delete", name], check=False)
        nsutil.delete_netns(ns)


@pytest.fixture
async def kernel(host: str) -> AsyncIterator[Kernel]:
    async with Kernel(netns=host, gateway_netns_prefix=f"{host}gw") as k:
        yield k


def endpoint(network: Network, host_ip: int, owner: str, n: int) -> Endpoint:
    ip = network.subnet.network_address + host_ip
    return Endpoint(network.name, f"e{n}", ip, f"02:44:00:00:00:{n:02x}", owner)


def view(*, with_networks: bool) -> ClusterView:
    v = ClusterView()
    v.apply(NodePut(Node("h1", VTEP, 0.0)))
    v.apply(NodePut(Node("near", A("198.18.6.2"), 0.0)))  # on the segment
    v.apply(NodePut(Node("far", A("198.18.9.2"), 0.0)))  # behind a router
    if with_networks:
        for network in (NAT, ROUTED):
            v.apply(NetworkPut(network))
            for i, owner in enumerate(("h1", "near", "far")):
                v.apply(EndpointPut(endpoint(network, 2 + i, owner, 10 * (network.vni % 10) + i)))
    return v


def desired(ns: str, v: ClusterView) -> KernelState:
    state = DesiredState(
        v,
        local_node="h1",
        local_vtep=VTEP,
        underlay_mtu=1500,
        underlay_ifname="ul0",
        underlay_network=IPv4Network("198.18.6.0/24"),
        gateway_netns_prefix=f"{ns}gw",
    ).tables.state()
    state.ports = {}  # endpoint ports are the admin API's to make
    return state


async def test_the_gateway_side_is_built_read_back_equal_and_removed(host: str, kernel: Kernel) -> None:
    # A foreign table and route the host had before: never touched.
    foreign = {"nftables": [{"add": {"table": {"family": "inet", "name": "foreign"}}}]}
    nsutil.run_in(host, ["nft", "-j", "-f", "-"], input=json.dumps(foreign))
    nsutil.ip("route", "add", "10.99.0.0/16", "via", "198.18.6.254", netns=host)

    want = desired(host, view(with_networks=True))
    results = await kernel.execute(diff(want, await kernel.observe()))
    assert [r for r in results if r.error is not None] == []
    have = await kernel.observe()
    assert have.netns.keys() == want.netns.keys() == {f"{host}gw4401"}
    assert have.routes == want.routes and have.addrs == want.addrs and have.nft == want.nft
    assert have.inner == want.inner and have.veths == want.veths and have.bridges == want.bridges
    assert want.forwarding <= have.forwarding
    assert diff(want, have) == []
    # What the kernel says in its own words.
    routes = nsutil.ip_json("route", "show", "proto", "111", netns=host)
    assert {r["dst"]: r.get("gateway") for r in routes} == {
        "10.45.0.3": "198.18.6.2",  # the routed network's endpoint on the segment
        "100.64.17.49": None,  # the uplink of the egress network's gateway namespace (VNI 4401)
    }
    sysctl = ["sysctl", "-n", "net.ipv4.conf.ul0.forwarding", "net.ipv4.conf.ovbr4402.proxy_arp"]
    assert nsutil.run_in(host, sysctl).stdout.split() == ["1", "1"]
    assert nsutil.run_in(host, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"

    # A second kernel object reading the same namespace from scratch finds the same.
    async with Kernel(netns=host, gateway_netns_prefix=f"{host}gw") as other:
        assert diff(want, await other.observe()) == []

    empty = desired(host, view(with_networks=False))
    results = await kernel.execute(diff(empty, await kernel.observe()))
    assert [r for r in results if r.error is not None] == []
    gone = await kernel.observe()
    assert (gone.netns, gone.veths, gone.routes, gone.addrs, gone.nft, gone.bridges) == (
        {},
        {},
        {},
        set(),
        {},
        {},
    )
    assert not [n for n in nsutil.list_netns() if n.startswith(f"{host}gw")]
    # Foreign objects stayed.
    assert "10.99.0.0/16" in nsutil.ip("route", "show", netns=host)
    assert '"foreign"' in nsutil.run_in(host, ["nft", "-j", "list", "tables"]).stdout
