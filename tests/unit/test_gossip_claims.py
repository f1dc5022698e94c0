"""Gossip-only address blocks (overlayd.cluster.gossip_claims): claimed ahead of the adds."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from overlayd.cluster.gossip_claims import GossipClaims
from overlayd.cluster.peering import BlockClaim
from overlayd.core.ipam import AddressBook, BlockTable, block_of, blocks_of
from overlayd.core.model import Network
from overlayd.core.view import ClusterView
from overlayd.gossip import MemberInfo, MemberState

WIDE = Network(name="wide", vni=100, subnet=IPv4Network("10.8.0.0/16"))  # 1,024 blocks of 64
SMALL = Network(name="small", vni=101, subnet=IPv4Network("10.9.0.0/24"))  # 64 blocks of 4
MID = Network(name="mid", vni=102, subnet=IPv4Network("10.10.0.0/22"))  # 64 blocks of 16


class Published:
    """The gossip side of a claim: which blocks were published, and when (wall clock)."""

    def __init__(self) -> None:
        self.blocks: dict[IPv4Network, float] = {}
        self.deleted: list[str] = []
        self.peers: list[MemberInfo] = []

    def members(self) -> list[MemberInfo]:
        return self.peers

    def publish_block(self, claim: BlockClaim) -> None:
        self.blocks.setdefault(claim.block, claim.created_at)

    def delete_block(self, key: str) -> None:
        self.deleted.append(key)


class Engine:
    def __init__(self) -> None:
        self.view = ClusterView()
        self.admission: Any = None


class Bus:
    """Gossip between hosts of one test, delivered at once to every host's block table."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts

    def publish(self, claim: BlockClaim) -> None:
        for host in self.hosts:
            if host.name != claim.owner:
                host.blocks.claim(claim.owner, claim.network, claim.block, claim.created_at)

    def withdraw(self, owner: str, key: str) -> None:
        network, _, cidr = key.partition("/")
        for host in self.hosts:
            if host.name != owner:
                host.blocks.release(owner, network, IPv4Network(cidr))


class BusPeering(Published):
    def __init__(self, owner: str) -> None:
        super().__init__()
        self.owner = owner
        self.bus: Bus | None = None

    def publish_block(self, claim: BlockClaim) -> None:
        super().publish_block(claim)
        if self.bus is not None:
            self.bus.publish(claim)

    def delete_block(self, key: str) -> None:
        super().delete_block(key)
        if self.bus is not None:
            self.bus.withdraw(self.owner, key)


class Host:
    def __init__(self, name: str, settle: float) -> None:
        self.name = name
        engine = Engine()
        self.blocks = BlockTable(name)
        self.peering = BusPeering(name)
        self.claims = GossipClaims(
            node=name,
            peering=self.peering,  # type: ignore[arg-type]
            engine=engine,  # type: ignore[arg-type]
            blocks=self.blocks,
            addresses=AddressBook(engine.view),
            settle=settle,
        )


def claims_for(settle: float) -> tuple[GossipClaims, BlockTable, Published]:
    engine = Engine()
    blocks = BlockTable("h1")
    peering = Published()
    claims = GossipClaims(
        node="h1",
        peering=peering,  # type: ignore[arg-type]
        engine=engine,  # type: ignore[arg-type]
        blocks=blocks,
        addresses=AddressBook(engine.view),
        settle=settle,
    )
    return claims, blocks, peering


async def test_a_burst_of_adds_rarely_waits_for_a_block_claim() -> None:
    # 1,000 adds at about 1,000/s, with a settle of 0.05 s: the blocks claimed ahead have
    # settled before the adds reach them. (The old rule claimed one block when the last one
    # came into use, sized by a rate that was still low: the 65th add of a burst waited.)
    settle = 0.05
    claims, blocks, _ = claims_for(settle=settle)
    claims.adopt_block(WIDE.name, blocks_of(WIDE.subnet)[0], time.time() - 1)
    taken: list[IPv4Address] = []
    async with asyncio.timeout(30.0):
        for _ in range(1000):
            ip, contested = await claims.take_address(WIDE)
            assert not contested
            taken.append(ip)
            await asyncio.sleep(0.001)
    assert len(set(taken)) == 1000
    mine = blocks.mine(WIDE.name)
    assert all(any(ip in b for b in mine) for ip in taken)
    # Ahead, not everything: at most 16 blocks beyond the 16 the adds filled.
    assert len(mine) <= 1000 // 64 + 1 + 16
    # Only the first adds, while the rate they measure is still rising, outrun the claims
    # ahead (and wait for the rest of a settle).
    assert claims.block_waits.value <= 10, claims.block_waits.value


