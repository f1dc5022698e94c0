"""Desired vs observed kernel state -> the commands that close the gap.

Pure: no I/O. `diff(want, have)` returns nothing when the kernel is already
right, so a restarted daemon adopts what it finds instead of flushing it.

Entries are compared by their kernel key, not by their whole value: an FDB
entry is (device, MAC) and a neighbour entry is (device, IP). When only the
value changed (an endpoint moved to another VTEP, an IP was reused with a new
MAC) the result is one replace and no delete: deleting the old value after
replacing it would remove the new one.

Order of the result: links first (entries need their device), then new and
changed entries (FDB before neighbour, so an answered ARP always has a
path; each new neighbour followed by an ARP announcement on the local
bridge), then stale entries, then links that are no longer wanted.
"""

from __future__ import annotations

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
from overlayd.dataplane.kstate import KernelState


def diff(want: KernelState, have: KernelState) -> list[Command]:
    links: list[Command] = []
    recreated: set[str] = set()

    for name, bridge in sorted(want.bridges.items()):
        if have.bridges.get(name) != bridge:
            links.append(EnsureBridge(bridge))

    for name, vxlan in sorted(want.vxlans.items()):
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

    for name, port in sorted(want.ports.items()):
        current_port = have.ports.get(name)
        # A missing port is not ours to create: only the admin API can build a
        # veth into a namespace. The reconciler reports it instead.
        if current_port is not None and current_port != port:
            links.append(SetPort(port))

    # Entries on a device that is about to be deleted or recreated are gone
    # with it: never delete them one by one, and re-add everything wanted.
    gone = recreated | (set(have.vxlans) - set(want.vxlans))

    have_fdb = {(e.device, e.mac): e for e in have.fdb if e.device not in gone}
    want_fdb = {(e.device, e.mac): e for e in want.fdb}
    have_neigh = {(e.device, e.ip): e for e in have.neigh if e.device not in gone}
    want_neigh = {(e.device, e.ip): e for e in want.neigh}
    have_flood = {e for e in have.flood if e.device not in gone}

    adds: list[Command] = []
    # Sort only what changed: a converged pass over 10k entries must stay cheap.
    adds += [ReplaceFdb(e) for e in sorted(e for k, e in want_fdb.items() if have_fdb.get(k) != e)]
    adds += [AppendFlood(e) for e in sorted(want.flood - have_flood)]
    for entry in sorted(e for k, e in want_neigh.items() if have_neigh.get(k) != e):
        adds.append(ReplaceNeigh(entry))
        device = want.vxlans.get(entry.device)
        if device is not None:
            # Local containers may have cached another MAC for this IP.
            adds.append(AnnounceArp(device.bridge, entry.ip, entry.mac))

    removals: list[Command] = []
    removals += [DeleteNeigh(e) for e in sorted(e for k, e in have_neigh.items() if k not in want_neigh)]
    removals += [DeleteFdb(e) for e in sorted(e for k, e in have_fdb.items() if k not in want_fdb)]
    removals += [DeleteFlood(e) for e in sorted(have_flood - want.flood)]

    # VXLAN devices before their bridges.
    stale_links: list[Command] = [DeleteLink(name) for name in sorted(set(have.vxlans) - set(want.vxlans))]
    stale_links += [DeleteLink(name) for name in sorted(set(have.bridges) - set(want.bridges))]

    return links + adds + removals + stale_links
