"""The embedded mode's claims: no KV server, the cluster agrees through gossip alone.

What the KV servers give, gossip approximates:

- compare-and-set: a claim is published, then checked after a short settle
  time (several gossip round trips) against what other hosts published
  meanwhile; the admission picks the same winner on every host (the first
  claim), and a loser withdraws its record and gets `AlreadyExists` — the
  operator is told, never silently overruled. Networks and address blocks
  pay this settle time; endpoints do not:
- addresses: each host claims blocks of a network's subnet (`ipam`), once,
  and allocates inside its own blocks without waiting for anyone. The next
  block is claimed in the background as soon as the last one starts to be
  used, so adds rarely wait even for that. Only an address the user names
  outside this host's blocks (or one borrowed when no block is free) is
  contested and settles like a network;
- lease expiry: a member SWIM confirms dead (or that left) keeps its
  endpoints for `dead_grace` seconds (`feeds.GossipFeed`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import zlib
from ipaddress import IPv4Address, IPv4Network

from overlayd.cluster.peering import BlockClaim, Peering
from overlayd.core.admission import Contested, FactSink, NetworkClaimed, NetworkRemovedMark
from overlayd.core.ipam import AddressBook, BlockTable, SubnetFull, block_of, block_prefixlen, blocks_of
from overlayd.core.model import Endpoint, Network
from overlayd.core.view import EndpointDeleted, EndpointPut, NetworkDeleted
from overlayd.store.base import AlreadyExists, NotFoundError

log = logging.getLogger(__name__)

# How long a contested claim waits for concurrent writers elsewhere to be heard.
SETTLE_SECONDS = 0.3
_BLOCK_ATTEMPTS = 8
# How far back the add rate is measured, and the most blocks claimed in one settle.
_DEMAND_WINDOW = 2.0
_MAX_BLOCKS_AT_ONCE = 16


class GossipClaims:
    def __init__(
        self,
        *,
        node: str,
        peering: Peering,
        engine: FactSink,
        blocks: BlockTable,
        addresses: AddressBook,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        self._node = node
        self._peering = peering
        self._engine = engine
        self._admission = engine.admission
        self.blocks = blocks
        self._addresses = addresses
        self._settle = settle
        self.settling: set[str] = set()  # own endpoints inside their settle wait
        self._block_claims: dict[str, asyncio.Task[list[IPv4Network]]] = {}  # network -> claim in flight
        self._takes: dict[str, collections.deque[float]] = {}  # network -> recent address takes

    # --- networks ---

    async def create_network(self, network: Network) -> None:
        view = self._engine.view
        if network.name in view.networks:
            raise AlreadyExists("network name", network.name)
        for other in view.networks.values():
            if other.vni == network.vni:
                raise AlreadyExists("VNI", str(network.vni), other.name)
        created_at = time.time()
        self._peering.publish_network(network, created_at)
        self._engine.from_own([NetworkClaimed(self._node, network, created_at)])
        await asyncio.sleep(self._settle)
        lost = self._admission.network_lost(network.name)
        if lost is not None:
            self._peering.delete_network(network.name)
            self._engine.from_own([NetworkDeleted(network.name)])
            log.warning(
                "network %s: another host created a conflicting one first: %s", network.name, lost.why
            )
            if lost.lost == Contested.VNI:
                raise AlreadyExists("VNI", str(network.vni))
            raise AlreadyExists("network name", network.name)

    async def delete_network(self, name: str) -> None:
        if name not in self._engine.view.networks:
            raise NotFoundError(f"network {name} not found")
        # Hide every claim of this name up to now, whoever made it.
        at = time.time()
        self._peering.remove_network(name, at)
        self._engine.from_gossip([NetworkRemovedMark(name, at)])
        own = self._peering.own("network", name)
        if own is not None and own.payload is not None:
            self._peering.delete_network(name)
        self._engine.from_own([NetworkDeleted(name)])
        for net, block in self.blocks.claims_of(self._node):
            if net == name:
                self.release_block(net, block)

    # --- endpoints ---

    async def create_endpoint(self, endpoint: Endpoint, *, contested: bool) -> None:
        view = self._engine.view
        if endpoint.key in view.endpoints:
            raise AlreadyExists("endpoint name", endpoint.key)
        holder = view.ip_holder(endpoint.network, endpoint.ip)
        if holder is not None:
            raise AlreadyExists("IP", str(endpoint.ip), holder)
        self._peering.publish_endpoint(endpoint)
        if not contested:
            self._engine.from_own([EndpointPut(endpoint)])
            return
        self.settling.add(endpoint.key)
        try:
            self._engine.from_own([EndpointPut(endpoint)])
            await asyncio.sleep(self._settle)
        finally:
            self.settling.discard(endpoint.key)
        lost = self._admission.lost(endpoint.key)
        if lost is not None:
            self._peering.delete_endpoint(endpoint.key)
            self._engine.from_own([EndpointDeleted(endpoint.key)])
            log.warning("endpoint %s: lost to a concurrent claim: %s", endpoint.key, lost.why)
            if lost.lost == Contested.NAME:
                raise AlreadyExists("endpoint name", endpoint.key)
            raise AlreadyExists("IP", str(endpoint.ip))

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        self._peering.delete_endpoint(endpoint.key)
        self._engine.from_own([EndpointDeleted(endpoint.key)])

    async def release(self) -> None:
        """Teardown: tombstones for every own record, then a clean leave."""
        for ep in self._engine.view.owned_by(self._node):
            self._peering.delete_endpoint(ep.key)
        for net, block in self.blocks.claims_of(self._node):
            self.release_block(net, block)
        await self._peering.stop(leave=True)

    # --- addresses ---

    def contested(self, network: Network, ip: IPv4Address) -> bool:
        """Whether a named address needs settling: it is outside this host's own blocks."""
        return self.blocks.holder(network.name, block_of(network.subnet, ip)) != self._node

    async def take_address(self, network: Network) -> tuple[IPv4Address, bool]:
        """A free address (reserved in the address book) and whether claiming it is contested."""
        self._note_demand(network.name)
        mine = self.blocks.mine(network.name)
        try:
            ip = self._addresses.take(network, within=mine)
        except SubnetFull:
            pass
        else:
            if ip in mine[-1]:  # (two int comparisons; `block_of` builds a network each add)
                # The last block is in use: have the next ones ready before anyone waits.
                self._claim_blocks_soon(network).add_done_callback(_log_failure)
            return ip, False
        blocks = await self._claim_blocks_soon(network)
        if blocks:
            try:
                return self._addresses.take(network, within=blocks), False
            except SubnetFull:
                pass  # taken by concurrent adds meanwhile: borrow
        # No block is free: borrow any free address, and settle for it.
        return self._addresses.take(network), True

    def _note_demand(self, network: str) -> None:
        now = time.monotonic()
        recent = self._takes.setdefault(network, collections.deque(maxlen=256))
        recent.append(now)
        while recent and recent[0] < now - _DEMAND_WINDOW:
            recent.popleft()

    def _blocks_wanted(self, network: Network) -> int:
        """Enough blocks for twice the adds one settle time takes at the recent rate."""
        rate = len(self._takes.get(network.name, ())) / _DEMAND_WINDOW
        size = 2 ** (32 - block_prefixlen(network.subnet))
        wanted: int = math.ceil(2 * rate * self._settle / size)
        return max(1, min(_MAX_BLOCKS_AT_ONCE, wanted))

    def _claim_blocks_soon(self, network: Network) -> asyncio.Task[list[IPv4Network]]:
        task = self._block_claims.get(network.name)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._claim_blocks(network, self._blocks_wanted(network)), name=f"ipam-blocks-{network.name}"
            )
            self._block_claims[network.name] = task
        return task

    async def _claim_blocks(self, network: Network, count: int) -> list[IPv4Network]:
        """Claim up to `count` free blocks at once: one settle time for all of them."""
        # Hosts start looking at different blocks, so they rarely race for one.
        start = zlib.crc32(self._node.encode()) % max(1, sum(1 for _ in blocks_of(network.subnet)))
        for _ in range(_BLOCK_ATTEMPTS):
            claimed: list[IPv4Network] = []
            for _ in range(count):
                block = self.blocks.free_block(network, start=start)
                if block is None:
                    break
                claim = BlockClaim(self._node, network.name, block, time.time())
                self._peering.publish_block(claim)
                self.blocks.claim(self._node, network.name, block, claim.created_at)
                claimed.append(block)
            if not claimed:
                return []
            await asyncio.sleep(self._settle)
            won = [b for b in claimed if self.blocks.holder(network.name, b) == self._node]
            for block in claimed:
                if block not in won:
                    self.release_block(network.name, block)
            if won:
                log.info("claimed address block(s) %s of network %s", ", ".join(map(str, won)), network.name)
                return won
        return []

    def release_block(self, network: str, block: IPv4Network) -> None:
        self.blocks.release(self._node, network, block)
        self._peering.delete_block(BlockClaim(self._node, network, block, 0.0).key)

    def adopt_block(self, network: str, block: IPv4Network, created_at: float) -> None:
        """A block this host held before a restart: keep it (with its original time) if in use."""
        self.blocks.claim(self._node, network, block, created_at)
        self._peering.publish_block(BlockClaim(self._node, network, block, created_at))


def _log_failure(task: asyncio.Task[list[IPv4Network]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("claiming an address block failed: %s", task.exception())
