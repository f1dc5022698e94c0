"""What the reconciler remembers of removed neighbour entries (overlayd.dataplane.announce)."""

from __future__ import annotations

from ipaddress import IPv4Address

from overlayd.dataplane.announce import Removed

A = IPv4Address
K1, K2, K3 = A("10.0.0.1"), A("10.0.0.2"), A("10.0.0.3")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_remembers_the_mac_an_entry_had_until_it_comes_back() -> None:
    removed = Removed()
    assert not removed and removed.get(K1) is None
    removed.removed(K1, "02:00:00:00:00:01")
    assert removed.get(K1) == "02:00:00:00:00:01"
    assert dict(removed) == {K1: "02:00:00:00:00:01"}
    removed.added(K1)
    assert removed.get(K1) is None and len(removed) == 0
    removed.added(K2)  # never removed: nothing to forget
    assert not removed


def test_forgets_what_was_removed_longer_than_the_window_ago() -> None:
    clock = Clock()
    removed = Removed(window=10.0, clock=clock)
    removed.removed(K1, "02:00:00:00:00:01")
    clock.now = 6.0
    removed.removed(K2, "02:00:00:00:00:02")
    clock.now = 9.0
    removed.removed(K1, "02:00:00:00:00:11")  # removed again (after coming back): counted from now
    clock.now = 17.0
    removed.expire()
    assert dict(removed) == {K1: "02:00:00:00:00:11"}
    clock.now = 19.5
    removed.expire()
    assert not removed


def test_holds_at_most_its_limit_the_oldest_going_first() -> None:
    removed = Removed(limit=2)
    removed.removed(K1, "02:00:00:00:00:01")
    removed.removed(K2, "02:00:00:00:00:02")
    removed.removed(K3, "02:00:00:00:00:03")
    assert list(removed) == [K2, K3]
