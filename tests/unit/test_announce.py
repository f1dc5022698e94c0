"""What the reconciler remembers of removed neighbour entries (overlayd.dataplane.announce)."""

from __future__ import annotations

from ipaddress import IPv4Address

from overlayd.dataplane.announce import Removed, own_announcement_needed

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


def test_an_address_pushed_out_by_the_limit_leaves_the_memory_partial_for_a_window() -> None:
    clock = Clock()
    removed = Removed(window=10.0, limit=2, clock=clock)
    removed.removed(K1, "02:00:00:00:00:01")
    clock.now = 3.0
    removed.removed(K2, "02:00:00:00:00:02")
    assert removed.complete()
    removed.removed(K3, "02:00:00:00:00:03")  # K1 (removed at 0) goes 7 s early
    assert not removed.complete()
    clock.now = 9.9
    assert not removed.complete()
    clock.now = 10.0  # K1 would have expired by now anyway
    assert removed.complete()


MAC, OTHER = "02:00:00:00:00:01", "02:00:00:00:00:02"


def test_a_new_local_endpoint_announces_itself_only_if_its_address_was_used_lately_with_another_mac() -> None:
    removed = Removed()
    assert not own_announcement_needed(K1, MAC, removed=removed, current=None)  # never used
    # A neighbour entry (a remote endpoint) still holds it with another MAC; with ours: moot.
    assert own_announcement_needed(K1, MAC, removed=removed, current=OTHER)
    assert not own_announcement_needed(K1, MAC, removed=removed, current=MAC)
    removed.removed(K1, OTHER)  # removed lately (remote or local) with another MAC
    assert own_announcement_needed(K1, MAC, removed=removed, current=None)
    assert not own_announcement_needed(K1, OTHER, removed=removed, current=None)
    removed.removed(K2, "")  # a routed network's host route: containers knew the gateway's MAC
    assert own_announcement_needed(K2, MAC, removed=removed, current=None)
    assert not own_announcement_needed(K3, MAC, removed=removed, current=None)


def test_a_partial_memory_proves_nothing_every_new_endpoint_announces_itself() -> None:
    removed = Removed(limit=1)
    removed.removed(K1, OTHER)
    removed.removed(K2, OTHER)  # K1 pushed out early
    assert own_announcement_needed(K1, MAC, removed=removed, current=None)
    assert own_announcement_needed(K3, MAC, removed=removed, current=None)


def test_recall_takes_an_earlier_lifes_removals_within_the_window() -> None:
    now = [1000.0]
    removed = Removed(window=600.0, clock=lambda: now[0])
    old, young, future = IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2"), IPv4Address("10.9.0.3")
    removed.recall(
        [(old, "02:00:00:00:00:01", 700.0), (young, "02:00:00:00:00:02", 100.0), (future, "", -5.0)]
    )
    assert old not in removed  # older than the window
    assert removed.get(young) == "02:00:00:00:00:02" and removed.get(future) == ""
    now[0] += 501.0  # the young one is 601 s old now; the one "from the future" 501 s
    removed.expire()
    assert young not in removed and future in removed


def test_export_hands_the_next_life_what_recall_takes() -> None:
    """A clean stop exports the memory (oldest first, with its age); the next life recalls
    it. An address removed twice in the earlier life keeps the later MAC, and what this life
    removed itself wins over any recalled one."""
    clock = Clock()
    removed = Removed(window=600.0, clock=clock)
    removed.removed(K1, "02:00:00:00:00:01")
    clock.now = 100.0
    removed.removed(K2, "02:00:00:00:00:02")
    clock.now = 650.0
    assert removed.export() == [(K2, "02:00:00:00:00:02", 550.0)]  # K1 (650 s old) left out
    clock.now = 200.0
    assert removed.export() == [(K1, "02:00:00:00:00:01", 200.0), (K2, "02:00:00:00:00:02", 100.0)]

    next_life = Removed(window=600.0, clock=Clock())
    next_life.removed(K3, "02:00:00:00:00:33")  # this life's own
    next_life.recall(
        [(K2, "02:00:00:00:00:02", 300.0), (K2, "02:00:00:00:00:22", 10.0), (K3, "02:00:00:00:00:03", 5.0)]
    )
    assert next_life.get(K2) == "02:00:00:00:00:22" and next_life.get(K3) == "02:00:00:00:00:33"
