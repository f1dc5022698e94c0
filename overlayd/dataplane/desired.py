"""Desired kernel state, kept up to date one view delta at a time.

Pure: no I/O. A host instantiates a network (bridge + VXLAN device) only
while it has at least one local endpoint in it, so hosts without endpoints
in a network get no flood traffic for it. For every other host that has
endpoints in the network we want one flood entry towards its VTEP, and for
each of its endpoints an FDB entry (MAC -> VTEP) and a neighbour entry
(IP -> MAC).

`DesiredState.apply(delta)` changes only the entries the delta touches and
marks their keys in `dirty`, which is what the reconciler compares against
its kernel mirror: an endpoint costs O(1), a node moving to another VTEP
O(its endpoints), a network appearing or going away O(its endpoints).
`desired_state(view)` builds the same thing from scratch (tests, `diff`).

Which record holds an IP or a MAC is the admission's decision (one rule,
`overlayd.core.admission`): the view never holds two endpoints on one address.
Should it ever happen anyway, the first claim keeps the entry and the
second waits for it, so an entry is never removed while a record still
wants it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Generic, TypeVar

from overlayd.core.model import VXLAN_OVERHEAD, Endpoint, Network, stable_mac
from overlayd.core.view import ClusterView, Delta, EndpointChanged, NetworkChanged, NodeChanged
from overlayd.dataplane.kstate import (
    BridgeSpec,
    Dirty,
    FdbKey,
    FloodKey,
    KernelState,
    NeighKey,
    PortSpec,
    Tables,
    VxlanSpec,
    bridge_name,
    veth_name,
    vxlan_name,
)

K = TypeVar("K")
V = TypeVar("V")


def overlay_mtu(network: Network, underlay_mtu: int) -> int:
    """The MTU for a network on this host: never above what the underlay can carry."""
    ceiling = underlay_mtu - VXLAN_OVERHEAD
    return min(network.mtu, ceiling) if network.mtu else ceiling


class _Claimed(Generic[K, V]):
    """Entry key -> value where a key is held by the first endpoint that claims it.

    Later claimants of a held key wait (in arrival order) and take over when
    the holder lets go. Waiting claims live in a side table that is empty in
    practice (see the module docstring).
    """

    def __init__(self, table: dict[K, V], dirty: set[K]) -> None:
        self.table = table
        self._holder: dict[K, str] = {}
        self._waiting: dict[K, dict[str, V]] = {}
        self._dirty = dirty

    def claim(self, key: K, who: str, value: V) -> None:
        holder = self._holder.get(key)
        if holder is None or holder == who:
            self._holder[key] = who
            self.table[key] = value
            self._dirty.add(key)
        else:
            self._waiting.setdefault(key, {})[who] = value

    def release(self, key: K, who: str) -> None:
        if self._holder.get(key) != who:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.pop(who, None)
                if not waiting:
                    del self._waiting[key]
            return
        waiting = self._waiting.get(key)
        if waiting:
            successor, value = next(iter(waiting.items()))
            del waiting[successor]
            if not waiting:
                del self._waiting[key]
            self._holder[key] = successor
            self.table[key] = value
        else:
            del self._holder[key]
            del self.table[key]
        self._dirty.add(key)


@dataclass(frozen=True, slots=True)
class _Remote:
    """What one remote endpoint contributes: kept so that it can be taken back exactly."""

    device: str
    mac: str
    ip: IPv4Address
    vtep: IPv4Address


class DesiredState:
    """The kernel objects this host wants, as `Tables`, following a `ClusterView`."""

    def __init__(
        self, view: ClusterView, *, local_node: str, local_vtep: IPv4Address, underlay_mtu: int
    ) -> None:
        self.view = view
        self.local_node = local_node
        self.local_vtep = local_vtep
        self.underlay_mtu = underlay_mtu
        self.tables = Tables()
        self.dirty = Dirty()
        self._fdb: _Claimed[FdbKey, IPv4Address] = _Claimed(self.tables.fdb, self.dirty.fdb)
        self._neigh: _Claimed[NeighKey, str] = _Claimed(self.tables.neigh, self.dirty.neigh)
        self._flood_refs: dict[FloodKey, int] = {}
        self._remote: dict[str, _Remote] = {}  # endpoint key -> its entries
        self._local_count: dict[str, int] = {}  # network -> local endpoints in it
        self._instantiated: dict[str, Network] = {}  # network name -> as instantiated
        for network in view.networks.values():
            self._network_added(network)
        for key in list(view.endpoints):
            self._endpoint_added(view.endpoints[key])

    # --- following the view ---

    def apply(self, deltas: Iterable[Delta]) -> None:
        for delta in deltas:
            match delta:
                case EndpointChanged(old, new):
                    if old is not None:
                        self._endpoint_removed(old)
                    if new is not None:
                        self._endpoint_added(new)
                case NodeChanged(old, new):
                    self._node_changed(delta.name)
                case NetworkChanged(old, new):
                    if old is not None:
                        self._network_removed(old)
                    if new is not None:
                        self._network_added(new)

    def _endpoint_added(self, ep: Endpoint) -> None:
        if ep.owner == self.local_node:
            count = self._local_count.get(ep.network, 0) + 1
            self._local_count[ep.network] = count
            network = self.view.networks.get(ep.network)
            if network is None:
                return
            if count == 1:
                self._instantiate(network)
            else:
                self._add_port(network, ep)
        elif ep.network in self._instantiated:
            self._add_remote(ep)

    def _endpoint_removed(self, ep: Endpoint) -> None:
        if ep.owner == self.local_node:
            count = self._local_count.get(ep.network, 0) - 1
            if count > 0:
                self._local_count[ep.network] = count
            else:
                self._local_count.pop(ep.network, None)
            network = self._instantiated.get(ep.network)
            if network is None:
                return
            if count <= 0:
                self._uninstantiate(network)
            else:
                self._drop_port(ep)
        else:
            self._drop_remote(ep.key)

    def _node_changed(self, name: str) -> None:
        if name == self.local_node:
            return
        for ep in self.view.owned_by(name):
            self._drop_remote(ep.key)
            if ep.network in self._instantiated:
                self._add_remote(ep)

    def _network_added(self, network: Network) -> None:
        if self._local_count.get(network.name, 0) > 0:
            self._instantiate(network)

    def _network_removed(self, network: Network) -> None:
        current = self._instantiated.get(network.name)
        if current is not None:
            self._uninstantiate(current)

    def set_underlay_mtu(self, mtu: int) -> None:
        """The underlay's MTU changed: every network's devices follow (O(everything), rare)."""
        if mtu == self.underlay_mtu:
            return
        networks = list(self._instantiated.values())
        for network in networks:
            self._uninstantiate(network)
        self.underlay_mtu = mtu
        for network in networks:
            self._instantiate(network)

    # --- networks ---

    def _instantiate(self, network: Network) -> None:
        # Deltas apply to a view that already holds their whole outcome, so a
        # network may be instantiated by an earlier delta of the same change.
        current = self._instantiated.get(network.name)
        if current == network:
            return
        if current is not None:
            self._uninstantiate(current)
        mtu = overlay_mtu(network, self.underlay_mtu)
        br, vx = bridge_name(network.vni), vxlan_name(network.vni)
        self.tables.bridges[br] = BridgeSpec(
            ifname=br, network=network.name, mac=stable_mac(self.local_node, str(network.vni)), mtu=mtu
        )
        self.tables.vxlans[vx] = VxlanSpec(
            ifname=vx, network=network.name, vni=network.vni, local=self.local_vtep, mtu=mtu, bridge=br
        )
        self.dirty.links |= {br, vx}
        self._instantiated[network.name] = network
        for ep in list(self.view.members(network.name).values()):
            if ep.owner == self.local_node:
                self._add_port(network, ep)
            else:
                self._add_remote(ep)

    def _uninstantiate(self, network: Network) -> None:
        del self._instantiated[network.name]
        for ep in list(self.view.members(network.name).values()):
            if ep.owner == self.local_node:
                self._drop_port(ep)
            else:
                self._drop_remote(ep.key)
        # Entries of endpoints that left the view in this same change are still held.
        vx = vxlan_name(network.vni)
        for key in [k for k, r in self._remote.items() if r.device == vx]:
            self._drop_remote(key)
        for port in [p for p, spec in self.tables.ports.items() if spec.network == network.name]:
            del self.tables.ports[port]
            self.dirty.links.add(port)
        br = bridge_name(network.vni)
        self.tables.bridges.pop(br, None)
        self.tables.vxlans.pop(vx, None)
        self.dirty.links |= {br, vx}

    def _add_port(self, network: Network, ep: Endpoint) -> None:
        port = veth_name(ep.network, ep.name)
        self.tables.ports[port] = PortSpec(
            ifname=port,
            network=network.name,
            bridge=bridge_name(network.vni),
            mtu=overlay_mtu(network, self.underlay_mtu),
        )
        self.dirty.links.add(port)

    def _drop_port(self, ep: Endpoint) -> None:
        port = veth_name(ep.network, ep.name)
        if self.tables.ports.pop(port, None) is not None:
            self.dirty.links.add(port)

    # --- remote endpoints ---

    def _add_remote(self, ep: Endpoint) -> None:
        node = self.view.nodes.get(ep.owner)
        if node is None or node.vtep == self.local_vtep:
            # Without the owner's node record we do not know where to send; the
            # entries appear as soon as it arrives. A record on our own VTEP is
            # local in all but name: nothing to tunnel to.
            return
        network = self._instantiated[ep.network]
        if ep.key in self._remote:
            self._drop_remote(ep.key)  # a replace: take back what the older record gave
        remote = _Remote(vxlan_name(network.vni), ep.mac, ep.ip, node.vtep)
        key = ep.key
        self._remote[key] = remote
        self._fdb.claim((remote.device, remote.mac), key, remote.vtep)
        self._neigh.claim((remote.device, remote.ip), key, remote.mac)
        flood = (remote.device, remote.vtep)
        refs = self._flood_refs.get(flood, 0)
        self._flood_refs[flood] = refs + 1
        if refs == 0:
            self.tables.flood.add(flood)
            self.dirty.flood.add(flood)

    def _drop_remote(self, key: str) -> None:
        remote = self._remote.pop(key, None)
        if remote is None:
            return
        self._fdb.release((remote.device, remote.mac), key)
        self._neigh.release((remote.device, remote.ip), key)
        flood = (remote.device, remote.vtep)
        refs = self._flood_refs[flood] - 1
        if refs:
            self._flood_refs[flood] = refs
        else:
            del self._flood_refs[flood]
            self.tables.flood.discard(flood)
            self.dirty.flood.add(flood)

    # --- asking ---

    def holder_of_mac(self, device: str, mac: str) -> str | None:
        """The endpoint key whose FDB entry (device, mac) is, or None."""
        return self._fdb._holder.get((device, mac))

    def network_instantiated(self, name: str) -> bool:
        return name in self._instantiated


def desired_state(
    view: ClusterView, *, local_node: str, local_vtep: IPv4Address, underlay_mtu: int
) -> KernelState:
    """The whole desired state of `view`, built from scratch."""
    return DesiredState(
        view, local_node=local_node, local_vtep=local_vtep, underlay_mtu=underlay_mtu
    ).tables.state()
