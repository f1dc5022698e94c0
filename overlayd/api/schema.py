"""The admin API's and /status's answers, as typed records: the one contract of daemon and clients.

Every answer the daemon gives has a frozen dataclass here. `to_json()` gives
exactly the JSON the daemon sends (same keys, same order, keys that are only
sometimes there left out the same way), and `from_json()` checks an answer
and raises one `SchemaError` whose message names the field at fault, e.g.
`status.store.healthy: must be true or false, got a string`.

Clients (`overlayctl`, the CNI plugin, `doctor`, the lab) read answers only
through these classes; the daemon builds its answers from them.

Pure: the standard library and nothing else, so the CNI plugin, exec'd for
every container, pays next to nothing to import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, TypeVar, cast

T = TypeVar("T")

JSONObject = dict[str, Any]

# A field marked so is left out of the JSON when it is None (the daemon sends it only sometimes).
_OPTIONAL_KEY: Mapping[str, bool] = {"omit_none": True}


class SchemaError(ValueError):
    """An answer that does not have the documented shape; the message is one line naming the field."""


# --- reading ------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Fields:
    """One JSON object being read: typed getters that say which field is wrong, then `done()`."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: must be an object, got {_json_type(data)}")
        self._data: dict[str, Any] = data
        self._where = where
        self._read: set[str] = set()

    def _path(self, key: str) -> str:
        return f"{self._where}.{key}"

    def _bad(self, key: str, wanted: str) -> SchemaError:
        return SchemaError(f"{self._path(key)}: must be {wanted}, got {_json_type(self._data[key])}")

    def has(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str) -> Any:
        self._read.add(key)
        if key not in self._data:
            raise SchemaError(f"{self._where}: missing field {key!r}")
        return self._data[key]

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        # bool is an int in Python, but never a count or a port.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def optional(self, key: str, read: Callable[[str], T], *, absent_ok: bool = False) -> T | None:
        """`read(key)` unless the value is null (or, with `absent_ok`, the key is missing)."""
        if absent_ok and key not in self._data:
            return None
        if self._get(key) is None:
            return None
        return read(key)

    def parsed(self, key: str, parse: Callable[[str], T], wanted: str) -> T:
        """A string turned into a value by `parse` (an address, a subnet)."""
        text = self.text(key)
        try:
            return parse(text)
        except ValueError:
            raise SchemaError(f"{self._path(key)}: must be {wanted}, got {text!r}") from None

    def texts(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return tuple(value)

    def record(self, key: str, parse: Callable[[object, str], T]) -> T:
        return parse(self._get(key), self._path(key))

    def records(self, key: str, parse: Callable[[object, str], T]) -> tuple[T, ...]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        return tuple(parse(item, f"{self._path(key)}[{i}]") for i, item in enumerate(value))

    def counts(self, key: str) -> dict[str, int]:
        value = self._get(key)
        if not isinstance(value, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value.values()
        ):
            raise self._bad(key, "an object of integers")
        return dict(value)

    def done(self) -> None:
        """No field left unread: an unknown one means the two sides disagree on the schema."""
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise SchemaError(f"{self._where}: unknown field {unknown[0]!r}")


def _list_of(data: object, where: str, parse: Callable[[object, str], T]) -> tuple[T, ...]:
    if not isinstance(data, list):
        raise SchemaError(f"{where}: must be a list, got {_json_type(data)}")
    return tuple(parse(item, f"{where}[{i}]") for i, item in enumerate(data))


# --- writing ------------------------------------------------------------------


def _plain(value: object) -> object:
    if isinstance(value, _Record):
        return value.to_json()
    if isinstance(value, IPv4Address | IPv4Network | IPv4Interface):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Record:
    """to_json() for the dataclasses below: fields in order, optional keys left out when None."""

    def to_json(self) -> JSONObject:
        out: JSONObject = {}
        for f in dataclasses.fields(cast(Any, self)):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _plain(value)
        return out


def _ipv4(text: str) -> IPv4Address:
    return IPv4Address(text)


def _subnet(text: str) -> IPv4Network:
    return IPv4Network(text, strict=True)


def _interface(text: str) -> IPv4Interface:
    return IPv4Interface(text)


# --- /v1/status ---------------------------------------------------------------


@dataclass(frozen=True)
class Underlay(_Record):
    interface: str
    mtu: int

    @classmethod
    def from_json(cls, data: object, where: str = "underlay") -> Underlay:
        f = _Fields(data, where)
        made = cls(interface=f.text("interface"), mtu=f.integer("mtu"))
        f.done()
        return made


@dataclass(frozen=True)
class StoreStatus(_Record):
    url: str  # scheme and addresses only; "gossip" in gossip-only mode
    healthy: bool
    synced: bool
    latency_ms: float | None  # of the last store probe (`overlayctl doctor`); None before one
    invalid_records: tuple[str, ...]
    pending_writes: int  # own changes made while the store was unreachable, not yet written
    # The last time the store lost its data (or was restored from an older backup) and
    # this host re-published its records and the networks: "when: why"; None if never.
    data_loss: str | None = field(default=None, metadata=_OPTIONAL_KEY)

    @classmethod
    def from_json(cls, data: object, where: str = "store") -> StoreStatus:
        f = _Fields(data, where)
        made = cls(
            url=f.text("url"),
            healthy=f.flag("healthy"),
            synced=f.flag("synced"),
            latency_ms=f.optional("latency_ms", f.number),
            invalid_records=f.texts("invalid_records"),
            pending_writes=f.integer("pending_writes"),
            data_loss=f.optional("data_loss", f.text, absent_ok=True),
        )
        f.done()
        return made


@dataclass(frozen=True)
class ViewStatus(_Record):
    """Whether the cluster view is complete: until then (a restart), nothing is removed from the kernel."""

    complete: bool
    complete_at: float | None

    @classmethod
    def from_json(cls, data: object, where: str = "view") -> ViewStatus:
        f = _Fields(data, where)
        made = cls(complete=f.flag("complete"), complete_at=f.optional("complete_at", f.number))
        f.done()
        return made


@dataclass(frozen=True)
class GossipStatus(_Record):
    port: int
    members: dict[str, int]  # SWIM state -> how many members are in it
    insecure: bool

    @classmethod
    def from_json(cls, data: object, where: str = "gossip") -> GossipStatus:
        f = _Fields(data, where)
        made = cls(port=f.integer("port"), members=f.counts("members"), insecure=f.flag("insecure"))
        f.done()
        return made


@dataclass(frozen=True)
class EndpointCounts(_Record):
    local: int
    remote: int

    @classmethod
    def from_json(cls, data: object, where: str = "endpoints") -> EndpointCounts:
        f = _Fields(data, where)
        made = cls(local=f.integer("local"), remote=f.integer("remote"))
        f.done()
        return made


@dataclass(frozen=True)
class ReconcilePass(_Record):
    trigger: str
    kind: str  # "incremental" (the dirty keys) or "full" (the whole kernel read and compared)
    started_at: float
    duration_ms: float
    applied: int
    failed: int
    held_deletions: int  # stale entries left in place while the view is not complete

    @classmethod
    def from_json(cls, data: object, where: str = "last_reconcile") -> ReconcilePass:
        f = _Fields(data, where)
        made = cls(
            trigger=f.text("trigger"),
            kind=f.text("kind"),
            started_at=f.number("started_at"),
            duration_ms=f.number("duration_ms"),
            applied=f.integer("applied"),
            failed=f.integer("failed"),
            held_deletions=f.integer("held_deletions"),
        )
        f.done()
        return made


@dataclass(frozen=True)
class Status(_Record):
    """GET /v1/status and the status server's /status."""

    node: str
    vtep: IPv4Address | None
    underlay: Underlay | None
    ready: bool
    started_at: float
    pid: int
    summary: str  # the one line systemd shows as STATUS=
    store: StoreStatus
    view: ViewStatus
    gossip: GossipStatus | None  # None: this daemon does not gossip
    networks: tuple[str, ...]
    nodes: int
    endpoints: EndpointCounts
    last_reconcile: ReconcilePass | None
    last_full_reconcile: ReconcilePass | None
    errors: tuple[str, ...]
    # What the operator should fix that does not stop the daemon (a config holding
    # secrets readable by others); None when there is nothing.
    warnings: tuple[str, ...] | None = field(default=None, metadata=_OPTIONAL_KEY)

    @classmethod
    def from_json(cls, data: object, where: str = "status") -> Status:
        f = _Fields(data, where)
        made = cls(
            node=f.text("node"),
            vtep=f.optional("vtep", lambda k: f.parsed(k, _ipv4, "an IPv4 address")),
            underlay=f.optional("underlay", lambda k: f.record(k, Underlay.from_json)),
            ready=f.flag("ready"),
            started_at=f.number("started_at"),
            pid=f.integer("pid"),
            summary=f.text("summary"),
            store=f.record("store", StoreStatus.from_json),
            view=f.record("view", ViewStatus.from_json),
            gossip=f.optional("gossip", lambda k: f.record(k, GossipStatus.from_json)),
            networks=f.texts("networks"),
            nodes=f.integer("nodes"),
            endpoints=f.record("endpoints", EndpointCounts.from_json),
            last_reconcile=f.optional("last_reconcile", lambda k: f.record(k, ReconcilePass.from_json)),
            last_full_reconcile=f.optional(
                "last_full_reconcile", lambda k: f.record(k, ReconcilePass.from_json)
            ),
            errors=f.texts("errors"),
            warnings=f.optional("warnings", f.texts, absent_ok=True),
        )
        f.done()
        return made


# --- /v1/peers ----------------------------------------------------------------


@dataclass(frozen=True)
class Peer(_Record):
    """One known node (or a gossip member without a node record yet)."""

    name: str
    vtep: str
    started_at: float | None  # None for a member known only to gossip
    endpoints: int
    self: bool
    # With gossip only: the SWIM state ("alive", "suspect", "dead", "unknown") and round trip.
    state: str | None = None
    rtt_ms: float | None = None
    # Seconds this peer's clock is ahead of ours (gossip measures it on every direct probe).
    clock_offset: float | None = None
    # How this host reaches the peer's endpoints in routed networks: "direct" (one underlay
    # segment: routed without encapsulation) or "vxlan" (a routed hop between: the fallback).
    # None for this host itself.
    path: str | None = None

    def to_json(self) -> JSONObject:
        out: JSONObject = {
            "name": self.name,
            "vtep": self.vtep,
            "started_at": self.started_at,
            "endpoints": self.endpoints,
            "self": self.self,
        }
        if self.state is not None:
            # With gossip always there: null until measured.
            out["state"] = self.state
            out["rtt_ms"] = self.rtt_ms
            out["clock_offset"] = self.clock_offset
        elif self.clock_offset is not None:
            out["clock_offset"] = self.clock_offset
        if self.path is not None:
            out["path"] = self.path
        return out

    @classmethod
    def from_json(cls, data: object, where: str = "peer") -> Peer:
        f = _Fields(data, where)
        name = f.text("name")
        vtep = f.text("vtep")
        started_at = f.optional("started_at", f.number)
        endpoints = f.integer("endpoints")
        is_self = f.flag("self")
        state = f.optional("state", f.text, absent_ok=True)
        if state is not None and not f.has("rtt_ms"):
            raise SchemaError(f"{where}: missing field 'rtt_ms' (it comes with 'state')")
        made = cls(
            name=name,
            vtep=vtep,
            started_at=started_at,
            endpoints=endpoints,
            self=is_self,
            state=state,
            rtt_ms=f.optional("rtt_ms", f.number, absent_ok=True),
            clock_offset=f.optional("clock_offset", f.number, absent_ok=True),
            path=f.optional("path", f.text, absent_ok=True),
        )
        f.done()
        return made

    @classmethod
    def list_from_json(cls, data: object, where: str = "peers") -> tuple[Peer, ...]:
        return _list_of(data, where, cls.from_json)


# --- networks and endpoints ---------------------------------------------------


def _network_fields(f: _Fields) -> dict[str, Any]:
    return {
        "name": f.text("name"),
        "vni": f.integer("vni"),
        "subnet": f.parsed("subnet", _subnet, "an IPv4 subnet"),
        "gateway": f.optional("gateway", lambda k: f.parsed(k, _ipv4, "an IPv4 address")),
        "mtu": f.optional("mtu", f.integer),  # None: derived from each host's underlay
        "mode": f.text("mode"),  # "vxlan" or "routed"
        "egress": f.text("egress"),  # "none" or "nat"
    }


@dataclass(frozen=True)
class NetworkInfo(_Record):
    """A network record: the answer to POST /v1/networks."""

    name: str
    vni: int
    subnet: IPv4Network
    gateway: IPv4Address | None
    mtu: int | None
    mode: str
    egress: str

    @classmethod
    def from_json(cls, data: object, where: str = "network") -> NetworkInfo:
        f = _Fields(data, where)
        made = cls(**_network_fields(f))
        f.done()
        return made


@dataclass(frozen=True)
class NetworkListItem(_Record):
    """One network of GET /v1/networks: the record and how many endpoints it has."""

    name: str
    vni: int
    subnet: IPv4Network
    gateway: IPv4Address | None
    mtu: int | None
    mode: str
    egress: str
    endpoints: int

    @classmethod
    def from_json(cls, data: object, where: str = "network") -> NetworkListItem:
        f = _Fields(data, where)
        made = cls(**_network_fields(f), endpoints=f.integer("endpoints"))
        f.done()
        return made

    @classmethod
    def list_from_json(cls, data: object, where: str = "networks") -> tuple[NetworkListItem, ...]:
        return _list_of(data, where, cls.from_json)


@dataclass(frozen=True)
class EndpointInfo(_Record):
    """An endpoint record, as listed, created or shown in a network."""

    network: str
    name: str
    ip: IPv4Address
    mac: str
    owner: str
    version: int
    created_at: float
    netns: str
    ifname: str
    # Set on an own endpoint withdrawn after losing an address clash: why.
    conflict: str | None = field(default=None, metadata=_OPTIONAL_KEY)

    @property
    def key(self) -> str:
        return f"{self.network}/{self.name}"

    @classmethod
    def from_json(cls, data: object, where: str = "endpoint") -> EndpointInfo:
        f = _Fields(data, where)
        made = cls(
            network=f.text("network"),
            name=f.text("name"),
            ip=f.parsed("ip", _ipv4, "an IPv4 address"),
            mac=f.text("mac"),
            owner=f.text("owner"),
            version=f.integer("version"),
            created_at=f.number("created_at"),
            netns=f.text("netns"),
            ifname=f.text("ifname"),
            conflict=f.optional("conflict", f.text, absent_ok=True),
        )
        f.done()
        return made

    @classmethod
    def list_from_json(cls, data: object, where: str = "endpoints") -> tuple[EndpointInfo, ...]:
        return _list_of(data, where, cls.from_json)


@dataclass(frozen=True)
class PeerPath(_Record):
    """How this host reaches one other host's endpoints in a network."""

    node: str
    vtep: str
    path: str  # "direct" (routed, no encapsulation) or "vxlan"

    @classmethod
    def from_json(cls, data: object, where: str = "path") -> PeerPath:
        f = _Fields(data, where)
        made = cls(node=f.text("node"), vtep=f.text("vtep"), path=f.text("path"))
        f.done()
        return made


@dataclass(frozen=True)
class NetworkInspect(_Record):
    """GET /v1/networks/{name}: the record, this host's MTU for it, and its endpoints."""

    name: str
    vni: int
    subnet: IPv4Network
    gateway: IPv4Address | None
    mtu: int | None
    mode: str
    egress: str
    # The MTU this host gives the network's devices; absent before the daemon knows its underlay.
    host_mtu: int | None = field(default=None, metadata=_OPTIONAL_KEY)
    # The namespace that holds this host's gateway for the network (VXLAN mode with egress),
    # absent when there is none here.
    gateway_netns: str | None = field(default=None, metadata=_OPTIONAL_KEY)
    # Per other host with endpoints in the network: routed directly or over VXLAN (absent
    # when there is none).
    paths: tuple[PeerPath, ...] | None = field(default=None, metadata=_OPTIONAL_KEY)
    endpoints: tuple[EndpointInfo, ...] = ()

    @classmethod
    def from_json(cls, data: object, where: str = "network") -> NetworkInspect:
        f = _Fields(data, where)
        made = cls(
            **_network_fields(f),
            host_mtu=f.optional("host_mtu", f.integer, absent_ok=True),
            gateway_netns=f.optional("gateway_netns", f.text, absent_ok=True),
            paths=f.records("paths", PeerPath.from_json) if f.has("paths") else None,
            endpoints=f.records("endpoints", EndpointInfo.from_json),
        )
        f.done()
        return made


@dataclass(frozen=True)
class EndpointCheck(_Record):
    """GET /v1/endpoints/{network}/{name}/check: what the daemon finds in the endpoint's namespace.

    Facts only; the caller (the CNI plugin's CHECK) compares them with the record.
    """

    network: str
    name: str
    netns: str
    ifname: str
    found: bool  # the interface exists in the namespace
    mac: str | None  # None when not found
    up: bool | None
    addresses: tuple[IPv4Interface, ...]  # its IPv4 addresses with prefix length
    error: str | None  # why the namespace could not be read (gone, say); None when it was

    @classmethod
    def from_json(cls, data: object, where: str = "check") -> EndpointCheck:
        f = _Fields(data, where)
        network, name, netns, ifname = f.text("network"), f.text("name"), f.text("netns"), f.text("ifname")
        found, mac, up = f.flag("found"), f.optional("mac", f.text), f.optional("up", f.flag)
        addresses = f.texts("addresses")
        try:
            parsed = tuple(_interface(a) for a in addresses)
        except ValueError:
            raise SchemaError(f"{where}.addresses: must be IPv4 addresses with a prefix length") from None
        error = f.optional("error", f.text)
        f.done()
        return cls(network, name, netns, ifname, found, mac, up, parsed, error)


# --- operations ---------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    """GET /v1/diff: what the reconciler would change now, one line per command."""

    changes: tuple[str, ...]

    def to_json(self) -> list[str]:
        return list(self.changes)

    @classmethod
    def from_json(cls, data: object, where: str = "diff") -> Diff:
        if not isinstance(data, list) or not all(isinstance(line, str) for line in data):
            raise SchemaError(f"{where}: must be a list of strings, got {_json_type(data)}")
        return cls(tuple(data))


@dataclass(frozen=True)
class StoreProbe(_Record):
    """GET /v1/store/probe: one timed read of the cluster view."""

    url: str
    ok: bool
    latency_ms: float | None  # None when it failed
    error: str | None

    @classmethod
    def from_json(cls, data: object, where: str = "store probe") -> StoreProbe:
        f = _Fields(data, where)
        made = cls(
            url=f.text("url"),
            ok=f.flag("ok"),
            latency_ms=f.optional("latency_ms", f.number),
            error=f.optional("error", f.text),
        )
        f.done()
        return made


@dataclass(frozen=True)
class TeardownResult(_Record):
    """POST /v1/teardown: what was removed, whether the lease was released, what failed."""

    node: str
    endpoints_removed: tuple[str, ...]  # "network/name"
    links_removed: tuple[str, ...]
    lease_released: bool
    errors: tuple[str, ...]
    stopping: bool

    @classmethod
    def from_json(cls, data: object, where: str = "teardown") -> TeardownResult:
        f = _Fields(data, where)
        made = cls(
            node=f.text("node"),
            endpoints_removed=f.texts("endpoints_removed"),
            links_removed=f.texts("links_removed"),
            lease_released=f.flag("lease_released"),
            errors=f.texts("errors"),
            stopping=f.flag("stopping"),
        )
        f.done()
        return made
