"""Desired kernel state, kept up to date one view delta at a time.

Pure: no I/O. A host instantiates a network (bridge + VXLAN device) only
while it has at least one local endpoint in it, so hosts without endpoints
in a network get no flood traffic for it. For every other host that has
endpoints in the network we want one flood entry towards its VTEP, and for
each of its endpoints an FDB entry (MAC -> VTEP) and a neighbour entry
(IP -> MAC).

A network with a gateway may add its gateway side (the gateway IP and MAC
are the same on every host that has the network: an anycast gateway):

- routed mode (`--mode routed`): the gateway lives on the bridge itself, in
  the host's routing table (routed networks never overlap). A remote endpoint
  whose host is on this host's underlay segment gets no FDB, flood or
  neighbour entry but a host route through that host's underlay address; the
  bridge answers ARP for it (proxy ARP) with the gateway MAC. A host behind a
  router (not on the segment) is reached over VXLAN as in VXLAN mode: the
  fallback is decided per pair of hosts from the underlay (`path_to`).
- VXLAN mode with egress (`--egress nat`): the gateway lives in a namespace
  of its own per network (`gateway_netns`), so networks with overlapping
  subnets never meet in one routing table. A veth pair puts its gateway
  interface (`gw0`, the gateway IP and MAC) on the bridge, another one its
  uplink (`up0`, an address from 100.64.0.0/10 derived from the VNI) on the
  host. What leaves the subnet through the uplink is masqueraded to the
  uplink's address there, and again to the host's address when it leaves the
  host: two NATs, so the host's own tables only ever see unique addresses.

The host-wide pieces follow the set of instantiated networks: the nftables
tables (`dataplane.nft`), and IPv4 forwarding on the underlay interface (and
the configured egress interfaces), where routed traffic and the replies to
masqueraded traffic come in.

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

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Generic, TypeVar

from overlayd.core.model import (
    EGRESS_VNI_MAX,
    MODE_ROUTED,
    VXLAN_OVERHEAD,
    Endpoint,
    Network,
    Node,
    routed_overlap,
    stable_mac,
)
from overlayd.core.view import ClusterView, Delta, EndpointChanged, NetworkChanged, NodeChanged
from overlayd.dataplane import nft
from overlayd.dataplane.kstate import (
    GW_INNER,
    HOST_NS,
    UP_INNER,
    AddrKey,
    BridgeSpec,
    Dirty,
    FdbKey,
    FloodKey,
    ForwardKey,
    InnerLinkSpec,
    KernelState,
    NeighKey,
    NetnsSpec,
    NftKey,
    NftTable,
    PortSpec,
    RouteKey,
    RouteSpec,
    Tables,
    VethSpec,
    VxlanSpec,
    bridge_name,
    gateway_port_name,
    uplink_name,
    veth_name,
    vxlan_name,
)

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_GATEWAY_NETNS_PREFIX = "ovgw"
# The uplinks between the host and its gateway namespaces: RFC 6598 shared address
# space, meant for exactly this (addresses between two NATs). One address per VNI.
TRANSIT_NETWORK = IPv4Network("100.64.0.0/10")
# The host's end of every uplink: link-local, the same on each (the gateway namespace
# reaches it "on link"; the host reaches each namespace by a /32 route on its uplink).
UPLINK_HOST = IPv4Address("169.254.0.1")
DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")

PATH_DIRECT = "direct"  # routed without encapsulation: the hosts share an underlay segment
PATH_VXLAN = "vxlan"


def overlay_mtu(network: Network, underlay_mtu: int) -> int:
    """The MTU for a network on this host: never above what the underlay can carry.

    Routed networks get the same ceiling as VXLAN ones: a pair of hosts behind a
    router falls back to VXLAN, and a frame too big for the tunnel would be dropped
    on the bridge without a word (no ICMP "fragmentation needed" at layer 2).
    """
    ceiling = underlay_mtu - VXLAN_OVERHEAD
    return min(network.mtu, ceiling) if network.mtu else ceiling


def gateway_mac(network: Network) -> str:
    """The anycast gateway's MAC: the same on every host (derived from the network alone)."""
    return stable_mac("gateway", network.name, str(network.vni))


