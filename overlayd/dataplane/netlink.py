"""The rtnetlink wire format overlayd speaks: constants, packing and parsing. Pure: no sockets.

pyroute2 builds and parses every message as a Python object tree, which
costs 100-200 us per entry; the hot paths (FDB and neighbour batches, table
dumps, notifications, a new endpoint's handful of link/address/route
messages) are packed and parsed here by hand with `struct`, a few us each.
Every request is built with sequence number 0; the socket code stamps it.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Container, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from itertools import compress
from typing import Any, Final, NamedTuple

from overlayd.dataplane.kstate import ALIAS_PREFIX, FLOOD_MAC, is_ours

# --- constants (linux/netlink.h, rtnetlink.h, neighbour.h, if_link.h, veth.h) ----

NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4

NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ACK: Final = 0x4
NLM_F_DUMP_INTR: Final = 0x10
NLM_F_REPLACE: Final = 0x100
NLM_F_EXCL: Final = 0x200
NLM_F_ACK_TLVS: Final = 0x200  # on NLMSG_ERROR: extended-ack TLVs follow
NLM_F_DUMP: Final = 0x300
NLM_F_CREATE: Final = 0x400
NLM_F_APPEND: Final = 0x800

RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_GETLINK: Final = 18
RTM_NEWADDR: Final = 20
RTM_DELADDR: Final = 21
RTM_GETADDR: Final = 22
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26
RTM_NEWNEIGH: Final = 28
RTM_DELNEIGH: Final = 29
RTM_GETNEIGH: Final = 30
RTM_SETNEIGHTBL: Final = 67
RTM_NEWNETCONF: Final = 80
RTM_GETNETCONF: Final = 82

# Multicast groups (bit masks for bind): link, neighbour, IPv4 address, route and netconf changes.
RTMGRP_LINK: Final = 0x1
RTMGRP_NEIGH: Final = 0x4
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV4_NETCONF: Final = 1 << (24 - 1)  # RTNLGRP_IPV4_NETCONF = 24

AF_INET: Final = socket.AF_INET
AF_INET6: Final = socket.AF_INET6
AF_BRIDGE: Final = 7

NUD_NOARP: Final = 0x40
NUD_PERMANENT: Final = 0x80
NTF_SELF: Final = 0x02

NDA_DST: Final = 1
NDA_LLADDR: Final = 2
NDA_CACHEINFO: Final = 3
NDA_PROBES: Final = 4

IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2

IFF_UP: Final = 0x1
IFLA_ADDRESS: Final = 1
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_MASTER: Final = 10
IFLA_LINKINFO: Final = 18
IFLA_IFALIAS: Final = 20
IFLA_AF_SPEC: Final = 26
IFLA_NET_NS_FD: Final = 28
IFLA_INET_CONF: Final = 1
IPV4_DEVCONF_FORWARDING: Final = 1
IPV4_DEVCONF_PROXY_ARP: Final = 3
IPV4_DEVCONF_ARP_NOTIFY: Final = 22
IFLA_INET6_ADDR_GEN_MODE: Final = 8
IN6_ADDR_GEN_MODE_NONE: Final = 1
NETCONFA_IFINDEX: Final = 1
NETCONFA_FORWARDING: Final = 2
NETCONFA_PROXY_NEIGH: Final = 5
NDTA_NAME: Final = 1
NDTA_PARMS: Final = 6
NDTPA_IFINDEX: Final = 1
NDTPA_PROXY_DELAY: Final = 13
IFLA_INFO_KIND: Final = 1
IFLA_INFO_DATA: Final = 2
IFLA_VXLAN_ID: Final = 1
IFLA_VXLAN_LOCAL: Final = 4
IFLA_VXLAN_PORT: Final = 15
VETH_INFO_PEER: Final = 1
NLA_F_NESTED: Final = 0x8000

RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_GATEWAY: Final = 5
RTA_TABLE: Final = 15
RT_TABLE_MAIN: Final = 254
RTPROT_BOOT: Final = 3
RT_SCOPE_UNIVERSE: Final = 0
RT_SCOPE_LINK: Final = 253
RTN_UNICAST: Final = 1
RTNH_F_ONLINK: Final = 4

SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10
NETLINK_EXT_ACK: Final = 11
NLMSGERR_ATTR_MSG: Final = 1

NLA_TYPE_MASK: Final = 0x3FFF
NLA_F_NET_BYTEORDER: Final = 0x4000
IFNAMSIZ: Final = 15  # without the terminating NUL
LOOPBACK_INDEX: Final = 1  # "lo" has ifindex 1 in every network namespace

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NDTMSG = struct.Struct("=Bxxx")  # family
U64 = struct.Struct("=Q")
NLA = struct.Struct("=HH")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
BE16 = struct.Struct("!H")


# --- attributes -------------------------------------------------------------------

Attrs = dict[int, bytes]


def attrs(data: bytes, start: int, end: int) -> Attrs:
    """Netlink attributes in data[start:end] by type (nested ones undecoded)."""
    out: Attrs = {}
    while start + 4 <= end:
        length, kind = NLA.unpack_from(data, start)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return out


def cstr(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.split(b"\0", 1)[0].decode(errors="replace")


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLA.size + len(payload)
    return NLA.pack(length, kind) + payload + bytes(-length % 4)


def nla_str(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, U32.pack(value))


def message(msg_type: int, flags: int, body: bytes) -> bytes:
    """A request with sequence number 0 (stamped when sent)."""
    return HDR.pack(HDR.size + len(body), msg_type, NLM_F_REQUEST | flags, 0, 0) + body


def extack_msg(data: bytes, offset: int, end: int, flags: int) -> str:
    """The kernel's extended-ack text of an NLMSG_ERROR, or ''."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # nlmsghdr, int error, the echoed request header (CAP_ACK: header only).
    start = offset + HDR.size + 4 + HDR.size
    return cstr(attrs(data, start, end).get(NLMSGERR_ATTR_MSG)) or ""