async def test_no_add_uses_a_block_before_its_claim_settled() -> None:
    # Every address handed out uncontested is in a block whose claim had settled: one
    # published at least a settle time before the add returned, even in a burst of 300
    # adds at once that outruns every claim ahead.
    settle = 0.05
    claims, _, peering = claims_for(settle=settle)
    claims.adopt_block(WIDE.name, blocks_of(WIDE.subnet)[0], time.time() - 1)

    async def add() -> tuple[IPv4Address, float]:
        ip, contested = await claims.take_address(WIDE)
        assert not contested
        return ip, time.time()

    async with asyncio.timeout(10.0):
        taken = await asyncio.gather(*(add() for _ in range(300)))
    for ip, at in taken:
        published = peering.blocks.get(block_of(WIDE.subnet, ip), 0.0)
        assert at - published >= settle * 0.9, (ip, at - published)
    assert claims.block_waits.value > 0  # the burst did reach blocks still settling


async def test_an_add_in_a_block_another_host_claimed_first_settles_like_a_borrowed_one() -> None:
    # h2 claimed the block h1 claims ahead a moment earlier, and h1 hears it during the
    # settle. The adds that reached that block must not take its addresses as h1's own:
    # h2 hands them out too. They come back contested (and settle as endpoints), or from
    # a block h1 did win.
    claims, blocks, peering = claims_for(settle=0.05)
    claims.adopt_block(SMALL.name, blocks_of(SMALL.subnet)[0], time.time() - 1)
    lost: list[IPv4Network] = []
    heard = asyncio.Event()
    publish = peering.publish_block

    def hear_h2(block: IPv4Network, created_at: float) -> None:
        blocks.claim("h2", SMALL.name, block, created_at)
        heard.set()

    def publish_and_lose_the_first(claim: BlockClaim) -> None:
        publish(claim)
        if not lost and claim.block != blocks_of(SMALL.subnet)[0]:
            lost.append(claim.block)
            # Heard halfway through h1's settle, after some adds took addresses in it.
            asyncio.get_running_loop().call_later(0.025, hear_h2, claim.block, claim.created_at - 1.0)

    peering.publish_block = publish_and_lose_the_first  # type: ignore[method-assign]
    async with asyncio.timeout(10.0):
        taken = await asyncio.gather(*(claims.take_address(SMALL) for _ in range(12)))
        await heard.wait()
    assert lost and blocks.holder(SMALL.name, lost[0]) == "h2"
    for ip, contested in taken:
        if ip in lost[0]:
            assert contested, f"{ip} in h2's block {lost[0]} taken as h1's own"
        else:
            assert any(ip in b for b in blocks.mine(SMALL.name))
    assert any(ip in lost[0] for ip, _ in taken)  # the case this test is about did happen


async def test_a_small_subnet_keeps_few_blocks_ahead_not_all_of_them() -> None:
    claims, blocks, _ = claims_for(settle=0.02)
    claims.adopt_block(SMALL.name, blocks_of(SMALL.subnet)[0], time.time())
    async with asyncio.timeout(5.0):
        for _ in range(40):
            await claims.take_address(SMALL)
    # 40 addresses need 11 blocks of 4 (the first lacks the subnet's own address and the
    # gateway): at most 4 more ahead (1/16 of the subnet), and the other 49 are left to the
    # other hosts.
    assert len(blocks.mine(SMALL.name)) <= 11 + 4


async def test_a_host_that_adds_now_and_then_holds_one_block() -> None:
    # The old rule kept a whole block free ahead whatever the rate: every host that added
    # one endpoint held two blocks, and half of a 30-host cluster found none left in a /24.
    claims, blocks, _ = claims_for(settle=0.01)
    for _ in range(2):
        _, contested = await claims.take_address(SMALL)
        assert not contested
        await asyncio.sleep(0.05)
    assert len(blocks.mine(SMALL.name)) == 1


async def test_thirty_hosts_in_a_24_each_get_a_block_of_their_own() -> None:
    hosts = [Host(f"h{i}", settle=0.02) for i in range(30)]
    bus = Bus(hosts)
    for host in hosts:
        host.peering.bus = bus
    async with asyncio.timeout(10.0):
        taken = await asyncio.gather(*(h.claims.take_address(SMALL) for h in hosts))
    assert [ip for ip, contested in taken if contested] == []  # nobody settles its add
    assert len({ip for ip, _ in taken}) == 30
    for host, (ip, _) in zip(hosts, taken, strict=True):
        mine = host.blocks.mine(SMALL.name)
        assert any(ip in b for b in mine)
        # Every host agrees who holds each of these blocks.
        assert {h.blocks.holder(SMALL.name, b) for h in hosts for b in mine} == {host.name}


