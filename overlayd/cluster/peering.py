"""overlayd's records over the gossip layer.

`Peering` owns this daemon's `GossipNode` and speaks Network/Node/Endpoint:
it publishes what this host owns, and turns each record a peer publishes
into one gossip fact for the admission (`overlayd.core.admission`), which alone
decides what enters the view. What a peer may say is checked: a node record
must be the sender's own, an endpoint must be owned by its publisher, every
payload goes through the model's validation. Anything else is counted and
dropped.

Record kinds: `node`, `endpoint`, `network` (with the claim's created_at),
`network-removed` (a marker hiding every claim of a name up to a time) and
`ipam-block` (an address block a host allocates in, gossip-only mode).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from overlayd.core.admission import (
    EndpointClaimed,
    EndpointReleased,
    GossipFact,
    NetworkClaimed,
    NetworkReleased,
    NetworkRemovedMark,
    NodeGone,
    NodeHeard,
)
from overlayd.core.config import GossipSettings
from overlayd.core.model import Endpoint, Network, Node, ValidationError, validate_name
from overlayd.gossip import GossipConfig, GossipMetrics, GossipNode, Keyring, MemberInfo, Record
from overlayd.util.tasks import TaskGroup

log = logging.getLogger(__name__)

NODE, NETWORK, NETWORK_REMOVED, ENDPOINT = "node", "network", "network-removed", "endpoint"
BLOCK = "ipam-block"


@dataclass(frozen=True, slots=True)
class BlockClaim:
    """`owner` allocates addresses in `block` of `network` (gossip-only IPAM), or gave it up."""

    owner: str
    network: str
    block: IPv4Network
    created_at: float
    released: bool = False

    @property
    def key(self) -> str:
        return block_key(self.network, self.block)


def block_key(network: str, block: IPv4Network) -> str:
    return f"{network}/{block}"


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
        tasks: TaskGroup | None = None,
    ) -> None:
        """`tasks`: the daemon's TaskGroup, so a dead gossip loop stops the watchdog too."""
        self.name = node_name
        self.settings = settings
        keyring = Keyring.from_base64(list(settings.keys)) if settings.keys else Keyring.insecure()
        self.metrics = GossipMetrics(registry)
        self.invalid = 0
        self.node = GossipNode(
            node_name,
            keyring=keyring,
            bind=settings.bind or str(advertise),
            port=settings.port,
            advertise=settings.bind or str(advertise),
            seeds=settings.peers,
            on_change=on_record,
            on_member=on_member,
            metrics=self.metrics,
            config=GossipConfig(
                probe_interval=settings.probe_interval,
                probe_timeout=min(0.5, settings.probe_interval / 2),
                anti_entropy_interval=settings.anti_entropy_interval,
                tombstone_ttl=settings.tombstone_ttl,
                mtu=settings.mtu,
            ),
            tasks=tasks,
        )

    async def start(self) -> None:
        await self.node.start()

    async def stop(self, *, leave: bool) -> None:
        await self.node.stop(leave=leave)

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

    def publish_block(self, claim: BlockClaim) -> None:
        payload = {"network": claim.network, "block": str(claim.block), "created_at": claim.created_at}
        self.node.publish(BLOCK, claim.key, payload)

    def delete_block(self, key: str) -> None:
        self.node.delete(BLOCK, key)

    def add_seeds(self, addrs: Iterable[tuple[str, int]]) -> None:
        self.node.add_seeds(addrs)

    def members(self) -> list[MemberInfo]:
        return self.node.members()

    def caught_up(self) -> bool:
        """A live peer said its record table equals ours: we hold what the cluster holds."""
        return self.node.is_caught_up()

    def own(self, kind: str, key: str) -> Record | None:
        """This host's current record of (kind, key), tombstones included."""
        return self.node.get(self.name, kind, key)

    # --- what gossip says ---

    def to_fact(self, record: Record) -> GossipFact | BlockClaim | None:
        """One record as what it claims, or None (invalid: counted and logged)."""
        try:
            return _fact(record)
        except (ValidationError, ValueError, TypeError, KeyError) as exc:
            self.invalid += 1
            log.warning(
                "gossip: dropping invalid %s record %s from %s: %s",
                *(record.kind, record.key, record.owner, exc),
            )
            return None

    def facts(self, records: Iterable[Record]) -> list[GossipFact]:
        out: list[GossipFact] = []
        for record in records:
            fact = self.to_fact(record)
            if fact is not None and not isinstance(fact, BlockClaim):
                out.append(fact)
        return out


def _fact(record: Record) -> GossipFact | BlockClaim:
    payload = record.payload
    if record.kind == NODE:
        if payload is None:
            return NodeGone(record.key)
        node = Node.from_dict(payload)
        _check(node.name == record.owner == record.key, "node record not its sender's own")
        return NodeHeard(node)
    if record.kind == ENDPOINT:
        if payload is None:
            at = record.deleted_at if record.deleted_at is not None else float("inf")
            return EndpointReleased(record.owner, record.key, at)
        endpoint = Endpoint.from_dict(payload)
        _check(endpoint.owner == record.owner, "endpoint not owned by its publisher")
        _check(endpoint.key == record.key, "endpoint key mismatch")
        return EndpointClaimed(endpoint)
    if record.kind == NETWORK:
        if payload is None:
            return NetworkReleased(record.owner, record.key)
        network = Network.from_dict(payload)
        _check(network.name == record.key, "network key mismatch")
        return NetworkClaimed(record.owner, network, _float(payload.get("created_at")))
    if record.kind == NETWORK_REMOVED:
        validate_name(record.key, "network name")
        at = _float(payload.get("created_at")) if payload is not None else float("-inf")
        return NetworkRemovedMark(record.key, at)
    if record.kind == BLOCK:
        net_name, _, cidr = record.key.partition("/")
        validate_name(net_name, "network name")
        block = IPv4Network(cidr, strict=True)
        if payload is None:
            return BlockClaim(record.owner, net_name, block, 0.0, released=True)
        return BlockClaim(record.owner, net_name, block, _float(payload.get("created_at")))
    raise ValueError(f"unknown record kind {record.kind!r}")


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(why)


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