def mac_bytes(mac: str) -> bytes:
    try:
        raw = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


FLOOD_MAC_BYTES: Final = mac_bytes(FLOOD_MAC)


# --- links --------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    """One link as the kernel reports it (only the fields overlayd looks at)."""

    index: int
    ifname: str
    kind: str | None
    alias: str | None
    mac: str | None
    mtu: int
    master: int  # ifindex of the master device, 0 for none
    up: bool
    # VXLAN devices only; None elsewhere.
    vni: int | None = None
    local: IPv4Address | None = None
    port: int | None = None
    # IPv4 settings of the link (None when it has no IPv4 configuration).
    forwarding: bool | None = None
    proxy_arp: bool | None = None

    @property
    def ours(self) -> bool:
        return is_ours(self.ifname, self.alias)

    def role(self) -> tuple[str, str] | None:
        """(role, network) from an overlayd alias `overlayd:<role>:<network>`, else None."""
        if not self.ours or self.alias is None:
            return None
        role, sep, network = self.alias[len(ALIAS_PREFIX) :].partition(":")
        if not sep or not network:
            return None
        return role, network


# The attributes `parse_link` reads, by their type as sent (either flag set or not).
_LINK_WANTED: Final = {
    kind | flag: kind
    for kind in (IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_IFALIAS, IFLA_ADDRESS, IFLA_LINKINFO, IFLA_AF_SPEC)
    for flag in (0, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLA_F_NESTED | NLA_F_NET_BYTEORDER)
}


