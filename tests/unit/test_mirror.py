"""The kernel mirror (overlayd.dataplane.mirror), fed with notification datagrams as the kernel sends them."""

from __future__ import annotations

from ipaddress import IPv4Address

from overlayd.dataplane import netlink as nl
from overlayd.dataplane.commands import ReplaceFdb
from overlayd.dataplane.kstate import FdbEntry
from overlayd.dataplane.mirror import Mirror

A = IPv4Address
VX, BR = "ovvx100", "ovbr100"
VX_INDEX, BR_INDEX, OTHER_INDEX = 7, 6, 9
MAC = "02:00:00:00:00:0b"
VTEP_B = A("198.18.0.12")


def link_msg(kind: int, index: int, name: str, alias: str | None, link_kind: str, master: int = 0) -> bytes:
    attrs = nl.nla_str(nl.IFLA_IFNAME, name) + nl.nla_u32(nl.IFLA_MTU, 1450)
    if alias is not None:
        attrs += nl.nla_str(nl.IFLA_IFALIAS, alias)
    if master:
        attrs += nl.nla_u32(nl.IFLA_MASTER, master)
    info = nl.nla_str(nl.IFLA_INFO_KIND, link_kind)
    if link_kind == "vxlan":
        data = nl.nla_u32(nl.IFLA_VXLAN_ID, 100) + nl.nla(nl.IFLA_VXLAN_LOCAL, A("198.18.0.11").packed)
        data += nl.nla(nl.IFLA_VXLAN_PORT, nl.BE16.pack(4789))
        info += nl.nla(nl.IFLA_INFO_DATA, data)
    attrs += nl.nla(nl.IFLA_LINKINFO, info)
    body = nl.IFINFOMSG.pack(0, 0, index, nl.IFF_UP, 0) + attrs
    return nl.HDR.pack(nl.HDR.size + len(body), kind, 0, 0, 0) + body


def fdb_msg(kind: int, index: int, mac: str, dst: IPv4Address, *, flags: int = nl.NTF_SELF) -> bytes:
    msg = bytearray(nl.entry_message("replace_fdb", index, nl.mac_bytes(mac), dst))
    nl.HDR.pack_into(msg, 0, len(msg), kind, 0, 0, 0)
    nl.NDMSG.pack_into(msg, nl.HDR.size, nl.AF_BRIDGE, index, nl.NUD_PERMANENT, flags, 0)
    return bytes(msg)


def neigh_msg(kind: int, index: int, ip: IPv4Address, mac: str, state: int = nl.NUD_PERMANENT) -> bytes:
    msg = bytearray(nl.entry_message("replace_neigh", index, nl.mac_bytes(mac), ip))
    nl.HDR.pack_into(msg, 0, len(msg), kind, 0, 0, 0)
    nl.NDMSG.pack_into(msg, nl.HDR.size, nl.AF_INET, index, state, 0, 0)
    return bytes(msg)


def with_devices() -> Mirror:
    m = Mirror()
    m.apply_datagram(
        link_msg(nl.RTM_NEWLINK, BR_INDEX, BR, "overlayd:bridge:blue", "bridge")
        + link_msg(nl.RTM_NEWLINK, VX_INDEX, VX, "overlayd:vxlan:blue", "vxlan", master=BR_INDEX)
    )
    m.dirty.take()
    return m


def test_our_links_are_mirrored_with_their_master() -> None:
    m = with_devices()
    assert m.tables.vxlans[VX].bridge == BR
    assert m.tables.vxlans[VX].vni == 100
    assert m.link_index(VX) == VX_INDEX and m.link_index(BR) == BR_INDEX


def test_entries_on_our_device_are_mirrored_and_marked() -> None:
    m = with_devices()
    m.apply_datagram(fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, MAC, VTEP_B))
    assert m.tables.fdb == {(VX, MAC): VTEP_B}
    assert m.dirty.take().fdb == {(VX, MAC)}
    m.apply_datagram(neigh_msg(nl.RTM_NEWNEIGH, VX_INDEX, A("10.1.0.11"), MAC))
    assert m.tables.neigh == {(VX, A("10.1.0.11")): MAC}
    m.apply_datagram(fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, "00:00:00:00:00:00", VTEP_B))
    assert m.tables.flood == {(VX, VTEP_B)}


