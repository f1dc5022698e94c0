"""The Consul watch's mirror: listings in, ordered changes out (no server needed)."""

from __future__ import annotations

from typing import Any

from overlayd.store.consultree import PROBE_ABOVE, Diff, Listing, Mirror, Put, Round, unit_of

P = "t/v1/"


def item(rel: str, modify_index: int, value: str | None = "e30=") -> dict[str, Any]:
    """One entry as Consul lists it."""
    return {"Key": P + rel, "ModifyIndex": modify_index, "Value": value, "LockIndex": 0, "Flags": 0}


def known(*pairs: tuple[str, int]) -> dict[str, int]:
    return {P + rel: index for rel, index in pairs}


def test_units_are_networks_nodes_and_one_per_network_claims_are_none() -> None:
    assert unit_of("networks/demo") == "networks/"
    assert unit_of("nodes/h1") == "nodes/"
    assert unit_of("endpoints/demo/web") == "endpoints/demo/"
    assert unit_of("endpoints/demo/deeper/x") == "endpoints/demo/"
    assert unit_of("vni/42") is None and unit_of("ipam/demo/10.1.0.5") is None
    # What is not a record of ours is a unit too, so that it is read and reported.
    assert unit_of("junk") == "junk"
    assert unit_of("other/x") == "other/"
    assert unit_of("endpoints/stray") == "endpoints/stray"
    assert unit_of("endpoints/") == "endpoints/"  # the single key "endpoints/", not the folder


def test_a_mirror_from_a_snapshot_leaves_claims_out() -> None:
    m = Mirror(P, 9, known(("networks/demo", 3), ("vni/42", 3), ("endpoints/demo/a", 5), ("ipam/demo/x", 5)))
    assert sorted(m.units) == ["endpoints/demo/", "networks/"]
    assert m.units["endpoints/demo/"].known == known(("endpoints/demo/a", 5))
    assert all(u.index == 9 for u in m.units.values())


def test_first_level_listing_names_units_and_the_split_folder_claims_skipped() -> None:
    m = Mirror(P, 1)
    units, split = m.top_units(
        [P + "endpoints/", P + "ipam/", P + "networks/", P + "nodes/", P + "vni/", P + "x"]
    )
    assert units == {"networks/", "nodes/", "x"} and split
    assert m.top_units([P + "networks/"]) == ({"networks/"}, False)


def test_listing_gives_puts_in_write_order_and_gone_keys_and_only_what_changed() -> None:
    m = Mirror(P, 10, known(("networks/a", 3), ("networks/b", 4), ("networks/c", 5)))
    diff = m.apply(
        Round(
            present={"networks/"},
            listings={
                "networks/": Listing(
                    12, [item("networks/a", 3), item("networks/c", 12), item("networks/d", 11)]
                )
            },
        )
    )
    assert diff == Diff(
        gone=[P + "networks/b"], puts=[Put(P + "networks/d", 11, "e30="), Put(P + "networks/c", 12, "e30=")]
    )
    assert m.units["networks/"].known == known(("networks/a", 3), ("networks/c", 12), ("networks/d", 11))
    assert m.units["networks/"].index == 12
    # The same listing again: nothing.
    again = Listing(12, [item("networks/a", 3), item("networks/c", 12), item("networks/d", 11)])
    assert m.apply(Round(present={"networks/"}, listings={"networks/": again})) == Diff([], [])


def test_puts_across_units_come_in_write_order_deletions_first() -> None:
    m = Mirror(P, 10, known(("endpoints/a/x", 4), ("nodes/h1", 2)))
    diff = m.apply(
        Round(
            present={"endpoints/a/", "networks/", "nodes/"},
            listings={
                "endpoints/a/": Listing(15, [item("endpoints/a/y", 15)]),
                "networks/": Listing(13, [item("networks/a", 13)]),
                "nodes/": Listing(2, [item("nodes/h1", 2)]),
            },
        )
    )
    assert diff.gone == [P + "endpoints/a/x"]
    assert [p.key for p in diff.puts] == [P + "networks/a", P + "endpoints/a/y"]


def test_a_unit_that_vanished_is_all_gone_and_an_emptied_one_forgotten() -> None:
    m = Mirror(P, 10, known(("endpoints/a/x", 4), ("endpoints/a/y", 5), ("endpoints/b/z", 6)))
    diff = m.apply(Round(present={"endpoints/b/"}, listings={"endpoints/b/": Listing(20, [])}))
    assert diff.gone == [P + "endpoints/a/x", P + "endpoints/a/y", P + "endpoints/b/z"]
    assert m.units == {}


def test_nothing_is_changed_before_a_round_is_committed() -> None:
    m = Mirror(P, 10, known(("networks/a", 3), ("endpoints/x/e", 4)))
    round_ = Round(present={"networks/"}, listings={"networks/": Listing(12, [item("networks/b", 12)])})
    diff = m.diff(round_)  # read, not delivered yet (a disconnect may still cut it short)
    assert diff == Diff(
        gone=[P + "endpoints/x/e", P + "networks/a"], puts=[Put(P + "networks/b", 12, "e30=")]
    )
    assert m.units["networks/"].known == known(("networks/a", 3)) and m.units["networks/"].index == 10
    assert "endpoints/x/" in m.units
    m.commit(round_, diff)
    assert m.units == {"networks/": m.units["networks/"]}
    assert m.units["networks/"].known == known(("networks/b", 12)) and m.units["networks/"].index == 12
    assert m.diff(round_) == Diff([], [])