def parse_link(data: bytes, start: int, end: int) -> LinkInfo | None:
    # A link message carries 40-odd attributes (statistics blocks among them) and the
    # mirror reads one for every link change: pick the few it needs in one pass, with
    # no dictionary of them all.
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, start)
    name = alias = mac = None
    mtu = master = 0
    linkinfo = af_spec = None
    pos = start + IFINFOMSG.size
    unpack = NLA.unpack_from
    wanted = _LINK_WANTED
    while pos + 4 <= end:
        length, kind = unpack(data, pos)
        if length < 4:
            break
        # One lookup for the 35-odd attributes skipped: a chain of seven comparisons for
        # each of them was half the cost of the message (the mirror reads six per add).
        if kind in wanted:
            kind = wanted[kind]
            if kind == IFLA_IFNAME:
                name = data[pos + 4 : pos + length]
            elif kind == IFLA_MTU:
                mtu = U32.unpack_from(data, pos + 4)[0]
            elif kind == IFLA_MASTER:
                master = U32.unpack_from(data, pos + 4)[0]
            elif kind == IFLA_IFALIAS:
                alias = data[pos + 4 : pos + length]
            elif kind == IFLA_ADDRESS:
                mac = data[pos + 4 : pos + length]
            elif kind == IFLA_LINKINFO:
                linkinfo = data[pos + 4 : pos + length]
            else:
                af_spec = data[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    ifname = cstr(name)
    if ifname is None:
        return None
    link_kind: str | None = None
    vni = local = port = None
    if linkinfo is not None:
        info = attrs(linkinfo, 0, len(linkinfo))
        link_kind = cstr(info.get(IFLA_INFO_KIND))
        info_data = info.get(IFLA_INFO_DATA)
        if link_kind == "vxlan" and info_data is not None:
            vx = attrs(info_data, 0, len(info_data))
            if (raw := vx.get(IFLA_VXLAN_ID)) is not None:
                vni = U32.unpack(raw[:4])[0]
            if (raw := vx.get(IFLA_VXLAN_LOCAL)) is not None and len(raw) == 4:
                local = IPv4Address(raw)
            if (raw := vx.get(IFLA_VXLAN_PORT)) is not None:
                port = BE16.unpack(raw[:2])[0]
    forwarding = proxy_arp = None
    if af_spec is not None:
        inet = attrs(af_spec, 0, len(af_spec)).get(AF_INET)
        if inet is not None:
            conf = attrs(inet, 0, len(inet)).get(IFLA_INET_CONF)
            if conf is not None:
                forwarding = _devconf(conf, IPV4_DEVCONF_FORWARDING)
                proxy_arp = _devconf(conf, IPV4_DEVCONF_PROXY_ARP)
    return LinkInfo(
        index=index,
        ifname=ifname,
        kind=link_kind,
        alias=cstr(alias) or None,
        mac=mac.hex(":") if mac is not None and len(mac) == 6 else None,
        mtu=mtu,
        master=master,
        up=bool(flags & IFF_UP),
        vni=vni,
        local=local,
        port=port,
        forwarding=forwarding,
        proxy_arp=proxy_arp,
    )


def _devconf(conf: bytes, index: int) -> bool | None:
    """One value of IFLA_INET_CONF: an array of u32, entry i holding IPV4_DEVCONF i+1."""
    offset = 4 * (index - 1)
    if len(conf) < offset + 4:
        return None
    return bool(U32.unpack_from(conf, offset)[0])


def link_index_of(data: bytes, start: int) -> int:
    """The ifindex of a link message (RTM_NEWLINK/RTM_DELLINK) at payload `start`."""
    return int(IFINFOMSG.unpack_from(data, start)[2])


def parse_addr(data: bytes, start: int, end: int) -> tuple[int, IPv4Address] | None:
    family, _plen, _flags, _scope, index = IFADDRMSG.unpack_from(data, start)
    if family != AF_INET:
        return None
    a = attrs(data, start + IFADDRMSG.size, end)
    raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
    if raw is None or len(raw) != 4:
        return None
    return index, IPv4Address(raw)


class RawAddr(NamedTuple):
    ifindex: int
    address: IPv4Interface


def parse_addr_full(data: bytes, start: int, end: int) -> RawAddr | None:
    """An IPv4 address with its prefix length (RTM_NEWADDR / RTM_DELADDR)."""
    family, plen, _flags, _scope, index = IFADDRMSG.unpack_from(data, start)
    if family != AF_INET:
        return None
    a = attrs(data, start + IFADDRMSG.size, end)
    raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
    if raw is None or len(raw) != 4:
        return None
    return RawAddr(index, IPv4Interface((IPv4Address(raw), plen)))


class RawRoute(NamedTuple):
    table: int
    protocol: int
    dst: IPv4Network
    oif: int
    gateway: IPv4Address | None


def route_protocol(data: bytes, start: int) -> int:
    """The rtm_protocol of a route message at payload `start`, without parsing the rest."""
    return data[start + 5]


def parse_route(data: bytes, start: int, end: int) -> RawRoute | None:
    """An IPv4 unicast route (RTM_NEWROUTE / RTM_DELROUTE); None for anything else."""
    family, dst_len, _src_len, _tos, table, protocol, _scope, kind, _flags = RTMSG.unpack_from(data, start)
    if family != AF_INET or kind != RTN_UNICAST:
        return None
    a = attrs(data, start + RTMSG.size, end)
    raw_table = a.get(RTA_TABLE)
    if raw_table is not None:
        table = U32.unpack(raw_table[:4])[0]
    dst_raw = a.get(RTA_DST)
    dst = IPv4Address(dst_raw) if dst_raw is not None and len(dst_raw) == 4 else IPv4Address(0)
    oif_raw = a.get(RTA_OIF)
    gw_raw = a.get(RTA_GATEWAY)
    return RawRoute(
        table=table,
        protocol=protocol,
        dst=IPv4Network((dst, dst_len), strict=False),
        oif=U32.unpack(oif_raw[:4])[0] if oif_raw else 0,
        gateway=IPv4Address(gw_raw) if gw_raw is not None and len(gw_raw) == 4 else None,
    )


class RawNetconf(NamedTuple):
    ifindex: int  # NETCONFA_IFINDEX_ALL (-1) and _DEFAULT (-2) are not interfaces
    forwarding: bool | None
    proxy_arp: bool | None


def parse_netconf(data: bytes, start: int, end: int) -> RawNetconf | None:
    """IPv4 per-interface settings (RTM_NEWNETCONF): forwarding and proxy ARP, when present."""
    if data[start] != AF_INET:
        return None
    a = attrs(data, start + 4, end)  # struct netconfmsg is one byte, aligned to four
    raw_index = a.get(NETCONFA_IFINDEX)
    if raw_index is None:
        return None
    forwarding = a.get(NETCONFA_FORWARDING)
    proxy = a.get(NETCONFA_PROXY_NEIGH)
    return RawNetconf(
        ifindex=I32.unpack(raw_index[:4])[0],
        forwarding=bool(I32.unpack(forwarding[:4])[0]) if forwarding else None,
        proxy_arp=bool(I32.unpack(proxy[:4])[0]) if proxy else None,
    )


def netconf_dump_request() -> bytes:
    """The body of an RTM_GETNETCONF dump (IPv4)."""
    return bytes([AF_INET, 0, 0, 0])


def route_dump_request() -> bytes:
    return RTMSG.pack(AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)


def replace_address(index: int, address: IPv4Interface) -> bytes:
    """`ip address replace ADDRESS dev INDEX` (scope link for a /32, global otherwise)."""
    scope = RT_SCOPE_UNIVERSE
    body = IFADDRMSG.pack(AF_INET, address.network.prefixlen, 0, scope, index)
    body += nla(IFA_LOCAL, address.ip.packed) + nla(IFA_ADDRESS, address.ip.packed)
    return message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)


def delete_address(index: int, address: IPv4Interface) -> bytes:
    body = IFADDRMSG.pack(AF_INET, address.network.prefixlen, 0, 0, index)
    body += nla(IFA_LOCAL, address.ip.packed) + nla(IFA_ADDRESS, address.ip.packed)
    return message(RTM_DELADDR, 0, body)


