"""Kernel state as overlayd sees it: the objects it owns, in one comparable shape.

Pure: no I/O. Both the desired state (computed from the cluster view) and the
observed state (read from netlink by `dataplane.kernel`) are a `KernelState`,
so the reconciler's diff compares like with like.

Naming is how ownership is marked (with the ifalias as a second mark): every
link overlayd creates starts with `ov` and carries an ifalias that starts with
`overlayd:`. Entries (FDB, flood, neighbour) count as ours only on our VXLAN
devices; addresses only on our links (and on anything inside a gateway
namespace); routes only with overlayd's routing protocol number
(`RTPROT_OVERLAYD`); nftables tables only by the name `overlayd`; gateway
namespaces only by their configured name prefix followed by the VNI.

Namespaces are named by a string: "" is the host's own (the daemon's),
anything else a gateway namespace overlayd made (one per VXLAN network with
egress on this host: `gateway_netns`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, NamedTuple

ALIAS_PREFIX = "overlayd:"
BRIDGE_PREFIX = "ovbr"
VXLAN_PREFIX = "ovvx"
VETH_PREFIX = "ovep"
GATEWAY_PREFIX = "ovgw"  # host side of the veth to a gateway namespace's gateway (a bridge port)
UPLINK_PREFIX = "ovup"  # host side of the veth to a gateway namespace's uplink
VXLAN_PORT = 4789
FLOOD_MAC = "00:00:00:00:00:00"

HOST_NS = ""  # the host's own namespace, where the daemon runs
# Inside a gateway namespace: the anycast gateway (the network's gateway IP and MAC, its other
# end a port of the network's bridge) and the uplink towards the host.
GW_INNER = "gw0"
UP_INNER = "up0"
NFT_TABLE = "overlayd"
# The routing protocol number that marks a route as overlayd's (`ip route show proto 111`).
RTPROT_OVERLAYD = 111


def bridge_name(vni: int) -> str:
    return f"{BRIDGE_PREFIX}{vni}"


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


def veth_name(network: str, endpoint: str) -> str:
    """Host side of a local endpoint's veth pair: stable, unique, <= 15 chars."""
    digest = hashlib.sha256(f"{network}/{endpoint}".encode()).hexdigest()[:10]
    return f"{VETH_PREFIX}{digest}"


def link_alias(network: str, role: str) -> str:
    return f"{ALIAS_PREFIX}{role}:{network}"


def gateway_port_name(vni: int) -> str:
    return f"{GATEWAY_PREFIX}{vni}"


def uplink_name(vni: int) -> str:
    return f"{UPLINK_PREFIX}{vni}"


OUR_PREFIXES = (BRIDGE_PREFIX, VXLAN_PREFIX, VETH_PREFIX, GATEWAY_PREFIX, UPLINK_PREFIX)


def is_ours(ifname: str, alias: str | None) -> bool:
    return ifname.startswith(OUR_PREFIXES) and bool(alias and alias.startswith(ALIAS_PREFIX))


def is_inner(ifname: str, kind: str | None, alias: str | None) -> bool:
    """A link inside a gateway namespace that overlayd made: marked, or one of its veth ends
    (marked right after it appears)."""
    return bool(alias and alias.startswith(ALIAS_PREFIX)) or (
        kind == "veth" and ifname in (GW_INNER, UP_INNER)
    )


@dataclass(frozen=True)
class BridgeSpec:
    ifname: str
    network: str
    mac: str
    mtu: int
    # The network is routed and its gateway lives on this bridge: IPv4 forwarding and proxy
    # ARP (the gateway answers for endpoints on other hosts) are on; otherwise both off.
    routed: bool = False


@dataclass(frozen=True)
class NetnsSpec:
    """A gateway namespace: one network's gateway side, in a routing domain of its own."""

    name: str
    network: str = field(default="", compare=False)


@dataclass(frozen=True)
class VethSpec:
    """Host side of a veth pair whose other end (`peer`) lives in gateway namespace `netns`.

    Role "gw": a port of the network's bridge; the peer is the anycast gateway.
    Role "uplink": the gateway namespace's way to the host (forwarding on).
    Only the host side's own attributes are compared with the kernel; where the
    peer lives is fixed when the pair is made (the peer is `InnerLinkSpec`).
    """

    ifname: str
    network: str
    role: str
    mtu: int
    bridge: str = ""  # master; "" for none
    forwarding: bool = False
    up: bool = True
    netns: str = field(default="", compare=False)
    peer: str = field(default="", compare=False)
    peer_mac: str = field(default="", compare=False)


@dataclass(frozen=True)
class InnerLinkSpec:
    """The gateway namespace's end of a veth pair: up, with its MAC and MTU, forwarding on."""

    netns: str
    ifname: str
    mac: str
    mtu: int
    up: bool = True
    forwarding: bool = True
    network: str = field(default="", compare=False)  # for its ifalias (`overlayd:inner:<network>`)