def transit_address(vni: int) -> IPv4Address:
    """The uplink address of a network's gateway namespace (unique per VNI on a host)."""
    if not 0 < vni <= EGRESS_VNI_MAX:
        raise ValueError(f"VNI {vni} has no uplink address (at most {EGRESS_VNI_MAX})")
    return TRANSIT_NETWORK.network_address + vni


_device_names: dict[int, str] = {}  # VNI -> its VXLAN device's name (VNIs are few)


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
        # One lookup that also takes a free key: a neighbour key hashes its address in Python.
        holder = self._holder.setdefault(key, who)
        if holder == who:
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


class _Remote:
    """What one remote endpoint contributes: kept so that it can be taken back exactly.

    A plain class, not a frozen dataclass: one is made per remote endpoint (10,000 in a
    join), and a frozen dataclass sets each field through `object.__setattr__`.
    """

    __slots__ = ("device", "direct", "ip", "mac", "vtep")

    def __init__(self, device: str, mac: str, ip: IPv4Address, vtep: IPv4Address, direct: bool) -> None:
        self.device = device
        self.mac = mac
        self.ip = ip
        self.vtep = vtep
        self.direct = direct  # routed without encapsulation: a host route, nothing on the VXLAN device


@dataclass(frozen=True, slots=True)
class _Gateway:
    """The objects one network's gateway side adds on this host, to take them back exactly."""

    netns: str | None
    veths: tuple[str, ...]
    inner: tuple[tuple[str, str], ...]
    addrs: tuple[AddrKey, ...]
    routes: tuple[RouteKey, ...]
    nft: tuple[NftKey, ...]