def replace_route(dst: IPv4Network, *, oif: int, via: IPv4Address | None, protocol: int) -> bytes:
    """`ip route replace DST [via VIA onlink] dev OIF proto PROTOCOL` in the main table."""
    scope = RT_SCOPE_UNIVERSE if via is not None else RT_SCOPE_LINK
    flags = RTNH_F_ONLINK if via is not None else 0
    body = RTMSG.pack(AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST, flags)
    if dst.prefixlen:
        body += nla(RTA_DST, dst.network_address.packed)
    if via is not None:
        body += nla(RTA_GATEWAY, via.packed)
    body += nla_u32(RTA_OIF, oif)
    return message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)


def delete_route(dst: IPv4Network, *, protocol: int) -> bytes:
    """Delete the main table's route to DST, only if it carries `protocol` (ours)."""
    body = RTMSG.pack(AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, protocol, 0, 0, 0)
    if dst.prefixlen:
        body += nla(RTA_DST, dst.network_address.packed)
    return message(RTM_DELROUTE, 0, body)


def set_devconf(index: int, values: dict[int, int]) -> bytes:
    """RTM_NEWLINK setting IPv4 per-interface settings (IPV4_DEVCONF_* -> value), as
    `sysctl net.ipv4.conf.DEV.*` would, through netlink (works where /proc/sys is read-only)."""
    conf = b"".join(nla_u32(key, value) for key, value in sorted(values.items()))
    spec = nla(AF_INET | NLA_F_NESTED, nla(IFLA_INET_CONF | NLA_F_NESTED, conf))
    body = IFINFOMSG.pack(0, 0, index, 0, 0) + nla(IFLA_AF_SPEC | NLA_F_NESTED, spec)
    return message(RTM_NEWLINK, 0, body)


def no_ipv6_link_local(index: int = 0, ifname: str | None = None) -> bytes:
    """RTM_NEWLINK: no IPv6 link-local address on a link, by index or by name (`ip link set
    DEV addrgenmode none`); sent before the link first has carrier, it keeps the link silent.

    The overlay carries IPv4 only, yet a link-local address makes every interface send
    DAD, MLD reports and router solicitations (the latter for as long as it lives), all
    multicast, which a bridge floods to every port and the VXLAN device to every VTEP.
    The kernel answers EAFNOSUPPORT where it has no IPv6: nothing to silence there."""
    spec = nla(AF_INET6 | NLA_F_NESTED, nla(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE])))
    body = IFINFOMSG.pack(0, 0, index, 0, 0)
    if ifname is not None:
        body += nla_str(IFLA_IFNAME, ifname)
    return message(RTM_NEWLINK, 0, body + nla(IFLA_AF_SPEC | NLA_F_NESTED, spec))


def set_proxy_delay(index: int, milliseconds: int) -> bytes:
    """`net.ipv4.neigh.DEV.proxy_delay`: how long proxy ARP waits before it answers a broadcast."""
    parms = nla_u32(NDTPA_IFINDEX, index) + nla(NDTPA_PROXY_DELAY, U64.pack(milliseconds))
    body = NDTMSG.pack(AF_INET) + nla_str(NDTA_NAME, "arp_cache") + nla(NDTA_PARMS | NLA_F_NESTED, parms)
    return message(RTM_SETNEIGHTBL, 0, body)


def set_link(
    index: int, *, mac: bytes | None = None, mtu: int | None = None, up: bool | None = None
) -> bytes:
    """RTM_NEWLINK on an existing link: MAC, MTU and/or up."""
    flags = change = 0
    if up is not None:
        change = IFF_UP
        flags = IFF_UP if up else 0
    body = IFINFOMSG.pack(0, 0, index, flags, change)
    if mac is not None:
        body += nla(IFLA_ADDRESS, mac)
    if mtu is not None:
        body += nla_u32(IFLA_MTU, mtu)
    return message(RTM_NEWLINK, 0, body)


def get_link_request(ifname: str) -> bytes:
    """The body of an RTM_GETLINK for one link by name."""
    return IFINFOMSG.pack(0, 0, 0, 0, 0) + nla_str(IFLA_IFNAME, ifname)


