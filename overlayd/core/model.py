"""Records of the cluster view: networks, nodes and endpoints.

Pure: no I/O. Every record validates itself when built, so a record that
exists is a valid one; `from_dict` is the single door through which data from
the store, the admin API or (later) gossip enters, and it raises
`ValidationError` with a message that names the offending field.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, cast

VNI_MIN = 1
VNI_MAX = 2**24 - 1
MTU_MIN = 576
MTU_MAX = 9000
VXLAN_OVERHEAD = 50

# How a network carries traffic between hosts (`Network.mode`).
MODE_VXLAN = "vxlan"  # every pair of hosts over VXLAN
MODE_ROUTED = "routed"  # hosts on one underlay segment route without encapsulation; VXLAN otherwise
MODES = (MODE_VXLAN, MODE_ROUTED)
# How endpoints reach what is outside the overlay (`Network.egress`).
EGRESS_NONE = "none"
EGRESS_NAT = "nat"  # through the anycast gateway, masqueraded to the host's address
EGRESSES = (EGRESS_NONE, EGRESS_NAT)
# A VXLAN-mode network with egress gets an uplink address derived from its VNI
# (100.64.0.0/10, 22 bits): see `dataplane.desired.transit_address`.
EGRESS_VNI_MAX = 2**22 - 1

# Matched with fullmatch: `$` would also accept a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
# A MAC `parse_mac` accepts as it is: lower case, unicast (bit 0x01 clear) and locally
# administered (bit 0x02 set) in the first octet.
_UNICAST_LAA_RE = re.compile(r"[0-9a-f][26ae](:[0-9a-f]{2}){5}")
# For decoders that match names and MACs inside a larger pattern (`store.keys`).
NAME_PATTERN, UNICAST_LAA_PATTERN = _NAME_RE.pattern, _UNICAST_LAA_RE.pattern


class Ip4(IPv4Address):
    """An IPv4 address that hashes in O(1) after construction.

    `IPv4Address.__hash__` computes `hash(hex(int(self)))` on every call,
    about 1 us; addresses are dictionary keys on every hot path (the view's
    address index, desired and mirrored neighbour entries), several times
    per endpoint. The hash is the same as the base class's, so an `Ip4` and
    an equal `IPv4Address` find each other in any dict or set.
    """

    __slots__ = ("_hash",)

    def __init__(self, address: int | str | bytes) -> None:
        super().__init__(address)
        self._hash = hash(hex(int(self)))

    @classmethod
    def _of_int(cls, value: int) -> Ip4:
        """The address `value`, already known to be in 0..2**32-1 (from four packed bytes):
        without `IPv4Address.__init__`'s checks, once per endpoint decoded."""
        ip = cls.__new__(cls)
        ip._ip = value  # type: ignore[attr-defined]
        ip._hash = hash(hex(value))
        return ip

    def __hash__(self) -> int:
        return self._hash

    @property
    def packed(self) -> bytes:
        # Every netlink message for an entry carries it: without the base class's two
        # Python calls and its range check (`_ip` is in range by construction).
        return self._ip.to_bytes(4, "big")  # type: ignore[attr-defined,no-any-return]

    def __eq__(self, other: object) -> bool:
        # Compared whenever a desired entry meets its mirrored one (a VTEP, a neighbour's
        # address): `_ip` is the integer IPv4Address keeps, read without two int() calls.
        if other.__class__ is Ip4:
            return self._ip == other._ip  # type: ignore[attr-defined,no-any-return]
        return super().__eq__(other)

    def __reduce__(self) -> tuple[type[Ip4], tuple[int]]:
        return (Ip4, (int(self),))

    def __repr__(self) -> str:
        return f"IPv4Address('{self}')"


class ValidationError(ValueError):
    """A record or request field is invalid; the message names the field."""


# Names repeat across records (one network, one owner for thousands of endpoints):
# remember the ones already checked, and hand back the first copy of each, so that the
# records decoded from the store share one string per network and owner instead of
# one each. Bounded, so a flood of distinct names costs no memory.
_VALID_NAMES: dict[str, str] = {}
_VALID_NAMES_MAX = 65536


