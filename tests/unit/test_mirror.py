"""The kernel mirror (overlayd.dataplane.mirror), fed with notification datagrams as the kernel sends them."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlayd.core.model import Ip4
from overlayd.dataplane import netlink as nl
from overlayd.dataplane.commands import DeleteNetns, EnsureNetns, ReplaceFdb, ReplaceNeigh, SetInnerLink
from overlayd.dataplane.kstate import (
    RTPROT_OVERLAYD,
    FdbEntry,
    InnerLinkSpec,
    NeighEntry,
    NetnsSpec,
    RouteSpec,
)
from overlayd.dataplane.mirror import Dump, Mirror, NsDump

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


def neigh_msg(
    kind: int, index: int, ip: IPv4Address, mac: str, state: int = nl.NUD_PERMANENT, *, port: int = 0
) -> bytes:
    msg = bytearray(nl.entry_message("replace_neigh", index, nl.mac_bytes(mac), ip))
    nl.HDR.pack_into(msg, 0, len(msg), kind, 0, 0, port)
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


def test_a_neighbour_echo_from_our_own_port_is_skipped_any_other_port_is_not() -> None:
    m = with_devices()
    m.own_port = 4242
    ip = A("10.1.0.11")
    m.assume(ReplaceNeigh(NeighEntry(VX, ip, MAC)))
    # Our write's echo (its request's port): already recorded by assume().
    m.apply_datagram(neigh_msg(nl.RTM_NEWNEIGH, VX_INDEX, ip, MAC, port=4242))
    assert not m.dirty
    assert m.tables.neigh == {(VX, ip): MAC}
    # Another program (its own port) or the kernel (0) changing the same entry is drift.
    m.apply_datagram(neigh_msg(nl.RTM_NEWNEIGH, VX_INDEX, ip, "02:00:00:00:00:0c", port=999))
    assert m.tables.neigh == {(VX, ip): "02:00:00:00:00:0c"}
    assert m.dirty.take().neigh == {(VX, ip)}
    m.apply_datagram(neigh_msg(nl.RTM_DELNEIGH, VX_INDEX, ip, "02:00:00:00:00:0c"))
    assert m.tables.neigh == {}
    assert m.dirty.take().neigh == {(VX, ip)}


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


def neigh_gone_msg(index: int, ip: IPv4Address, *, port: int = 0) -> bytes:
    """An RTM_DELNEIGH as the kernel sends it for a neighbour: no link-layer address,
    the cache info after the destination."""
    body = nl.NDMSG.pack(nl.AF_INET, index, 0x20, 0, 0)  # NUD_FAILED
    body += nl.nla(nl.NDA_DST, ip.packed) + nl.nla(3, bytes(16))  # NDA_CACHEINFO
    return nl.HDR.pack(nl.HDR.size + len(body), nl.RTM_DELNEIGH, 0, 0, port) + body


def test_a_neighbour_deleted_behind_our_back_is_marked_though_its_note_has_no_mac() -> None:
    m = with_devices()
    ip = A("10.1.0.11")
    m.assume(ReplaceNeigh(NeighEntry(VX, ip, MAC)))
    m.apply_datagram(neigh_gone_msg(VX_INDEX, ip))
    assert m.tables.neigh == {}
    assert m.dirty.take().neigh == {(VX, ip)}
    # The same note again (our own delete's echo, after assume): nothing more to compare.
    m.apply_datagram(neigh_gone_msg(VX_INDEX, ip))
    assert not m.dirty


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


# --- addresses, routes, per-interface settings, gateway namespaces --------------------------

UL_INDEX, UP_INDEX = 2, 20
NS = "ovgw100"


def with_flags(msg: bytes, flags: int) -> bytes:
    """A link message with other IFF flags (0: down)."""
    out = bytearray(msg)
    nl.IFINFOMSG.pack_into(out, nl.HDR.size, 0, 0, nl.link_index_of(msg, nl.HDR.size), flags, 0)
    return bytes(out)


def devconf(forwarding: int, proxy_arp: int) -> bytes:
    conf = bytearray(4 * 32)
    nl.U32.pack_into(conf, 4 * (nl.IPV4_DEVCONF_FORWARDING - 1), forwarding)
    nl.U32.pack_into(conf, 4 * (nl.IPV4_DEVCONF_PROXY_ARP - 1), proxy_arp)
    inet = nl.nla(nl.IFLA_INET_CONF, bytes(conf))
    return nl.nla(nl.IFLA_AF_SPEC, nl.nla(nl.AF_INET, inet))


def link_with_conf(
    kind: int, index: int, name: str, alias: str | None, link_kind: str, fwd: int, proxy: int
) -> bytes:
    msg = link_msg(kind, index, name, alias, link_kind) + devconf(fwd, proxy)
    return nl.HDR.pack(len(msg), kind, 0, 0, 0) + msg[nl.HDR.size :]


def addr_msg(kind: int, index: int, address: str) -> bytes:
    iface = IPv4Interface(address)
    body = nl.IFADDRMSG.pack(nl.AF_INET, iface.network.prefixlen, 0, 0, index)
    body += nl.nla(nl.IFA_LOCAL, iface.ip.packed)
    return nl.HDR.pack(nl.HDR.size + len(body), kind, 0, 0, 0) + body


def route_msg(kind: int, dst: str, oif: int, via: str | None, proto: int = RTPROT_OVERLAYD) -> bytes:
    net = IPv4Network(dst)
    body = nl.RTMSG.pack(nl.AF_INET, net.prefixlen, 0, 0, nl.RT_TABLE_MAIN, proto, 0, nl.RTN_UNICAST, 0)
    if net.prefixlen:
        body += nl.nla(nl.RTA_DST, net.network_address.packed)
    if via is not None:
        body += nl.nla(nl.RTA_GATEWAY, A(via).packed)
    body += nl.nla_u32(nl.RTA_OIF, oif)
    return nl.HDR.pack(nl.HDR.size + len(body), kind, 0, 0, 0) + body


def netconf_msg(index: int, forwarding: int | None = None, proxy: int | None = None) -> bytes:
    body = bytes([nl.AF_INET, 0, 0, 0]) + nl.nla(nl.NETCONFA_IFINDEX, nl.I32.pack(index))
    if forwarding is not None:
        body += nl.nla(nl.NETCONFA_FORWARDING, nl.I32.pack(forwarding))
    if proxy is not None:
        body += nl.nla(nl.NETCONFA_PROXY_NEIGH, nl.I32.pack(proxy))
    return nl.HDR.pack(nl.HDR.size + len(body), nl.RTM_NEWNETCONF, 0, 0, 0) + body


def routed_host() -> Mirror:
    m = Mirror()
    m.apply_datagram(
        link_with_conf(nl.RTM_NEWLINK, BR_INDEX, BR, "overlayd:bridge:blue", "bridge", 1, 1)
        + link_with_conf(nl.RTM_NEWLINK, UL_INDEX, "ul0", None, "veth", 0, 0)
    )
    m.dirty.take()
    return m


def test_a_routed_bridge_is_one_that_forwards_and_answers_for_others() -> None:
    m = routed_host()
    assert m.tables.bridges[BR].routed
    m.apply_datagram(netconf_msg(BR_INDEX, proxy=0))  # someone switched proxy ARP off
    assert not m.tables.bridges[BR].routed and m.dirty.take().links == {BR}
    m.apply_datagram(netconf_msg(BR_INDEX, proxy=1))
    assert m.tables.bridges[BR].routed


def test_forwarding_of_a_foreign_link_is_followed() -> None:
    m = routed_host()
    assert m.tables.forwarding == set()
    m.apply_datagram(netconf_msg(UL_INDEX, forwarding=1))
    assert m.tables.forwarding == {("", "ul0")} and m.dirty.take().forwarding == {("", "ul0")}
    m.apply_datagram(netconf_msg(UL_INDEX, forwarding=1))  # the echo of our own write
    assert not m.dirty
    m.apply_datagram(netconf_msg(UL_INDEX, forwarding=0))
    assert m.tables.forwarding == set() and m.dirty.take().forwarding == {("", "ul0")}


def test_routes_are_ours_by_protocol_and_addresses_by_link() -> None:
    m = routed_host()
    m.apply_datagram(
        route_msg(nl.RTM_NEWROUTE, "10.1.0.11/32", UL_INDEX, "198.18.0.12")
        + route_msg(nl.RTM_NEWROUTE, "10.9.0.0/24", UL_INDEX, "198.18.0.1", proto=nl.RTPROT_BOOT)
        + addr_msg(nl.RTM_NEWADDR, BR_INDEX, "10.1.0.1/24")
        + addr_msg(nl.RTM_NEWADDR, UL_INDEX, "198.18.0.11/24")
    )
    key = ("", IPv4Network("10.1.0.11/32"))
    assert m.tables.routes == {key: RouteSpec("ul0", A("198.18.0.12"))}
    assert m.tables.addrs == {("", BR, IPv4Interface("10.1.0.1/24"))}
    dirty = m.dirty.take()
    assert dirty.routes == {key} and dirty.addrs == {("", BR, IPv4Interface("10.1.0.1/24"))}
    m.apply_datagram(route_msg(nl.RTM_NEWROUTE, "10.1.0.11/32", UL_INDEX, "198.18.0.12"))
    assert not m.dirty  # an echo
    m.apply_datagram(route_msg(nl.RTM_DELROUTE, "10.1.0.11/32", UL_INDEX, "198.18.0.12"))
    assert m.tables.routes == {} and m.dirty.take().routes == {key}


def test_a_link_going_down_or_losing_its_address_takes_its_routes_silently() -> None:
    # The kernel flushes routes through such a link without an RTM_DELROUTE.
    m = routed_host()
    key = ("", IPv4Network("10.1.0.11/32"))
    m.apply_datagram(route_msg(nl.RTM_NEWROUTE, "10.1.0.11/32", UL_INDEX, "198.18.0.12"))
    m.dirty.take()
    m.apply_datagram(with_flags(link_with_conf(nl.RTM_NEWLINK, UL_INDEX, "ul0", None, "veth", 0, 0), 0))
    assert m.tables.routes == {} and m.dirty.take().routes == {key}
    m.apply_datagram(route_msg(nl.RTM_NEWROUTE, "10.1.0.11/32", UL_INDEX, "198.18.0.12"))
    m.dirty.take()
    m.apply_datagram(addr_msg(nl.RTM_DELADDR, UL_INDEX, "198.18.0.11/24"))
    assert m.tables.routes == {} and m.dirty.take().routes == {key}


def inside_dump() -> Dump:
    up = link_msg(nl.RTM_NEWLINK, UP_INDEX, "up0", "overlayd:inner:blue", "veth")
    up_link = nl.parse_link(up, nl.HDR.size, len(up))
    assert up_link is not None
    inside = NsDump(
        links=[up_link],
        addrs=[nl.RawAddr(UP_INDEX, IPv4Interface("100.64.0.100/32"))],
        routes=[
            nl.RawRoute(
                nl.RT_TABLE_MAIN, RTPROT_OVERLAYD, IPv4Network("0.0.0.0/0"), UP_INDEX, A("169.254.0.1")
            )
        ],
    )
    return Dump(namespaces={NS: inside})


def test_a_gateway_namespace_is_mirrored_from_a_dump_and_its_own_notifications() -> None:
    m = Mirror()
    m.load_dump(inside_dump())
    t = m.tables
    assert set(t.netns) == {NS}
    assert t.addrs == {(NS, "up0", IPv4Interface("100.64.0.100/32"))}
    default = (NS, IPv4Network("0.0.0.0/0"))
    assert t.routes == {default: RouteSpec("up0", A("169.254.0.1"))}
    m.dirty.take()
    # The same messages from the host's monitor mean nothing there (no such link of ours).
    m.apply_datagram(addr_msg(nl.RTM_DELADDR, UP_INDEX, "100.64.0.100/32"))
    assert (NS, "up0", IPv4Interface("100.64.0.100/32")) in t.addrs
    m.apply_datagram(addr_msg(nl.RTM_DELADDR, UP_INDEX, "100.64.0.100/32"), NS)
    assert t.addrs == set() and t.routes == {}  # its last address gone: the default route too
    m.apply_datagram(netconf_msg(UP_INDEX, forwarding=1), NS)
    m.apply_datagram(addr_msg(nl.RTM_NEWADDR, UP_INDEX, "100.64.0.100/32"), "elsewhere")  # not followed
    assert not any(k[0] == "elsewhere" for k in t.addrs)
    m.apply_datagram(link_msg(nl.RTM_DELLINK, UP_INDEX, "up0", "overlayd:inner:blue", "veth"), NS)
    assert (NS, "up0") not in t.inner


def test_our_own_namespace_writes_are_assumed() -> None:
    m = Mirror()
    m.load_dump(inside_dump())
    m.dirty.take()
    m.assume(EnsureNetns(NetnsSpec(NS, "blue")))  # made anew: nothing in it yet
    assert set(m.tables.netns) == {NS} and m.tables.addrs == set() and m.tables.routes == {}
    assert m.dirty.take().netns == set()
    m.assume(SetInnerLink(InnerLinkSpec(NS, "gw0", MAC, 1450)))
    assert m.tables.inner[(NS, "gw0")].up
    m.assume(DeleteNetns(NS))
    assert m.tables.netns == {} and m.tables.inner == {}


def test_a_dump_reads_a_written_vtep_as_the_object_that_was_written() -> None:
    # Desired state's VTEP objects come back from every full verify as themselves: comparing
    # 10,000 FDB entries then finds each value equal by identity.
    m = with_devices()
    vtep = Ip4(str(VTEP_B))  # as records carry them
    m.assume(ReplaceFdb(FdbEntry(VX, MAC, vtep)))
    links = [
        nl.parse_link(msg, nl.HDR.size, len(msg))
        for msg in (
            link_msg(nl.RTM_NEWLINK, BR_INDEX, BR, "overlayd:bridge:blue", "bridge"),
            link_msg(nl.RTM_NEWLINK, VX_INDEX, VX, "overlayd:vxlan:blue", "vxlan", master=BR_INDEX),
        )
    ]
    other = "02:00:00:00:00:0c"
    fdb = [
        (VX_INDEX, nl.NTF_SELF, 0, nl.mac_bytes(MAC), VTEP_B.packed),
        (VX_INDEX, nl.NTF_SELF, 0, nl.mac_bytes(other), VTEP_B.packed),
        (VX_INDEX, nl.NTF_SELF, 0, nl.FLOOD_MAC_BYTES, VTEP_B.packed),
    ]
    m.load([link for link in links if link], fdb, [], mark=False)
    assert m.tables.fdb == {(VX, MAC): VTEP_B, (VX, other): VTEP_B}
    assert all(value is vtep for value in m.tables.fdb.values())
    assert m.tables.flood == {(VX, VTEP_B)}


def test_a_dump_reads_a_written_neighbour_address_as_the_object_that_was_written() -> None:
    m = with_devices()
    ip = Ip4("10.1.0.11")  # as records carry them
    m.assume(ReplaceNeigh(NeighEntry(VX, ip, MAC)))
    links = [
        nl.parse_link(msg, nl.HDR.size, len(msg))
        for msg in (
            link_msg(nl.RTM_NEWLINK, BR_INDEX, BR, "overlayd:bridge:blue", "bridge"),
            link_msg(nl.RTM_NEWLINK, VX_INDEX, VX, "overlayd:vxlan:blue", "vxlan", master=BR_INDEX),
        )
    ]
    neigh = [(VX_INDEX, 0, nl.NUD_PERMANENT, nl.mac_bytes(MAC), ip.packed)]
    m.load([link for link in links if link], [], neigh, mark=False)
    assert m.tables.neigh == {(VX, ip): MAC}
    ((_, key_ip),) = m.tables.neigh
    assert key_ip is ip


def bridge_family_link_msg(kind: int, index: int, name: str, master: int) -> bytes:
    """What a bridge sends about one of its ports: name, master, MTU; no alias, no kind."""
    attrs = nl.nla_str(nl.IFLA_IFNAME, name) + nl.nla_u32(nl.IFLA_MTU, 1450)
    attrs += nl.nla_u32(nl.IFLA_MASTER, master)
    body = nl.IFINFOMSG.pack(nl.AF_BRIDGE, 0, index, nl.IFF_UP, 0) + attrs
    return nl.HDR.pack(nl.HDR.size + len(body), kind, 0, 0, 0) + body


def test_a_bridge_port_s_bridge_family_messages_leave_it_as_it_is() -> None:
    # A port coming up sends about five of these: read as link messages they would make
    # the port look unmarked (gone) until the next full one.
    m = with_devices()
    port, index = "ovep1", 12
    m.apply_datagram(link_msg(nl.RTM_NEWLINK, index, port, "overlayd:port:blue", "veth", master=BR_INDEX))
    before = m.tables.ports[port]
    m.dirty.take()
    m.apply_datagram(bridge_family_link_msg(nl.RTM_NEWLINK, index, port, BR_INDEX))
    assert m.tables.ports[port] == before
    assert not m.dirty.links
    # Leaving the bridge also sends a bridge-family RTM_DELLINK: the link itself stays.
    m.apply_datagram(bridge_family_link_msg(nl.RTM_DELLINK, index, port, BR_INDEX))
    assert m.tables.ports[port] == before
    m.apply_datagram(link_msg(nl.RTM_DELLINK, index, port, "overlayd:port:blue", "veth"))
    assert port not in m.tables.ports and port in m.dirty.links


def test_an_fdb_notification_alone_reads_as_the_same_in_a_batch() -> None:
    # Alone in its datagram (the echo of a write) it is read at fixed offsets; several in
    # one datagram are walked message by message: the mirror ends the same either way.
    msgs = [
        fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, "02:00:00:00:00:01", A("198.18.0.12")),
        fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, "00:00:00:00:00:00", A("198.18.0.12")),
        fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, "02:00:00:00:00:02", A("198.18.0.13"), flags=0),  # the bridge's
        fdb_msg(nl.RTM_NEWNEIGH, OTHER_INDEX, "02:00:00:00:00:03", A("198.18.0.13")),  # not our device
        fdb_msg(nl.RTM_DELNEIGH, VX_INDEX, "02:00:00:00:00:01", A("198.18.0.12")),
        fdb_msg(nl.RTM_NEWNEIGH, VX_INDEX, "02:00:00:00:00:04", A("198.18.0.14")),
    ]
    assert nl.lone_fdb_note(msgs[0]) is not None
    alone, together = with_devices(), with_devices()
    for msg in msgs:
        alone.apply_datagram(msg)
    together.apply_datagram(b"".join(msgs))
    assert alone.tables.fdb == together.tables.fdb == {(VX, "02:00:00:00:00:04"): A("198.18.0.14")}
    assert alone.tables.flood == together.tables.flood == {(VX, A("198.18.0.12"))}
    assert alone.dirty == together.dirty
    assert alone.notifications == together.notifications


# Notifications captured from a real kernel (6.18) in a scratch namespace, ifindex 4:
# overlayd's own neighbour delete of 10.42.0.100 (the entry gone FAILED, from our port;
# then its removal, from port 0), iproute2's delete of a reachable entry, a delete of an
# entry written with a protocol (one attribute more), and an FDB entry's removal.
_CAPTURED = {
    "own delete, FAILED": "400000001c00000000000000f9a73fbe020000000400000020000001080001000a2a0064"
    "0800040000000000140003000a0000000a0000000a00000001000000",
    "own delete, removal": "400000001d0000000000000000000000020000000400000020000001080001000a2a0064"
    "0800040000000000140003000a0000000a0000000a00000000000000",
    "iproute2 delete of a reachable entry": "400000001d0000000000000000000000020000000400000020000001"
    "080001000a2a006508000400000000001400030005000000050000000500000000000000",
    "delete with a protocol": "480000001d0000000000000000000000020000000400000020000001080001000a2a0066"
    "08000400000000001400030005000000050000000500000000000000" + "05000c0004000000",
    "FDB removal": "440000001d00000000000000000000000700000004000000c00002010a000200024200000064000008000100"
    "c612070a14000300000000000a0000000a00000000000000",
}


def _at(data: bytes, index: int) -> bytes:
    """The message with its ifindex set to `index`."""
    out = bytearray(data)
    nl.I32.pack_into(out, nl.HDR.size + 4, index)
    return bytes(out)


def _edited(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _neigh_gone_cases() -> dict[str, bytes]:
    removal = _at(bytes.fromhex(_CAPTURED["own delete, removal"]), VX_INDEX)
    cases = {name: _at(bytes.fromhex(text), VX_INDEX) for name, text in _CAPTURED.items()}
    cases |= {
        "from our port": _edited(removal, 12, "=I", 4242),
        "from another port": _edited(removal, 12, "=I", 999),
        "another device": _at(removal, OTHER_INDEX),
        "a bridge entry": _edited(removal, 16, "=B", nl.AF_BRIDGE),
        "an RTM_NEWNEIGH": _edited(removal, 4, "=H", nl.RTM_NEWNEIGH),
        "a length that is not the datagram's": _edited(removal, 0, "=I", 60),
        "NDA_LLADDR where NDA_DST is": _edited(removal, 30, "=H", nl.NDA_LLADDR),
        "a 6-byte destination": _edited(removal, 28, "=H", 10),
        "another attribute where NDA_PROBES is": _edited(removal, 38, "=H", nl.NDA_LLADDR),
        "another attribute where NDA_CACHEINFO is": _edited(removal, 46, "=H", nl.NDA_DST),
        "cache info of another size": _edited(removal, 44, "=H", 16),
        "two in one datagram": removal + removal,
        "with a MAC after the destination": removal[:36]
        + nl.nla(nl.NDA_LLADDR, nl.mac_bytes(MAC))
        + removal[36:],
    }
    # The header's length follows the message where one was inserted.
    cases["with a MAC after the destination"] = _edited(
        cases["with a MAC after the destination"], 0, "=I", len(cases["with a MAC after the destination"])
    )
    return cases


def _full_read(data: bytes) -> list[tuple[int, int, nl.RawNeigh | None]]:
    """(type, port, entry) of every neighbour message, read by the attribute walk."""
    return [
        (kind, nl.message_port(data, start), nl.parse_neigh(data, start, end, lladdr=False))
        for kind, _flags, _seq, start, end in nl.messages(data)
        if kind in (nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH) and data[start] == nl.AF_INET
    ]


def test_a_neighbour_removal_read_at_fixed_offsets_is_what_the_full_read_says() -> None:
    taken = []
    for name, data in _neigh_gone_cases().items():
        fast = nl.lone_neigh_gone(data)
        if fast is None:
            continue
        taken.append(name)
        port, entry = fast
        assert _full_read(data) == [(nl.RTM_DELNEIGH, port, entry)], name
    # The kernel's removal notices take the fixed-offset path; nothing else does.
    assert taken == [
        "own delete, removal",
        "iproute2 delete of a reachable entry",
        "from our port",
        "from another port",
        "another device",
    ]


def test_a_neighbour_removal_changes_the_mirror_as_the_full_read_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ip, other = A("10.42.0.100"), A("10.42.0.101")

    def fed(data: bytes) -> Mirror:
        m = with_devices()
        m.own_port = 4242
        for address in (ip, other):
            m.assume(ReplaceNeigh(NeighEntry(VX, address, MAC)))
        m.apply_datagram(data)
        return m

    cases = _neigh_gone_cases()
    fast = {name: fed(data) for name, data in cases.items()}
    monkeypatch.setattr(nl, "lone_neigh_gone", lambda data: None)
    for name, data in cases.items():
        full = fed(data)
        assert (fast[name].tables, fast[name].dirty, fast[name].notifications) == (
            full.tables,
            full.dirty,
            full.notifications,
        ), name
    # Taken by the fixed-offset path: a removal from anyone but us is drift to compare.
    assert fast["own delete, removal"].tables.neigh == {(VX, other): MAC}
    assert fast["own delete, removal"].dirty.neigh == {(VX, ip)}
    assert fast["from our port"].tables.neigh == {(VX, ip): MAC, (VX, other): MAC}
    assert not fast["from our port"].dirty


def test_a_link_reads_the_same_with_its_nested_attributes_flagged_and_others_between() -> None:
    """The kernel sets NLA_F_NESTED on some nests and not others, and sends 40-odd
    attributes `parse_link` skips: neither changes what it reads."""
    plain = link_msg(nl.RTM_NEWLINK, VX_INDEX, VX, "overlayd:vxlan:blue", "vxlan", master=BR_INDEX)
    body = bytearray(plain[nl.HDR.size :])
    pos = nl.IFINFOMSG.size
    while pos < len(body):  # flag the nests, as a newer kernel's notifications may
        length, kind = nl.NLA.unpack_from(body, pos)
        if kind == nl.IFLA_LINKINFO:
            nl.NLA.pack_into(body, pos, length, kind | nl.NLA_F_NESTED)
        pos += (length + 3) & ~3
    skipped = nl.nla_u32(13, 1000) + nl.nla(23, bytes(200))  # IFLA_TXQLEN, IFLA_STATS64
    body = body[: nl.IFINFOMSG.size] + skipped + body[nl.IFINFOMSG.size :] + skipped
    flagged = nl.HDR.pack(nl.HDR.size + len(body), nl.RTM_NEWLINK, 0, 0, 0) + bytes(body)
    want = nl.parse_link(plain, nl.HDR.size, len(plain))
    assert want is not None and want.kind == "vxlan" and want.vni == 100 and want.master == BR_INDEX
    assert nl.parse_link(flagged, nl.HDR.size, len(flagged)) == want