def create_veth(
    *, ifname: str, mtu: int, master: int, peer: str, peer_netns_fd: int, peer_mac: bytes
) -> bytes:
    """RTM_NEWLINK: a veth pair, the host side up on `master`, the peer born in another
    namespace under its final name, with its MAC and MTU (down: a veth cannot be opened
    before its pair is complete, the kernel answers ENOTCONN)."""
    peer_info = IFINFOMSG.pack(0, 0, 0, 0, 0) + b"".join(
        (
            nla_str(IFLA_IFNAME, peer),
            nla_u32(IFLA_NET_NS_FD, peer_netns_fd),
            nla(IFLA_ADDRESS, peer_mac),
            nla_u32(IFLA_MTU, mtu),
        )
    )
    linkinfo = nla_str(IFLA_INFO_KIND, "veth") + nla(
        IFLA_INFO_DATA | NLA_F_NESTED, nla(VETH_INFO_PEER | NLA_F_NESTED, peer_info)
    )
    body = IFINFOMSG.pack(0, 0, 0, IFF_UP, IFF_UP) + b"".join(
        (
            nla_str(IFLA_IFNAME, ifname),
            nla_u32(IFLA_MTU, mtu),
            nla_u32(IFLA_MASTER, master),
            nla(IFLA_LINKINFO | NLA_F_NESTED, linkinfo),
        )
    )
    return message(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def set_alias(ifname: str, alias: str) -> bytes:
    """RTM_NEWLINK on an existing link by name: set its ifalias (a create request ignores it)."""
    body = IFINFOMSG.pack(0, 0, 0, 0, 0) + nla_str(IFLA_IFNAME, ifname) + nla_str(IFLA_IFALIAS, alias)
    return message(RTM_NEWLINK, 0, body)


def delete_link_by_name(ifname: str) -> bytes:
    body = IFINFOMSG.pack(0, 0, 0, 0, 0) + nla_str(IFLA_IFNAME, ifname)
    return message(RTM_DELLINK, 0, body)


def set_up(index: int) -> bytes:
    return message(RTM_NEWLINK, 0, IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP))


def add_address(index: int, ip: IPv4Address, prefixlen: int) -> bytes:
    body = IFADDRMSG.pack(AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += nla(IFA_LOCAL, ip.packed) + nla(IFA_ADDRESS, ip.packed)
    return message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)


def add_default_route(index: int, gateway: IPv4Address) -> bytes:
    """`ip route add default via GATEWAY dev INDEX` ("add": an existing default is a conflict)."""
    body = RTMSG.pack(AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    body += nla(RTA_GATEWAY, gateway.packed) + nla_u32(RTA_OIF, index)
    return message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)


# --- FDB and neighbour entries ---------------------------------------------------

# (ifindex, flags, state, mac bytes, dst bytes) straight off the wire; mapped
# to kstate tuples only for our devices, which keeps the dump loop cheap.
RawNeigh = tuple[int, int, int, bytes, bytes]