async def test_with_every_block_held_adds_do_not_search_for_one_each_time() -> None:
    claims, blocks, _ = claims_for(settle=60.0)
    for block in blocks_of(MID.subnet)[1:]:
        blocks.claim("h2", MID.name, block, 1.0)
    claims.adopt_block(MID.name, blocks_of(MID.subnet)[0], time.time())
    searches = 0
    search = blocks.free_block

    def counted(network: Network, *, start: int = 0) -> IPv4Network | None:
        nonlocal searches
        searches += 1
        return search(network, start=start)

    blocks.free_block = counted  # type: ignore[method-assign]
    async with asyncio.timeout(5.0):
        for _ in range(10):
            ip, contested = await claims.take_address(MID)
            assert not contested and ip in blocks_of(MID.subnet)[0]
    assert searches == 1


async def test_adds_waiting_for_the_first_claim_all_get_an_own_block_none_borrows() -> None:
    # 100 adds at once on a host with no block yet: they all wait for one claim, whose
    # block holds 64 addresses. The old rule then had the other 36 borrow an address
    # anywhere in the subnet and settle for it (another 0.3 s each).
    claims, blocks, _ = claims_for(settle=0.05)
    async with asyncio.timeout(5.0):
        taken = await asyncio.gather(*(claims.take_address(WIDE) for _ in range(100)))
    assert [ip for ip, contested in taken if contested] == []
    assert len({ip for ip, _ in taken}) == 100
    mine = blocks.mine(WIDE.name)
    assert all(any(ip in b for b in mine) for ip, _ in taken)


def peers(count: int, state: MemberState = MemberState.ALIVE) -> list[MemberInfo]:
    return [MemberInfo(f"p{i}", "198.18.0.1", 7946, state, 1, None, 0.0) for i in range(count)]


async def test_a_host_claims_a_block_when_it_learns_of_a_network_and_its_first_add_does_not_wait() -> None:
    claims, blocks, _ = claims_for(settle=0.05)
    assert claims.network_known(SMALL) is None  # the view is not complete yet (a restart)
    claims.view_complete()
    claim = claims.network_known(SMALL)
    assert claim is not None
    async with asyncio.timeout(5.0):
        assert len(await claim) == 1
    assert claims.network_known(SMALL) is None  # held already: nothing more
    ip, contested = await claims.take_address(SMALL)
    assert not contested and ip in blocks.mine(SMALL.name)[0]
    assert claims.block_waits.value == 0
    assert len(blocks.mine(SMALL.name)) == 1


async def test_view_complete_claims_blocks_of_each_network_in_the_view() -> None:
    # 128 addresses (a settle time of a fast burst), and 1/64 of the subnet at most.
    claims, blocks, _ = claims_for(settle=0.02)
    view = claims._engine.view
    for network in (WIDE, MID, SMALL):
        view.networks[network.name] = network
    started = claims.view_complete()
    assert len(started) == 3
    async with asyncio.timeout(5.0):
        await asyncio.gather(*started)
    held = {n.name: sum(b.num_addresses for b in blocks.mine(n.name)) for n in (WIDE, MID, SMALL)}
    assert held == {WIDE.name: 128, MID.name: 16, SMALL.name: 4}


async def test_no_block_ahead_of_need_where_the_subnet_lacks_blocks_for_twice_the_hosts() -> None:
    # A /24 has 64 blocks: with 33 live hosts (32 peers and this one), a block each for
    # those that never add an endpoint there would leave too few for those that do.
    # Suspected peers count; dead ones do not.
    claims, _, peering = claims_for(settle=0.02)
    claims.view_complete()
    peering.peers = peers(31) + peers(1, MemberState.SUSPECT) + peers(5, MemberState.DEAD)
    assert claims.network_known(SMALL) is None
    peering.peers = peers(30) + peers(5, MemberState.DEAD)
    claim = claims.network_known(SMALL)
    assert claim is not None
    async with asyncio.timeout(5.0):
        await claim


async def test_a_network_gone_gives_back_this_hosts_blocks_of_it_only() -> None:
    claims, blocks, peering = claims_for(settle=0.02)
    claims.view_complete()
    for network in (WIDE, SMALL):
        claim = claims.network_known(network)
        assert claim is not None
        async with asyncio.timeout(5.0):
            await claim
    other = blocks_of(SMALL.subnet)[7]
    blocks.claim("h2", SMALL.name, other, 1.0)
    claims.network_gone(SMALL.name)
    assert blocks.mine(SMALL.name) == [] and blocks.holder(SMALL.name, other) == "h2"
    assert [key.partition("/")[0] for key in peering.deleted] == [SMALL.name]  # withdrawn by gossip
    assert len(blocks.mine(WIDE.name)) == 2
