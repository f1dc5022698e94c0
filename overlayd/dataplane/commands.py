"""Commands the reconciler gives the kernel executor, named as imperatives.

Pure data. The diff produces them; `dataplane.kernel.Kernel` is the
only thing that turns them into netlink messages, and it rejects any type it
does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address

from overlayd.dataplane.kstate import (
    AddrKey,
    BridgeSpec,
    FdbEntry,
    FloodEntry,
    InnerLinkSpec,
    NeighEntry,
    NetnsSpec,
    NftTable,
    PortSpec,
    RouteKey,
    RouteSpec,
    VethSpec,
    VxlanSpec,
)


class Op(StrEnum):
    """Kind of kernel operation, also the `kind` label of the ops metric."""

    ENSURE_BRIDGE = "ensure_bridge"
    ENSURE_VXLAN = "ensure_vxlan"
    SET_PORT = "set_port"
    DELETE_LINK = "delete_link"
    REPLACE_FDB = "replace_fdb"
    DELETE_FDB = "delete_fdb"
    APPEND_FLOOD = "append_flood"
    DELETE_FLOOD = "delete_flood"
    REPLACE_NEIGH = "replace_neigh"
    DELETE_NEIGH = "delete_neigh"
    ANNOUNCE_ARP = "announce_arp"
    ENSURE_NETNS = "ensure_netns"
    DELETE_NETNS = "delete_netns"
    ENSURE_VETH = "ensure_veth"
    SET_INNER_LINK = "set_inner_link"
    REPLACE_ADDR = "replace_addr"
    DELETE_ADDR = "delete_addr"
    REPLACE_ROUTE = "replace_route"
    DELETE_ROUTE = "delete_route"
    ENABLE_FORWARDING = "enable_forwarding"
    REPLACE_NFT = "replace_nft"
    DELETE_NFT = "delete_nft"


@dataclass(frozen=True)
class EnsureBridge:
    """Create the bridge, or bring an existing one to `spec` (MAC, MTU, up)."""

    spec: BridgeSpec
    op = Op.ENSURE_BRIDGE


@dataclass(frozen=True)
class EnsureVxlan:
    """Create the VXLAN device (learning off, proxy on) on its bridge, or fix MTU/master."""

    spec: VxlanSpec
    op = Op.ENSURE_VXLAN


@dataclass(frozen=True)
class SetPort:
    """Put an existing local endpoint veth on its bridge with its MTU, up."""

    spec: PortSpec
    op = Op.SET_PORT


@dataclass(frozen=True)
class DeleteLink:
    ifname: str
    op = Op.DELETE_LINK


@dataclass(frozen=True)
class ReplaceFdb:
    entry: FdbEntry
    op = Op.REPLACE_FDB


@dataclass(frozen=True)
class DeleteFdb:
    entry: FdbEntry
    op = Op.DELETE_FDB


@dataclass(frozen=True)
class AppendFlood:
    entry: FloodEntry
    op = Op.APPEND_FLOOD


@dataclass(frozen=True)
class DeleteFlood:
    entry: FloodEntry
    op = Op.DELETE_FLOOD


@dataclass(frozen=True)
class ReplaceNeigh:
    entry: NeighEntry
    op = Op.REPLACE_NEIGH


@dataclass(frozen=True)
class DeleteNeigh:
    entry: NeighEntry
    op = Op.DELETE_NEIGH


@dataclass(frozen=True)
class AnnounceArp:
    """Broadcast a gratuitous ARP (ip is at mac) on a bridge's local ports.

    The VXLAN device answers ARP itself (`proxy`) and never forwards it, so a
    container that cached an address's old MAC (the IP was reused by an
    endpoint elsewhere) would keep sending into the void until its cache
    entry expired; the announcement corrects its cache at once.
    """

    bridge: str
    ip: IPv4Address
    mac: str
    op = Op.ANNOUNCE_ARP


@dataclass(frozen=True)
class EnsureNetns:
    """Create the gateway namespace (pinned under /run/netns) unless it is there."""

    spec: NetnsSpec
    op = Op.ENSURE_NETNS


@dataclass(frozen=True)
class DeleteNetns:
    """Delete a gateway namespace: everything inside goes with it, and the veths into it."""

    name: str
    op = Op.DELETE_NETNS


@dataclass(frozen=True)
class EnsureVeth:
    """Create a veth pair into a gateway namespace, or fix the host side (MTU, master, forwarding)."""

    spec: VethSpec
    op = Op.ENSURE_VETH


@dataclass(frozen=True)
class SetInnerLink:
    """Inside a gateway namespace: the veth's end up, with its MAC and MTU, forwarding on."""

    spec: InnerLinkSpec
    op = Op.SET_INNER_LINK


