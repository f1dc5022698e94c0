"""Desired vs observed kernel state -> the commands that close the gap.

Pure: no I/O. `plan(want, have, dirty)` compares only the keys in `dirty`
(the ones a view change or a kernel notification touched), so a change
costs O(change); `diff(want, have)` is the same comparison over every key,
for a full verify and for `overlayctl diff`. Both return nothing when the
kernel is already right, so a restarted daemon adopts what it finds instead
of flushing it.

Entries are compared by their kernel key, not by their whole value: an FDB
entry is (device, MAC) and a neighbour entry is (device, IP). When only the
value changed (an endpoint moved to another VTEP, an IP was reused with a new
MAC) the result is one replace and no delete: deleting the old value after
replacing it would remove the new one.

Order of the result: gateway namespaces, then links (entries need their
device: bridges, VXLAN devices, ports, the veths into gateway namespaces,
then the far ends of those inside), then addresses, routes and forwarding,
then new and changed entries (FDB before neighbour, so an answered ARP
always has a path; each new neighbour followed by an ARP announcement on the
local bridge, or, given what was removed lately, only those whose address a
local container may hold with another MAC), then nftables tables; then everything stale in the reverse
order: tables, routes, addresses, entries, links, namespaces.

What lives inside a namespace that is about to be deleted (or made anew,
when someone deleted it) goes with it: nothing in it is deleted one by one,
and after a re-creation everything wanted in it is written again, the veths
into it first made anew.

With `hold_deletions` (a restarted daemon whose view is not complete yet)
nothing is removed: stale entries and links are counted in `Plan.held`
instead, and compared again once the hold ends.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address

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
    Dirty,
    FdbEntry,
    FloodEntry,
    KernelState,
    NeighEntry,
    NeighKey,
    PortSpec,
    Tables,
)


@dataclass
class Plan:
    commands: list[Command] = field(default_factory=list)
    held: int = 0  # deletions left out because of `hold_deletions`
    # Local endpoints' ports wanted but absent (their veth deleted behind our back):
    # not ours to create, so the reconciler reports them.
    missing_ports: list[PortSpec] = field(default_factory=list)


def diff(want: KernelState, have: KernelState) -> list[Command]:
    """Every command that makes `have` into `want` (a full compare)."""
    w, h = Tables.of(want), Tables.of(have)
    everything = Dirty()
    everything.add_tables(w)
    everything.add_tables(h)
    return plan(w, h, everything).commands


def plan(
    want: Tables,
    have: Tables,
    dirty: Dirty,
    *,
    hold_deletions: bool = False,
    previous: Mapping[IPv4Address, str] | None = None,
) -> Plan:
    """The commands that make the keys in `dirty` in `have` what they are in `want`.

    `previous`: the MAC each remote address removed lately was known by
    (`announce.Removed`). With it, a new neighbour entry is announced only if a local
    container may have another MAC cached for its address: the entry held another
    MAC until now, a host route to the address goes in this plan (the gateway
    answered for it), or the address was removed lately with another MAC (reused).
    Without it, every new neighbour entry is announced.
    """
    if not (
        dirty.links
        or dirty.netns
        or dirty.inner
        or dirty.addrs
        or dirty.routes
        or dirty.forwarding
        or dirty.nft
    ):
        # Only entries (a remote endpoint came or went: one FDB and one neighbour entry):
        # no link, namespace, layer 3 or table to look at, nothing of theirs to sort.
        return _plan_entries(want, have, dirty, hold_deletions, previous)
    out = Plan()
    links: list[Command] = []
    recreated: set[str] = set()

    # Gateway namespaces: made anew (first time, or someone deleted it) or going away.
    fresh_ns = {ns for ns in dirty.netns if ns in want.netns and ns not in have.netns}
    gone_ns = have.netns.keys() - want.netns.keys()
    links += [EnsureNetns(want.netns[ns]) for ns in sorted(fresh_ns)]

    dirty_links = sorted(dirty.links)
    for name in dirty_links:
        bridge = want.bridges.get(name)
        if bridge is not None and have.bridges.get(name) != bridge:
            links.append(EnsureBridge(bridge))

    for name in dirty_links:
        vxlan = want.vxlans.get(name)
        if vxlan is None:
            continue
        current = have.vxlans.get(name)
        if current == vxlan:
            continue
        if current is not None and (current.vni, current.local, current.port) != (
            vxlan.vni,
            vxlan.local,
            vxlan.port,
        ):
            # VNI, local address and port cannot change on a live device.
            links.append(DeleteLink(name))
            recreated.add(name)
        links.append(EnsureVxlan(vxlan))

    for name in dirty_links:
        port = want.ports.get(name)
        current_port = have.ports.get(name)
        # A missing port is not ours to create: only the admin API can build a
        # veth into a namespace. The reconciler reports it instead.
        if port is not None and current_port is not None and current_port != port:
            links.append(SetPort(port))
        elif port is not None and current_port is None:
            out.missing_ports.append(port)

    for name in dirty_links:
        veth = want.veths.get(name)
        if veth is None:
            continue
        current_veth = have.veths.get(name)
        if current_veth is not None and veth.netns in fresh_ns:
            # Its far end is in the namespace that was deleted: make the pair anew.
            links.append(DeleteLink(name))
            current_veth = None
        if current_veth != veth:
            links.append(EnsureVeth(veth))

    for ikey in sorted(dirty.inner):
        inner = want.inner.get(ikey)
        if inner is not None and (ikey[0] in fresh_ns or have.inner.get(ikey) != inner):
            links.append(SetInnerLink(inner))

    # Links about to go: what is on them goes with them.
    dying = {name for name in dirty_links if have.has_link(name) and not want.has_link(name)}

    layer3: list[Command] = []
    layer3_removals: list[Command] = []
    for akey in sorted(dirty.addrs, key=_addr_order):
        ns, on, _ = akey
        present = akey in have.addrs and ns not in fresh_ns
        if akey in want.addrs:
            if not present:
                layer3.append(ReplaceAddr(akey))
        elif present and ns not in gone_ns and on not in dying:
            layer3_removals.append(DeleteAddr(akey))
    route_removals: list[Command] = []
    announcements: list[Command] = []
    for rkey in sorted(dirty.routes, key=_route_order):
        route = want.routes.get(rkey)
        current_route = None if rkey[0] in fresh_ns else have.routes.get(rkey)
        if route is not None:
            if route != current_route:
                layer3.append(ReplaceRoute(rkey, route))
                if route.bridge and rkey[1].prefixlen == 32:
                    announcements.append(AnnounceArp(route.bridge, rkey[1].network_address, route.mac))
        elif current_route is not None and rkey[0] not in gone_ns and current_route.device not in dying:
            route_removals.append(DeleteRoute(rkey))
    for fkey in sorted(dirty.forwarding):
        # Only ever switched on, and only on interfaces overlayd does not own (its own
        # links carry their forwarding in their specs): whoever else needs it keeps it.
        if fkey in want.forwarding and fkey not in have.forwarding:
            layer3.append(EnableForwarding(*fkey))

    tables: list[Command] = []
    table_removals: list[Command] = []
    for tkey in sorted(dirty.nft):
        table = want.nft.get(tkey)
        current_table = None if tkey[0] in fresh_ns else have.nft.get(tkey)
        if table is not None:
            if table != current_table:
                tables.append(ReplaceNft(table))
        elif current_table is not None and tkey[0] not in gone_ns:
            table_removals.append(DeleteNft(*tkey))

    # Entries on a device that is about to be deleted or recreated are gone
    # with it: never delete them one by one, and re-add everything wanted.
    gone = recreated | (have.vxlans.keys() - want.vxlans.keys())

    adds, removals = _entries(want, have, dirty, gone, previous)

    # VXLAN devices and veths before their bridges, namespaces last.
    stale_links: list[Command] = [
        DeleteLink(name) for name in dirty_links if name in have.vxlans and name not in want.vxlans
    ]
    stale_links += [DeleteLink(name) for name in dirty_links if name in have.veths and name not in want.veths]
    stale_links += [
        DeleteLink(name) for name in dirty_links if name in have.bridges and name not in want.bridges
    ]
    stale_links += [DeleteNetns(ns) for ns in sorted(gone_ns & dirty.netns)]

    removals = table_removals + route_removals + layer3_removals + removals
    if hold_deletions:
        out.held = len(removals) + len(stale_links)
        removals, stale_links = [], []
    out.commands = links + layer3 + adds + announcements + tables + removals + stale_links
    return out


def _plan_entries(
    want: Tables,
    have: Tables,
    dirty: Dirty,
    hold_deletions: bool,
    previous: Mapping[IPv4Address, str] | None,
) -> Plan:
    """`plan` for a `dirty` that holds entries only (FDB, flood, neighbour keys)."""
    vxlans = have.vxlans
    gone = vxlans.keys() - want.vxlans.keys() if vxlans else set()
    adds, removals = _entries(want, have, dirty, gone, previous)
    if hold_deletions and removals:
        return Plan(adds, held=len(removals))
    return Plan(adds + removals if removals else adds)


def _entries(
    want: Tables,
    have: Tables,
    dirty: Dirty,
    gone: set[str],
    previous: Mapping[IPv4Address, str] | None,
) -> tuple[list[Command], list[Command]]:
    """The entry commands for the entry keys in `dirty`: (new and changed entries, each new
    neighbour followed by its announcement; stale entries). `gone`: devices about to be
    deleted or made anew, whose entries go with them."""
    adds: list[Command] = []
    removals: list[Command] = []
    fdb_adds: list[FdbEntry] = []
    fdb_dels: list[FdbEntry] = []
    want_fdb, have_fdb = want.fdb, have.fdb
    for fkey in dirty.fdb:
        dst = want_fdb.get(fkey)
        current_dst = None if gone and fkey[0] in gone else have_fdb.get(fkey)
        if dst is not None:
            # `is None` first: `IPv4Address != None` costs a caught AttributeError (~1 us,
            # once per new entry of a join); `is` next: the mirror holds desired state's own
            # VTEP objects (`Mirror._adopt_vtep`).
            if current_dst is None or (dst is not current_dst and dst != current_dst):
                fdb_adds.append(_fdb_entry((*fkey, dst)))
        elif current_dst is not None:
            fdb_dels.append(FdbEntry(fkey[0], fkey[1], current_dst))

    flood_adds: list[FloodEntry] = []
    flood_dels: list[FloodEntry] = []
    for flood in dirty.flood:
        wanted = flood in want.flood
        present = flood[0] not in gone and flood in have.flood
        if wanted and not present:
            flood_adds.append(FloodEntry(*flood))
        elif present and not wanted:
            flood_dels.append(FloodEntry(*flood))

    neigh_adds: list[NeighEntry] = []
    neigh_dels: list[NeighEntry] = []
    # The new neighbours to announce: all of them without `previous`; with it, those
    # whose address a local container may hold with another MAC.
    announced: set[NeighKey] | None = None if previous is None else set()
    reused = previous if previous else None  # nothing removed lately: no lookup per entry
    if announced is not None and dirty.routes:
        # Host routes going now: the gateway's MAC is what local containers knew them by.
        unrouted = {
            rkey[1].network_address: ""
            for rkey in dirty.routes
            if rkey[1].prefixlen == 32 and rkey in have.routes and rkey not in want.routes
        }
        if unrouted:
            reused = {**(reused or {}), **unrouted}
    want_neigh, have_neigh = want.neigh, have.neigh
    for nkey in dirty.neigh:
        mac = want_neigh.get(nkey)
        current_mac = None if gone and nkey[0] in gone else have_neigh.get(nkey)
        if mac is not None:
            if mac != current_mac:
                neigh_adds.append(_neigh_entry((*nkey, mac)))
                if announced is not None and (
                    current_mac is not None or (reused is not None and reused.get(nkey[1], mac) != mac)
                ):
                    announced.add(nkey)
        elif current_mac is not None:
            neigh_dels.append(NeighEntry(nkey[0], nkey[1], current_mac))

    # `map`, not comprehensions: each of those is a function call of its own (Python 3.11),
    # made per pass even for an empty list; a remote change fills two of these six lists.
    if fdb_adds:
        adds += map(ReplaceFdb, sorted(fdb_adds))
    if flood_adds:
        adds += map(AppendFlood, sorted(flood_adds))
    ordered_neigh = sorted(neigh_adds, key=_neigh_order) if neigh_adds else neigh_adds
    if announced is not None and not announced:
        adds += map(ReplaceNeigh, ordered_neigh)  # new addresses (a join): none announced
    else:
        for entry in ordered_neigh:
            adds.append(ReplaceNeigh(entry))
            if announced is not None and (entry.device, entry.ip) not in announced:
                continue
            device = want.vxlans.get(entry.device)
            if device is not None:
                # Local containers may have cached another MAC for this IP.
                adds.append(AnnounceArp(device.bridge, entry.ip, entry.mac))

    if neigh_dels:
        removals += map(DeleteNeigh, sorted(neigh_dels, key=_neigh_order))
    if fdb_dels:
        removals += map(DeleteFdb, sorted(fdb_dels))
    if flood_dels:
        removals += map(DeleteFlood, sorted(flood_dels))

    return adds, removals


def _addr_order(key: tuple[str, str, object]) -> tuple[str, str, str]:
    return (key[0], key[1], str(key[2]))


def _route_order(key: tuple[str, object]) -> tuple[str, str]:
    return (key[0], str(key[1]))


# An entry from its key and value as one tuple, without the Python-level `__new__` of a
# NamedTuple: two per remote endpoint of a join.
_fdb_entry: Callable[[tuple[str, str, IPv4Address]], FdbEntry] = partial(tuple.__new__, FdbEntry)
_neigh_entry: Callable[[tuple[str, IPv4Address, str]], NeighEntry] = partial(tuple.__new__, NeighEntry)

# The order of sorted(entries) by (device, address as an integer), without IPv4Address's
# comparisons in Python (a 10,000-entry batch makes ~140,000 of them) and without a Python
# call per entry: `_ip` is the integer every IPv4Address keeps.
_neigh_order = operator.attrgetter("device", "ip._ip")
