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

Order of the result: links first (entries need their device), then new and
changed entries (FDB before neighbour, so an answered ARP always has a
path; each new neighbour followed by an ARP announcement on the local
bridge), then stale entries, then links that are no longer wanted.

With `hold_deletions` (a restarted daemon whose view is not complete yet)
nothing is removed: stale entries and links are counted in `Plan.held`
instead, and compared again once the hold ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overlayd.dataplane.commands import (
    AnnounceArp,
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
    Dirty,
    FdbEntry,
    FloodEntry,
    KernelState,
    NeighEntry,
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


def plan(want: Tables, have: Tables, dirty: Dirty, *, hold_deletions: bool = False) -> Plan:
    """The commands that make the keys in `dirty` in `have` what they are in `want`."""
    out = Plan()
    links: list[Command] = []
    recreated: set[str] = set()

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

    # Entries on a device that is about to be deleted or recreated are gone
    # with it: never delete them one by one, and re-add everything wanted.
    gone = recreated | (have.vxlans.keys() - want.vxlans.keys())

    adds: list[Command] = []
    removals: list[Command] = []
    fdb_adds: list[FdbEntry] = []
    fdb_dels: list[FdbEntry] = []
    for fkey in dirty.fdb:
        dst = want.fdb.get(fkey)
        current_dst = None if fkey[0] in gone else have.fdb.get(fkey)
        if dst is not None:
            if dst != current_dst:
                fdb_adds.append(FdbEntry(fkey[0], fkey[1], dst))
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
    for nkey in dirty.neigh:
        mac = want.neigh.get(nkey)
        current_mac = None if nkey[0] in gone else have.neigh.get(nkey)
        if mac is not None:
            if mac != current_mac:
                neigh_adds.append(NeighEntry(nkey[0], nkey[1], mac))
        elif current_mac is not None:
            neigh_dels.append(NeighEntry(nkey[0], nkey[1], current_mac))

    adds += [ReplaceFdb(e) for e in sorted(fdb_adds)]
    adds += [AppendFlood(e) for e in sorted(flood_adds)]
    for entry in sorted(neigh_adds, key=_neigh_order):
        adds.append(ReplaceNeigh(entry))
        device = want.vxlans.get(entry.device)
        if device is not None:
            # Local containers may have cached another MAC for this IP.
            adds.append(AnnounceArp(device.bridge, entry.ip, entry.mac))

    removals += [DeleteNeigh(e) for e in sorted(neigh_dels, key=_neigh_order)]
    removals += [DeleteFdb(e) for e in sorted(fdb_dels)]
    removals += [DeleteFlood(e) for e in sorted(flood_dels)]

    # VXLAN devices before their bridges.
    stale_links: list[Command] = [
        DeleteLink(name) for name in dirty_links if name in have.vxlans and name not in want.vxlans
    ]
    stale_links += [
        DeleteLink(name) for name in dirty_links if name in have.bridges and name not in want.bridges
    ]

    if hold_deletions:
        out.held = len(removals) + len(stale_links)
        removals, stale_links = [], []
    out.commands = links + adds + removals + stale_links
    return out


def _neigh_order(entry: NeighEntry) -> tuple[str, int]:
    # The order of sorted(entries), without IPv4Address's comparisons in Python (a 10,000-entry
    # batch makes ~140,000 of them).
    return (entry.device, int(entry.ip))