def parse_neigh(data: bytes, start: int, end: int, *, lladdr: bool = True) -> RawNeigh | None:
    """An FDB or neighbour entry; None without an IPv4 destination, or without a MAC
    unless `lladdr` is false (then the MAC is b"" when the message carries none: the
    kernel sends none in an RTM_DELNEIGH of a neighbour, nor for an entry gone FAILED)."""
    # The hot loop of dumps and notifications (two messages per remote
    # endpoint): scan for the two attributes inline instead of building a
    # dict per message.
    _family, index, state, flags, _type = NDMSG.unpack_from(data, start)
    mac = dst = b""
    pos = start + NDMSG.size
    unpack = NLA.unpack_from
    while pos + 4 <= end:
        length, kind = unpack(data, pos)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == NDA_LLADDR:
            mac = data[pos + 4 : pos + length]
        elif kind == NDA_DST:
            dst = data[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    if len(dst) != 4 or (len(mac) != 6 and (lladdr or mac)):
        return None
    return index, flags, state, mac, dst


# A full verify reads the whole FDB and neighbour tables: two messages per remote endpoint
# and, on a VXLAN device that is a bridge port, the bridge's own entries for the same MACs.
# The kernel writes the two attributes overlayd reads first and in a fixed order (a VXLAN
# FDB entry: NDA_LLADDR, NDA_DST; a neighbour: NDA_DST, NDA_LLADDR), so one unpack of a
# fixed layout reads a message's header and ndmsg, a second its address pair; anything
# laid out otherwise goes through `parse_neigh`'s attribute scan.
_NEIGH_HEAD = struct.Struct("=IHHI4xBxxxiHBx")  # nlmsghdr without pid, ndmsg without type
_LLADDR_DST = struct.Struct("=HH6sxxHH4s")
_DST_LLADDR = struct.Struct("=HH4sHH6sxx")
_FIXED_END = _NEIGH_HEAD.size + _LLADDR_DST.size  # both layouts are 20 bytes


class DumpPart(NamedTuple):
    """What one datagram of a dump said about the dump as a whole."""

    done: bool  # NLMSG_DONE (or an error) came: nothing more follows
    interrupted: bool  # NLM_F_DUMP_INTR: the table changed while it was read
    error: int = 0  # errno of an NLMSG_ERROR answering the request, 0 for none
    text: str = ""  # the kernel's explanation of it


def neigh_dump_rows(
    data: bytes, seq: int, out: list[RawNeigh], *, devices: Container[int], flags: int = 0, state: int = 0
) -> DumpPart:
    """Add to `out` the entries of one datagram of an FDB or neighbour dump (the answer to
    request `seq`) that lie on one of `devices` and carry a bit of `flags` in ndm_flags
    or of `state` in ndm_state, as `parse_neigh` would read them; every other message
    costs one unpack. Messages of another sequence number (a late answer to an abandoned
    request) are skipped."""
    uniform = _uniform_rows(data, seq, out, devices, flags, state)
    if uniform is not None:
        return uniform
    return _walk_rows(data, 0, seq, out, devices, flags, state)


def _walk_rows(
    data: bytes, offset: int, seq: int, out: list[RawNeigh], devices: Container[int], flags: int, state: int
) -> DumpPart:
    """`neigh_dump_rows` message by message, from `offset`."""
    size = len(data)
    seen = 0  # the nlmsg_flags of the dump's messages, or-ed (NLM_F_DUMP_INTR)
    head = _NEIGH_HEAD.unpack_from
    head_size = _NEIGH_HEAD.size
    lladdr_dst = _LLADDR_DST.unpack_from
    dst_lladdr = _DST_LLADDR.unpack_from
    append = out.append
    # Inline, without a call per message: this is the loop a full verify spends its time in.
    # A message shorter than an entry's head (NLMSG_DONE, 20 bytes) comes last; it is read
    # after the loop. Inside it, the head of a shorter message reads into the next one, but
    # only its nlmsghdr is looked at then.
    while offset + head_size <= size:
        length, kind, mflags, mseq, family, index, nstate, nflags = head(data, offset)
        end = offset + length
        if length < HDR.size or end > size:
            return DumpPart(False, bool(seen & NLM_F_DUMP_INTR))  # malformed: nothing more to read
        if mseq == seq:
            seen |= mflags
            if kind == RTM_NEWNEIGH:
                if (nflags & flags or nstate & state) and index in devices:
                    if end >= offset + _FIXED_END:
                        if family == AF_BRIDGE:
                            mac_len, mac_type, mac, dst_len, dst_type, dst = lladdr_dst(
                                data, offset + head_size
                            )
                        else:
                            dst_len, dst_type, dst, mac_len, mac_type, mac = dst_lladdr(
                                data, offset + head_size
                            )
                        if mac_len == 10 and mac_type == NDA_LLADDR and dst_len == 8 and dst_type == NDA_DST:
                            append((index, nflags, nstate, mac, dst))
                            offset = (end + 3) & ~3
                            continue
                    if length >= head_size:
                        row = parse_neigh(data, offset + HDR.size, end)
                        if row is not None:
                            append(row)
            elif kind == NLMSG_DONE or kind == NLMSG_ERROR:
                return _dump_end(data, offset, seen)
        offset = (end + 3) & ~3
    if offset + HDR.size <= size:
        length, kind, mflags, mseq, _pid = HDR.unpack_from(data, offset)
        if mseq == seq and (kind == NLMSG_DONE or kind == NLMSG_ERROR) and offset + length <= size:
            return _dump_end(data, offset, seen | mflags)
    return DumpPart(False, bool(seen & NLM_F_DUMP_INTR))


# A datagram of a big dump is nearly always a run of entries of one length and layout
# (~450 of them in the 32 KiB the kernel fills per datagram), then maybe NLMSG_DONE: read
# whole with iter_unpack, every field checked for every entry at C speed (counting, not
# looping), it costs a fraction of the message-by-message walk.
_UNIFORM: dict[tuple[int, bool], struct.Struct] = {}


def _uniform_layout(length: int, bridge: bool) -> struct.Struct:
    layout = _UNIFORM.get((length, bridge))
    if layout is None:
        pair = "HH6sxxHH4s" if bridge else "HH4sHH6sxx"
        layout = _UNIFORM[(length, bridge)] = struct.Struct(
            f"={_NEIGH_HEAD.format[1:]}{pair}{length - _FIXED_END}x"
        )
    return layout


def _uniform_rows(
    data: bytes, seq: int, out: list[RawNeigh], devices: Container[int], flags: int, state: int
) -> DumpPart | None:
    """`neigh_dump_rows` for a datagram whose messages (but a last, shorter one) are all
    entries of one length whose wanted ones are in the kernel's usual layout; None, having
    added nothing, for any other datagram."""
    size = len(data)
    if size < _FIXED_END:
        return None
    length, kind, _mflags, _seq, _pid = HDR.unpack_from(data, 0)
    if kind != RTM_NEWNEIGH or length < _FIXED_END or length % 4:
        return None
    count = size // length
    if count == 0:
        return None
    bridge = data[HDR.size] == AF_BRIDGE
    records = _uniform_layout(length, bridge).iter_unpack(memoryview(data)[: count * length])
    fields: tuple[tuple[Any, ...], ...] = tuple(zip(*records, strict=True))
    lengths, kinds, mflags, seqs, families, indexes, states, nflags, len_a, type_a, a, len_b, type_b, b = (
        fields
    )
    if (
        lengths.count(length) != count
        or kinds.count(RTM_NEWNEIGH) != count
        or seqs.count(seq) != count
        or families.count(data[HDR.size]) != count
    ):
        return None
    seen = 0
    for mflag in set(mflags):
        seen |= mflag
    # Which entries are wanted depends on (device, flags, state): a few distinct triples.
    triples = set(zip(indexes, nflags, states, strict=True))
    wanted = {t for t in triples if (t[1] & flags or t[2] & state) and t[0] in devices}
    if wanted:
        columns: tuple[tuple[Any, ...], ...] = (indexes, nflags, states, len_a, type_a, a, len_b, type_b, b)
        if len(wanted) != len(triples):
            keep = list(map(wanted.__contains__, zip(indexes, nflags, states, strict=True)))
            columns = tuple(tuple(compress(column, keep)) for column in columns)
        indexes, nflags, states, len_a, type_a, a, len_b, type_b, b = columns
        kept = len(indexes)
        # The bridge writes NDA_LLADDR then NDA_DST; the neighbour table the other way round.
        sides = ((len_a, type_a, a), (len_b, type_b, b))
        (mac_lens, mac_types, macs), (dst_lens, dst_types, dsts) = sides if bridge else sides[::-1]
        macs_ok = mac_lens.count(10) == mac_types.count(NDA_LLADDR) == kept
        if not (macs_ok and dst_lens.count(8) == dst_types.count(NDA_DST) == kept):
            return None  # a wanted entry laid out otherwise: the walk reads it
        out.extend(zip(indexes, nflags, states, macs, dsts, strict=True))
    if count * length == size:
        return DumpPart(False, bool(seen & NLM_F_DUMP_INTR))
    rest = _walk_rows(data, count * length, seq, out, devices, flags, state)
    return DumpPart(rest.done, rest.interrupted or bool(seen & NLM_F_DUMP_INTR), rest.error, rest.text)


def _dump_end(data: bytes, offset: int, seen: int) -> DumpPart:
    """The NLMSG_DONE or NLMSG_ERROR at `offset` that ends a dump."""
    length, kind, mflags, _seq, _pid = HDR.unpack_from(data, offset)
    interrupted = bool((seen | mflags) & NLM_F_DUMP_INTR)
    if kind == NLMSG_DONE:
        return DumpPart(True, interrupted)
    if length < HDR.size + 4:
        return DumpPart(True, interrupted, errno.EPROTO, "truncated error message")
    code = -I32.unpack_from(data, offset + HDR.size)[0]
    text = extack_msg(data, offset, offset + length, mflags) if code else ""
    return DumpPart(True, interrupted, code, text)


# One FDB notification alone in its datagram, as VXLAN devices send them: the header,
# the ndmsg, then the MAC and the (IPv4) destination first, at fixed places.
_FDB_NOTE = struct.Struct("=IHHIIBxxxiHBB" + "HH6sxx" + "HH4s")
_FDB_LLADDR_LEN, _FDB_DST_LEN = 4 + 6, 4 + 4


def lone_fdb_note(data: bytes) -> tuple[int, int, int, RawNeigh] | None:
    """(type, sender's port, family, entry) of a datagram that holds one neighbour message
    laid out as the kernel lays out a VXLAN FDB entry (MAC, then an IPv4 destination,
    first); None for anything else (then `messages` + `parse_neigh` read it).

    The bulk of what the mirror hears in a join is the echo of its own FDB writes, one
    datagram each: read at fixed offsets, without walking the attributes.
    """
    if len(data) < _FDB_NOTE.size:
        return None
    (length, kind, _flags, _seq, port, family, index, state, ndm_flags, _type,
     ll_len, ll_type, mac, dst_len, dst_type, dst) = _FDB_NOTE.unpack_from(data, 0)  # fmt: skip
    if (
        length != len(data)
        or (kind != RTM_NEWNEIGH and kind != RTM_DELNEIGH)
        or ll_len != _FDB_LLADDR_LEN
        or ll_type & NLA_TYPE_MASK != NDA_LLADDR
        or dst_len != _FDB_DST_LEN
        or dst_type & NLA_TYPE_MASK != NDA_DST
    ):
        return None
    return kind, port, family, (index, ndm_flags, state, mac, dst)


# The kernel's RTM_DELNEIGH of an IPv4 neighbour entry, alone in its datagram: the last
# notification of every remote endpoint's removal (the echo of our own delete: the kernel
# sends it with port 0, so no socket filter can tell it from anyone else's). Its entry
# went FAILED first, so it carries no MAC: the ndmsg, then exactly NDA_DST, NDA_PROBES
# and NDA_CACHEINFO, as `neigh_fill_info` writes them.
_NEIGH_GONE_NOTE = struct.Struct("=IHHIIBxxxiHBB" + "HH4s" + "HHI" + "HH16s")
NEIGH_GONE_SIZE: Final = _NEIGH_GONE_NOTE.size
_DST_LEN, _PROBES_LEN, _CACHEINFO_LEN = 4 + 4, 4 + 4, 4 + 16


def lone_neigh_gone(data: bytes) -> tuple[int, RawNeigh] | None:
    """(sender's port, entry) of a datagram that is one RTM_DELNEIGH of an IPv4 neighbour
    laid out exactly as above (the entry without a MAC); None for anything else (then
    `messages` + `parse_neigh` read it).

    Every byte of the message is accounted for by the checked layout: it holds no other
    attribute, so `parse_neigh(..., lladdr=False)` would read the very same entry.
    """
    if len(data) != _NEIGH_GONE_NOTE.size:
        return None
    (length, kind, _flags, _seq, port, family, index, state, ndm_flags, _type,
     dst_len, dst_type, dst, probes_len, probes_type, _probes,
     info_len, info_type, _info) = _NEIGH_GONE_NOTE.unpack_from(data, 0)  # fmt: skip
    if (
        length != _NEIGH_GONE_NOTE.size
        or kind != RTM_DELNEIGH
        or family != AF_INET
        or dst_len != _DST_LEN
        or dst_type & NLA_TYPE_MASK != NDA_DST
        or probes_len != _PROBES_LEN
        or probes_type & NLA_TYPE_MASK != NDA_PROBES
        or info_len != _CACHEINFO_LEN
        or info_type & NLA_TYPE_MASK != NDA_CACHEINFO
    ):
        return None
    return port, (index, ndm_flags, state, b"", dst)


def neigh_family(data: bytes, start: int) -> int:
    return data[start]


def message_port(data: bytes, start: int) -> int:
    """The nlmsg_pid of the message whose payload starts at `start`.

    In a notification it is the port of the socket whose request caused it,
    where the kernel says (neighbour entries do; VXLAN's FDB entries and the
    kernel's own changes carry 0).
    """
    return int(U32.unpack_from(data, start - HDR.size + 12)[0])


# How each entry operation goes on the wire: (message type, extra flags, family, NUD state, ndm flags).
_BRIDGE_STATE = NUD_PERMANENT | NUD_NOARP
ENTRY_OPS: Final[dict[str, tuple[int, int, int, int, int]]] = {
    "replace_fdb": (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, AF_BRIDGE, _BRIDGE_STATE, NTF_SELF),
    # With NDA_DST the kernel removes just this destination.
    "delete_fdb": (RTM_DELNEIGH, 0, AF_BRIDGE, _BRIDGE_STATE, NTF_SELF),
    # The all-zero MAC holds a list of VTEPs; APPEND adds one more (`bridge fdb
    # append`) where REPLACE would drop the others.
    "append_flood": (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND, AF_BRIDGE, _BRIDGE_STATE, NTF_SELF),
    "delete_flood": (RTM_DELNEIGH, 0, AF_BRIDGE, _BRIDGE_STATE, NTF_SELF),
    "replace_neigh": (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, AF_INET, NUD_PERMANENT, 0),
}


# An entry request is the same bytes for every entry of one operation on one device but
# the MAC and the address: those are packed once per (operation, device) into a head
# (`entry_head`), and each entry is one pack of four fields (`ENTRY_TAIL`). A join writes
# tens of thousands; one pack of all sixteen fields per entry cost about three times as
# much. `>`: the address goes as an integer in network order; the rest are byte strings.
_HEAD_SIZE: Final = HDR.size + NDMSG.size + NLA.size  # through NDA_LLADDR's (NDA_DST's) header
ENTRY_TAIL: Final = struct.Struct(f">{_HEAD_SIZE}s6s6sI")  # head, MAC, DST_HEAD, address
DST_HEAD: Final = bytes(2) + NLA.pack(8, NDA_DST)  # NDA_LLADDR's padding, NDA_DST's header
DELETE_NEIGH_TAIL: Final = struct.Struct(f">{_HEAD_SIZE}sI")  # head, address


def entry_head(op: str, ifindex: int) -> bytes:
    """What every `op` request on device `ifindex` starts with (`ENTRY_TAIL`'s head)."""
    msg_type, flags, family, state, ndm_flags = ENTRY_OPS[op]
    return (
        HDR.pack(ENTRY_TAIL.size, msg_type, NLM_F_REQUEST | flags, 0, 0)
        + NDMSG.pack(family, ifindex, state, ndm_flags, 0)
        + NLA.pack(10, NDA_LLADDR)
    )


def delete_neigh_head(ifindex: int) -> bytes:
    """What every neighbour delete on device `ifindex` starts with (`DELETE_NEIGH_TAIL`'s head)."""
    return (
        HDR.pack(DELETE_NEIGH_TAIL.size, RTM_DELNEIGH, NLM_F_REQUEST, 0, 0)
        + NDMSG.pack(AF_INET, ifindex, 0, 0, 0)
        + NLA.pack(8, NDA_DST)
    )


def entry_message(op: str, ifindex: int, mac: bytes, dst: IPv4Address) -> bytes:
    """The request for one FDB, flood or neighbour write (`op` a key of ENTRY_OPS)."""
    if len(mac) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return ENTRY_TAIL.pack(entry_head(op, ifindex), mac, DST_HEAD, int(dst))


def delete_neigh_message(ifindex: int, ip: IPv4Address) -> bytes:
    """A neighbour entry is keyed by its IP alone: no link-layer address in the request."""
    return DELETE_NEIGH_TAIL.pack(delete_neigh_head(ifindex), int(ip))


# --- frames -------------------------------------------------------------------------

_ETH_P_ARP = 0x0806


def gratuitous_arp(ip: IPv4Address, mac: str) -> bytes:
    """A broadcast ARP request for `ip` from `ip` at `mac`: receivers update their caches."""
    hw = bytes.fromhex(mac.replace(":", ""))
    frame = b"\xff" * 6 + hw + struct.pack("!H", _ETH_P_ARP)
    frame += struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip.packed + b"\x00" * 6 + ip.packed
    return frame.ljust(60, b"\x00")  # Ethernet minimum frame size without FCS


# --- walking a datagram ------------------------------------------------------------------


def messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload start, end) of each message in one datagram."""
    offset = 0
    size = len(data)
    while offset + HDR.size <= size:
        length, kind, flags, seq, _pid = HDR.unpack_from(data, offset)
        if length < HDR.size or offset + length > size:
            return
        yield kind, flags, seq, offset + HDR.size, offset + length
        offset = (offset + length + 3) & ~3
