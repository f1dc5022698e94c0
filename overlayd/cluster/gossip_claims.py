"""The embedded mode's claims: no KV server, the cluster agrees through gossip alone.

What the KV servers give, gossip approximates:

- compare-and-set: a claim is published, then checked after a short settle
  time (several gossip round trips) against what other hosts published
  meanwhile; the admission picks the same winner on every host (the first
  claim), and a loser withdraws its record and gets `AlreadyExists` — the
  operator is told, never silently overruled. Networks and address blocks
  pay this settle time; endpoints do not:
- addresses: each host claims blocks of a network's subnet (`ipam`), once,
  and allocates inside its own blocks without waiting for anyone. More
  blocks are claimed in the background while the addresses left in its
  blocks still cover a few settle times of adds at the recent rate, so only
  a host's first add in a network could wait (for its first block's settle).
  It does not where the subnet has blocks for twice the hosts (a /24 has 64):
  there every host claims its first blocks when it learns of the network,
  and gives them back when the network goes. No address is used from a
  block before its claim has settled: another host may have claimed the
  same block a moment earlier, and both would hand out its addresses. An
  add that gets there first (a burst faster than the claims ahead) waits
  for the rest of that settle;
  An address the user names outside this host's blocks (or one borrowed
  when no block is free) is contested and settles like a network;
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
from overlayd.util.metrics import Metrics

log = logging.getLogger(__name__)

# How long a contested claim waits for concurrent writers elsewhere to be heard.
SETTLE_SECONDS = 0.3
_BLOCK_ATTEMPTS = 8
# How far back the add rate is measured. (It is measured over one settle time at least:
# a burst of a few adds at once is not a rate that would claim many blocks.)
_DEMAND_WINDOW = 2.0
# Addresses kept free ahead, in settle times of adds at the recent rate: a block claimed
# that early has settled before the adds reach it (a claim takes one settle time, and the
# rate may keep rising meanwhile).
_AHEAD_SETTLES = 3
# The most blocks kept ahead, and the share of a subnet's blocks that may be (a small
# subnet's blocks are few: one host's burst must not take them all from the others).
_MAX_BLOCKS_AHEAD = 16
_SUBNET_SHARE = 16
# Addresses a host claims in a network when it learns of it (where the subnet is wide enough):
# a settle time of adds at about the fastest rate one host reaches (350/s), so that a burst
# from rest need not wait for a claim.
_AT_REST = 128


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
        metrics: Metrics | None = None,
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
        self._ahead: set[asyncio.Task[list[IPv4Network]]] = set()  # claims ahead of need, settling
        # Blocks published in this life whose settle has not ended: done when it has.
        self._unsettled: dict[tuple[str, IPv4Network], asyncio.Future[None]] = {}
        self.block_waits = (metrics or Metrics()).ipam_block_waits.only()
        self._no_free_block: dict[str, float] = {}  # network -> no search for a free block before then
        self._takes: dict[str, collections.deque[float]] = {}  # network -> recent address takes
        self._view_complete = False  # until then, blocks of an earlier life may still be adopted
        self._creating: set[str] = set()  # networks this host creates, inside their settle

    # --- networks ---

    async def create_network(self, network: Network) -> None:
        view = self._engine.view
        if network.name in view.networks:
            raise AlreadyExists("network name", network.name)
        for other in view.networks.values():
            if other.vni == network.vni:
                raise AlreadyExists("VNI", str(network.vni), other.name)
        created_at = time.time()
        self._creating.add(network.name)
        try:
            self._peering.publish_network(network, created_at)
            self._engine.from_own([NetworkClaimed(self._node, network, created_at)])
            await asyncio.sleep(self._settle)
        finally:
            self._creating.discard(network.name)
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
        self.network_known(network)

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
        self.network_gone(name)

    def network_gone(self, name: str) -> None:
        """A network left the view (removed through any host): give back this host's blocks
        of it, which every host holds once it learnt of the network."""
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

    def view_complete(self) -> list[asyncio.Task[list[IPv4Network]]]:
        """The view holds what the cluster holds: claim first blocks of the networks in it
        (returned: the claims started)."""
        self._view_complete = True
        started = (self.network_known(network) for network in list(self._engine.view.networks.values()))
        return [claim for claim in started if claim is not None]

    def network_known(self, network: Network) -> asyncio.Task[list[IPv4Network]] | None:
        """A network this host learnt of: claim its first block now, so that the first add
        here need not wait for the claim's settle. Returns the claim, if one was started.

        Not before the view is complete (a restarted host adopts the blocks it still uses
        first), not for a network this host creates before it has won it, not where this
        host holds or is claiming a block already, and only where the subnet has blocks
        for twice the hosts: hosts that never add an endpoint to a small subnet must not
        take the blocks of those that do.
        """
        if not self._view_complete or network.name in self._creating or self.blocks.mine(network.name):
            return None
        in_flight = self._block_claims.get(network.name)
        if in_flight is not None and not in_flight.done():
            return None
        hosts = 1 + sum(1 for m in self._peering.members() if m.live)
        total = len(blocks_of(network.subnet))
        if total < 2 * hosts:
            return None
        # A settle time of a burst's adds, and 1/64 of the subnet at most (the hosts seen so
        # far may be a few of many: a cluster that is starting).
        size = 1 << (32 - block_prefixlen(network.subnet))
        count = max(1, min(math.ceil(_AT_REST / size), total // 64))
        task = self._claim_blocks_soon(network, count)
        task.add_done_callback(_log_failure)
        return task

    def contested(self, network: Network, ip: IPv4Address) -> bool:
        """Whether a named address needs settling: it is outside this host's own settled blocks."""
        block = block_of(network.subnet, ip)
        unsettled = (network.name, block) in self._unsettled
        return unsettled or self.blocks.holder(network.name, block) != self._node

    async def take_address(self, network: Network) -> tuple[IPv4Address, bool]:
        """A free address (reserved in the address book) and whether claiming it is contested."""
        self._note_demand(network.name)
        for _ in range(2):
            mine = self.blocks.mine(network.name)
            try:
                ip = self._addresses.take(network, within=mine)
            except SubnetFull:
                # Out of addresses (the first add, or a burst faster than the claims ahead):
                # wait for a claim, then take from any own block again, the blocks claimed
                # ahead meanwhile by the adds that took the claim's addresses first included.
                if not await self._claim_blocks_soon(network):
                    break
                continue
            self._claim_ahead(network, mine)
            return ip, await self._settled_for(network, ip)
        # No block is free: borrow any free address, and settle for it.
        return self._addresses.take(network), True

    async def _settled_for(self, network: Network, ip: IPv4Address) -> bool:
        """Whether `ip`, taken from this host's blocks, is contested after all: its block
        may still be settling (a burst that outran the claims ahead); then wait for the
        rest of that settle, and if another host won the block, the address settles like
        a borrowed one."""
        block = block_of(network.subnet, ip)
        pending = self._unsettled.get((network.name, block))
        if pending is None:
            return False
        self.block_waits.inc()
        try:
            await asyncio.shield(pending)
        except BaseException:
            self._addresses.release(network.name, ip)
            raise
        return self.blocks.holder(network.name, block) != self._node

    def _claim_ahead(self, network: Network, mine: list[IPv4Network]) -> None:
        """Claim more blocks now if the addresses left in `mine` may not last a claim's settle.

        Published at once (not in a task: the next add must already count them), settled
        in the background. Claims already settling count as room, so a burst neither
        claims again for every add nor waits for the first, too small, claim.
        """
        wanted = self._spare_wanted(network)
        missing = wanted - self._addresses.room(network, mine, wanted)
        if missing <= 0 or time.monotonic() < self._no_free_block.get(network.name, 0.0):
            return
        claimed = self._publish_blocks(network, self._blocks_for(network, missing))
        if not claimed:
            # Every block is held: searching them all again on every add would cost O(subnet)
            # each; blocks come free rarely (a host gone for good, a network re-created).
            self._no_free_block[network.name] = time.monotonic() + self._settle
        else:
            task = asyncio.get_running_loop().create_task(
                self._settle_blocks(network, claimed), name=f"ipam-ahead-{network.name}"
            )
            self._ahead.add(task)
            task.add_done_callback(self._ahead.discard)
            task.add_done_callback(_log_failure)

    def _note_demand(self, network: str) -> None:
        now = time.monotonic()
        recent = self._takes.setdefault(network, collections.deque(maxlen=256))
        recent.append(now)
        while recent and recent[0] < now - _DEMAND_WINDOW:
            recent.popleft()

    def _rate(self, network: str) -> float:
        """Address takes per second lately: over the span the takes kept cover (a full deque
        covers less than the window at a high rate), and one settle time at least."""
        recent = self._takes.get(network)
        if not recent:
            return 0.0
        span = max(self._settle, 0.001, time.monotonic() - recent[0])
        return len(recent) / span

    def _spare_wanted(self, network: Network) -> int:
        """Free addresses to keep ahead: a few settle times of adds at the recent rate (one
        at least), and at most `_ahead_blocks`' worth.

        Not a whole block more whatever the rate: a host that adds now and then in a small
        subnet would hold two blocks where one does, and the subnet's blocks are for every
        host. The rate counts one settle time at least, so a burst's demand grows three
        addresses for every add and claims ahead long before its blocks run out.
        """
        size = 1 << (32 - block_prefixlen(network.subnet))
        # Rounded first: one add's 3 * settle * (1 / settle) must not come out as 3.0000000000000004.
        demand = math.ceil(round(_AHEAD_SETTLES * self._settle * self._rate(network.name), 6))
        return max(1, min(demand, _ahead_blocks(network) * size))

    def _blocks_for(self, network: Network, missing: int) -> int:
        """How many blocks one claim takes for `missing` addresses (bounded)."""
        size = 1 << (32 - block_prefixlen(network.subnet))
        return max(1, min(_ahead_blocks(network), math.ceil(missing / size)))

    def _claim_blocks_soon(
        self, network: Network, count: int | None = None
    ) -> asyncio.Task[list[IPv4Network]]:
        """The claim every add out of addresses waits for (one at a time per network), of
        `count` blocks or as many as the recent adds need."""
        task = self._block_claims.get(network.name)
        if task is None or task.done():
            if count is None:
                count = self._blocks_for(network, self._spare_wanted(network))
            task = asyncio.get_running_loop().create_task(
                self._claim_blocks(network, count),
                name=f"ipam-blocks-{network.name}",
            )
            self._block_claims[network.name] = task
        return task

    async def _claim_blocks(self, network: Network, count: int) -> list[IPv4Network]:
        """Claim up to `count` free blocks at once: one settle time for all of them."""
        for _ in range(_BLOCK_ATTEMPTS):
            claimed = self._publish_blocks(network, count)
            if not claimed:
                return []
            won = await self._settle_blocks(network, claimed)
            if won:
                return won
        return []

    def _publish_blocks(self, network: Network, count: int) -> list[IPv4Network]:
        """Claim up to `count` free blocks: published, and this host's until a settle says otherwise."""
        # Hosts start looking at different blocks, so they rarely race for one.
        start = zlib.crc32(self._node.encode()) % max(1, len(blocks_of(network.subnet)))
        claimed: list[IPv4Network] = []
        for _ in range(count):
            block = self.blocks.free_block(network, start=start)
            if block is None:
                break
            claim = BlockClaim(self._node, network.name, block, time.time())
            self._peering.publish_block(claim)
            self.blocks.claim(self._node, network.name, block, claim.created_at)
            self._unsettled[(network.name, block)] = asyncio.get_running_loop().create_future()
            claimed.append(block)
        return claimed

    async def _settle_blocks(self, network: Network, claimed: list[IPv4Network]) -> list[IPv4Network]:
        """After one settle time: the blocks of `claimed` this host won; the others given back."""
        try:
            await asyncio.sleep(self._settle)
        finally:
            for block in claimed:  # the adds waiting for these blocks go on (also at teardown)
                pending = self._unsettled.pop((network.name, block), None)
                if pending is not None and not pending.done():
                    pending.set_result(None)
        won = [b for b in claimed if self.blocks.holder(network.name, b) == self._node]
        for block in claimed:
            if block not in won:
                self.release_block(network.name, block)
        if won:
            log.info("claimed address block(s) %s of network %s", ", ".join(map(str, won)), network.name)
        return won

    def release_block(self, network: str, block: IPv4Network) -> None:
        self.blocks.release(self._node, network, block)
        self._peering.delete_block(BlockClaim(self._node, network, block, 0.0).key)

    def adopt_block(self, network: str, block: IPv4Network, created_at: float) -> None:
        """A block this host held before a restart: keep it (with its original time) if in use."""
        self.blocks.claim(self._node, network, block, created_at)
        self._peering.publish_block(BlockClaim(self._node, network, block, created_at))


def _ahead_blocks(network: Network) -> int:
    """The most blocks this host keeps ahead of need in `network` (one at least)."""
    return max(1, min(_MAX_BLOCKS_AHEAD, len(blocks_of(network.subnet)) // _SUBNET_SHARE))


def _log_failure(task: asyncio.Task[list[IPv4Network]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("claiming an address block failed: %s", task.exception())