def many(folder: str, n: int) -> dict[str, int]:
    return known(*((f"{folder}{i}", i) for i in range(n)))


def test_big_units_are_probed_unless_the_round_is_full_and_move_only_past_their_index() -> None:
    m = Mirror(P, 50, {**many("endpoints/s/", PROBE_ABOVE), **many("endpoints/b/", PROBE_ABOVE + 1)})
    m.units.update(Mirror(P, 50, many("nodes/", 30)).units)
    units = {"endpoints/s/", "endpoints/b/", "endpoints/new/", "nodes/", "networks/"}
    probe = m.to_probe(units, full=False)
    assert probe == {"endpoints/b/", "nodes/"}
    assert m.to_probe(units, full=True) == set()
    assert m.reading_order(units, probe) == [
        "endpoints/new/",
        "endpoints/s/",
        "endpoints/b/",
        "networks/",
        "nodes/",
    ]
    assert not m.moved("endpoints/b/", 50) and not m.moved("endpoints/b/", 40)  # 40: a tombstone was reaped
    assert m.moved("endpoints/b/", 51) and m.moved("endpoints/new/", 1)


def test_a_big_network_is_listed_without_a_probe_when_nothing_else_below_endpoints_moved() -> None:
    m = Mirror(P, 50, {**many("endpoints/s/", 3), **many("endpoints/b/", 30), **many("nodes/", 30)})
    small = Listing(50, [item(k[len(P) :], i) for k, i in many("endpoints/s/", 3).items()])
    present = {"endpoints/s/", "endpoints/b/", "nodes/"}
    quiet = Round(present=present, listings={"endpoints/s/": small}, split_index=60)
    assert m.surely_moved("endpoints/b/", quiet)
    assert not m.surely_moved("nodes/", quiet)  # not below endpoints/
    moved = Round(present=present, listings={"endpoints/s/": Listing(55, small.items)}, split_index=60)
    assert not m.surely_moved("endpoints/b/", moved)
    assert not m.surely_moved(
        "endpoints/b/", Round(present=present, listings={}, split_index=60)
    )  # s/ not read
    assert not m.surely_moved(
        "endpoints/b/", Round(present=present, listings={"endpoints/s/": small})
    )  # no move
    vanished = Round(present={"endpoints/b/", "nodes/"}, split_index=60)
    assert not m.surely_moved("endpoints/b/", vanished)
    appeared = Round(
        present={*present, "endpoints/n/"}, listings={"endpoints/s/": small, "endpoints/n/": small}
    )
    assert not m.surely_moved("endpoints/b/", Round(appeared.present, appeared.listings, split_index=60))


def test_split_folder_that_did_not_move_keeps_its_units_unless_full() -> None:
    m = Mirror(P, 50, known(("endpoints/a/x", 4)))
    assert m.split_units(50, [P + "endpoints/a/"], full=False) is None
    assert m.split_units(50, [P + "endpoints/a/"], full=True) == {"endpoints/a/"}
    assert m.split_units(51, [P + "endpoints/a/", P + "endpoints/b/"], full=False) == {
        "endpoints/a/",
        "endpoints/b/",
    }
    assert m.known_split_units() == {"endpoints/a/"}
    m.apply(Round(present={"endpoints/a/"}, split_index=51))
    assert m.split_units(51, [P + "endpoints/a/"], full=False) is None


def test_networks_and_nodes_are_probed_as_one_group_and_never_with_claims() -> None:
    m = Mirror(P, 50, known(("networks/demo", 3), ("nodes/h1", 40), ("endpoints/demo/a", 45)))
    assert m.probe_group(["networks/", "nodes/"], full=False) == "n"
    assert m.probe_group(["networks/", "nodes/"], full=True) is None  # indexes not trusted
    assert m.probe_group(["networks/"], full=False) is None  # one unit: its own probe or listing
    assert m.probe_group(["networks/", "newcomer/"], full=False) is None  # not known yet
    m.units.update(Mirror(P, 50, known(("ivy/x", 3), ("gadget", 4))).units)
    assert m.probe_group(["ivy/", "networks/", "nodes/"], full=False) is None  # no common start
    assert m.probe_group(["gadget", "networks/"], full=False) is None  # "" would take in the claims
    m.units.update(Mirror(P, 50, known(("vn/x", 3), ("vnet/y", 4))).units)
    assert m.probe_group(["vn/", "vnet/"], full=False) is None  # "vn" would take in vni/ claims


