"""overlayd's records over the gossip layer.

`Peering` owns this daemon's `GossipNode` and speaks Network/Node/Endpoint:
it publishes what this host owns, and turns what peers say into the same
facts the KV watch produces. What a peer may say is checked: a node record
must be the sender's own, an endpoint must be owned by its publisher, every
payload goes through the model's validation. Anything else is counted and
dropped.

`derive()` computes the cluster view as gossip tells it, with the rules that
make concurrent, uncoordinated writers agree without a KV store:

- several records for one network name, or one VNI: the oldest
  (created_at, owner, name) wins everywhere;
- a `network-removed` marker hides a network created at or before it;
- several endpoints for one key or one IP in a network: the oldest wins;
- records of an owner in `excluded` (dead past its grace period) are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from overlayd.config import GossipSettings
from overlayd.gossip import GossipConfig, GossipMetrics, GossipNode, Keyring, MemberInfo, Record
from overlayd.model import Endpoint, Network, Node, ValidationError
from overlayd.state import ClusterView, EndpointPut, Fact, NetworkPut, NodePut

log = logging.getLogger(__name__)

NODE, NETWORK, NETWORK_REMOVED, ENDPOINT = "node", "network", "network-removed", "endpoint"


@dataclass
class Derived:
    """The view gossip gives, plus what lost a conflict (to tell the losers)."""

    view: ClusterView = field(default_factory=ClusterView)
    lost_networks: dict[str, str] = field(default_factory=dict)  # "owner/name" -> why
    lost_endpoints: dict[str, str] = field(default_factory=dict)  # "owner/net/name" -> why


class Peering:
    def __init__(
        self,
        *,
        node_name: str,
        settings: GossipSettings,
        advertise: IPv4Address,
        registry: Any,  # prometheus CollectorRegistry of the daemon
        on_record: Callable[[Record], None],
        on_member: Callable[[MemberInfo], None] | None = None,
    ) -> None:
        self.name = node_name
        self.settings = settings
        keyring = Keyring.from_base64(list(settings.keys)) if settings.keys else Keyring.insecure()
        self.metrics = GossipMetrics(registry)
        self._on_record = on_record
        self.invalid = 0
        self.node = GossipNode(
            node_name,
            keyring=keyring,
            bind=settings.bind or str(advertise),
            port=settings.port,
            advertise=settings.bind or str(advertise),
            seeds=settings.peers,
            on_change=self._changed,
            on_member=on_member,
            metrics=self.metrics,
            config=GossipConfig(
                probe_interval=settings.probe_interval,
                probe_timeout=min(0.5, settings.probe_interval / 2),
                anti_entropy_interval=settings.anti_entropy_interval,
                tombstone_ttl=settings.tombstone_ttl,
                mtu=settings.mtu,
            ),
        )

    async def start(self) -> None:
        await self.node.start()

    async def stop(self, *, leave: bool) -> None:
        await self.node.stop(leave=leave)

    def _changed(self, record: Record) -> None:
        self._on_record(record)

    # --- what this host says ---

    def publish_node(self, node: Node) -> None:
        self.node.publish(NODE, node.name, node.to_dict())

    def publish_endpoint(self, endpoint: Endpoint) -> None:
        self.node.publish(ENDPOINT, endpoint.key, endpoint.to_dict())

    def delete_endpoint(self, key: str) -> None:
        self.node.delete(ENDPOINT, key)

    def publish_network(self, network: Network, created_at: float) -> None:
        self.node.publish(NETWORK, network.name, {**network.to_dict(), "created_at": created_at})

    def delete_network(self, name: str) -> None:
        self.node.delete(NETWORK, name)

    def remove_network(self, name: str, created_at: float) -> None:
        """Hide every record of network `name` created at or before `created_at`, whoever owns it."""
        self.node.publish(NETWORK_REMOVED, name, {"name": name, "created_at": created_at})

    def add_seeds(self, addrs: Iterable[tuple[str, int]]) -> None:
        self.node.add_seeds(addrs)

    def members(self) -> list[MemberInfo]:
        return self.node.members()

    # --- what gossip says ---

    def to_fact(self, record: Record) -> Fact | None:
        """A live record as a fact, or None (tombstone, marker, or invalid: counted)."""
        if record.payload is None:
            return None
        try:
            if record.kind == NODE:
                node = Node.from_dict(record.payload)
                _check(node.name == record.owner == record.key, "node record not its sender's own")
                return NodePut(node)
            if record.kind == ENDPOINT:
                endpoint = Endpoint.from_dict(record.payload)
                _check(endpoint.owner == record.owner, "endpoint not owned by its publisher")
                _check(endpoint.key == record.key, "endpoint key mismatch")
                return EndpointPut(endpoint)
            if record.kind == NETWORK:
                network = Network.from_dict(record.payload)
                _check(network.name == record.key, "network key mismatch")
                return NetworkPut(network)
            if record.kind == NETWORK_REMOVED:
                return None
        except (ValidationError, ValueError, TypeError) as exc:
            self.invalid += 1
            log.warning(
                "gossip: dropping invalid %s record %s from %s: %s",
                record.kind,
                record.key,
                record.owner,
                exc,
            )
            return None
        self.invalid += 1
        log.warning("gossip: dropping record of unknown kind %r from %s", record.kind, record.owner)
        return None

    def derive(
        self, *, excluded: frozenset[str] | set[str] = frozenset(), with_networks: bool = True
    ) -> Derived:
        out = Derived()
        removed: dict[str, float] = {}
        networks: list[tuple[tuple[float, str, str], Network, str]] = []
        endpoints: list[tuple[tuple[float, str, str], Endpoint]] = []
        for record in self.node.records():
            if record.owner in excluded:
                continue
            if record.kind == NETWORK_REMOVED and record.payload is not None:
                at = _float(record.payload.get("created_at"))
                removed[record.key] = max(removed.get(record.key, 0.0), at)
                continue
            fact = self.to_fact(record)
            match fact:
                case NodePut(node):
                    out.view.nodes[node.name] = node
                case NetworkPut(network) if with_networks:
                    at = _float(record.payload.get("created_at") if record.payload else 0.0)
                    networks.append(((at, record.owner, network.name), network, record.owner))
                case EndpointPut(endpoint):
                    endpoints.append(((endpoint.created_at, endpoint.owner, endpoint.name), endpoint))
        by_vni: dict[int, str] = {}
        for (at, owner, name), network, _ in sorted(networks, key=lambda item: item[0]):
            if at <= removed.get(name, -1.0):
                continue
            if name in out.view.networks:
                out.lost_networks[f"{owner}/{name}"] = f"network {name} already exists"
            elif network.vni in by_vni:
                out.lost_networks[f"{owner}/{name}"] = (
                    f"VNI {network.vni} is already used by network {by_vni[network.vni]}"
                )
            else:
                out.view.networks[name] = network
                by_vni[network.vni] = name
        taken: dict[tuple[str, IPv4Address], str] = {}
        for _, endpoint in sorted(endpoints, key=lambda item: item[0]):
            ident = f"{endpoint.owner}/{endpoint.key}"
            if endpoint.key in out.view.endpoints:
                out.lost_endpoints[ident] = f"endpoint {endpoint.key} already exists"
            elif (endpoint.network, endpoint.ip) in taken:
                holder = taken[(endpoint.network, endpoint.ip)]
                out.lost_endpoints[ident] = f"IP {endpoint.ip} is already taken (held by {holder})"
            else:
                out.view.endpoints[endpoint.key] = endpoint
                taken[(endpoint.network, endpoint.ip)] = endpoint.key
        return out


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(why)


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
