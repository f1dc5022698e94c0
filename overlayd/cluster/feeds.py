"""Sources into the engine: the KV store's watch, and what gossip hears.

`follow_store` turns the store's snapshots and watch batches into admission
input, one batch at a time (a watch response carrying many records is one
batch for the reconciler too).

`GossipFeed` takes every record a peer publishes and every membership
change, in both modes:

- records become gossip facts for the admission (networks only in
  gossip-only mode: beside a store, networks come from the store alone;
  address blocks go to the block table);
- membership becomes admissibility: beside a store, an owner's gossip
  records count while SWIM sees it alive or suspect; in gossip-only mode,
  until it has been dead (or left) for `dead_grace` seconds;
- this host's own records from before a restart, as peers kept them, are
  settled as they arrive (this life's own records are out before anything is
  heard): networks it created and blocks it still uses are taken over again,
  endpoints it no longer has are withdrawn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from overlayd.cluster.gossip_claims import GossipClaims
from overlayd.cluster.peering import BLOCK, ENDPOINT, NETWORK, BlockClaim, Peering
from overlayd.core.admission import (
    FactSink,
    MemberAdmissible,
    NetworkClaimed,
    NetworkReleased,
    NetworkRemovedMark,
)
from overlayd.core.ipam import BlockTable
from overlayd.core.model import Endpoint
from overlayd.gossip import MemberInfo, Record
from overlayd.store.base import Snapshot, Store

log = logging.getLogger(__name__)


class OwnEndpoints(Protocol):
    """The endpoints this host owns (the daemon's local registry)."""

    def __contains__(self, key: str) -> bool: ...

    def all(self) -> list[Endpoint]: ...




async def follow_store(
    store: Store,
    engine: FactSink,
    revision: int,
    *,
    on_data_lost: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Apply the store's watch from `revision` on, forever.

    A snapshot from a server that lost its data is not the truth: `on_data_lost`
    (hold deletions, re-publish) runs before it is applied.
    """
    async for batch in store.watch(revision):
        if isinstance(batch, Snapshot):
            if batch.data_lost is not None and on_data_lost is not None:
                await on_data_lost(batch.data_lost)
            engine.store_snapshot(batch.facts)
        else:
            engine.from_store(batch.facts)


class GossipFeed:
    def __init__(
        self,
        *,
        node: str,
        engine: FactSink,
        registry: OwnEndpoints,
        authority: bool,
        dead_grace: float,
        blocks: BlockTable | None = None,
    ) -> None:
        self._node = node
        self._engine = engine
        self._registry = registry
        self._authority = authority
        self._grace = dead_grace
        self._blocks = blocks
        self.peering: Peering | None = None
        self.claims: GossipClaims | None = None  # gossip-only: to take own blocks over again
        self._dead_since: dict[str, float] = {}  # member -> monotonic time it went dead or left
        self._excluded: set[str] = set()
        self.on_member_change: Callable[[MemberInfo], None] | None = None

    # --- what gossip says ---

    def record(self, record: Record) -> None:
        peering = self.peering
        if peering is None:
            return
        if record.owner == self._node:
            # Ours from a previous life. This life's own records went out before gossip
            # could hear anything (`Daemon._start_peering`), so decide at once: a network
            # left waiting would be missing from the view when the restart hold ends.
            self._adopt(record)
            return
        fact = peering.to_fact(record)
        if fact is None:
            return
        if isinstance(fact, BlockClaim):
            if self._blocks is not None:
                if fact.released:
                    self._blocks.release(fact.owner, fact.network, fact.block)
                else:
                    self._blocks.claim(fact.owner, fact.network, fact.block, fact.created_at)
            return
        if self._authority and isinstance(fact, NetworkClaimed | NetworkReleased | NetworkRemovedMark):
            return  # beside a store, networks come from the store alone
        self._engine.from_gossip([fact])

    def member(self, info: MemberInfo) -> None:
        if self.on_member_change is not None:
            self.on_member_change(info)
        live = info.live
        if self._authority:
            self._admit(info.name, live)
            return
        if not live:
            self._dead_since.setdefault(info.name, time.monotonic())
            return
        if self._dead_since.pop(info.name, None) is not None:
            log.info("gossip: %s is back (%s)", info.name, info.state)
        if info.name in self._excluded:
            self._excluded.discard(info.name)
            self._admit(info.name, True)

    def _admit(self, name: str, admissible: bool) -> None:
        if self._blocks is not None:
            self._blocks.set_admissible(name, admissible)
        self._engine.from_gossip([MemberAdmissible(name, admissible)])

    # --- the clock ---

    async def run(self) -> None:
        """Expire members dead past their grace (gossip-only mode)."""
        interval = min(1.0, self._grace / 4) if not self._authority else 1.0
        while True:
            await asyncio.sleep(interval)
            self.tick()

    def tick(self) -> None:
        if not self._authority:
            now = time.monotonic()
            for member, since in list(self._dead_since.items()):
                if member not in self._excluded and now - since >= self._grace:
                    log.warning("gossip: %s dead for %.0fs: dropping its endpoints", member, self._grace)
                    self._excluded.add(member)
                    self._admit(member, False)

    def _adopt(self, record: Record) -> None:
        peering = self.peering
        if peering is None or record.payload is None:
            return
        current = peering.own(record.kind, record.key)
        if current is not None and current.incarnation >= peering.node.incarnation:
            return  # already published (or withdrawn) in this life
        if record.kind == ENDPOINT and record.key not in self._registry:
            peering.delete_endpoint(record.key)  # gone while we were down
        elif record.kind == NETWORK and not self._authority:
            # Networks outlive their creator's restarts: take them over again.
            fact = peering.to_fact(record)
            if isinstance(fact, NetworkClaimed):
                peering.publish_network(fact.network, fact.created_at)
                self._engine.from_own([fact])
        elif record.kind == BLOCK and self.claims is not None:
            fact = peering.to_fact(record)
            if isinstance(fact, BlockClaim):
                in_use = any(
                    ep.network == fact.network and ep.ip in fact.block for ep in self._registry.all()
                )
                if in_use:
                    self.claims.adopt_block(fact.network, fact.block, fact.created_at)
                else:
                    peering.delete_block(fact.key)