class DesiredState:
    """The kernel objects this host wants, as `Tables`, following a `ClusterView`.

    `underlay_ifname` and `underlay_network` (the underlay interface and its
    connected subnet) decide which hosts are on this host's segment; without them
    every pair of hosts falls back to VXLAN. `gateway_netns_prefix` names the
    gateway namespaces (`<prefix><vni>`); `egress_interfaces` are interfaces
    besides the underlay's where replies to masqueraded traffic come in.
    """

    def __init__(
        self,
        view: ClusterView,
        *,
        local_node: str,
        local_vtep: IPv4Address,
        underlay_mtu: int,
        underlay_ifname: str = "",
        underlay_network: IPv4Network | None = None,
        gateway_netns_prefix: str = DEFAULT_GATEWAY_NETNS_PREFIX,
        egress_interfaces: tuple[str, ...] = (),
    ) -> None:
        self.view = view
        self.local_node = local_node
        self.local_vtep = local_vtep
        self.underlay_mtu = underlay_mtu
        self.underlay_ifname = underlay_ifname
        self.underlay_network = underlay_network
        self.gateway_netns_prefix = gateway_netns_prefix
        self.egress_interfaces = egress_interfaces
        self.tables = Tables()
        self.dirty = Dirty()
        self._fdb: _Claimed[FdbKey, IPv4Address] = _Claimed(self.tables.fdb, self.dirty.fdb)
        self._neigh: _Claimed[NeighKey, str] = _Claimed(self.tables.neigh, self.dirty.neigh)
        self._routes: _Claimed[RouteKey, RouteSpec] = _Claimed(self.tables.routes, self.dirty.routes)
        self._flood_refs: dict[FloodKey, int] = {}
        self._remote: dict[str, _Remote] = {}  # endpoint key -> its entries
        self._last_node: tuple[Node, bool] | None = None  # `_on_local_vtep`'s last answer
        self._local_count: dict[str, int] = {}  # network -> local endpoints in it
        self._instantiated: dict[str, Network] = {}  # network name -> as instantiated
        self._gateways: dict[str, _Gateway] = {}  # network name -> its gateway side here
        # A routed network whose subnet overlaps one instantiated before it (two creates
        # racing on different hosts): it keeps its layer 2, gets no gateway, and says why.
        self.problems: dict[str, str] = {}
        for network in view.networks.values():
            self._network_added(network)
        for key in list(view.endpoints):
            self._endpoint_added(view.endpoints[key])

    # --- following the view ---

    def apply(self, deltas: Iterable[Delta]) -> None:
        for delta in deltas:
            if type(delta) is EndpointChanged:  # nearly every delta: no match for it
                if delta.old is not None:
                    self._endpoint_removed(delta.old)
                if delta.new is not None:
                    self._endpoint_added(delta.new)
                continue
            match delta:
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

    def _routes_here(self, network: Network) -> bool:
        """Routed, and not overlapping a routed network instantiated before it."""
        if not network.routed:
            return False
        others = (n for name, n in self._instantiated.items() if name != network.name and self._routes_on(n))
        clash = routed_overlap(network, others)
        if clash is None:
            self.problems.pop(network.name, None)
            return True
        why = (
            f"routed network {network.name} ({network.subnet}) overlaps routed network {clash.name} "
            f"({clash.subnet}) on this host: it gets no gateway here"
        )
        if self.problems.get(network.name) != why:
            log.error("%s", why)
        self.problems[network.name] = why
        return False

    def _routes_on(self, network: Network) -> bool:
        bridge = self.tables.bridges.get(bridge_name(network.vni))
        return bridge is not None and bridge.routed

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
        routed = self._routes_here(network)
        mac = gateway_mac(network) if routed else stable_mac(self.local_node, str(network.vni))
        self.tables.bridges[br] = BridgeSpec(ifname=br, network=network.name, mac=mac, mtu=mtu, routed=routed)
        self.tables.vxlans[vx] = VxlanSpec(
            ifname=vx, network=network.name, vni=network.vni, local=self.local_vtep, mtu=mtu, bridge=br
        )
        self.dirty.links |= {br, vx}
        self._instantiated[network.name] = network
        if routed:
            assert network.gateway is not None  # the model requires one in routed mode
            self._add_gateway(network, _Gateway(None, (), (), ((HOST_NS, br, _iface(network)),), (), ()))
        elif network.nat:
            self._add_gateway(network, self._gateway_namespace(network, mtu))
        for ep in list(self.view.members(network.name).values()):
            if ep.owner == self.local_node:
                self._add_port(network, ep)
            else:
                self._add_remote(ep)
        self._host_wide()

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
        self._drop_gateway(network.name)
        br = bridge_name(network.vni)
        self.tables.bridges.pop(br, None)
        self.tables.vxlans.pop(vx, None)
        self.dirty.links |= {br, vx}
        self.problems.pop(network.name, None)
        self._host_wide()

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

    # --- gateways ---

    def gateway_netns(self, network: Network) -> str:
        return f"{self.gateway_netns_prefix}{network.vni}"

    def _gateway_namespace(self, network: Network, mtu: int) -> _Gateway:
        """The gateway namespace of a VXLAN network with egress, and everything around it."""
        assert network.gateway is not None  # the model requires one for egress
        ns = self.gateway_netns(network)
        gw, up = gateway_port_name(network.vni), uplink_name(network.vni)
        mac = gateway_mac(network)
        up_mac = stable_mac(self.local_node, "uplink", str(network.vni))
        transit = transit_address(network.vni)
        t = self.tables
        t.netns[ns] = NetnsSpec(ns, network.name)
        t.veths[gw] = VethSpec(
            gw,
            network.name,
            "gw",
            mtu,
            bridge=bridge_name(network.vni),
            netns=ns,
            peer=GW_INNER,
            peer_mac=mac,
        )
        t.veths[up] = VethSpec(
            up,
            network.name,
            "uplink",
            self.underlay_mtu,
            forwarding=True,
            netns=ns,
            peer=UP_INNER,
            peer_mac=up_mac,
        )
        t.inner[(ns, GW_INNER)] = InnerLinkSpec(ns, GW_INNER, mac, mtu, network=network.name)
        t.inner[(ns, UP_INNER)] = InnerLinkSpec(ns, UP_INNER, up_mac, self.underlay_mtu, network=network.name)
        addrs: tuple[AddrKey, ...] = (
            (ns, GW_INNER, _iface(network)),
            (ns, UP_INNER, IPv4Interface(f"{transit}/32")),
            (HOST_NS, up, IPv4Interface(f"{UPLINK_HOST}/32")),
        )
        routes: dict[RouteKey, RouteSpec] = {
            (ns, DEFAULT_ROUTE): RouteSpec(UP_INNER, UPLINK_HOST),
            (HOST_NS, IPv4Network(f"{transit}/32")): RouteSpec(up, None),
        }
        for key, route in routes.items():
            self._routes.claim(key, f"gateway:{network.name}", route)
        table = nft.gateway_ip_table(ns, uplink=UP_INNER, subnet=network.subnet)
        t.nft[(ns, table.family)] = table
        self.dirty.netns.add(ns)
        self.dirty.links |= {gw, up}
        self.dirty.inner |= {(ns, GW_INNER), (ns, UP_INNER)}
        self.dirty.nft.add((ns, table.family))
        return _Gateway(
            ns, (gw, up), ((ns, GW_INNER), (ns, UP_INNER)), addrs, tuple(routes), ((ns, table.family),)
        )

    def _add_gateway(self, network: Network, gateway: _Gateway) -> None:
        self._gateways[network.name] = gateway
        self.tables.addrs.update(gateway.addrs)
        self.dirty.addrs.update(gateway.addrs)

    def _drop_gateway(self, name: str) -> None:
        gateway = self._gateways.pop(name, None)
        if gateway is None:
            return
        t = self.tables
        if gateway.netns is not None:
            t.netns.pop(gateway.netns, None)
            self.dirty.netns.add(gateway.netns)
        for link in gateway.veths:
            t.veths.pop(link, None)
        self.dirty.links.update(gateway.veths)
        for key in gateway.inner:
            t.inner.pop(key, None)
        self.dirty.inner.update(gateway.inner)
        t.addrs.difference_update(gateway.addrs)
        self.dirty.addrs.update(gateway.addrs)
        for route in gateway.routes:
            self._routes.release(route, f"gateway:{name}")
        for key in gateway.nft:
            t.nft.pop(key, None)
        self.dirty.nft.update(gateway.nft)

    def _host_wide(self) -> None:
        """nftables tables and forwarding in the host namespace, from the instantiated networks."""
        networks = sorted(self._instantiated.values(), key=lambda n: n.vni)
        routed = [n for n in networks if self._routes_on(n)]
        uplinks = any(n.nat and not n.routed for n in networks)
        self._set_nft(
            (HOST_NS, "ip"),
            nft.host_ip_table(
                uplinks=uplinks, routed=[(bridge_name(n.vni), n.subnet, n.nat) for n in routed]
            ),
        )
        macs = [gateway_mac(n) for n in networks if self._routes_on(n) or n.name in self._namespaced()]
        self._set_nft((HOST_NS, "bridge"), nft.host_bridge_table(macs))
        wanted: set[ForwardKey] = set()
        if (routed or uplinks) and self.underlay_ifname:
            wanted = {(HOST_NS, dev) for dev in (self.underlay_ifname, *self.egress_interfaces)}
        if wanted != self.tables.forwarding:
            self.dirty.forwarding |= wanted ^ self.tables.forwarding
            self.tables.forwarding.clear()
            self.tables.forwarding |= wanted

    def _namespaced(self) -> set[str]:
        return {name for name, g in self._gateways.items() if g.netns is not None}

    def _set_nft(self, key: NftKey, table: NftTable | None) -> None:
        if self.tables.nft.get(key) == table:
            return
        if table is None:
            self.tables.nft.pop(key, None)
        else:
            self.tables.nft[key] = table
        self.dirty.nft.add(key)

    # --- remote endpoints ---

    def path_to(self, vtep: IPv4Address) -> str:
        """How a routed network reaches a host: directly when it is on this host's segment."""
        if self.underlay_network is not None and self.underlay_ifname and vtep in self.underlay_network:
            return PATH_DIRECT
        return PATH_VXLAN

    def _add_remote(self, ep: Endpoint) -> None:
        node = self.view.nodes.get(ep.owner)
        if node is None or self._on_local_vtep(node):
            # Without the owner's node record we do not know where to send; the
            # entries appear as soon as it arrives. A record on our own VTEP is
            # local in all but name: nothing to tunnel to.
            return
        network = self._instantiated[ep.network]
        key = ep.key
        if key in self._remote:
            self._drop_remote(key)  # a replace: take back what the older record gave
        # `mode` first: a VXLAN network (most) never routes, and `_routes_on` formats a name.
        direct = (
            network.mode == MODE_ROUTED
            and self._routes_on(network)
            and self.path_to(node.vtep) == PATH_DIRECT
        )
        # One device-name string per VNI, shared by every entry on it (a fresh one per
        # endpoint would be ~60 bytes each, kept in the remote, the FDB and the neighbour key).
        device = _device_names.get(network.vni) or _device_names.setdefault(
            network.vni, vxlan_name(network.vni)
        )
        vtep = node.vtep
        self._remote[key] = _Remote(device, ep.mac, ep.ip, vtep, direct)
        if direct:
            route = RouteSpec(self.underlay_ifname, vtep, bridge_name(network.vni), gateway_mac(network))
            self._routes.claim((HOST_NS, IPv4Network(f"{ep.ip}/32")), key, route)
            return
        self._fdb.claim((device, ep.mac), key, vtep)
        self._neigh.claim((device, ep.ip), key, ep.mac)
        flood = (device, vtep)
        refs = self._flood_refs.get(flood, 0)
        self._flood_refs[flood] = refs + 1
        if refs == 0:
            self.tables.flood.add(flood)
            self.dirty.flood.add(flood)

    def _on_local_vtep(self, node: Node) -> bool:
        # Asked once per remote endpoint, nearly always of the node asked about last (a
        # join's thousands of one owner): remembered, with no address comparison per call.
        last = self._last_node
        if last is not None and last[0] is node:
            return last[1]
        local = node.vtep == self.local_vtep
        self._last_node = (node, local)
        return local

    def _drop_remote(self, key: str) -> None:
        remote = self._remote.pop(key, None)
        if remote is None:
            return
        if remote.direct:
            self._routes.release((HOST_NS, IPv4Network(f"{remote.ip}/32")), key)
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

    def fdb_holder_of(self) -> Callable[[FdbKey], str | None]:
        """The endpoint key whose FDB entry (device, mac) is, or None: the table's own `get`
        (read-only), which the engine calls for each entry of a whole batch of applied
        writes. A read-only proxy's `get` would look the method up on every call."""
        return self._fdb._holder.get

    def holder_of_route(self, key: RouteKey) -> str | None:
        """The endpoint key whose host route `key` is (routed mode), or None."""
        return self._routes._holder.get(key)

    def network_instantiated(self, name: str) -> bool:
        return name in self._instantiated

    def gateway_netns_of(self, name: str) -> str | None:
        """The gateway namespace network `name` has on this host, if any."""
        gateway = self._gateways.get(name)
        return gateway.netns if gateway is not None else None


def _iface(network: Network) -> IPv4Interface:
    return IPv4Interface(f"{network.gateway}/{network.subnet.prefixlen}")


def desired_state(
    view: ClusterView,
    *,
    local_node: str,
    local_vtep: IPv4Address,
    underlay_mtu: int,
    underlay_ifname: str = "",
    underlay_network: IPv4Network | None = None,
    gateway_netns_prefix: str = DEFAULT_GATEWAY_NETNS_PREFIX,
) -> KernelState:
    """The whole desired state of `view`, built from scratch."""
    return DesiredState(
        view,
        local_node=local_node,
        local_vtep=local_vtep,
        underlay_mtu=underlay_mtu,
        underlay_ifname=underlay_ifname,
        underlay_network=underlay_network,
        gateway_netns_prefix=gateway_netns_prefix,
    ).tables.state()
