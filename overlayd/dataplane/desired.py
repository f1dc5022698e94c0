"""Desired kernel state: a pure function of the cluster view.

A host instantiates a network (bridge + VXLAN device) only while it has at
least one local endpoint in it, so hosts without endpoints in a network get
no flood traffic for it. For every other host that has endpoints in the
network we want one flood entry towards its VTEP, and for each of its
endpoints an FDB entry (MAC -> VTEP) and a neighbour entry (IP -> MAC).
"""

from __future__ import annotations

from ipaddress import IPv4Address

from overlayd.dataplane.kstate import (
    BridgeSpec,
    FdbEntry,
    FloodEntry,
    KernelState,
    NeighEntry,
    PortSpec,
    VxlanSpec,
    bridge_name,
    veth_name,
    vxlan_name,
)
from overlayd.model import VXLAN_OVERHEAD, Network, stable_mac
from overlayd.state import ClusterView


def overlay_mtu(network: Network, underlay_mtu: int) -> int:
    """The MTU for a network on this host: never above what the underlay can carry."""
    ceiling = underlay_mtu - VXLAN_OVERHEAD
    return min(network.mtu, ceiling) if network.mtu else ceiling


def desired_state(
    view: ClusterView, *, local_node: str, local_vtep: IPv4Address, underlay_mtu: int
) -> KernelState:
    want = KernelState()
    # One value per kernel key, as the diff compares them: (device, MAC) for
    # FDB entries, (device, IP) for neighbour entries.
    fdb: dict[tuple[str, str], IPv4Address] = {}
    neigh: dict[tuple[str, IPv4Address], str] = {}
    for network in view.networks.values():
        members = view.endpoints_in(network.name)
        local = [ep for ep in members if ep.owner == local_node]
        if not local:
            continue
        mtu = overlay_mtu(network, underlay_mtu)
        br = bridge_name(network.vni)
        vx = vxlan_name(network.vni)
        want.bridges[br] = BridgeSpec(
            ifname=br, network=network.name, mac=stable_mac(local_node, str(network.vni)), mtu=mtu
        )
        want.vxlans[vx] = VxlanSpec(
            ifname=vx, network=network.name, vni=network.vni, local=local_vtep, mtu=mtu, bridge=br
        )
        for ep in local:
            port = veth_name(ep.network, ep.name)
            want.ports[port] = PortSpec(ifname=port, network=network.name, bridge=br, mtu=mtu)
        # Newest endpoint wins an IP (and a MAC): two records can hold one for
        # a moment while a release on one host and a reuse on another cross in
        # flight. Every record claims, including the ones we program nothing
        # for, so an older record never keeps an IP a newer one has taken.
        for ep in sorted(members, key=lambda e: (e.created_at, e.owner, e.name)):
            node = view.nodes.get(ep.owner)
            if ep.owner == local_node or node is None or node.vtep == local_vtep:
                # Local endpoints need no entry on the VXLAN device. Without the
                # owner's node record we do not know where to send; the entry
                # appears as soon as the record arrives.
                fdb.pop((vx, ep.mac), None)
                neigh.pop((vx, ep.ip), None)
                continue
            fdb[(vx, ep.mac)] = node.vtep
            neigh[(vx, ep.ip)] = ep.mac
            want.flood.add(FloodEntry(vx, node.vtep))
    want.fdb = {FdbEntry(dev, mac, dst) for (dev, mac), dst in fdb.items()}
    want.neigh = {NeighEntry(dev, ip, mac) for (dev, ip), mac in neigh.items()}
    return want
