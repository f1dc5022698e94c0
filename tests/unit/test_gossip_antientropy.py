"""Anti-entropy over hash trees, on simulated clusters: it repairs everything pushes miss, and at
rest it costs the same per member whatever the cluster's size (simulated time, no sockets)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from overlayd.gossip import GossipConfig, GossipMetrics, GossipNode, Keyring
from overlayd.gossip.clock import LoopClock
from overlayd.gossip.simnet import LinkModel, SimNetwork
from overlayd.gossip.virtualtime import VirtualTimeLoop

T = TypeVar("T")
CONFIG = GossipConfig(probe_interval=0.5, probe_timeout=0.2, anti_entropy_interval=1.0)
KEY = Keyring.generate()


def simulate(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main())


class SimCluster:
    def __init__(self, n: int, config: GossipConfig, loss: float = 0.0, seed: int = 1) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.net = SimNetwork(LinkModel(loss=loss), rng=random.Random(seed))
        self.registry = CollectorRegistry()
        metrics = GossipMetrics(self.registry)
        self.nodes = [
            GossipNode(
                f"m{i:03}",
                keyring=Keyring([KEY]),
                bind=f"10.0.{i // 250}.{i % 250 + 1}",
                seeds=[("10.0.0.1", 7946)],
                network=self.net,
                clock=LoopClock(loop),
                config=config,
                metrics=metrics,
            )
            for i in range(n)
        ]

    async def start(self) -> None:
        for node in self.nodes:
            await node.start()
        await self.until(self.formed, 120, "membership")

    def formed(self) -> bool:
        trees = [n._ms.tree for n in self.nodes]
        return all(len(t) == len(self.nodes) for t in trees) and len({t.root for t in trees}) == 1

    async def until(self, pred: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = self.loop.time() + seconds
        while not pred():
            assert self.loop.time() < deadline, f"no {what} within {seconds} simulated seconds"
            await asyncio.sleep(0.1)

    def sent(self, kind: str) -> float:
        return self.registry.get_sample_value("overlayd_gossip_messages_sent_total", {"type": kind}) or 0.0

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop(leave=False)


def test_with_pushes_off_the_trees_alone_spread_every_change() -> None:
    async def main() -> None:
        c = SimCluster(
            80, GossipConfig(probe_interval=0.5, probe_timeout=0.2, anti_entropy_interval=1.0, fanout=0)
        )
        await c.start()
        rng = random.Random(2)
        made = [
            rng.choice(c.nodes).publish("endpoint", f"demo/e{i}", {"ip": f"10.1.0.{i}"}) for i in range(5)
        ]
        owner = next(n for n in c.nodes if n.name == made[0].owner)
        made[0] = owner.delete("endpoint", "demo/e0")
        await c.until(lambda: all(n.get(*r.ident) == r for n in c.nodes for r in made), 60, "convergence")
        assert c.sent("push") == 0
        assert c.sent("watermarks") > 0 and c.sent("records") > 0
        await c.stop()

    simulate(main)


def test_at_rest_a_member_sends_the_same_whatever_the_cluster_size() -> None:
    """Two opening sums per round and nothing else: the tables agree, so no one descends.
    (A full-table exchange would cost four times more per member at four times the size.)"""

    async def at_rest(n: int) -> tuple[float, float]:
        c = SimCluster(n, CONFIG, seed=n)
        await c.start()
        for node in c.nodes:
            node.publish("node", node.name, {"vtep": "198.18.0.1"})
        await c.until(lambda: not any(x._ms.pending_news() for x in c.nodes), 300, "join news drained")
        await asyncio.sleep(5)  # the records' pushes and repairs are over
        before = c.net.total().bytes
        kinds = ("sums", "watermarks", "member-entries", "records", "request", "members")
        sent = {k: c.sent(k) for k in kinds}
        await asyncio.sleep(20)
        per_member_second = (c.net.total().bytes - before) / n / 20
        exchanges = {k: c.sent(k) - sent[k] for k in kinds}
        await c.stop()
        assert exchanges["sums"] > 0 and sum(exchanges.values()) == exchanges["sums"], exchanges
        return per_member_second, exchanges["sums"] / n / 20

    small = simulate(lambda: at_rest(20))
    large = simulate(lambda: at_rest(80))
    print(f"\nat rest, bytes and sums per member per second: 20 members {small}, 80 members {large}")
    assert abs(large[0] - small[0]) / small[0] < 0.2
    assert abs(large[1] - 2 / CONFIG.anti_entropy_interval) < 0.3