@dataclass(frozen=True)
class RouteSpec:
    """Where a route of ours sends: out of `device`, through `via` (on link) or directly.

    A routed network's host route towards another host's endpoint also names the
    network's bridge and gateway MAC (not compared with the kernel): once it is
    written, local endpoints are told the address is at the gateway, in case they
    cached another MAC for it (it was behind a router, reached over VXLAN, before).
    """

    device: str
    via: IPv4Address | None
    bridge: str = field(default="", compare=False)
    mac: str = field(default="", compare=False)


@dataclass(frozen=True)
class NftRule:
    """One rule of our nftables table. Its comment is its identity in the kernel: the name
    plus a digest of the expression, so a changed rule has another comment."""

    comment: str
    expr: str = field(default="", compare=False)  # the JSON of its expressions (to write it)


@dataclass(frozen=True)
class NftChain:
    name: str
    type: str  # "filter" or "nat"
    hook: str
    prio: int
    policy: str
    rules: tuple[NftRule, ...] = ()


@dataclass(frozen=True)
class NftTable:
    """The nftables table `overlayd` of one family in one namespace, whole."""

    netns: str
    family: str  # "ip" or "bridge"
    chains: tuple[NftChain, ...]


@dataclass(frozen=True)
class VxlanSpec:
    ifname: str
    network: str
    vni: int
    local: IPv4Address
    mtu: int
    bridge: str  # master
    port: int = VXLAN_PORT


@dataclass(frozen=True)
class PortSpec:
    """Host side of a local endpoint's veth: must sit on `bridge` with `mtu`."""

    ifname: str
    network: str
    bridge: str
    mtu: int


class FdbEntry(NamedTuple):
    """Unicast MAC behind a remote VTEP, on our VXLAN device."""

    device: str
    mac: str
    dst: IPv4Address


class FloodEntry(NamedTuple):
    """All-zero MAC towards one remote VTEP: where BUM traffic is replicated."""

    device: str
    dst: IPv4Address


class NeighEntry(NamedTuple):
    """Permanent IP -> MAC on our VXLAN device (answers ARP locally via `proxy`)."""

    device: str
    ip: IPv4Address
    mac: str


InnerKey = tuple[str, str]  # (namespace, ifname)
AddrKey = tuple[str, str, IPv4Interface]  # (namespace, device, address with prefix length)
RouteKey = tuple[str, IPv4Network]  # (namespace, destination) in the main table
ForwardKey = tuple[str, str]  # (namespace, device): a device not ours that must forward IPv4
NftKey = tuple[str, str]  # (namespace, family)


@dataclass
class KernelState:
    bridges: dict[str, BridgeSpec] = field(default_factory=dict)
    vxlans: dict[str, VxlanSpec] = field(default_factory=dict)
    ports: dict[str, PortSpec] = field(default_factory=dict)
    fdb: set[FdbEntry] = field(default_factory=set)
    flood: set[FloodEntry] = field(default_factory=set)
    neigh: set[NeighEntry] = field(default_factory=set)
    netns: dict[str, NetnsSpec] = field(default_factory=dict)
    veths: dict[str, VethSpec] = field(default_factory=dict)
    inner: dict[InnerKey, InnerLinkSpec] = field(default_factory=dict)
    addrs: set[AddrKey] = field(default_factory=set)
    routes: dict[RouteKey, RouteSpec] = field(default_factory=dict)
    forwarding: set[ForwardKey] = field(default_factory=set)
    nft: dict[NftKey, NftTable] = field(default_factory=dict)

    def entry_count(self) -> int:
        return len(self.fdb) + len(self.flood) + len(self.neigh)


# --- keyed tables: the shape the incremental path works in -----------------------

FdbKey = tuple[str, str]  # (device, MAC)
NeighKey = tuple[str, IPv4Address]  # (device, IP)
FloodKey = tuple[str, IPv4Address]  # (device, remote VTEP)


