"""A gossip node's loops run where the daemon's watchdog can see them die (simulated time, no sockets)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from overlayd.gossip import GossipConfig, GossipNode, Keyring
from overlayd.gossip.clock import LoopClock
from overlayd.gossip.simnet import SimNetwork
from overlayd.gossip.virtualtime import VirtualTimeLoop
from overlayd.util.tasks import TaskGroup

FAST = GossipConfig(probe_interval=0.2, probe_timeout=0.1, anti_entropy_interval=0.5)


def node(net: SimNetwork, name: str, tasks: TaskGroup | None) -> GossipNode:
    return GossipNode(
        name,
        keyring=Keyring.insecure(),
        bind="10.0.0.1" if name == "a" else "10.0.0.2",
        seeds=[("10.0.0.1", 7946)],
        network=net,
        clock=LoopClock(asyncio.get_running_loop()),
        config=FAST,
        tasks=tasks,
    )


async def until(pred: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll in simulated time (the loop jumps; polling costs nothing) until `pred` or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not pred():
        assert loop.time() < deadline, f"no {what} within {seconds} simulated seconds"
        await asyncio.sleep(0.05)


def boom() -> None:
    raise RuntimeError("boom")


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop_name, breaks", [("probe", "expire"), ("anti-entropy", "reap")])
def test_a_dead_loop_shows_in_the_parent_group(loop_name: str, breaks: str) -> None:
    """The daemon passes its TaskGroup; the watchdog stops pinging once `failures` is not empty."""

    async def main() -> None:
        parent = TaskGroup()
        net = SimNetwork(rng=random.Random(1))
        a, b = node(net, "a", parent), node(net, "b", None)
        await a.start()
        await b.start()
        await asyncio.sleep(2)
        assert parent.failures == [] and a.failures == []
        setattr(a._ms, breaks, lambda *args: boom())
        await until(lambda: bool(parent.failures), 5, "failure in the parent group")
        name, exc = parent.failures[0]
        assert name == f"gossip-{loop_name}-a" and isinstance(exc, RuntimeError)
        assert a.failures == parent.failures
        assert b.failures == []
        await a.stop(leave=False)
        await b.stop(leave=False)

    run(main)


def test_without_a_parent_the_node_reports_its_own_failures() -> None:
    async def main() -> None:
        net = SimNetwork(rng=random.Random(2))
        a = node(net, "a", None)
        await a.start()
        a._ms.expire = boom  # type: ignore[method-assign]
        await until(lambda: bool(a.failures), 5, "failure")
        assert a.failures[0][0] == "gossip-probe-a"
        await a.stop(leave=False)

    run(main)


def test_stop_cancels_only_the_nodes_own_tasks_and_that_is_no_failure() -> None:
    async def main() -> None:
        parent = TaskGroup()
        other = parent.spawn(asyncio.sleep(3600), name="daemon-task")
        net = SimNetwork(rng=random.Random(3))
        a = node(net, "a", parent)
        await a.start()
        await asyncio.sleep(1)
        await a.stop(leave=False)
        assert not other.done()  # the daemon's task runs on
        assert parent.failures == [] and a.failures == []
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)

    run(main)
