"""The merged cluster view: what this daemon believes the cluster looks like.

Pure: no I/O. Facts come in (`NetworkPut`, `EndpointDeleted`, ...) from the
store watch, and `ClusterView.apply` says whether the view changed, so the
caller knows when the reconciler has work to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TypeVar

from overlayd.model import Endpoint, Network, Node

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class NetworkPut:
    network: Network


@dataclass(frozen=True)
class NetworkDeleted:
    name: str


@dataclass(frozen=True)
class NodePut:
    node: Node


@dataclass(frozen=True)
class NodeDeleted:
    name: str


@dataclass(frozen=True)
class EndpointPut:
    endpoint: Endpoint


@dataclass(frozen=True)
class EndpointDeleted:
    key: str  # "network/name"


Fact = NetworkPut | NetworkDeleted | NodePut | NodeDeleted | EndpointPut | EndpointDeleted


@dataclass
class ClusterView:
    """Networks, nodes and endpoints as last heard, keyed by name / "network/name"."""

    networks: dict[str, Network] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def apply(self, fact: Fact) -> bool:
        """Apply one fact; True if the view changed."""
        match fact:
            case NetworkPut(network):
                return _put(self.networks, network.name, network)
            case NetworkDeleted(name):
                return self.networks.pop(name, None) is not None
            case NodePut(node):
                return _put(self.nodes, node.name, node)
            case NodeDeleted(name):
                return self.nodes.pop(name, None) is not None
            case EndpointPut(endpoint):
                return _put(self.endpoints, endpoint.key, endpoint)
            case EndpointDeleted(key):
                return self.endpoints.pop(key, None) is not None
        raise TypeError(f"unknown fact {fact!r}")

    def replace_all(self, facts: list[Fact]) -> bool:
        """Make the view exactly what `facts` describe (a full re-list); True if it changed."""
        fresh = ClusterView()
        for fact in facts:
            fresh.apply(fact)
        changed = (fresh.networks, fresh.nodes, fresh.endpoints) != (
            self.networks,
            self.nodes,
            self.endpoints,
        )
        self.networks, self.nodes, self.endpoints = fresh.networks, fresh.nodes, fresh.endpoints
        return changed

    def endpoints_in(self, network: str) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.network == network]

    def taken_ips(self, network: str) -> set[IPv4Address]:
        return {ep.ip for ep in self.endpoints.values() if ep.network == network}

    def owned_by(self, node: str) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.owner == node]


def _put(table: dict[K, V], key: K, value: V) -> bool:
    if table.get(key) == value:
        return False
    table[key] = value
    return True