@dataclass
class Tables:
    """One side of the comparison (desired state or the kernel mirror), keyed as the kernel keys it.

    An FDB entry is (device, MAC) -> VTEP and a neighbour entry (device, IP)
    -> MAC: a change of value is one replace, never a delete and an add.
    """

    bridges: dict[str, BridgeSpec] = field(default_factory=dict)
    vxlans: dict[str, VxlanSpec] = field(default_factory=dict)
    ports: dict[str, PortSpec] = field(default_factory=dict)
    fdb: dict[FdbKey, IPv4Address] = field(default_factory=dict)
    neigh: dict[NeighKey, str] = field(default_factory=dict)
    flood: set[FloodKey] = field(default_factory=set)
    netns: dict[str, NetnsSpec] = field(default_factory=dict)
    veths: dict[str, VethSpec] = field(default_factory=dict)
    inner: dict[InnerKey, InnerLinkSpec] = field(default_factory=dict)
    addrs: set[AddrKey] = field(default_factory=set)
    routes: dict[RouteKey, RouteSpec] = field(default_factory=dict)
    forwarding: set[ForwardKey] = field(default_factory=set)
    nft: dict[NftKey, NftTable] = field(default_factory=dict)

    @classmethod
    def of(cls, state: KernelState) -> Tables:
        return cls(
            bridges=dict(state.bridges),
            vxlans=dict(state.vxlans),
            ports=dict(state.ports),
            fdb={(e.device, e.mac): e.dst for e in state.fdb},
            neigh={(e.device, e.ip): e.mac for e in state.neigh},
            flood={(e.device, e.dst) for e in state.flood},
            netns=dict(state.netns),
            veths=dict(state.veths),
            inner=dict(state.inner),
            addrs=set(state.addrs),
            routes=dict(state.routes),
            forwarding=set(state.forwarding),
            nft=dict(state.nft),
        )

    def state(self) -> KernelState:
        return KernelState(
            bridges=dict(self.bridges),
            vxlans=dict(self.vxlans),
            ports=dict(self.ports),
            fdb={FdbEntry(dev, mac, dst) for (dev, mac), dst in self.fdb.items()},
            neigh={NeighEntry(dev, ip, mac) for (dev, ip), mac in self.neigh.items()},
            flood={FloodEntry(dev, dst) for dev, dst in self.flood},
            netns=dict(self.netns),
            veths=dict(self.veths),
            inner=dict(self.inner),
            addrs=set(self.addrs),
            routes=dict(self.routes),
            forwarding=set(self.forwarding),
            nft=dict(self.nft),
        )

    def links(self) -> set[str]:
        return set(self.bridges) | set(self.vxlans) | set(self.ports) | set(self.veths)

    def has_link(self, name: str) -> bool:
        """`name in self.links()` without building the set (a host's ports are many)."""
        return name in self.bridges or name in self.vxlans or name in self.ports or name in self.veths

    def entry_count(self) -> int:
        return len(self.fdb) + len(self.neigh) + len(self.flood) + len(self.routes)


@dataclass
class Dirty:
    """Keys whose desired or observed value may have changed: the next pass compares only these."""

    links: set[str] = field(default_factory=set)
    fdb: set[FdbKey] = field(default_factory=set)
    neigh: set[NeighKey] = field(default_factory=set)
    flood: set[FloodKey] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    inner: set[InnerKey] = field(default_factory=set)
    addrs: set[AddrKey] = field(default_factory=set)
    routes: set[RouteKey] = field(default_factory=set)
    forwarding: set[ForwardKey] = field(default_factory=set)
    nft: set[NftKey] = field(default_factory=set)

    def _sets(self) -> tuple[set[Any], ...]:
        return (
            self.links,
            self.fdb,
            self.neigh,
            self.flood,
            self.netns,
            self.inner,
            self.addrs,
            self.routes,
            self.forwarding,
            self.nft,
        )

    def __bool__(self) -> bool:
        # Asked per notification and per view outcome: no tuple of sets built for it,
        # and the entry sets, the ones a join fills, first.
        return bool(
            self.fdb
            or self.neigh
            or self.flood
            or self.links
            or self.netns
            or self.inner
            or self.addrs
            or self.routes
            or self.forwarding
            or self.nft
        )

    def __len__(self) -> int:
        return sum(len(s) for s in self._sets())

    def update(self, other: Dirty) -> None:
        for mine, theirs in zip(self._sets(), other._sets(), strict=True):
            mine |= theirs

    def take(self, also: Dirty | None = None) -> Dirty:
        """Everything marked so far, and in `also`; both start empty again."""
        mine = self._sets()
        if also is None:
            taken = Dirty(*map(set, mine))
        else:
            theirs = also._sets()
            taken = Dirty(*map(set.union, mine, theirs))
            for s in theirs:
                if s:
                    s.clear()
        # Cleared in place: desired state keeps references to these sets.
        for s in mine:
            if s:
                s.clear()
        return taken

    def add_tables(self, tables: Tables) -> None:
        """Mark every key of `tables` (a full compare)."""
        self.links |= tables.links()
        self.fdb |= tables.fdb.keys()
        self.neigh |= tables.neigh.keys()
        self.flood |= tables.flood
        self.netns |= tables.netns.keys()
        self.inner |= tables.inner.keys()
        self.addrs |= tables.addrs
        self.routes |= tables.routes.keys()
        self.forwarding |= tables.forwarding
        self.nft |= tables.nft.keys()

    def add_device(self, tables: Tables, device: str) -> None:
        """Mark every entry `tables` has on `device` (it appeared, vanished or was recreated)."""
        self.fdb |= {k for k in tables.fdb if k[0] == device}
        self.neigh |= {k for k in tables.neigh if k[0] == device}
        self.flood |= {k for k in tables.flood if k[0] == device}
        self.addrs |= {k for k in tables.addrs if k[0] == HOST_NS and k[1] == device}

    def add_netns(self, tables: Tables, netns: str) -> None:
        """Mark everything `tables` has inside namespace `netns`."""
        self.netns.add(netns)
        self.inner |= {k for k in tables.inner if k[0] == netns}
        self.addrs |= {k for k in tables.addrs if k[0] == netns}
        self.routes |= {k for k in tables.routes if k[0] == netns}
        self.nft |= {k for k in tables.nft if k[0] == netns}
