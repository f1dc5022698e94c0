"""SWIM member table: merge rules, suspicion timeout, refutation and piggybacking (pure)."""

from __future__ import annotations

import math
import random

from overlayd.gossip.membership import Membership
from overlayd.gossip.schema import MemberState, MemberUpdate

A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def upd(name: str, state: MemberState, inc: int) -> MemberUpdate:
    return MemberUpdate(name, "198.18.0.9", 7946, state, inc)


def table(clock: Clock | None = None, **kw: float) -> Membership:
    c = clock or Clock()
    return Membership("me", "198.18.0.1", 7946, incarnation=5, clock=c, wall=c, rng=random.Random(1), **kw)


def state(ms: Membership, name: str) -> tuple[MemberState, int] | None:
    i = ms.get(name)
    return (i.state, i.incarnation) if i else None


def test_transcript_of_merge_rules() -> None:
    ms = table()
    steps = [
        (upd("x", D, 3), None),  # death of a stranger: nothing kept
        (upd("x", A, 1), (A, 1)),
        (upd("x", A, 1), (A, 1)),  # no change
        (upd("x", S, 1), (S, 1)),  # suspect at >= incarnation beats alive
        (upd("x", A, 1), (S, 1)),  # alive must out-bid the suspicion
        (upd("x", S, 1), (S, 1)),
        (upd("x", A, 2), (A, 2)),  # refuted
        (upd("x", S, 1), (A, 2)),  # old news
        (upd("x", D, 2), (D, 2)),
        (upd("x", S, 3), (D, 2)),  # suspicion never revives the dead
        (upd("x", L, 2), (L, 2)),  # a clean leave replaces a death at the same incarnation
        (upd("x", D, 2), (L, 2)),
        (upd("x", A, 3), (A, 3)),  # rejoined with a higher incarnation
    ]
    for u, expected in steps:
        ms.apply(u)
        assert state(ms, "x") == expected, u


def test_changes_are_reported_with_previous_state() -> None:
    ms = table()
    first = ms.apply(upd("x", A, 1))
    assert first is not None and first.previous is None
    change = ms.apply(upd("x", S, 1))
    assert change is not None and change.previous == A and change.member.state == S
    assert ms.apply(upd("x", S, 1)) is None


def test_refutes_suspicion_of_itself() -> None:
    ms = table()
    assert ms.apply(upd("me", S, 5)) is None
    assert ms.incarnation == 6 and ms.refutations == 1
    assert ms.piggyback(10_000)[0] == MemberUpdate("me", "198.18.0.1", 7946, A, 6)
    ms.apply(upd("me", D, 3))  # older claim: ignored
    assert ms.incarnation == 6
    ms.apply(upd("me", D, 9))
    assert ms.incarnation == 10


def test_a_leaving_node_does_not_refute() -> None:
    ms = table()
    assert ms.leave().state == L
    ms.apply(upd("me", D, 5))
    assert ms.incarnation == 5


def test_suspect_becomes_dead_after_timeout_unless_refuted() -> None:
    clock = Clock()
    ms = table(clock, probe_interval=1.0, suspicion_mult=4.0)
    ms.apply(upd("x", A, 1))
    ms.apply(upd("y", A, 1))
    assert ms.suspect("x") is not None and ms.suspect("y") is not None
    clock.t += 3.9
    assert ms.expire() == []
    ms.apply(upd("y", A, 2))  # y refutes in time
    clock.t += 0.2
    dead = ms.expire()
    assert [c.member.name for c in dead] == ["x"]
    assert state(ms, "x") == (D, 1) and state(ms, "y") == (A, 2)


def test_suspicion_timeout_grows_with_log_n() -> None:
    ms = table(probe_interval=1.0, suspicion_mult=4.0)
    assert ms.suspicion_timeout() == 4.0
    for i in range(99):
        ms.apply(upd(f"n{i}", A, 1))
    assert math.isclose(ms.suspicion_timeout(), 4.0 * math.log10(100))
    for i in range(999):
        ms.apply(upd(f"m{i}", A, 1))
    assert ms.suspicion_timeout() > 4.0 * 3


def test_piggyback_retransmits_a_bounded_number_of_times() -> None:
    ms = table()
    ms.apply(upd("x", A, 1))
    sends = 0
    while any(u.name == "x" for u in ms.piggyback(10_000)):
        sends += 1
    assert sends == 3 * math.ceil(math.log10(ms.cluster_size() + 1))


