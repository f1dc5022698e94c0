"""The embedded mode: no KV server, the cluster view lives in gossip alone.

Implements the same `Store` interface as etcd/ZooKeeper/Consul, so the daemon
does not know the difference. What the KV servers give, gossip approximates:

- "compare-and-set": a write is published, then checked after a short settle
  time (several gossip round trips) against what other hosts published
  meanwhile; `Peering.derive` picks the same winner on every host (the
  oldest), and a loser withdraws its record and gets `AlreadyExists` —
  the operator is told, never silently overruled;
- "lease expiry": a member SWIM confirms dead (or that left) keeps its
  endpoints for `dead_grace` seconds, then they drop out of the view; if
  it comes back, its records come back with it;
- "watch": every change re-derives the view and yields the difference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from overlayd.config import GossipSettings
from overlayd.gossip import MemberInfo, MemberState, Record
from overlayd.model import Endpoint, Network, Node
from overlayd.peering import ENDPOINT, NETWORK, Derived, Peering
from overlayd.state import (
    ClusterView,
    EndpointDeleted,
    EndpointPut,
    Fact,
    NetworkDeleted,
    NetworkPut,
    NodeDeleted,
    NodePut,
)
from overlayd.store.base import AlreadyExists, Changes, NotFoundError, Snapshot, Store, StoreError

log = logging.getLogger(__name__)

# How long a write waits for concurrent writers elsewhere to be heard.
SETTLE_SECONDS = 0.3


class GossipStore(Store):
    def __init__(
        self,
        settings: GossipSettings,
        *,
        registry: Any,
        node_name: str,
        on_conflict: Callable[[str, str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._name = node_name
        self.peering: Peering | None = None
        self._wake = asyncio.Event()
        self._revision = 0
        self._dead_since: dict[str, float] = {}  # member -> monotonic time it went dead/left
        self._excluded: set[str] = set()
        self._published: dict[str, Endpoint] = {}
        self._created: dict[str, float] = {}  # networks this host created: name -> created_at
        self._adopted: list[Record] = []
        self._on_conflict = on_conflict
        self._settling: set[str] = set()  # endpoints inside create_endpoint's settle wait

    # ----------------------------------------------------------------- session

    @property
    def healthy(self) -> bool:
        return self.peering is not None

    async def connect(self) -> None:
        """Nothing to reach: gossip starts with the session, once the VTEP is known."""

    async def open_session(self, node: Node) -> None:
        if self.peering is None:
            self.peering = Peering(
                node_name=self._name,
                settings=self._settings,
                advertise=node.vtep,
                registry=self._registry,
                on_record=self._on_record,
                on_member=self._on_member,
            )
            try:
                await self.peering.start()
            except OSError as exc:
                self.peering = None
                raise StoreError(f"cannot start gossip on port {self._settings.port}: {exc}") from None
        self.peering.publish_node(node)

    def _require(self) -> Peering:
        if self.peering is None:
            raise StoreError("gossip is not running: open_session() first")
        return self.peering

    async def keep_session(self) -> None:
        """Expire members dead past their grace; settle our records from an earlier life."""
        while True:
            await asyncio.sleep(min(1.0, self._settings.dead_grace / 4))
            self._expire_dead()
            self._settle_adopted()

    def _expire_dead(self) -> None:
        now = time.monotonic()
        expired = {m for m, since in self._dead_since.items() if now - since >= self._settings.dead_grace}
        if expired != self._excluded:
            for member in expired - self._excluded:
                log.warning(
                    "gossip: %s dead for %.0fs: dropping its endpoints", member, self._settings.dead_grace
                )
            self._excluded = expired
            self._wake.set()

    def _on_member(self, info: MemberInfo) -> None:
        if info.state in (MemberState.DEAD, MemberState.LEFT):
            self._dead_since.setdefault(info.name, time.monotonic())
        else:
            if self._dead_since.pop(info.name, None) is not None:
                log.info("gossip: %s is back (%s)", info.name, info.state)
            if info.name in self._excluded:
                self._excluded.discard(info.name)
                self._wake.set()

    def _on_record(self, record: Record) -> None:
        if record.owner == self._name:
            # Our own record from before a restart, as peers kept it: decided in keep_session,
            # once this life's own records are published.
            self._adopted.append(record)
        self._wake.set()

    def _settle_adopted(self) -> None:
        peering = self._require()
        adopted, self._adopted = self._adopted, []
        for record in adopted:
            if record.payload is None:
                continue
            current = peering.node.get(self._name, record.kind, record.key)
            if current is not None and current.incarnation >= peering.node.incarnation:
                continue  # already re-published in this life
            if record.kind == NETWORK:
                # Networks outlive their creator's restarts: take them over again.
                at = float(record.payload.get("created_at", 0.0))
                fact = peering.to_fact(record)
                if isinstance(fact, NetworkPut):
                    peering.publish_network(fact.network, at)
                    self._created[fact.network.name] = at
            elif record.kind == ENDPOINT and record.key not in self._published:
                peering.delete_endpoint(record.key)  # gone while we were down

    async def release_session(self) -> None:
        if self.peering is None:
            return
        for key in list(self._published):
            self.peering.delete_endpoint(key)
        self._published.clear()
        await self.peering.stop(leave=True)
        self.peering = None

    async def close(self) -> None:
        # A plain stop (restart) does not announce a leave: peers keep our endpoints
        # while SWIM notices, and we are back long before the grace period ends.
        if self.peering is not None:
            await self.peering.stop(leave=False)
            self.peering = None

    # ----------------------------------------------------------------- records

    def view(self) -> ClusterView:
        return self._require().derive(excluded=self._excluded).view

    async def create_network(self, network: Network) -> None:
        peering = self._require()
        view = self.view()
        if network.name in view.networks:
            raise AlreadyExists("network name", network.name)
        for other in view.networks.values():
            if other.vni == network.vni:
                raise AlreadyExists("VNI", str(network.vni), other.name)
        created_at = time.time()
        peering.publish_network(network, created_at)
        await asyncio.sleep(SETTLE_SECONDS)
        why = peering.derive(excluded=self._excluded).lost_networks.get(f"{self._name}/{network.name}")
        if why is not None:
            peering.delete_network(network.name)
            log.warning("network %s: another host created a conflicting one first: %s", network.name, why)
            what = "network name" if why.startswith("network ") else "VNI"
            raise AlreadyExists(what, network.name if what == "network name" else str(network.vni))
        self._created[network.name] = created_at

    async def delete_network(self, name: str) -> None:
        peering = self._require()
        if name not in self.view().networks:
            raise NotFoundError(f"network {name} not found")
        # Hide every record of this name up to now, whoever created it.
        peering.remove_network(name, time.time())
        if name in self._created:
            peering.delete_network(name)
            del self._created[name]

    async def create_endpoint(self, endpoint: Endpoint) -> None:
        peering = self._require()
        view = self.view()
        if endpoint.key in view.endpoints:
            raise AlreadyExists("endpoint name", endpoint.key)
        for other in view.endpoints_in(endpoint.network):
            if other.ip == endpoint.ip:
                raise AlreadyExists("IP", str(endpoint.ip), other.key)
        peering.publish_endpoint(endpoint)
        self._published[endpoint.key] = endpoint
        self._settling.add(endpoint.key)
        try:
            await asyncio.sleep(SETTLE_SECONDS)
        finally:
            self._settling.discard(endpoint.key)
        why = peering.derive(excluded=self._excluded).lost_endpoints.get(f"{self._name}/{endpoint.key}")
        if why is not None:
            peering.delete_endpoint(endpoint.key)
            del self._published[endpoint.key]
            log.warning("endpoint %s: lost to a concurrent claim: %s", endpoint.key, why)
            if why.startswith("IP "):
                raise AlreadyExists("IP", str(endpoint.ip))
            raise AlreadyExists("endpoint name", endpoint.key)

    async def publish_endpoint(self, endpoint: Endpoint) -> None:
        self._require().publish_endpoint(endpoint)
        self._published[endpoint.key] = endpoint

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        self._require().delete_endpoint(endpoint.key)
        self._published.pop(endpoint.key, None)

    # ----------------------------------------------------------------- reading

    async def snapshot(self) -> Snapshot:
        self._revision += 1
        return Snapshot(facts=_facts(self.view()), revision=self._revision)

    def _withdraw_losers(self, derived: Derived) -> None:
        """Own endpoints that lost a clash found late (claims made on both sides of a
        partition): withdraw them from the overlay and say so, loudly.

        The veth stays: removing it would cut the container off without anyone
        asking. The operator removes or re-creates the endpoint.
        """
        peering = self._require()
        for key in list(self._published):
            why = derived.lost_endpoints.get(f"{self._name}/{key}")
            if why is None or key in self._settling:
                continue
            peering.delete_endpoint(key)
            del self._published[key]
            log.error("endpoint %s withdrawn from the overlay: %s", key, why)
            if self._on_conflict is not None:
                self._on_conflict(key, why)

    async def watch(self, after_revision: int) -> AsyncIterator[Changes | Snapshot]:
        last = self.view()
        while True:
            await self._wake.wait()
            self._wake.clear()
            derived = self._require().derive(excluded=self._excluded)
            self._withdraw_losers(derived)
            current = derived.view
            facts = _difference(last, current)
            last = current
            if facts:
                self._revision += 1
                yield Changes(facts, self._revision)


def _facts(view: ClusterView) -> list[Fact]:
    facts: list[Fact] = [NetworkPut(n) for n in view.networks.values()]
    facts += [NodePut(n) for n in view.nodes.values()]
    facts += [EndpointPut(e) for e in view.endpoints.values()]
    return facts


def _difference(old: ClusterView, new: ClusterView) -> list[Fact]:
    """Facts that turn `old` into `new`: puts before deletes, networks first."""
    facts: list[Fact] = []
    facts += [NetworkPut(n) for name, n in new.networks.items() if old.networks.get(name) != n]
    facts += [NodePut(n) for name, n in new.nodes.items() if old.nodes.get(name) != n]
    facts += [EndpointPut(e) for key, e in new.endpoints.items() if old.endpoints.get(key) != e]
    facts += [EndpointDeleted(key) for key in old.endpoints if key not in new.endpoints]
    facts += [NodeDeleted(name) for name in old.nodes if name not in new.nodes]
    facts += [NetworkDeleted(name) for name in old.networks if name not in new.networks]
    return facts
