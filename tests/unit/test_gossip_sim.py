"""The simulation tools: a loop in virtual time, a simulated LAN, and a 50-member cluster on them.

No sockets and no root: this is what lets CI cover `bench/gossip_scale.py`'s machinery.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from overlayd.gossip import GossipNode, Keyring, MemberState, Record
from overlayd.gossip.clock import LoopClock
from overlayd.gossip.simnet import LinkModel, SimNetwork
from overlayd.gossip.virtualtime import Stalled, VirtualTimeLoop

T = TypeVar("T")


def simulate(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main())


# --- virtual time ---------------------------------------------------------------------------------


def test_an_hour_of_sleep_costs_no_wall_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        return loop.time()

    wall = time.perf_counter()
    assert simulate(main) == pytest.approx(3600)
    assert time.perf_counter() - wall < 1.0


def test_timers_fire_in_order_at_their_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        for name, delay in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)):
            loop.call_later(delay, lambda n=name: fired.append((n, loop.time())))
        await asyncio.sleep(5)
        return fired

    assert simulate(main) == [("a", 1.0), ("a2", 1.0), ("b", 2.0), ("c", 3.0)]


def test_timeouts_run_in_virtual_time() -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        try:
            await asyncio.wait_for(never, 30)
        except TimeoutError:
            return True, loop.time()
        return False, loop.time()

    assert simulate(main) == (True, pytest.approx(30))


def test_waiting_on_nothing_is_a_stall_not_a_hang() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(Stalled):
        simulate(main)


def test_time_only_moves_forward() -> None:
    loop = VirtualTimeLoop()
    try:
        with pytest.raises(ValueError):
            loop.advance(-1)
    finally:
        loop.close()


# --- the simulated network ------------------------------------------------------------------------


def test_datagrams_arrive_after_the_latency_and_are_counted() -> None:
    async def main() -> tuple[list[tuple[bytes, float]], int]:
        loop = asyncio.get_running_loop()
        net = SimNetwork(LinkModel(latency=(0.001, 0.002)), rng=random.Random(1))
        got: list[tuple[bytes, float]] = []
        a = net.open(("10.0.0.1", 0), lambda d, s: None)
        net.open(("10.0.0.2", 7946), lambda d, s: got.append((d, loop.time())))
        for i in range(10):
            a.sendto(bytes([i]) * 10, ("10.0.0.2", 7946))
        await asyncio.sleep(1)
        return got, net.counters(a.address).bytes

    got, sent = simulate(main)
    assert len(got) == 10 and all(0.001 <= t <= 0.002 for _, t in got)
    assert sent == 100


def test_loss_drops_about_its_share() -> None:
    async def main() -> int:
        net = SimNetwork(LinkModel(loss=0.2), rng=random.Random(2))
        got: list[bytes] = []
        a = net.open(("10.0.0.1", 1), lambda d, s: None)
        net.open(("10.0.0.2", 1), lambda d, s: got.append(d))
        for _ in range(2000):
            a.sendto(b"x", ("10.0.0.2", 1))
        await asyncio.sleep(1)
        assert net.total().lost == 2000 - len(got)
        return len(got)

    assert 1500 < simulate(main) < 1700


def test_a_host_handles_one_datagram_at_a_time() -> None:
    """Ten datagrams arriving together are handled cpu seconds apart, in arrival order, and
    what a handler sends leaves when its handling ends."""

    async def main() -> tuple[list[tuple[bytes, float]], list[float]]:
        loop = asyncio.get_running_loop()
        net = SimNetwork(LinkModel(latency=(0.001, 0.001), cpu=0.01), rng=random.Random(3))
        handled: list[tuple[bytes, float]] = []
        echoes: list[float] = []
        a = net.open(("10.0.0.1", 1), lambda d, s: echoes.append(loop.time()))

        def echo(data: bytes, source: tuple[str, int]) -> None:
            handled.append((data, loop.time()))
            b.sendto(data, source)

        b = net.open(("10.0.0.2", 1), echo)
        for i in range(10):
            a.sendto(bytes([i]), ("10.0.0.2", 1))
        await asyncio.sleep(1)
        return handled, echoes

    handled, echoes = simulate(main)
    assert [d for d, _ in handled] == [bytes([i]) for i in range(10)]
    assert [t for _, t in handled] == pytest.approx([0.001 + 0.01 * i for i in range(10)])
    # each echo: handled from 0.001 + 0.01 i, done 0.01 later, 0.001 on the wire (A's CPU too)
    assert echoes == pytest.approx([0.012 + 0.01 * i for i in range(10)])


def test_closed_or_unknown_addresses_receive_nothing() -> None:
    async def main() -> list[bytes]:
        net = SimNetwork(rng=random.Random(4))
        got: list[bytes] = []
        a = net.open(("10.0.0.1", 1), lambda d, s: None)
        b = net.open(("10.0.0.2", 1), lambda d, s: got.append(d))
        b.close()
        a.sendto(b"to a closed one", ("10.0.0.2", 1))
        a.sendto(b"to nobody", ("10.0.0.3", 1))
        await asyncio.sleep(1)
        with pytest.raises(OSError):
            net.open(("10.0.0.1", 1), lambda d, s: None)
        return got

    assert simulate(main) == []


# --- a simulated cluster --------------------------------------------------------------------------


def test_50_simulated_members_all_get_every_change() -> None:
    """Fifty real GossipNodes on the simulated LAN with 5% loss: membership forms, and every
    publish and delete reaches every other member (pushes, then anti-entropy for any misses)."""
    n = 50
    key = Keyring.generate()

    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        net = SimNetwork(LinkModel(latency=(0.0001, 0.0005), loss=0.05), rng=random.Random(5))
        clock = LoopClock(loop)
        learned: list[dict[tuple[str, str, str], Record]] = [{} for _ in range(n)]
        nodes = [
            GossipNode(
                f"s{i:02}",
                keyring=Keyring([key]),
                bind=f"10.0.0.{i + 1}",
                seeds=[("10.0.0.1", 7946)],
                on_change=lambda r, box=learned[i]: box.__setitem__(r.ident, r),
                network=net,
                clock=clock,
            )
            for i in range(n)
        ]
        for node in nodes:
            await node.start()
        start = loop.time()
        while not all(sum(m.state == MemberState.ALIVE for m in x.members()) == n - 1 for x in nodes):
            assert loop.time() - start < 120, "membership did not form in 120 s of simulated time"
            await asyncio.sleep(0.5)
        formed = loop.time() - start
        rng = random.Random(6)
        spreads = []
        for i in range(20):
            src = rng.randrange(n)
            made = nodes[src].publish("endpoint", f"demo/e{i}", {"ip": f"10.100.0.{i + 1}"})
            if i % 5 == 4:
                made = nodes[src].delete("endpoint", f"demo/e{i}")  # put and tombstone, back to back
            t0 = loop.time()
            while not all(x.get(*made.ident) == made for x in nodes):
                assert loop.time() - t0 < 60, f"change {i} did not reach everyone in 60 s"
                await asyncio.sleep(0.001)
            spreads.append(loop.time() - t0)
            others = [learned[j] for j in range(n) if j != src]
            assert all(box.get(made.ident) == made for box in others)  # callbacks too
        for node in nodes:
            await node.stop(leave=False)
        return spreads, formed

    spreads, formed = simulate(main)
    print(f"\n50 simulated members: formed in {formed:.1f} s, spreads (s): {sorted(spreads)}")
    assert sorted(spreads)[len(spreads) // 2] < 0.1  # the median change travels by push


def test_a_restarted_member_catches_up_and_knows_it() -> None:
    """A member restarted with an empty table is told `InSync` once its records match a live
    peer's; until then anti-entropy runs at the catch-up pace, and only then is it caught up."""
    key = Keyring.generate()

    async def main() -> tuple[bool, float, int]:
        loop = asyncio.get_running_loop()
        net = SimNetwork(LinkModel(latency=(0.0001, 0.0005), loss=0.0), rng=random.Random(7))
        clock = LoopClock(loop)

        def node(i: int) -> GossipNode:
            return GossipNode(
                f"r{i}",
                keyring=Keyring([key]),
                bind=f"10.0.1.{i + 1}",
                seeds=[("10.0.1.1", 7946)],
                network=net,
                clock=clock,
                on_change=lambda r: earlier.append(r) if r.owner == f"r{i}" else None,
            )

        earlier: list[Record] = []  # the restarted member's records from its first life

        peers = [node(i) for i in range(3)]
        for p in peers:
            await p.start()
        for i, p in enumerate(peers):
            for k in range(40):
                p.publish("endpoint", f"demo/p{i}-{k}", {"ip": f"10.100.{i}.{k + 1}"})
        # Everyone catches up with everyone once the tables agree.
        async with asyncio.timeout(60):
            while True:
                if all(p.is_caught_up() for p in peers):
                    break
                await asyncio.sleep(0.1)
        await peers[2].stop(leave=False)
        restarted = node(2)  # a new life: empty table, a higher incarnation
        assert not restarted.is_caught_up()
        await restarted.start()
        t0 = loop.time()
        async with asyncio.timeout(30):
            # As the daemon does: its first life's records it no longer holds, it withdraws
            # (at its new incarnation); until then the tables cannot match.
            while not restarted.is_caught_up():
                for r in earlier:
                    if r.payload is not None:
                        restarted.delete(r.kind, r.key)
                earlier.clear()
                await asyncio.sleep(0.05)
        took = loop.time() - t0
        # Caught up means it holds what the others hold (its own earlier records included).
        held = {r.ident for r in restarted.records()}
        wanted = {r.ident for r in peers[0].records() if r.owner != "r2"}
        assert not any(r.owner == "r2" for r in peers[0].records())  # withdrawn everywhere
        for p in (*peers[:2], restarted):
            await p.stop(leave=False)
        return wanted <= held, took, len(held)

    complete, took, held = simulate(main)
    assert complete
    assert took < 5.0  # the catch-up pace, well inside one ordinary anti-entropy round
    assert held >= 80