def test_the_echo_of_our_own_write_marks_nothing() -> None:
    m = with_devices()
    m.assume(ReplaceFdb(FdbEntry(VX, MAC, VTEP_B)))
    m.apply_datagram(fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, MAC, VTEP_B))
    assert not m.dirty


def test_a_change_behind_our_back_is_marked() -> None:
    m = with_devices()
    m.assume(ReplaceFdb(FdbEntry(VX, MAC, VTEP_B)))
    m.apply_datagram(fdb_msg(nl.RTM_DELNEIGH, VX_INDEX, MAC, VTEP_B))
    assert m.tables.fdb == {}
    assert m.dirty.take().fdb == {(VX, MAC)}
    m.apply_datagram(fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, MAC, A("198.18.0.99")))
    assert m.tables.fdb == {(VX, MAC): A("198.18.0.99")}
    assert m.dirty.take().fdb == {(VX, MAC)}


def test_a_neighbour_that_is_no_longer_permanent_counts_as_gone() -> None:
    m = with_devices()
    m.apply_datagram(neigh_msg(nl.RTM_NEWNEIGH, VX_INDEX, A("10.1.0.11"), MAC))
    m.dirty.take()
    m.apply_datagram(neigh_msg(nl.RTM_NEWNEIGH, VX_INDEX, A("10.1.0.11"), MAC, state=0x04))  # NUD_STALE
    assert m.tables.neigh == {}
    assert m.dirty.take().neigh == {(VX, A("10.1.0.11"))}


def test_foreign_devices_and_bridge_learned_entries_are_ignored() -> None:
    m = with_devices()
    m.apply_datagram(
        fdb_msg(nl.RTM_NEWNEIGH, OTHER_INDEX, MAC, VTEP_B)
        + fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, MAC, VTEP_B, flags=0x04)  # NTF_MASTER: the bridge's own table
        + neigh_msg(nl.RTM_NEWNEIGH, OTHER_INDEX, A("10.1.0.11"), MAC)
    )
    assert m.tables.fdb == {} and m.tables.neigh == {}
    assert not m.dirty


def test_a_deleted_vxlan_device_takes_its_entries_along() -> None:
    m = with_devices()
    m.apply_datagram(
        fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, MAC, VTEP_B)
        + neigh_msg(nl.RTM_NEWNEIGH, VX_INDEX, A("10.1.0.11"), MAC)
    )
    m.dirty.take()
    m.apply_datagram(link_msg(nl.RTM_DELLINK, VX_INDEX, VX, "overlayd:vxlan:blue", "vxlan"))
    assert VX not in m.tables.vxlans and m.tables.entry_count() == 0
    dirty = m.dirty.take()
    assert dirty.links == {VX}
    assert dirty.fdb == {(VX, MAC)} and dirty.neigh == {(VX, A("10.1.0.11"))}


def test_a_foreign_link_with_our_name_is_marked_but_not_mirrored() -> None:
    m = Mirror()
    m.apply_datagram(link_msg(nl.RTM_NEWLINK, 12, "ovbr200", None, "bridge"))
    assert m.tables.bridges == {}
    assert m.dirty.take().links == {"ovbr200"}


def test_load_replaces_everything_and_marks_old_and_new() -> None:
    m = with_devices()
    m.apply_datagram(fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, MAC, VTEP_B))
    m.dirty.take()
    links = [
        nl.parse_link(msg, nl.HDR.size, len(msg))
        for msg in (
            link_msg(nl.RTM_NEWLINK, BR_INDEX, BR, "overlayd:bridge:blue", "bridge"),
            link_msg(nl.RTM_NEWLINK, VX_INDEX, VX, "overlayd:vxlan:blue", "vxlan", master=BR_INDEX),
        )
    ]
    other = "02:00:00:00:00:0c"
    fdb = [(VX_INDEX, nl.NTF_SELF, 0, nl.mac_bytes(other), VTEP_B.packed)]
    m.load([link for link in links if link], fdb, [])
    assert m.tables.fdb == {(VX, other): VTEP_B}
    assert m.dirty.take().fdb == {(VX, MAC), (VX, other)}
