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

    @classmethod
    def of(cls, state: KernelState) -> Tables:
        return cls(
            bridges=dict(state.bridges),
            vxlans=dict(state.vxlans),
            ports=dict(state.ports),
            fdb={(e.device, e.mac): e.dst for e in state.fdb},
            neigh={(e.device, e.ip): e.mac for e in state.neigh},
            flood={(e.device, e.dst) for e in state.flood},
        )

    def state(self) -> KernelState:
        return KernelState(
            bridges=dict(self.bridges),
            vxlans=dict(self.vxlans),
            ports=dict(self.ports),
            fdb={FdbEntry(dev, mac, dst) for (dev, mac), dst in self.fdb.items()},
            neigh={NeighEntry(dev, ip, mac) for (dev, ip), mac in self.neigh.items()},
            flood={FloodEntry(dev, dst) for dev, dst in self.flood},
        )

    def links(self) -> set[str]:
        return set(self.bridges) | set(self.vxlans) | set(self.ports)

    def entry_count(self) -> int:
        return len(self.fdb) + len(self.neigh) + len(self.flood)


@dataclass
class Dirty:
    """Keys whose desired or observed value may have changed: the next pass compares only these."""

    links: set[str] = field(default_factory=set)
    fdb: set[FdbKey] = field(default_factory=set)
    neigh: set[NeighKey] = field(default_factory=set)
    flood: set[FloodKey] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.links or self.fdb or self.neigh or self.flood)

    def __len__(self) -> int:
        return len(self.links) + len(self.fdb) + len(self.neigh) + len(self.flood)

    def update(self, other: Dirty) -> None:
        self.links |= other.links
        self.fdb |= other.fdb
        self.neigh |= other.neigh
        self.flood |= other.flood

    def take(self) -> Dirty:
        """Everything marked so far; this one starts empty again."""
        taken = Dirty(set(self.links), set(self.fdb), set(self.neigh), set(self.flood))
        # Cleared in place: desired state keeps references to these sets.
        self.links.clear()
        self.fdb.clear()
        self.neigh.clear()
        self.flood.clear()
        return taken

    def add_tables(self, tables: Tables) -> None:
        """Mark every key of `tables` (a full compare)."""
        self.links |= tables.links()
        self.fdb |= tables.fdb.keys()
        self.neigh |= tables.neigh.keys()
        self.flood |= tables.flood

    def add_device(self, tables: Tables, device: str) -> None:
        """Mark every entry `tables` has on `device` (it appeared, vanished or was recreated)."""
        self.fdb |= {k for k in tables.fdb if k[0] == device}
        self.neigh |= {k for k in tables.neigh if k[0] == device}
        self.flood |= {k for k in tables.flood if k[0] == device}