def test_piggyback_fits_budget_and_tells_a_suspect_its_state() -> None:
    ms = table()
    for i in range(50):
        ms.apply(upd(f"n{i:02}", A, 1))
    assert 0 < len(ms.piggyback(300)) < 10
    ms.suspect("n07")
    to_suspect = ms.piggyback(300, to="n07")
    assert to_suspect[0].name == "n07" and to_suspect[0].state == S


def test_probe_order_visits_everyone_once_per_round() -> None:
    ms = table()
    names = {f"n{i}" for i in range(10)}
    for n in names:
        ms.apply(upd(n, A, 1))
    for _ in range(3):
        seen = [ms.next_probe_target() for _ in range(10)]
        assert {i.name for i in seen if i} == names


def test_dead_are_not_probed_and_are_reaped() -> None:
    clock = Clock()
    ms = table(clock)
    ms.apply(upd("x", A, 1))
    ms.apply(upd("x", D, 1))
    assert ms.next_probe_target() is None
    clock.t += 601
    assert ms.reap(600) == ["x"] and ms.get("x") is None


def test_rtt_is_smoothed() -> None:
    ms = table()
    ms.apply(upd("x", A, 1))
    ms.record_rtt("x", 0.010)
    ms.record_rtt("x", 0.020)
    info = ms.get("x")
    assert info is not None and info.rtt is not None and math.isclose(info.rtt, 0.012)


def test_fresh_news_rides_before_old_and_never_twice_in_one_message() -> None:
    ms = table()
    for i in range(30):
        ms.apply(upd(f"old{i:02}", A, 1))
    for _ in range(3):  # the old news has been sent a few times
        ms.piggyback(10_000)
    ms.apply(upd("fresh", A, 1))
    out = ms.piggyback(200)  # room for a few: the fresh one comes first
    assert out[0].name == "fresh"
    everything = ms.piggyback(100_000)
    assert len({u.name for u in everything}) == len(everything)


def test_members_first_heard_of_in_a_snapshot_are_not_announced_again() -> None:
    ms = table()
    ms.apply(upd("x", A, 1), snapshot=True)
    assert ms.get("x") is not None and ms.pending_news() == 0
    ms.apply(upd("x", D, 1), snapshot=True)  # a change to a member we knew: that spreads
    assert [u.name for u in ms.piggyback(10_000)] == ["x"]


def test_state_counts_follow_every_change_and_reap() -> None:
    clock = Clock()
    ms = table(clock)
    for i in range(6):
        ms.apply(upd(f"n{i}", A, 1))
    ms.suspect("n0")
    ms.apply(upd("n1", D, 1))
    ms.apply(upd("n2", L, 1))
    assert ms.counts() == {A: 3, S: 1, D: 1, L: 1}
    clock.t += 1000
    ms.expire()  # the suspect dies now...
    assert ms.counts() == {A: 3, D: 2, L: 1}
    clock.t += 1000
    ms.reap(older_than=10)  # ...and is forgotten with the others later
    assert ms.counts() == {A: 3}
    assert ms.counts() == {A: len(ms.live())}


def test_ring_neighbours_are_the_live_names_around_ours() -> None:
    ms = table()  # this node is "me"
    assert ms.neighbours() == []
    ms.apply(upd("a", A, 1))
    assert [m.name for m in ms.neighbours()] == ["a"]  # one other: one neighbour, not two
    for name in ("b", "mz", "x", "z"):
        ms.apply(upd(name, A, 1))
    assert [m.name for m in ms.neighbours()] == ["mz", "b"]
    ms.apply(upd("mz", D, 1))  # the dead are off the ring
    assert [m.name for m in ms.neighbours()] == ["x", "b"]
    for name in ("a", "b"):
        ms.apply(upd(name, L, 1))
    assert [m.name for m in ms.neighbours()] == ["x", "z"]  # wraps around


def test_ring_takes_the_nearest_live_names_alternating_sides() -> None:
    ms = table()  # this node is "me"
    assert ms.ring(3) == []
    for name in ("a", "b", "c", "x", "y", "z"):
        ms.apply(upd(name, A, 1))
    # ring: a b c me x y z -> distance 1, -1, 2, -2, ...
    assert [m.name for m in ms.ring(3)] == ["x", "c", "y"]
    assert [m.name for m in ms.ring(2)] == [m.name for m in ms.neighbours()]
    assert [m.name for m in ms.ring(3, exclude={"c"})] == ["x", "y", "b"]
    assert [m.name for m in ms.ring(10)] == ["x", "c", "y", "b", "z", "a"]  # each once
    ms.apply(upd("x", D, 1))  # the dead are off the ring
    assert [m.name for m in ms.ring(2)] == ["y", "c"]