def validate_name(value: object, what: str) -> str:
    """`value` if it is a valid name (the copy first seen of an equal one)."""
    if isinstance(value, str):
        known = _VALID_NAMES.get(value)
        if known is not None:
            return known
    value = _valid_name(value, what)
    if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
        _VALID_NAMES.clear()
    _VALID_NAMES[value] = value
    return value


def _valid_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValidationError(
            f"invalid {what} {value!r}: use 1-63 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return value


def validate_vni(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not VNI_MIN <= value <= VNI_MAX:
        raise ValidationError(f"invalid VNI {value!r}: must be an integer in {VNI_MIN}..{VNI_MAX}")
    return value


def validate_mtu(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MTU_MIN <= value <= MTU_MAX:
        raise ValidationError(f"invalid MTU {value!r}: must be an integer in {MTU_MIN}..{MTU_MAX}")
    return value


def parse_subnet(value: object) -> IPv4Network:
    if isinstance(value, IPv4Network):
        net = value
    else:
        try:
            net = IPv4Network(str(value), strict=True)
        except ValueError as exc:
            raise ValidationError(f"invalid subnet {value!r}: {exc}") from None
    if net.prefixlen > 30:
        raise ValidationError(f"invalid subnet {net}: prefix must be /30 or shorter to hold endpoints")
    return net


def parse_ipv4(value: object, what: str) -> IPv4Address:
    if isinstance(value, Ip4):
        return value
    if isinstance(value, IPv4Address):
        return Ip4(int(value))
    if isinstance(value, str):
        # inet_pton takes exactly dotted-quad (no leading zeros, no short forms) and runs
        # in C, several times faster than ipaddress's parser on this hot path.
        try:
            packed = socket.inet_pton(socket.AF_INET, value)
        except OSError:
            pass
        else:
            return Ip4._of_int(int.from_bytes(packed, "big"))
    try:
        return Ip4(str(value))
    except ValueError:
        raise ValidationError(f"invalid {what} {value!r}: not an IPv4 address") from None


def parse_mac(value: object) -> str:
    mac = str(value).lower()
    if not _MAC_RE.fullmatch(mac):
        raise ValidationError(f"invalid MAC {value!r}: expected six hex octets like 02:00:00:00:00:01")
    first = int(mac[:2], 16)
    if first & 0x01:
        raise ValidationError(f"invalid MAC {value!r}: multicast bit set")
    if not first & 0x02:
        raise ValidationError(f"invalid MAC {value!r}: must be locally administered (bit 0x02)")
    return mac


def random_mac() -> str:
    """A random locally administered unicast MAC.

    Random rather than derived from the IP: when an IP is released on one host
    and reused on another, a fresh MAC means no FDB entry anywhere can still
    point the new endpoint's traffic at the old host.
    """
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def stable_mac(*parts: str) -> str:
    """A locally administered unicast MAC derived from `parts` (used for bridges)."""
    digest = bytearray(hashlib.sha256("\0".join(parts).encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(data: dict[str, Any], key: str, kind: str) -> Any:
    if key not in data:
        raise ValidationError(f"{kind} record is missing field {key!r}")
    return data[key]


def _as_dict(data: object, kind: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationError(f"{kind} record must be an object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Network:
    name: str
    vni: int
    subnet: IPv4Network
    gateway: IPv4Address | None = None
    mtu: int | None = None  # None: every host uses its underlay MTU minus the VXLAN overhead
    mode: str = MODE_VXLAN
    egress: str = EGRESS_NONE

    def __post_init__(self) -> None:
        validate_name(self.name, "network name")
        validate_vni(self.vni)
        object.__setattr__(self, "subnet", parse_subnet(self.subnet))
        if self.gateway is not None:
            gw = parse_ipv4(self.gateway, "gateway")
            object.__setattr__(self, "gateway", gw)
            if not self.is_host_address(gw):
                raise ValidationError(f"gateway {gw} is not a usable address in subnet {self.subnet}")
        if self.mtu is not None:
            validate_mtu(self.mtu)
        if self.mode not in MODES:
            raise ValidationError(f"invalid mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.egress not in EGRESSES:
            raise ValidationError(f"invalid egress {self.egress!r}: use one of {', '.join(EGRESSES)}")
        if self.gateway is None and self.egress != EGRESS_NONE:
            raise ValidationError(
                f"network {self.name}: egress {self.egress} needs a gateway (give one with --gateway IP): "
                "endpoints leave the overlay through it"
            )
        if self.gateway is None and self.mode == MODE_ROUTED:
            raise ValidationError(
                f"network {self.name}: routed mode needs a gateway (give one with --gateway IP): "
                "each host's gateway routes to the other hosts' endpoints"
            )
        if self.egress == EGRESS_NAT and self.mode == MODE_VXLAN and self.vni > EGRESS_VNI_MAX:
            raise ValidationError(
                f"invalid VNI {self.vni} for a network with egress: must be at most {EGRESS_VNI_MAX} "
                "(its uplink address on every host is derived from it)"
            )

    @property
    def routed(self) -> bool:
        return self.mode == MODE_ROUTED

    @property
    def nat(self) -> bool:
        return self.egress == EGRESS_NAT

    def is_host_address(self, ip: IPv4Address) -> bool:
        return ip in self.subnet and ip not in (self.subnet.network_address, self.subnet.broadcast_address)

    def check_endpoint_ip(self, ip: IPv4Address) -> None:
        if not self.is_host_address(ip):
            raise ValidationError(f"IP {ip} is not a usable address in network {self.name} ({self.subnet})")
        if ip == self.gateway:
            raise ValidationError(f"IP {ip} is the gateway of network {self.name}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vni": self.vni,
            "subnet": str(self.subnet),
            "gateway": str(self.gateway) if self.gateway else None,
            "mtu": self.mtu,
            "mode": self.mode,
            "egress": self.egress,
        }

    @classmethod
    def from_dict(cls, data: object) -> Network:
        d = _as_dict(data, "network")
        gateway = d.get("gateway")
        return cls(
            name=_require(d, "name", "network"),
            vni=_require(d, "vni", "network"),
            subnet=parse_subnet(_require(d, "subnet", "network")),
            gateway=parse_ipv4(gateway, "gateway") if gateway is not None else None,
            mtu=d.get("mtu"),
            # Records written before modes and egress existed are VXLAN networks without egress.
            mode=d.get("mode", MODE_VXLAN),
            egress=d.get("egress", EGRESS_NONE),
        )


@dataclass(frozen=True)
class Node:
    name: str
    vtep: IPv4Address
    started_at: float

    def __post_init__(self) -> None:
        validate_name(self.name, "node name")
        object.__setattr__(self, "vtep", parse_ipv4(self.vtep, "VTEP address"))
        if not _is_number(self.started_at):
            raise ValidationError(f"invalid started_at {self.started_at!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vtep": str(self.vtep), "started_at": self.started_at}

    @classmethod
    def from_dict(cls, data: object) -> Node:
        d = _as_dict(data, "node")
        return cls(
            name=_require(d, "name", "node"),
            vtep=parse_ipv4(_require(d, "vtep", "node"), "VTEP address"),
            started_at=_require(d, "started_at", "node"),
        )


# Slots: a daemon holds one per endpoint in the cluster (tens of thousands); without
# an instance dict each is ~250 bytes smaller and one object fewer for the collector.
@dataclass(frozen=True, slots=True)
class Endpoint:
    network: str
    name: str
    ip: IPv4Address
    mac: str
    owner: str
    version: int = 1
    # Wall-clock time at the owner when this version was made; the
    # convergence-latency histogram measures from here to "programmed".
    created_at: float = 0.0
    # Where the endpoint lives on its owner (namespace name or path, interface name).
    netns: str = ""
    ifname: str = "eth0"
    # "network/name", computed once: it is looked up several times per change.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        network, name, owner, ip, mac, created_at, _version = _checked_endpoint(
            self.network, self.name, self.owner, self.ip, self.mac, self.created_at, self.version
        )
        # The checked names are the shared copies of equal ones (`validate_name`).
        object.__setattr__(self, "network", network)
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "key", endpoint_key(network, name))
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "mac", mac)
        object.__setattr__(self, "created_at", created_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "name": self.name,
            "ip": str(self.ip),
            "mac": self.mac,
            "owner": self.owner,
            "version": self.version,
            "created_at": self.created_at,
            "netns": self.netns,
            "ifname": self.ifname,
        }

    @classmethod
    def from_dict(cls, data: object) -> Endpoint:
        if data.__class__ is dict:
            ep = cls.from_common_dict(data)
            if ep is not None:
                return ep
        d = _as_dict(data, "endpoint")
        # Each field is checked once, in the order from_dict always checked them, and the
        # record built without checking them again (`_checked`). Network, owner and interface
        # names repeat across records: each record keeps a shared copy (`validate_name`,
        # `sys.intern`), not its own.
        network = validate_name(_require(d, "network", "endpoint"), "network name")
        name = _require(d, "name", "endpoint")
        ip = parse_ipv4(_require(d, "ip", "endpoint"), "endpoint IP")
        mac = _require(d, "mac", "endpoint")
        owner = validate_name(_require(d, "owner", "endpoint"), "owner node name")
        network, name, owner, ip, mac, created_at, version = _checked_endpoint(
            network, name, owner, ip, mac, d.get("created_at", 0.0), d.get("version", 1)
        )
        return cls._checked(
            network,
            name,
            ip,
            mac,
            owner,
            version,
            created_at,
            sys.intern(str(d.get("netns") or "")),
            sys.intern(str(d.get("ifname") or "eth0")),
        )

    @classmethod
    def from_common_dict(cls, d: dict[str, Any]) -> Endpoint | None:
        """The record `d` holds if it has the shape every writer of ours gives it, checked
        inline; None for anything else, valid or not, which `from_dict`'s checks then
        accept or reject with the field named. A join decodes thousands of records in a
        row: their network and owner are names checked before (`_VALID_NAMES`), the
        rest is matched here without a call per field.
        """
        get = d.get
        network, owner, name, mac = get("network"), get("owner"), get("name"), get("mac")
        ip, created_at, version = get("ip"), get("created_at", 0.0), get("version", 1)
        netns, ifname = get("netns") or "", get("ifname") or "eth0"
        if not (
            network.__class__ is str
            and owner.__class__ is str
            and name.__class__ is str
            and mac.__class__ is str
            and ip.__class__ is str
            and created_at.__class__ is float
            and version.__class__ is int
            and netns.__class__ is str
            and ifname.__class__ is str
        ):
            return None
        if not _NAME_RE.fullmatch(name) or not _UNICAST_LAA_RE.fullmatch(mac):
            return None
        return cls.from_shaped_fields(network, owner, name, mac, ip, created_at, version, netns, ifname)

    @classmethod
    def from_shaped_fields(
        cls,
        network: str,
        owner: str,
        name: str,
        mac: str,
        ip: str,
        created_at: float,
        version: int,
        netns: str,
        ifname: str,
    ) -> Endpoint | None:
        """`from_common_dict` once each field is known to be of its type (`netns` and
        `ifname` with their defaults applied) and `name` to match `NAME_PATTERN` and `mac`
        `UNICAST_LAA_PATTERN` (a decoder that matched them already)."""
        network_, owner_ = _VALID_NAMES.get(network), _VALID_NAMES.get(owner)
        if version < 1 or network_ is None or owner_ is None:
            return None
        try:
            packed = socket.inet_pton(socket.AF_INET, ip)
        except OSError:
            return None
        return cls._checked(
            network_,
            name,
            Ip4._of_int(int.from_bytes(packed, "big")),
            mac,
            owner_,
            version,
            created_at,
            sys.intern(netns),
            sys.intern(ifname),
        )

    @classmethod
    def _checked(
        cls,
        network: str,
        name: str,
        ip: IPv4Address,
        mac: str,
        owner: str,
        version: int,
        created_at: float,
        netns: str,
        ifname: str,
    ) -> Endpoint:
        """A record of fields `_checked_endpoint` has already passed (and normalised)."""
        # Filled in as an `_OpenEndpoint` by plain attribute stores, then made the frozen
        # record it is from then on. `object.__setattr__` on the frozen class costs a
        # wrapper call (~1,000 instructions) per field; a join decodes thousands of these.
        ep: Any = object.__new__(_OpenEndpoint)
        ep.network = network
        ep.name = name
        ep.ip = ip
        ep.mac = mac
        ep.owner = owner
        ep.version = version
        ep.created_at = created_at
        ep.netns = netns
        ep.ifname = ifname
        ep.key = f"{network}/{name}"
        ep.__class__ = cls
        return cast(Endpoint, ep)


def open_twin(cls: type) -> type:
    """A subclass of the slotted frozen dataclass `cls` with its very layout (no slot added)
    and object's own attribute store and delete. An instance made as the twin, filled in
    with plain stores, and then assigned the class `cls` (which CPython allows for equal
    layouts) is a `cls` like any other, frozen from then on; nothing else sees the twin.

    For the few records made per endpoint of a join: `object.__setattr__` on a frozen
    class goes through a wrapper call per field (~1,000 instructions each). Both
    `__setattr__` and `__delattr__` are object's own, so the twin keeps the generic
    attribute store slot (with one of them inherited from the frozen class, every store
    would call through Python)."""
    if "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} has an instance dict: set its fields through it")
    return type(
        f"_Open{cls.__name__}",
        (cls,),
        {"__slots__": (), "__setattr__": object.__setattr__, "__delattr__": object.__delattr__},
    )


_OpenEndpoint = open_twin(Endpoint)


def _checked_endpoint(
    network: object, name: object, owner: object, ip: object, mac: object, created_at: object, version: object
) -> tuple[str, str, str, IPv4Address, str, float, int]:
    """An endpoint's fields checked (each error names its field) and normalised."""
    checked_network = validate_name(network, "network name")
    checked_name = _valid_name(name, "endpoint name")  # one per endpoint: nothing to share, not remembered
    checked_owner = validate_name(owner, "owner node name")
    checked_ip = parse_ipv4(ip, "endpoint IP")
    checked_mac = parse_mac(mac)
    if isinstance(created_at, bool) or not isinstance(created_at, int | float):
        raise ValidationError(f"invalid created_at {created_at!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValidationError(f"invalid endpoint version {version!r}")
    return checked_network, checked_name, checked_owner, checked_ip, checked_mac, float(created_at), version


def routed_overlap(network: Network, others: Iterable[Network]) -> Network | None:
    """Another routed network whose subnet overlaps `network`'s, if `network` is routed (first by name)."""
    if not network.routed:
        return None
    clashes = [n for n in others if n.routed and n.name != network.name and n.subnet.overlaps(network.subnet)]
    return min(clashes, key=lambda n: n.name) if clashes else None


def endpoint_key(network: str, name: str) -> str:
    return f"{network}/{name}"


def usable_ips(network: Network) -> list[IPv4Address]:
    """Addresses an endpoint may take: hosts of the subnet minus the gateway."""
    return [ip for ip in network.subnet.hosts() if ip != network.gateway]


def first_free_ip(network: Network, taken: set[IPv4Address]) -> IPv4Address:
    for ip in network.subnet.hosts():
        if ip != network.gateway and ip not in taken:
            return ip
    raise ValidationError(f"network {network.name} ({network.subnet}) has no free address")


def is_ipv4_network(value: str) -> bool:
    try:
        ipaddress.IPv4Network(value)
    except ValueError:
        return False
    return True
