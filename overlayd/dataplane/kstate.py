"""Kernel state as overlayd sees it: the objects it owns, in one comparable shape.

Pure: no I/O. Both the desired state (computed from the cluster view) and the
observed state (read from netlink by `dataplane.kernel`) are a `KernelState`,
so the reconciler's diff compares like with like.

Naming is how ownership is marked (with the ifalias as a second mark): every
link overlayd creates starts with `ov` and carries an ifalias that starts with
`overlayd:`. Entries (FDB, flood, neighbour) count as ours only on our VXLAN
devices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import NamedTuple

ALIAS_PREFIX = "overlayd:"
BRIDGE_PREFIX = "ovbr"
VXLAN_PREFIX = "ovvx"
VETH_PREFIX = "ovep"
VXLAN_PORT = 4789
FLOOD_MAC = "00:00:00:00:00:00"


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


def is_ours(ifname: str, alias: str | None) -> bool:
    return ifname.startswith((BRIDGE_PREFIX, VXLAN_PREFIX, VETH_PREFIX)) and bool(
        alias and alias.startswith(ALIAS_PREFIX)
    )


@dataclass(frozen=True)
class BridgeSpec:
    ifname: str
    network: str
    mac: str
    mtu: int


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


@dataclass
class KernelState:
    bridges: dict[str, BridgeSpec] = field(default_factory=dict)
    vxlans: dict[str, VxlanSpec] = field(default_factory=dict)
    ports: dict[str, PortSpec] = field(default_factory=dict)
    fdb: set[FdbEntry] = field(default_factory=set)
    flood: set[FloodEntry] = field(default_factory=set)
    neigh: set[NeighEntry] = field(default_factory=set)

    def entry_count(self) -> int:
        return len(self.fdb) + len(self.flood) + len(self.neigh)