@dataclass(frozen=True)
class ReplaceAddr:
    key: AddrKey
    op = Op.REPLACE_ADDR


@dataclass(frozen=True)
class DeleteAddr:
    key: AddrKey
    op = Op.DELETE_ADDR


@dataclass(frozen=True)
class ReplaceRoute:
    key: RouteKey
    route: RouteSpec
    op = Op.REPLACE_ROUTE


@dataclass(frozen=True)
class DeleteRoute:
    key: RouteKey
    op = Op.DELETE_ROUTE


@dataclass(frozen=True)
class EnableForwarding:
    """IPv4 forwarding on one interface overlayd does not own (never the global switch)."""

    netns: str
    device: str
    op = Op.ENABLE_FORWARDING


@dataclass(frozen=True)
class ReplaceNft:
    """Replace our nftables table with `table`, atomically (one nft transaction)."""

    table: NftTable
    op = Op.REPLACE_NFT


@dataclass(frozen=True)
class DeleteNft:
    netns: str
    family: str
    op = Op.DELETE_NFT


Command = (
    EnsureBridge
    | EnsureVxlan
    | SetPort
    | DeleteLink
    | ReplaceFdb
    | DeleteFdb
    | AppendFlood
    | DeleteFlood
    | ReplaceNeigh
    | DeleteNeigh
    | AnnounceArp
    | EnsureNetns
    | DeleteNetns
    | EnsureVeth
    | SetInnerLink
    | ReplaceAddr
    | DeleteAddr
    | ReplaceRoute
    | DeleteRoute
    | EnableForwarding
    | ReplaceNft
    | DeleteNft
)


def _where(netns: str) -> str:
    return f" in {netns}" if netns else ""


def describe(cmd: Command) -> str:
    """One human line per command, as `overlayctl diff` prints it."""
    match cmd:
        case EnsureBridge(spec):
            routed = " routed" if spec.routed else ""
            return f"ensure bridge {spec.ifname} mac {spec.mac} mtu {spec.mtu}{routed} ({spec.network})"
        case EnsureVxlan(spec):
            return (
                f"ensure vxlan {spec.ifname} vni {spec.vni} local {spec.local} "
                f"mtu {spec.mtu} master {spec.bridge}"
            )
        case SetPort(spec):
            return f"set port {spec.ifname} master {spec.bridge} mtu {spec.mtu}"
        case DeleteLink(ifname):
            return f"delete link {ifname}"
        case ReplaceFdb(e):
            return f"replace fdb {e.mac} dev {e.device} dst {e.dst}"
        case DeleteFdb(e):
            return f"delete fdb {e.mac} dev {e.device} dst {e.dst}"
        case AppendFlood(e):
            return f"append flood dev {e.device} dst {e.dst}"
        case DeleteFlood(e):
            return f"delete flood dev {e.device} dst {e.dst}"
        case ReplaceNeigh(e):
            return f"replace neigh {e.ip} lladdr {e.mac} dev {e.device}"
        case DeleteNeigh(e):
            return f"delete neigh {e.ip} lladdr {e.mac} dev {e.device}"
        case AnnounceArp(bridge, ip, mac):
            return f"announce arp {ip} is-at {mac} on {bridge}"
        case EnsureNetns(ns):
            return f"ensure netns {ns.name} ({ns.network})"
        case DeleteNetns(name):
            return f"delete netns {name}"
        case EnsureVeth(v):
            master = f" master {v.bridge}" if v.bridge else ""
            return f"ensure veth {v.ifname} peer {v.peer} in {v.netns} mtu {v.mtu}{master} ({v.role})"
        case SetInnerLink(i):
            return f"set link {i.ifname} in {i.netns} mac {i.mac} mtu {i.mtu} up"
        case ReplaceAddr((netns, device, address)):
            return f"replace address {address} dev {device}{_where(netns)}"
        case DeleteAddr((netns, device, address)):
            return f"delete address {address} dev {device}{_where(netns)}"
        case ReplaceRoute((netns, dst), route):
            via = f" via {route.via} onlink" if route.via is not None else ""
            return f"replace route {dst}{via} dev {route.device}{_where(netns)}"
        case DeleteRoute((netns, dst)):
            return f"delete route {dst}{_where(netns)}"
        case EnableForwarding(netns, device):
            return f"enable forwarding on {device}{_where(netns)}"
        case ReplaceNft(table):
            rules = sum(len(c.rules) for c in table.chains)
            return f"replace nft table {table.family} overlayd{_where(table.netns)} ({rules} rules)"
        case DeleteNft(netns, family):
            return f"delete nft table {family} overlayd{_where(netns)}"
    raise TypeError(f"unknown command {cmd!r}")