def test_a_unit_read_in_a_round_knows_every_write_up_to_the_rounds_top_index() -> None:
    # A probe of both answers the higher last write: known only up to its own last write,
    # networks/ (3) could hide a new write (5) below nodes' (8). Read in a round, each is
    # known up to the round's top index, and any write it missed comes after that.
    m = Mirror(P, 10, known(("networks/demo", 3), ("nodes/h1", 8), ("endpoints/demo/a", 9)))
    top = 60
    round_ = Round(
        present={"networks/", "nodes/", "endpoints/demo/"},
        listings={
            "networks/": Listing(3, [item("networks/demo", 3)]),
            "endpoints/demo/": Listing(60, [item("endpoints/demo/a", 9), item("endpoints/demo/b", 60)]),
        },
        top=top,
        unmoved={"nodes/"},
    )
    m.apply(round_)
    assert m.units["networks/"].index == 60 and m.units["nodes/"].index == 60
    assert not m.group_moved(["networks/", "nodes/"], 8)  # their own last writes: nothing new
    assert m.group_moved(["networks/", "nodes/"], 61)  # a write after the round, in either
    # A unit never raised to the top (known only from the snapshot at 10) keeps the group honest.
    m.units["nodes/"].index = 10
    assert m.group_moved(["networks/", "nodes/"], 30)


def test_a_listing_of_all_endpoints_is_cut_into_network_units() -> None:
    m = Mirror(P, 10, known(("endpoints/demo/a", 4), ("endpoints/demo/b", 5)))
    listing = Listing(
        20, [item("endpoints/demo/a", 4), item("endpoints/new/c", 20), item("endpoints/stray", 7)]
    )
    cut = m.split_listing(listing)
    assert sorted(cut) == ["endpoints/demo/", "endpoints/new/", "endpoints/stray"]
    assert cut["endpoints/demo/"] == Listing(20, [item("endpoints/demo/a", 4)])
    diff = m.apply(Round(present=set(cut), listings=cut, split_index=20, top=20))
    assert diff == Diff(
        gone=[P + "endpoints/demo/b"],
        puts=[Put(P + "endpoints/stray", 7, "e30="), Put(P + "endpoints/new/c", 20, "e30=")],
    )
    assert m.split_index == 20 and m.units["endpoints/demo/"].index == 20
    assert m.split_listing(Listing(21, [])) == {}  # all gone: no unit is present


def test_a_listing_of_all_endpoints_is_cut_the_same_in_any_order() -> None:
    """Runs of one network's keys take a shortcut; names that start alike (demo, demo2, the
    single key "endpoints/demo"), claims and keys outside the prefix must not follow it, in
    Consul's sorted order or any other."""
    m = Mirror(P, 10)
    rels = [
        "endpoints/demo",
        "endpoints/demo/a",
        "endpoints/demo/b",
        "endpoints/demo/sub/c",
        "endpoints/demo2/a",
        "endpoints/demo2/b",
        "endpoints/dem/x",
        "endpoints/stray",
        "nodes/h1",
    ]
    entries = [item(rel, n) for n, rel in enumerate(rels, 1)] + [{"Key": "elsewhere/endpoints/demo/z"}]
    expected: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        unit = m.unit_of_key(entry["Key"])
        if unit is not None and unit.startswith("endpoints/"):
            expected.setdefault(unit, []).append(entry)
    for order in (
        sorted(entries, key=lambda e: e["Key"]),
        list(reversed(entries)),
        entries[1::2] + entries[::2],
    ):
        cut = m.split_listing(Listing(30, order))
        assert {unit: sorted(map(str, got.items)) for unit, got in cut.items()} == {
            unit: sorted(map(str, want)) for unit, want in expected.items()
        }
    assert sorted(expected) == [
        "endpoints/dem/",
        "endpoints/demo",
        "endpoints/demo/",
        "endpoints/demo2/",
        "endpoints/stray",
    ]


def test_deletions_need_no_index_check_only_when_listed_at_the_rounds_top_index() -> None:
    m = Mirror(P, 10, known(("endpoints/demo/a", 4), ("endpoints/demo/b", 5), ("nodes/h1", 3)))
    gone = [P + "endpoints/demo/b"]
    # The deletion's own write is the top index: the listing answered at it.
    at_top = Round(
        present={"endpoints/demo/", "nodes/"},
        listings={"endpoints/demo/": Listing(12, [item("endpoints/demo/a", 4)])},
        top=12,
    )
    assert m.diff(at_top).gone == gone and m.gone_at_top(at_top, gone)
    # Answered below the top: a server that restarted empty, a tombstone reaped, or writes
    # elsewhere since; the driver checks the prefix's index.
    below = Round(present=at_top.present, listings=at_top.listings, top=13)
    assert not m.gone_at_top(below, gone)
    # A unit that vanished has no listing to vouch for it; nor has an index of 0.
    vanished = Round(present={"endpoints/demo/"}, listings=at_top.listings, top=12)
    assert m.diff(vanished).gone == [*gone, P + "nodes/h1"] and not m.gone_at_top(
        vanished, m.diff(vanished).gone
    )
    zero = Round(present=at_top.present, listings={"endpoints/demo/": Listing(0, [])}, top=0)
    assert not m.gone_at_top(zero, [P + "endpoints/demo/a", *gone])
    assert m.gone_at_top(at_top, [])  # nothing gone: nothing to check
