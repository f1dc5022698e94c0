"""The kernel mirror: what overlayd owns in the kernel, kept from dumps and notifications.

Pure: no I/O. `load` takes a full dump (links, FDB and neighbour tables);
`apply_datagram` takes one datagram of rtnetlink notifications (link and
neighbour groups) as the monitor socket received it; `assume` records a
write the kernel acknowledged. Each of them updates `tables` (the same shape
as desired state, `kstate.Tables`) and marks in `dirty` exactly the keys
whose observed value changed, so the reconciler compares only those against
desired state. A notification that only confirms what the mirror holds (the
echo of our own write) marks nothing: correct entries never flap.

Only our objects are mirrored: links with our name prefix and ifalias, and
FDB/flood/neighbour entries on our VXLAN devices (FDB entries the device
itself holds, `NTF_SELF`; neighbour entries that are permanent). The names
of all links are kept, to know which bridge a port or a VXLAN device is
enslaved to.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from overlayd.core.model import Ip4
from overlayd.dataplane import netlink as nl
from overlayd.dataplane.commands import (
    AppendFlood,
    Command,
    DeleteFdb,
    DeleteFlood,
    DeleteLink,
    DeleteNeigh,
    EnsureBridge,
    EnsureVxlan,
    ReplaceFdb,
    ReplaceNeigh,
    SetPort,
)
from overlayd.dataplane.kstate import (
    BRIDGE_PREFIX,
    VETH_PREFIX,
    VXLAN_PREFIX,
    BridgeSpec,
    Dirty,
    PortSpec,
    Tables,
    VxlanSpec,
)
from overlayd.dataplane.netlink import LinkInfo, RawNeigh

_ADDRESS_CACHE = 1 << 17


class Mirror:
    def __init__(self) -> None:
        self.tables = Tables()
        self.dirty = Dirty()
        self._names: dict[int, str] = {}  # every link: ifindex -> name
        self._ours: dict[int, str] = {}  # our mirrored links: ifindex -> name
        self._index_of: dict[str, int] = {}  # our mirrored links: name -> ifindex
        self._vxlan_name: dict[int, str] = {}
        self._vteps: dict[bytes, IPv4Address] = {}  # few VTEPs, many entries: parse each once
        self._addresses: dict[bytes, IPv4Address] = {}
        self.notifications = 0
        self.overruns = 0

    # --- full reads ---

    def load(
        self, links: list[LinkInfo], fdb: list[RawNeigh], neigh: list[RawNeigh], *, mark: bool = True
    ) -> None:
        """Replace everything with a dump.

        With `mark`, every key that was or is now present is marked dirty;
        without, the caller compares the tables itself (a full verify
        compares whole dictionaries at C speed and marks only what differs).
        """
        if mark:
            self.dirty.add_tables(self.tables)
        self.tables = Tables()
        self._names = {link.index: link.ifname for link in links}
        self._ours.clear()
        self._index_of.clear()
        self._vxlan_name.clear()
        links_dirty = set(self.dirty.links)
        for link in links:
            self._link(link)
        if not mark:
            self.dirty.links = links_dirty  # _link marks what it loads: not wanted here
        # The entry loops are the hot part of a full verify (two messages per remote
        # endpoint): locals only, no method call per entry.
        t = self.tables
        devices = self._vxlan_name
        vtep_of = self._vtep
        flood_mac = nl.FLOOD_MAC_BYTES
        for index, flags, _state, mac, dst in fdb:
            device = devices.get(index)
            if device is None or not flags & nl.NTF_SELF:
                continue
            if mac == flood_mac:
                t.flood.add((device, vtep_of(dst)))
            else:
                t.fdb[(device, mac.hex(":"))] = vtep_of(dst)
        address_of = self._address
        permanent = nl.NUD_PERMANENT
        for index, _flags, state, mac, dst in neigh:
            device = devices.get(index)
            if device is not None and state & permanent:
                t.neigh[(device, address_of(dst))] = mac.hex(":")
        if mark:
            self.dirty.add_tables(self.tables)

    def link_index(self, name: str) -> int | None:
        """The ifindex of our link `name` (bridge, VXLAN device or port), if the kernel has it."""
        return self._index_of.get(name)

    # --- notifications ---

    def apply_datagram(self, data: bytes) -> None:
        """Every message of one notification datagram, in order."""
        for kind, _flags, _seq, start, end in nl.messages(data):
            self.notifications += 1
            if kind == nl.RTM_NEWNEIGH or kind == nl.RTM_DELNEIGH:
                raw = nl.parse_neigh(data, start, end)
                if raw is None:
                    continue
                present = kind == nl.RTM_NEWNEIGH
                if nl.neigh_family(data, start) == nl.AF_BRIDGE:
                    self._fdb(raw, present=present)
                elif nl.neigh_family(data, start) == nl.AF_INET:
                    self._neigh(raw, present=present)
            elif kind == nl.RTM_NEWLINK:
                link = nl.parse_link(data, start, end)
                if link is not None:
                    self._names[link.index] = link.ifname
                    self._link(link)
            elif kind == nl.RTM_DELLINK:
                index = nl.link_index_of(data, start)
                self._names.pop(index, None)
                self._link_gone(index)

    # --- links ---

    def _link(self, link: LinkInfo) -> None:
        name = self._ours.get(link.index)
        if name is not None and name != link.ifname:
            self._link_gone(link.index)  # renamed: the old name is gone
        role = link.role()
        if role is None:
            if link.index in self._ours:
                self._link_gone(link.index)  # lost our mark
            elif link.ifname.startswith((BRIDGE_PREFIX, VXLAN_PREFIX, VETH_PREFIX)):
                # A foreign link holding a name we may want: the executor refuses to
                # touch it; comparing again reports that clearly.
                self.dirty.links.add(link.ifname)
            return
        kind, network = role
        master = self._names.get(link.master, "") if link.master else ""
        t = self.tables
        if kind == "bridge" and link.kind == "bridge" and link.ifname.startswith(BRIDGE_PREFIX):
            spec_b = BridgeSpec(ifname=link.ifname, network=network, mac=link.mac or "", mtu=link.mtu)
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
        else:
            return
        self._ours[link.index] = link.ifname
        self._index_of[link.ifname] = link.index

    def _link_gone(self, index: int) -> None:
        name = self._ours.pop(index, None)
        if name is None:
            return
        if self._index_of.get(name) == index:
            del self._index_of[name]
        t = self.tables
        t.bridges.pop(name, None)
        t.ports.pop(name, None)
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
            vtep = self._vtep(dst)
            if t.fdb.get(key) != vtep:
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
        if present and state & nl.NUD_PERMANENT:
            value = mac.hex(":")
            if t.neigh.get(key) != value:
                t.neigh[key] = value
                self.dirty.neigh.add(key)
        elif key in t.neigh:
            # Gone, or no longer permanent (someone replaced it): not ours as it stands.
            del t.neigh[key]
            self.dirty.neigh.add(key)

    # --- our own writes ---

    def assume(self, cmd: Command) -> None:
        """Record an entry write the kernel acknowledged, ahead of its notification.

        Links are left to their notifications (and to the next dump): the
        kernel fills in what a spec does not say (a bridge's MAC, a master's
        name), and the notification carries exactly that.
        """
        t = self.tables
        match cmd:
            case ReplaceFdb(e):
                t.fdb[(e.device, e.mac)] = e.dst
            case DeleteFdb(e):
                t.fdb.pop((e.device, e.mac), None)
            case AppendFlood(e):
                t.flood.add((e.device, e.dst))
            case DeleteFlood(e):
                t.flood.discard((e.device, e.dst))
            case ReplaceNeigh(e):
                t.neigh[(e.device, e.ip)] = e.mac
            case DeleteNeigh(e):
                t.neigh.pop((e.device, e.ip), None)
            case EnsureBridge() | EnsureVxlan() | SetPort() | DeleteLink():
                pass
