"""The merged cluster view: what this daemon believes the cluster looks like.

Pure: no I/O. Facts come in (`NetworkPut`, `EndpointDeleted`, ...) and every
change to the view comes out as one typed delta (`EndpointChanged` with the
old and the new record, ...), so whoever follows the view (desired state,
gauges, allocation) updates in proportion to the change, never by scanning
everything. `apply` keeps the older "did it change?" answer for callers that
only need that.

Which fact may enter the view (a store record, a gossip record, this host's
own) is not decided here: that is `overlayd.core.admission`. The view indexes what
it holds by network, by owner and by address, so those questions cost
O(answer), not O(all endpoints).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import MappingProxyType
from typing import Any, cast

from overlayd.core.model import Endpoint, Network, Node, open_twin

# --- facts: what a source says ------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkPut:
    network: Network


@dataclass(frozen=True, slots=True)
class NetworkDeleted:
    name: str


@dataclass(frozen=True, slots=True)
class NodePut:
    node: Node


@dataclass(frozen=True, slots=True)
class NodeDeleted:
    name: str


@dataclass(frozen=True, slots=True)
class EndpointPut:
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class EndpointDeleted:
    key: str  # "network/name"


Fact = NetworkPut | NetworkDeleted | NodePut | NodeDeleted | EndpointPut | EndpointDeleted


# --- deltas: how the view changed ---------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkChanged:
    """A network appeared (old None), changed, or went away (new None)."""

    old: Network | None
    new: Network | None

    @property
    def name(self) -> str:
        record = self.new or self.old
        assert record is not None
        return record.name


@dataclass(frozen=True, slots=True)
class NodeChanged:
    old: Node | None
    new: Node | None

    @property
    def name(self) -> str:
        record = self.new or self.old
        assert record is not None
        return record.name


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    old: Endpoint | None
    new: Endpoint | None

    @property
    def key(self) -> str:
        record = self.new or self.old
        assert record is not None
        return record.key


Delta = NetworkChanged | NodeChanged | EndpointChanged


# One EndpointPut per record decoded from the store and one EndpointChanged per change of
# the view: made as `Endpoint._checked` makes records (`model.open_twin`), a wrapper call
# less per field.
_OpenEndpointPut = open_twin(EndpointPut)
_OpenEndpointChanged = open_twin(EndpointChanged)


def endpoint_put(endpoint: Endpoint) -> EndpointPut:
    """`EndpointPut(endpoint)`."""
    fact: Any = object.__new__(_OpenEndpointPut)
    fact.endpoint = endpoint
    fact.__class__ = EndpointPut
    return cast(EndpointPut, fact)


def endpoint_changed(old: Endpoint | None, new: Endpoint | None) -> EndpointChanged:
    """`EndpointChanged(old, new)`."""
    delta: Any = object.__new__(_OpenEndpointChanged)
    delta.old = old
    delta.new = new
    delta.__class__ = EndpointChanged
    return cast(EndpointChanged, delta)


_EMPTY: Mapping[str, Endpoint] = MappingProxyType({})


@dataclass
class ClusterView:
    """Networks, nodes and endpoints as last heard, keyed by name / "network/name".

    Read the three tables freely; change them only through `put_*`/`remove_*`,
    `change`/`apply` or `replace_all`, which keep the indexes right.
    """

    networks: dict[str, Network] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    # network -> key -> endpoint; owner -> keys; (network, ip) -> keys holding it.
    _members: dict[str, dict[str, Endpoint]] = field(default_factory=dict, repr=False)
    _owned: dict[str, dict[str, None]] = field(default_factory=dict, repr=False)
    # One holder (the rule) is kept as its key, several as a list of keys, oldest first:
    # a list per endpoint would cost ~90 bytes and one more object for the collector.
    _ips: dict[tuple[str, IPv4Address], str | list[str]] = field(default_factory=dict, repr=False)

    # --- changing ---

    def change(self, fact: Fact) -> Delta | None:
        """Apply one fact; the delta it made, or None if the view already said so."""
        match fact:
            case NetworkPut(network):
                return self.put_network(network)
            case NetworkDeleted(name):
                return self.remove_network(name)
            case NodePut(node):
                return self.put_node(node)
            case NodeDeleted(name):
                return self.remove_node(name)
            case EndpointPut(endpoint):
                return self.put_endpoint(endpoint)
            case EndpointDeleted(key):
                return self.remove_endpoint(key)
        raise TypeError(f"unknown fact {fact!r}")

    def apply(self, fact: Fact) -> bool:
        """Apply one fact; True if the view changed."""
        return self.change(fact) is not None

    def put_network(self, network: Network) -> NetworkChanged | None:
        old = self.networks.get(network.name)
        if old == network:
            return None
        self.networks[network.name] = network
        return NetworkChanged(old, network)

    def remove_network(self, name: str) -> NetworkChanged | None:
        old = self.networks.pop(name, None)
        return None if old is None else NetworkChanged(old, None)

    def put_node(self, node: Node) -> NodeChanged | None:
        old = self.nodes.get(node.name)
        if old == node:
            return None
        self.nodes[node.name] = node
        return NodeChanged(old, node)

    def remove_node(self, name: str) -> NodeChanged | None:
        old = self.nodes.pop(name, None)
        return None if old is None else NodeChanged(old, None)

    def put_endpoint(self, endpoint: Endpoint) -> EndpointChanged | None:
        key = endpoint.key
        old = self.endpoints.get(key)
        if old is not None:  # (not `old == endpoint` first: None == a record is a slow False)
            if old == endpoint:
                return None
            self._unindex(old)
        self.endpoints[key] = endpoint
        self._index(endpoint)
        return endpoint_changed(old, endpoint)

    def remove_endpoint(self, key: str) -> EndpointChanged | None:
        old = self.endpoints.pop(key, None)
        if old is None:
            return None
        self._unindex(old)
        return endpoint_changed(old, None)

    def replace_all(self, facts: Iterable[Fact]) -> bool:
        """Make the view exactly what `facts` describe (a full re-list); True if it changed."""
        return bool(self.replace_with(facts))

    def replace_with(self, facts: Iterable[Fact]) -> list[Delta]:
        """Make the view exactly what `facts` describe; the deltas that took.

        Deletes in `facts` apply in order (a put then a delete of one key
        leaves nothing). Puts come before removals in the result, networks
        and nodes before endpoints, so a follower never sees an endpoint of
        a network it does not know yet.
        """
        fresh = ClusterView()
        for fact in facts:
            fresh.apply(fact)
        deltas: list[Delta] = []
        for network in fresh.networks.values():
            if (d := self.put_network(network)) is not None:
                deltas.append(d)
        for node in fresh.nodes.values():
            if (n := self.put_node(node)) is not None:
                deltas.append(n)
        for endpoint in fresh.endpoints.values():
            if (e := self.put_endpoint(endpoint)) is not None:
                deltas.append(e)
        for key in [k for k in self.endpoints if k not in fresh.endpoints]:
            if (e := self.remove_endpoint(key)) is not None:
                deltas.append(e)
        for name in [k for k in self.nodes if k not in fresh.nodes]:
            if (n := self.remove_node(name)) is not None:
                deltas.append(n)
        for name in [k for k in self.networks if k not in fresh.networks]:
            if (d := self.remove_network(name)) is not None:
                deltas.append(d)
        return deltas

    def _index(self, ep: Endpoint) -> None:
        key = ep.key
        # get, not setdefault: setdefault makes an empty dict per call, kept or not.
        members = self._members.get(ep.network)
        if members is None:
            members = self._members[ep.network] = {}
        members[key] = ep
        owned = self._owned.get(ep.owner)
        if owned is None:
            owned = self._owned[ep.owner] = {}
        owned[key] = None
        where = (ep.network, ep.ip)
        holders = self._ips.get(where)
        if holders is None:
            self._ips[where] = key
        elif isinstance(holders, str):
            self._ips[where] = [holders, key]
        else:
            holders.append(key)

    def _unindex(self, ep: Endpoint) -> None:
        key = ep.key
        members = self._members.get(ep.network)
        if members is not None:
            members.pop(key, None)
            if not members:
                del self._members[ep.network]
        owned = self._owned.get(ep.owner)
        if owned is not None:
            owned.pop(key, None)
            if not owned:
                del self._owned[ep.owner]
        where = (ep.network, ep.ip)
        holders = self._ips.get(where)
        if holders is None:
            return
        if isinstance(holders, str):
            if holders == key:
                del self._ips[where]
            return
        if key in holders:
            holders.remove(key)
        if len(holders) == 1:
            self._ips[where] = holders[0]
        elif not holders:
            del self._ips[where]

    # --- asking (each O(answer)) ---

    def members(self, network: str) -> Mapping[str, Endpoint]:
        """The endpoints of `network` by key (a live, read-only mapping)."""
        members = self._members.get(network)
        return MappingProxyType(members) if members is not None else _EMPTY

    def endpoints_in(self, network: str) -> list[Endpoint]:
        return list(self._members.get(network, {}).values())

    def count_in(self, network: str) -> int:
        return len(self._members.get(network, ()))

    def taken_ips(self, network: str) -> set[IPv4Address]:
        return {ep.ip for ep in self._members.get(network, {}).values()}

    def ip_holder(self, network: str, ip: IPv4Address) -> str | None:
        """The key of an endpoint holding `ip` in `network`, or None."""
        holders = self._ips.get((network, ip))
        if holders is None or isinstance(holders, str):
            return holders
        return holders[-1] if holders else None

    def owned_by(self, node: str) -> list[Endpoint]:
        return [self.endpoints[key] for key in self._owned.get(node, ())]

    def count_owned(self, node: str) -> int:
        return len(self._owned.get(node, ()))

    def owners(self) -> dict[str, int]:
        """Endpoint count per owner."""
        return {owner: len(keys) for owner, keys in self._owned.items()}
