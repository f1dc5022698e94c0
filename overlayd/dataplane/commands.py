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
    BridgeSpec,
    FdbEntry,
    FloodEntry,
    NeighEntry,
    PortSpec,
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
)


def describe(cmd: Command) -> str:
    """One human line per command, as `overlayctl diff` prints it."""
    match cmd:
        case EnsureBridge(spec):
            return f"ensure bridge {spec.ifname} mac {spec.mac} mtu {spec.mtu} ({spec.network})"
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
    raise TypeError(f"unknown command {cmd!r}")
