"""Clock offsets from probe round trips: the estimate, its filter, and nodes whose clocks are set
apart by a known amount (simulated time and network, so the truth is exact)."""

from __future__ import annotations

import asyncio
import random

import pytest

from overlayd.gossip import GossipConfig, GossipNode, Keyring, MemberInfo, MemberState
from overlayd.gossip.clock import LoopClock, ShiftedClock
from overlayd.gossip.membership import Membership
from overlayd.gossip.schema import MemberUpdate
from overlayd.gossip.simnet import LinkModel, SimNetwork
from overlayd.gossip.skew import OffsetFilter, offset_sample
from overlayd.gossip.virtualtime import VirtualTimeLoop


def test_symmetric_legs_give_the_exact_offset() -> None:
    # The peer's clock is 2 s ahead; each leg takes 10 ms; it stamps the ack as it answers.
    t1 = 1000.0
    peer_at_answer = t1 + 0.010 + 2.0
    assert offset_sample(t1, peer_at_answer, rtt=0.020) == pytest.approx(2.0)


@pytest.mark.parametrize("out_leg", [0.0, 0.005, 0.019, 0.020])
def test_asymmetric_legs_err_by_at_most_half_the_round_trip(out_leg: float) -> None:
    t1, rtt, truth = 1000.0, 0.020, -3.0
    sample = offset_sample(t1, t1 + out_leg + truth, rtt)
    assert abs(sample - truth) <= rtt / 2 + 1e-12


def test_filter_keeps_the_sample_with_the_fastest_round_trip() -> None:
    f = OffsetFilter(size=3)
    assert f.estimate is None and f.error is None
    assert f.add(0.50, rtt=0.010) == 0.50
    assert f.add(0.90, rtt=0.100) == 0.50  # a slow exchange (queueing on one leg) loses
    assert f.add(0.48, rtt=0.004) == 0.48
    assert f.error == pytest.approx(0.002)
    f.add(0.70, rtt=0.050)
    f.add(0.70, rtt=0.060)
    f.add(0.70, rtt=0.070)  # the fast samples aged out of the window: the estimate follows
    assert f.estimate == 0.70
    with pytest.raises(ValueError):
        f.add(0.0, rtt=-1.0)


def test_membership_keeps_the_offset_across_state_changes() -> None:
    ms = Membership("me", "198.18.0.1", 7946, incarnation=1, rng=random.Random(1))
    ms.apply(MemberUpdate("x", "198.18.0.2", 7946, MemberState.ALIVE, 1))
    info = ms.get("x")
    assert info is not None and info.clock_offset is None
    ms.record_clock("x", 0.25, 0.001)
    ms.apply(MemberUpdate("x", "198.18.0.2", 7946, MemberState.SUSPECT, 1))
    ms.apply(MemberUpdate("x", "198.18.0.2", 7946, MemberState.ALIVE, 2))
    info = ms.get("x")
    assert info is not None and info.clock_offset == 0.25
    ms.record_clock("nobody", 1.0, 0.001)  # a member we do not know: ignored
    assert ms.get("nobody") is None


FAST = GossipConfig(probe_interval=0.2, probe_timeout=0.1, anti_entropy_interval=0.5)


def run_trio(shift: float, cut_a_b: bool) -> tuple[dict[str, MemberInfo], dict[str, MemberInfo]]:
    """a and c keep true time, b's wall clock is `shift` ahead; what a and b see of the others
    after 20 simulated seconds. With `cut_a_b`, a and b reach each other only through c."""
    key = Keyring.generate()

    async def main() -> tuple[dict[str, MemberInfo], dict[str, MemberInfo]]:
        loop = asyncio.get_running_loop()
        net = SimNetwork(LinkModel(latency=(0.0001, 0.002)), rng=random.Random(7))
        true_time = LoopClock(loop)
        clocks = {"a": true_time, "b": ShiftedClock(true_time, shift), "c": true_time}
        nodes = {
            name: GossipNode(
                name,
                keyring=Keyring([key]),
                bind=f"10.0.0.{i + 1}",
                seeds=[("10.0.0.1", 7946)],
                network=net,
                clock=clocks[name],
                config=FAST,
            )
            for i, name in enumerate(clocks)
        }
        for node in nodes.values():
            await node.start()
        if cut_a_b:
            pair = {("10.0.0.1", 7946), ("10.0.0.2", 7946)}
            net.cut = lambda src, dst: {src, dst} == pair
        await asyncio.sleep(20)
        views = tuple({m.name: m for m in nodes[n].members()} for n in ("a", "b"))
        for node in nodes.values():
            await node.stop(leave=False)
        return views

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main())


def test_a_node_whose_clock_is_ahead_is_seen_ahead_and_sees_the_others_behind() -> None:
    a_sees, b_sees = run_trio(shift=2.5, cut_a_b=False)
    # Legs of 0.1-2 ms: the error is at most half the fastest round trip kept.
    assert a_sees["b"].clock_offset == pytest.approx(2.5, abs=0.002)
    assert a_sees["c"].clock_offset == pytest.approx(0.0, abs=0.002)
    assert b_sees["a"].clock_offset == pytest.approx(-2.5, abs=0.002)
    assert b_sees["c"].clock_offset == pytest.approx(-2.5, abs=0.002)


def test_relayed_acks_give_no_clock_sample() -> None:
    """An indirect ack is sealed by the helper, with the helper's clock: it must not be taken
    for the target's (here it would say b is on time, while b is 2.5 s ahead)."""
    a_sees, _ = run_trio(shift=2.5, cut_a_b=True)
    b = a_sees["b"]
    assert b.state == MemberState.ALIVE  # kept alive by c's indirect probes
    assert b.clock_offset is None  # the cut came before any direct exchange
