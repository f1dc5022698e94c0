"""The kernel mirror: what overlayd owns in the kernel, kept from dumps and notifications.

Pure: no I/O. `load` / `load_dump` take a full dump (links, FDB and
neighbour tables, addresses, routes, per-interface settings; the same for
each gateway namespace; the nftables tables as read back); `apply_datagram`
takes one datagram of rtnetlink notifications (link, neighbour, IPv4
address, route and netconf groups) as a namespace's monitor socket received
it; `assume` records a write the kernel acknowledged. Each of them updates
`tables` (the same shape as desired state, `kstate.Tables`) and marks in
`dirty` exactly the keys whose observed value changed, so the reconciler
compares only those against desired state. A notification that only
confirms what the mirror holds (the echo of our own write) marks nothing:
correct entries never flap.

Only our objects are mirrored: links with our name prefix and ifalias,
FDB/flood/neighbour entries on our VXLAN devices (FDB entries the device
itself holds, `NTF_SELF`; neighbour entries that are permanent), addresses
on our links, routes with our protocol number, and everything inside our
gateway namespaces. Of the links that are not ours only the name and the
IPv4 forwarding switch are kept (the bridge a port is enslaved to; the
underlay interface that routed and masqueraded traffic comes in on).
Gateway namespaces and nftables tables send no notifications: they change
in the mirror only by a full dump or by `assume`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from overlayd.core.model import Ip4
from overlayd.dataplane import netlink as nl
from overlayd.dataplane.bulk import gc_paused
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
from overlayd.dataplane.kstate import (
    BRIDGE_PREFIX,
    GATEWAY_PREFIX,
    HOST_NS,
    OUR_PREFIXES,
    RTPROT_OVERLAYD,
    UPLINK_PREFIX,
    VETH_PREFIX,
    VXLAN_PREFIX,
    BridgeSpec,
    Dirty,
    InnerLinkSpec,
    NetnsSpec,
    NftKey,
    NftTable,
    PortSpec,
    RouteSpec,
    Tables,
    VethSpec,
    VxlanSpec,
)
from overlayd.dataplane.netlink import LinkInfo, RawAddr, RawNeigh, RawNetconf, RawRoute


@dataclass
class NsDump:
    """A gateway namespace as read in one go."""

    links: list[LinkInfo] = field(default_factory=list)
    addrs: list[RawAddr] = field(default_factory=list)
    routes: list[RawRoute] = field(default_factory=list)


@dataclass
class Dump:
    """Everything a full verify reads: the host namespace, each gateway namespace, the nft tables."""

    links: list[LinkInfo] = field(default_factory=list)
    fdb: list[RawNeigh] = field(default_factory=list)
    neigh: list[RawNeigh] = field(default_factory=list)
    addrs: list[RawAddr] = field(default_factory=list)
    routes: list[RawRoute] = field(default_factory=list)
    netconf: list[RawNetconf] = field(default_factory=list)
    namespaces: dict[str, NsDump] = field(default_factory=dict)
    nft: dict[NftKey, NftTable] = field(default_factory=dict)


_ADDRESS_CACHE = 1 << 17


class Mirror:
    def __init__(self) -> None:
        self.tables = Tables()
        self.dirty = Dirty()
        self._names: dict[int, str] = {}  # every link: ifindex -> name
        self._ns_names: dict[str, dict[int, str]] = {}  # gateway namespace -> its links by ifindex
        self._forwarding: dict[int, bool] = {}  # links not ours: IPv4 forwarding
        self._bridge_l3: dict[str, tuple[bool, bool]] = {}  # our bridges: (forwarding, proxy ARP)
        self._ours: dict[int, str] = {}  # our mirrored links: ifindex -> name
        self._index_of: dict[str, int] = {}  # our mirrored links: name -> ifindex
        self._vxlan_name: dict[int, str] = {}
        self._vteps: dict[bytes, IPv4Address] = {}  # few VTEPs, many entries: parse each once
        self._addresses: dict[bytes, IPv4Address] = {}
        self.notifications = 0
        self.overruns = 0
        # The netlink port our entry writes go out from (0: unknown). A neighbour
        # notification carrying it is the echo of our own write, which `assume()`
        # recorded when the kernel acknowledged it: not parsed again.
        self.own_port = 0
        self._written_vtep: IPv4Address | None = None  # the VTEP object of the last FDB write

    def _adopt_vtep(self, vtep: IPv4Address) -> None:
        """Read this VTEP off the wire as this very object from now on.

        FDB writes carry desired state's own VTEP objects (one per node). With the same
        object in the mirror, a full verify's comparison of 10,000 FDB entries finds each
        value equal by identity, without an `IPv4Address.__eq__` call per entry.
        """
        self._written_vtep = vtep
        if vtep.__class__ is Ip4:  # a plain IPv4Address hashes slowly: the cache keeps its own Ip4
            self._vteps[vtep.packed] = vtep

    # --- full reads ---

    def load(
        self,
        links: list[LinkInfo],
        fdb: list[RawNeigh],
        neigh: list[RawNeigh],
        *,
        mark: bool = True,
        dump: Dump | None = None,
    ) -> None:
        """Replace everything with a dump (`dump` adds layer 3, namespaces and nft).

        With `mark`, every key that was or is now present is marked dirty;
        without, the caller compares the tables itself (a full verify
        compares whole dictionaries at C speed and marks only what differs).
        """
        with gc_paused():
            self._load(links, fdb, neigh, mark=mark, dump=dump)

    def _load(
        self,
        links: list[LinkInfo],
        fdb: list[RawNeigh],
        neigh: list[RawNeigh],
        *,
        mark: bool,
        dump: Dump | None,
    ) -> None:
        if mark:
            self.dirty.add_tables(self.tables)
        self.tables = Tables()
        self._names = {link.index: link.ifname for link in links}
        self._ours.clear()
        self._index_of.clear()
        self._vxlan_name.clear()
        self._forwarding.clear()
        self._bridge_l3.clear()
        self._ns_names.clear()
        links_dirty = set(self.dirty.links)
        for link in links:
            self._link(link)
        if not mark:
            self.dirty.links = links_dirty  # _link marks what it loads: not wanted here
        # The entry loops are the hot part of a full verify (two messages per remote
        # endpoint): locals only, no method call per entry.
        # The caches are read inline; a method call is made only for an address not seen yet.
        t = self.tables
        devices = self._vxlan_name
        table, flood = t.fdb, t.flood
        vteps, vtep_of = self._vteps, self._vtep
        flood_mac, own = nl.FLOOD_MAC_BYTES, nl.NTF_SELF
        for index, flags, _state, mac, dst in fdb:
            device = devices.get(index)
            if device is None or not flags & own:
                continue
            vtep = vteps.get(dst) or vtep_of(dst)
            if mac == flood_mac:
                flood.add((device, vtep))
            else:
                table[device, mac.hex(":")] = vtep
        neighbours = t.neigh
        addresses, address_of = self._addresses, self._address
        permanent = nl.NUD_PERMANENT
        for index, _flags, state, mac, dst in neigh:
            device = devices.get(index)
            if device is not None and state & permanent:
                neighbours[device, addresses.get(dst) or address_of(dst)] = mac.hex(":")
        if dump is not None:
            self._load_layer3(dump)
        if mark:
            self.dirty.add_tables(self.tables)
        else:
            self.dirty.forwarding.clear()
            self.dirty.addrs.clear()
            self.dirty.routes.clear()
            self.dirty.inner.clear()

    def load_dump(self, dump: Dump, *, mark: bool = True) -> None:
        self.load(dump.links, dump.fdb, dump.neigh, mark=mark, dump=dump)

    def _load_layer3(self, dump: Dump) -> None:
        t = self.tables
        for raw in dump.netconf:
            self._netconf(raw)
        for addr in dump.addrs:
            self._addr(HOST_NS, addr, present=True)
        for route in dump.routes:
            self._route(HOST_NS, route, present=True)
        for name, inside in dump.namespaces.items():
            t.netns[name] = NetnsSpec(name)
            self._ns_names[name] = {link.index: link.ifname for link in inside.links}
            for link in inside.links:
                self._inner_link(name, link)
            for addr in inside.addrs:
                self._addr(name, addr, present=True)
            for route in inside.routes:
                self._route(name, route, present=True)
        t.nft = dict(dump.nft)

    def namespaces(self) -> set[str]:
        """The gateway namespaces the mirror knows are there."""
        return set(self.tables.netns)

    def vxlan_indexes(self) -> dict[str, int]:
        """Our VXLAN devices the kernel holds, by name: their ifindex (few: one per network)."""
        return {name: index for index, name in self._vxlan_name.items()}

    def link_index(self, name: str) -> int | None:
        """The ifindex of our link `name` (bridge, VXLAN device or port), if the kernel has it."""
        return self._index_of.get(name)

    # --- notifications ---

    def apply_datagram(self, data: bytes, netns: str = HOST_NS) -> None:
        """Every message of one notification datagram (from namespace `netns`), in order."""
        if netns != HOST_NS:
            self._apply_inside(netns, data)
            return
        lone = nl.lone_fdb_note(data)
        if lone is not None and lone[2] == nl.AF_BRIDGE:
            # One FDB entry (the echo of our own writes, mostly): no walk over the message.
            note, port, _family, entry = lone
            self.notifications += 1
            if not (self.own_port and port == self.own_port):
                self._fdb(entry, present=note == nl.RTM_NEWNEIGH)
            return
        if len(data) == nl.NEIGH_GONE_SIZE:
            gone = nl.lone_neigh_gone(data)
            if gone is not None:
                # A neighbour entry's removal, alone (every remote endpoint's last echo).
                self.notifications += 1
                if not (self.own_port and gone[0] == self.own_port):
                    self._neigh(gone[1], present=False)
                return
        for kind, _flags, _seq, start, end in nl.messages(data):
            self.notifications += 1
            # Entries first: two notifications per remote endpoint, every other kind is rare.
            if kind == nl.RTM_NEWNEIGH or kind == nl.RTM_DELNEIGH:
                if self.own_port and nl.message_port(data, start) == self.own_port:
                    continue  # our own write (anyone else's change carries another port, or 0)
                present = kind == nl.RTM_NEWNEIGH
                family = nl.neigh_family(data, start)
                if family == nl.AF_BRIDGE:
                    raw = nl.parse_neigh(data, start, end)
                    if raw is not None:
                        self._fdb(raw, present=present)
                elif family == nl.AF_INET:
                    # Without a MAC too: the kernel's RTM_DELNEIGH of a neighbour has none.
                    raw = nl.parse_neigh(data, start, end, lladdr=False)
                    if raw is not None:
                        self._neigh(raw, present=present)
            elif kind == nl.RTM_NEWADDR or kind == nl.RTM_DELADDR:
                addr = nl.parse_addr_full(data, start, end)
                if addr is not None:
                    self._addr(HOST_NS, addr, present=kind == nl.RTM_NEWADDR)
                    if kind == nl.RTM_DELADDR:
                        self._routes_flushed(HOST_NS, self._names.get(addr.ifindex))
            elif kind == nl.RTM_NEWROUTE or kind == nl.RTM_DELROUTE:
                if nl.route_protocol(data, start) != RTPROT_OVERLAYD:
                    continue  # a host may change many routes; ours carry our protocol number
                route = nl.parse_route(data, start, end)
                if route is not None:
                    self._route(HOST_NS, route, present=kind == nl.RTM_NEWROUTE)
            elif kind == nl.RTM_NEWNETCONF:
                netconf = nl.parse_netconf(data, start, end)
                if netconf is not None:
                    self._netconf(netconf)
            elif (kind == nl.RTM_NEWLINK or kind == nl.RTM_DELLINK) and data[start] == nl.AF_BRIDGE:
                # A bridge's word about one of its ports (its port state; RTM_DELLINK when it
                # leaves the bridge): no alias, no kind, nothing the mirror keeps, and read as
                # a link it would look unmarked, i.e. gone. The link's own messages follow.
                continue
            elif kind == nl.RTM_NEWLINK:
                link = nl.parse_link(data, start, end)
                if link is not None:
                    self._names[link.index] = link.ifname
                    self._link(link)
                    if not link.up:
                        self._routes_flushed(HOST_NS, link.ifname)
            elif kind == nl.RTM_DELLINK:
                index = nl.link_index_of(data, start)
                self._routes_flushed(HOST_NS, self._names.pop(index, None))
                self._forwarding.pop(index, None)
                self._link_gone(index)

    def _apply_inside(self, netns: str, data: bytes) -> None:
        names = self._ns_names.get(netns)
        if names is None:
            return  # not (or no longer) a namespace the mirror follows
        for kind, _flags, _seq, start, end in nl.messages(data):
            self.notifications += 1
            if kind == nl.RTM_NEWADDR or kind == nl.RTM_DELADDR:
                addr = nl.parse_addr_full(data, start, end)
                if addr is not None:
                    self._addr(netns, addr, present=kind == nl.RTM_NEWADDR)
                    if kind == nl.RTM_DELADDR:
                        self._routes_flushed(netns, names.get(addr.ifindex))
            elif kind == nl.RTM_NEWROUTE or kind == nl.RTM_DELROUTE:
                if nl.route_protocol(data, start) != RTPROT_OVERLAYD:
                    continue  # a host may change many routes; ours carry our protocol number
                route = nl.parse_route(data, start, end)
                if route is not None:
                    self._route(netns, route, present=kind == nl.RTM_NEWROUTE)
            elif kind == nl.RTM_NEWLINK:
                link = nl.parse_link(data, start, end)
                if link is not None:
                    names[link.index] = link.ifname
                    self._inner_link(netns, link)
                    if not link.up:
                        self._routes_flushed(netns, link.ifname)
            elif kind == nl.RTM_DELLINK:
                index = nl.link_index_of(data, start)
                name = names.pop(index, None)
                if name is not None:
                    self._inner_gone(netns, name)
            elif kind == nl.RTM_NEWNETCONF:
                netconf = nl.parse_netconf(data, start, end)
                if netconf is not None and netconf.forwarding is not None:
                    self._inner_forwarding(netns, names.get(netconf.ifindex), netconf.forwarding)

    # --- links ---

    def _link(self, link: LinkInfo) -> None:
        name = self._ours.get(link.index)
        if name is not None and name != link.ifname:
            self._link_gone(link.index)  # renamed: the old name is gone
        role = link.role()
        if role is None:
            if link.index in self._ours:
                self._link_gone(link.index)  # lost our mark
            elif link.ifname.startswith(OUR_PREFIXES):
                # A foreign link holding a name we may want: the executor refuses to
                # touch it; comparing again reports that clearly.
                self.dirty.links.add(link.ifname)
            self._foreign(link)
            return
        kind, network = role
        master = self._names.get(link.master, "") if link.master else ""
        t = self.tables
        if kind == "bridge" and link.kind == "bridge" and link.ifname.startswith(BRIDGE_PREFIX):
            l3 = (bool(link.forwarding), bool(link.proxy_arp))
            self._bridge_l3[link.ifname] = l3
            spec_b = BridgeSpec(
                ifname=link.ifname,
                network=network,
                mac=link.mac or "",
                mtu=link.mtu,
                # Both on, or the bridge is not a routed one as it stands.
                routed=l3[0] and l3[1],
            )
            if t.bridges.get(link.ifname) != spec_b:
                t.bridges[link.ifname] = spec_b
                self.dirty.links.add(link.ifname)
        elif kind == "vxlan" and link.kind == "vxlan" and link.ifname.startswith(VXLAN_PREFIX):
            spec_v = VxlanSpec(
                ifname=link.ifname,
                network=network,
                vni=link.vni if link.vni is not None else -1,
                # A device without a local address cannot be what we want;
                # 0.0.0.0 makes the diff recreate it.
                local=link.local or IPv4Address(0),
                mtu=link.mtu,
                bridge=master,
                port=link.port if link.port is not None else 0,
            )
            if t.vxlans.get(link.ifname) != spec_v:
                t.vxlans[link.ifname] = spec_v
                self.dirty.links.add(link.ifname)
            self._vxlan_name[link.index] = link.ifname
        elif kind == "port" and link.kind == "veth" and link.ifname.startswith(VETH_PREFIX):
            spec_p = PortSpec(ifname=link.ifname, network=network, bridge=master, mtu=link.mtu)
            if t.ports.get(link.ifname) != spec_p:
                t.ports[link.ifname] = spec_p
                self.dirty.links.add(link.ifname)
        elif (
            kind in ("gw", "uplink")
            and link.kind == "veth"
            and link.ifname.startswith(GATEWAY_PREFIX if kind == "gw" else UPLINK_PREFIX)
        ):
            spec_e = VethSpec(
                ifname=link.ifname,
                network=network,
                role=kind,
                mtu=link.mtu,
                bridge=master,
                forwarding=bool(link.forwarding),
                up=link.up,
            )
            if t.veths.get(link.ifname) != spec_e:
                t.veths[link.ifname] = spec_e
                self.dirty.links.add(link.ifname)
        else:
            return
        self._ours[link.index] = link.ifname
        self._index_of[link.ifname] = link.index

    def _foreign(self, link: LinkInfo) -> None:
        """A link that is not ours: only whether it forwards IPv4 (the underlay interface)."""
        if link.forwarding is None:
            return
        self._set_forwarding(link.index, link.ifname, link.forwarding)

    def _set_forwarding(self, index: int, name: str, on: bool) -> None:
        self._forwarding[index] = on
        key = (HOST_NS, name)
        if on != (key in self.tables.forwarding):
            if on:
                self.tables.forwarding.add(key)
            else:
                self.tables.forwarding.discard(key)
            self.dirty.forwarding.add(key)

    def _netconf(self, raw: RawNetconf) -> None:
        if raw.ifindex < 0:
            return  # "all" and "default", not an interface
        name = self._names.get(raw.ifindex)
        if name is None:
            return
        index = self._index_of.get(name)
        if index == raw.ifindex:
            # Ours: the spec holds it (routed bridges: forwarding and proxy ARP; uplinks).
            t = self.tables
            bridge = t.bridges.get(name)
            if bridge is not None:
                # A netconf notification carries only the setting that changed.
                forwarding, proxy = self._bridge_l3.get(name, (False, False))
                forwarding = forwarding if raw.forwarding is None else raw.forwarding
                proxy = proxy if raw.proxy_arp is None else raw.proxy_arp
                self._bridge_l3[name] = (forwarding, proxy)
                self._replace_bridge(name, forwarding and proxy)
            veth = t.veths.get(name)
            if veth is not None and raw.forwarding is not None and raw.forwarding != veth.forwarding:
                t.veths[name] = VethSpec(
                    veth.ifname, veth.network, veth.role, veth.mtu, veth.bridge, raw.forwarding, veth.up
                )
                self.dirty.links.add(name)
            return
        if raw.forwarding is not None:
            self._set_forwarding(raw.ifindex, name, raw.forwarding)

    def _replace_bridge(self, name: str, routed: bool) -> None:
        bridge = self.tables.bridges[name]
        if bridge.routed != routed:
            self.tables.bridges[name] = BridgeSpec(
                bridge.ifname, bridge.network, bridge.mac, bridge.mtu, routed
            )
            self.dirty.links.add(name)

    # --- addresses and routes ---

    def _device(self, netns: str, index: int) -> str | None:
        """The name of the device an address or route of ours may be on, or None."""
        if netns == HOST_NS:
            return self._ours.get(index)
        name = self._ns_names.get(netns, {}).get(index)
        return None if name == "lo" else name

    def _addr(self, netns: str, raw: RawAddr, *, present: bool) -> None:
        device = self._device(netns, raw.ifindex)
        if device is None:
            return
        key = (netns, device, raw.address)
        if present != (key in self.tables.addrs):
            if present:
                self.tables.addrs.add(key)
            else:
                self.tables.addrs.discard(key)
            self.dirty.addrs.add(key)

    def _route(self, netns: str, raw: RawRoute, *, present: bool) -> None:
        if raw.protocol != RTPROT_OVERLAYD or raw.table != nl.RT_TABLE_MAIN:
            return
        names = self._names if netns == HOST_NS else self._ns_names.get(netns, {})
        key = (netns, raw.dst)
        t = self.tables
        if present:
            route = RouteSpec(names.get(raw.oif, f"#{raw.oif}"), raw.gateway)
            if t.routes.get(key) != route:
                t.routes[key] = route
                self.dirty.routes.add(key)
        elif key in t.routes:
            del t.routes[key]
            self.dirty.routes.add(key)

    def _routes_flushed(self, netns: str, device: str | None) -> None:
        """The kernel may have flushed the routes through `device` without a word.

        It removes every route through a device that goes down or loses its last
        address and sends no RTM_DELROUTE for them. The mirror forgets its routes
        through it; comparing again re-adds what is wanted (a replace, harmless if
        the route was still there).
        """
        if device is None:
            return
        t = self.tables
        for key in [k for k, r in t.routes.items() if k[0] == netns and r.device == device]:
            del t.routes[key]
            self.dirty.routes.add(key)

    # --- inside gateway namespaces ---

    def _inner_link(self, netns: str, link: LinkInfo) -> None:
        if link.ifname == "lo":
            return
        key = (netns, link.ifname)
        role = link.role()
        spec = InnerLinkSpec(
            netns=netns,
            ifname=link.ifname,
            mac=link.mac or "",
            mtu=link.mtu,
            up=link.up,
            forwarding=bool(link.forwarding),
            network=role[1] if role is not None else "",
        )
        if self.tables.inner.get(key) != spec:
            self.tables.inner[key] = spec
            self.dirty.inner.add(key)

    def _inner_forwarding(self, netns: str, name: str | None, on: bool) -> None:
        key = (netns, name or "")
        spec = self.tables.inner.get(key)
        if spec is not None and spec.forwarding != on:
            self.tables.inner[key] = replace(spec, forwarding=on)
            self.dirty.inner.add(key)

    def _inner_gone(self, netns: str, name: str) -> None:
        t = self.tables
        key = (netns, name)
        if t.inner.pop(key, None) is not None:
            self.dirty.inner.add(key)
        gone = {k for k in t.addrs if k[0] == netns and k[1] == name}
        t.addrs -= gone
        self.dirty.addrs |= gone
        for rkey in [k for k, r in t.routes.items() if k[0] == netns and r.device == name]:
            del t.routes[rkey]
            self.dirty.routes.add(rkey)

    def _netns_gone(self, netns: str) -> None:
        t = self.tables
        self.dirty.add_netns(t, netns)
        t.netns.pop(netns, None)
        self._ns_names.pop(netns, None)
        t.inner = {k: v for k, v in t.inner.items() if k[0] != netns}
        t.addrs = {k for k in t.addrs if k[0] != netns}
        t.routes = {k: v for k, v in t.routes.items() if k[0] != netns}
        t.nft = {k: v for k, v in t.nft.items() if k[0] != netns}

    def _link_gone(self, index: int) -> None:
        name = self._ours.pop(index, None)
        if name is None:
            return
        if self._index_of.get(name) == index:
            del self._index_of[name]
        t = self.tables
        t.bridges.pop(name, None)
        self._bridge_l3.pop(name, None)
        t.ports.pop(name, None)
        t.veths.pop(name, None)
        gone = {k for k in t.addrs if k[0] == HOST_NS and k[1] == name}
        if gone:
            t.addrs -= gone
            self.dirty.addrs |= gone
        for rkey in [k for k, r in t.routes.items() if k[0] == HOST_NS and r.device == name]:
            del t.routes[rkey]
            self.dirty.routes.add(rkey)
        if t.vxlans.pop(name, None) is not None:
            # Its entries went with it (the kernel sends no notification for each).
            self.dirty.add_device(t, name)
            t.fdb = {k: v for k, v in t.fdb.items() if k[0] != name}
            t.neigh = {k: v for k, v in t.neigh.items() if k[0] != name}
            t.flood = {k for k in t.flood if k[0] != name}
            self._vxlan_name.pop(index, None)
        self.dirty.links.add(name)

    # --- entries ---

    def _vtep(self, raw: bytes) -> IPv4Address:
        vtep = self._vteps.get(raw)
        if vtep is None:
            vtep = self._vteps[raw] = Ip4(raw)
        return vtep

    def _adopt_address(self, ip: IPv4Address) -> None:
        """Read this endpoint address off the wire as this very object from now on.

        Neighbour writes carry desired state's own address objects. Adopted when written,
        the next full verify neither parses the address again (a few us each: 10,000 of
        them in the first verify after a big join) nor compares the mirror's neighbour keys
        with desired state's by `IPv4Address.__eq__`: they are the same objects.
        """
        if ip.__class__ is not Ip4:
            return  # a plain IPv4Address hashes slowly: the cache keeps its own Ip4
        if len(self._addresses) >= _ADDRESS_CACHE:
            self._addresses.clear()
        self._addresses[ip.packed] = ip

    def _address(self, raw: bytes) -> IPv4Address:
        """An endpoint address from the wire; the same few thousand repeat in every dump."""
        ip = self._addresses.get(raw)
        if ip is None:
            if len(self._addresses) >= _ADDRESS_CACHE:
                self._addresses.clear()
            ip = self._addresses[raw] = Ip4(raw)
        return ip

    def _fdb(self, raw: RawNeigh, *, present: bool) -> None:
        index, flags, _state, mac, dst = raw
        device = self._vxlan_name.get(index)
        if device is None or not flags & nl.NTF_SELF:
            return
        t = self.tables
        if mac == nl.FLOOD_MAC_BYTES:
            flood = (device, self._vtep(dst))
            if present != (flood in t.flood):
                if present:
                    t.flood.add(flood)
                else:
                    t.flood.discard(flood)
                self.dirty.flood.add(flood)
            return
        key = (device, mac.hex(":"))
        if present:
            vtep = self._vteps.get(dst) or self._vtep(dst)
            current = t.fdb.get(key)
            # `is` first: the echo of our own write finds desired state's own VTEP object.
            if current is not vtep and current != vtep:
                t.fdb[key] = vtep
                self.dirty.fdb.add(key)
        elif t.fdb.get(key) == self._vtep(dst):
            del t.fdb[key]
            self.dirty.fdb.add(key)

    def _neigh(self, raw: RawNeigh, *, present: bool) -> None:
        index, _flags, state, mac, dst = raw
        device = self._vxlan_name.get(index)
        if device is None:
            return
        t = self.tables
        key = (device, self._address(dst))
        if present and state & nl.NUD_PERMANENT and mac:
            value = mac.hex(":")
            if t.neigh.get(key) != value:
                t.neigh[key] = value
                self.dirty.neigh.add(key)
        elif key in t.neigh:
            # Gone, or no longer permanent (someone replaced it), or without a MAC:
            # not ours as it stands.
            del t.neigh[key]
            self.dirty.neigh.add(key)

    # --- our own writes ---

    def assume_all(self, cmds: Iterable[Command]) -> None:
        """`assume` each of `cmds`, in order; entries (all but a few of a big batch) inline."""
        t = self.tables
        fdb, neigh = t.fdb, t.neigh
        for cmd in cmds:
            if type(cmd) is ReplaceFdb:
                fdb_entry = cmd.entry
                fdb[fdb_entry.device, fdb_entry.mac] = fdb_entry.dst
                if fdb_entry.dst is not self._written_vtep:
                    self._adopt_vtep(fdb_entry.dst)
            elif type(cmd) is ReplaceNeigh:
                neigh_entry = cmd.entry
                neigh[neigh_entry.device, neigh_entry.ip] = neigh_entry.mac
                self._adopt_address(neigh_entry.ip)
            elif type(cmd) is not AnnounceArp:
                self.assume(cmd)

    def assume(self, cmd: Command) -> None:
        """Record a write the kernel acknowledged, ahead of its notification.

        Links in the host namespace are left to their notifications (and to
        the next dump): the kernel fills in what a spec does not say (a
        bridge's MAC, a master's name), and the notification carries exactly
        that. Namespaces and nft tables have no notifications: what we wrote
        is what the mirror holds until the next full dump.
        """
        t = self.tables
        match cmd:
            case ReplaceFdb(e):
                t.fdb[(e.device, e.mac)] = e.dst
                if e.dst is not self._written_vtep:
                    self._adopt_vtep(e.dst)
            case DeleteFdb(e):
                t.fdb.pop((e.device, e.mac), None)
            case AppendFlood(e):
                t.flood.add((e.device, e.dst))
                if e.dst is not self._written_vtep:
                    self._adopt_vtep(e.dst)
            case DeleteFlood(e):
                t.flood.discard((e.device, e.dst))
            case ReplaceNeigh(e):
                t.neigh[(e.device, e.ip)] = e.mac
                self._adopt_address(e.ip)
            case DeleteNeigh(e):
                t.neigh.pop((e.device, e.ip), None)
            case AnnounceArp():
                pass  # one per new neighbour: matched here, not after every other command
            case ReplaceAddr(key):
                t.addrs.add(key)
            case DeleteAddr(key):
                t.addrs.discard(key)
            case ReplaceRoute(key, route):
                t.routes[key] = route
            case DeleteRoute(key):
                t.routes.pop(key, None)
            case EnableForwarding(netns, device):
                t.forwarding.add((netns, device))
            case ReplaceNft(table):
                t.nft[(table.netns, table.family)] = table
            case DeleteNft(netns, family):
                t.nft.pop((netns, family), None)
            case EnsureNetns(spec):
                # Anew (or again): nothing in it yet, whatever the mirror held there before.
                self._netns_gone(spec.name)
                self.dirty.netns.discard(spec.name)
                t.netns[spec.name] = spec
                self._ns_names[spec.name] = {}
            case DeleteNetns(name):
                self._netns_gone(name)
                self.dirty.netns.discard(name)
            case SetInnerLink(spec):
                # The namespace's monitor may not be listening yet: record what was written.
                t.inner[(spec.netns, spec.ifname)] = spec
            case EnsureBridge() | EnsureVxlan() | SetPort() | DeleteLink() | EnsureVeth():
                pass
