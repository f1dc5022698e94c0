"""Merge rules, watermarks, reaping and digest diffs of the gossip record table (pure)."""

from __future__ import annotations

import itertools

import pytest

from overlayd.gossip import schema
from overlayd.gossip.merge import ZERO, RecordTable, diff_digests, split_digest, wins
from overlayd.gossip.schema import Digest, Record


def put(key: str, inc: int, ver: int, owner: str = "h1", **payload: object) -> Record:
    return Record("endpoint", key, owner, inc, ver, dict(payload) or {"ip": "10.0.0.1"})


def tomb(key: str, inc: int, ver: int, owner: str = "h1", at: float = 1000.0) -> Record:
    return Record("endpoint", key, owner, inc, ver, None, at)


# --- wins ---------------------------------------------------------------------------------


def test_anything_beats_nothing() -> None:
    assert wins(put("a", 1, 1), None)
    assert wins(tomb("a", 1, 1), None)


@pytest.mark.parametrize(
    ("new", "old", "expected"),
    [
        ((1, 2), (1, 1), True),  # newer version
        ((1, 1), (1, 2), False),  # older version
        ((2, 1), (1, 9), True),  # newer incarnation beats any version of an older one
        ((1, 9), (2, 1), False),
    ],
)
def test_newest_stamp_wins(new: tuple[int, int], old: tuple[int, int], expected: bool) -> None:
    assert wins(put("a", *new), put("a", *old)) is expected
    assert wins(tomb("a", *new), put("a", *old)) is expected
    assert wins(put("a", *new), tomb("a", *old)) is expected


def test_tombstone_beats_older_put_and_loses_to_newer_put() -> None:
    assert wins(tomb("a", 1, 3), put("a", 1, 2))
    assert not wins(put("a", 1, 2), tomb("a", 1, 3))
    assert wins(put("a", 1, 4), tomb("a", 1, 3))  # re-created after the delete


def test_equal_stamps_decide_the_same_way_everywhere() -> None:
    a, b = put("a", 1, 1, ip="10.0.0.1"), put("a", 1, 1, ip="10.0.0.2")
    assert wins(a, b) != wins(b, a)
    assert not wins(a, a)  # the same record again is no change
    assert wins(tomb("a", 1, 1), a) and not wins(a, tomb("a", 1, 1))


def test_any_arrival_order_converges_to_the_same_record() -> None:
    history = [put("a", 1, 1), put("a", 1, 2, ip="10.0.0.9"), tomb("a", 1, 3), put("a", 2, 1, ip="x")]
    for order in itertools.permutations(history):
        t = RecordTable()
        for r in order:
            t.apply(r)
        assert t.get(("h1", "endpoint", "a")) == history[-1], order


def test_owners_are_separate_records() -> None:
    t = RecordTable()
    assert t.apply(put("a", 1, 5, owner="h1"))
    assert t.apply(put("a", 1, 1, owner="h2"))  # a lower stamp of another owner is not older
    assert len(t) == 2


# --- RecordTable: changes and watermarks --------------------------------------------------


def test_apply_reports_change_only_when_the_view_changes() -> None:
    t = RecordTable()
    assert t.apply(put("a", 1, 1))
    assert not t.apply(put("a", 1, 1))
    assert t.apply(tomb("a", 1, 2))
    assert not t.apply(put("a", 1, 1))


def test_watermark_moves_over_contiguous_versions_only() -> None:
    t = RecordTable()
    t.set_watermark("h1", (1, 1))
    t.apply(put("b", 1, 3))
    assert t.watermark("h1") == (1, 1)  # version 2 missing: no skipping over the gap
    t.apply(put("a", 1, 2))
    assert t.watermark("h1") == (1, 3)  # the gap filled; 3 was waiting


def test_superseded_version_counts_as_seen() -> None:
    t = RecordTable()
    t.set_watermark("h1", (1, 1))
    t.apply(put("a", 1, 3))
    t.apply(put("a", 1, 2))  # older than what is held, but it fills the gap
    assert t.watermark("h1") == (1, 3)
    assert t.get(("h1", "endpoint", "a")) == put("a", 1, 3)


def test_new_incarnation_waits_for_anti_entropy() -> None:
    t = RecordTable()
    t.apply(put("a", 5, 1))
    assert t.watermark("h1") == ZERO  # versions of incarnation 5 before it may exist elsewhere
    assert t.advance("h1", ZERO, (5, 1))
    assert t.watermark("h1") == (5, 1)


def test_advance_refuses_a_chunk_after_a_gap() -> None:
    t = RecordTable()
    assert t.advance("h1", ZERO, (1, 10))
    assert not t.advance("h1", (1, 20), (1, 30))  # (10, 20] was never covered
    assert t.watermark("h1") == (1, 10)
    assert not t.advance("h1", (1, 5), (1, 8))  # behind us: nothing new
    assert t.advance("h1", (1, 5), (1, 12))  # overlapping is fine
    assert t.watermark("h1") == (1, 12)


def test_advance_then_settles_pending_stamps() -> None:
    t = RecordTable()
    t.apply(put("x", 1, 4))
    t.apply(put("y", 1, 5))
    t.advance("h1", ZERO, (1, 3))
    assert t.watermark("h1") == (1, 5)


def test_records_after_are_ascending_and_skip_superseded() -> None:
    t = RecordTable()
    for i, key in enumerate(["a", "b", "c", "a"], start=1):
        t.apply(put(key, 1, i))
    assert [r.stamp for r in t.records_after("h1", ZERO)] == [(1, 2), (1, 3), (1, 4)]
    assert [r.key for r in t.records_after("h1", (1, 2))] == ["c", "a"]
    assert list(t.records_after("h1", (1, 4))) == []
    assert list(t.records_after("nobody", ZERO)) == []


def test_digest_is_the_watermarks() -> None:
    t = RecordTable()
    t.set_watermark("h1", (1, 4))
    t.advance("h2", ZERO, (7, 2))
    assert t.digest() == {"h1": (1, 4), "h2": (7, 2)}


# --- reaping ------------------------------------------------------------------------------


def test_reap_forgets_old_tombstones_only() -> None:
    t = RecordTable()
    t.apply(put("live", 1, 1))
    t.apply(tomb("old", 1, 2, at=1000.0))
    t.apply(tomb("new", 1, 3, at=2000.0))
    gone = t.reap(now=1000.0 + 1800.0, ttl=1800.0)
    assert [r.key for r in gone] == ["old"]
    assert {r.key for r in t.all()} == {"live", "new"}
    assert t.reap(now=1000.0 + 1799.0, ttl=1800.0) == []


def test_reaped_deletion_is_not_resurrected_by_a_stale_put() -> None:
    t = RecordTable()
    t.apply(put("a", 1, 1))
    t.apply(tomb("a", 1, 2, at=0.0))
    t.advance("h1", ZERO, (1, 2))  # anti-entropy confirmed everything up to the deletion
    t.reap(now=10_000.0, ttl=1800.0)
    assert t.get(("h1", "endpoint", "a")) is None
    assert not t.apply(put("a", 1, 1))  # a late copy of the deleted put
    assert t.get(("h1", "endpoint", "a")) is None
    assert t.apply(put("a", 1, 3))  # a real re-creation is newer than the watermark


# --- digest diff --------------------------------------------------------------------------


def test_diff_asks_for_what_they_have_newer_and_sends_what_we_have_newer() -> None:
    mine = {"h1": (1, 5), "h2": (1, 1), "h3": (2, 0)}
    theirs = {"h1": (1, 3), "h2": (1, 4), "h4": (1, 1), "h3": (2, 0)}
    d = diff_digests(mine, theirs)
    assert d.ask == {"h2": (1, 1), "h4": ZERO}
    assert d.send == {"h1": (1, 3)}


def test_diff_sends_owners_they_do_not_know_only_inside_the_range() -> None:
    mine = {"a": (1, 1), "m": (1, 1), "z": (1, 1)}
    assert diff_digests(mine, {}).send == {"a": ZERO, "m": ZERO, "z": ZERO}
    assert diff_digests(mine, {}, lo="b", hi="y").send == {"m": ZERO}
    assert diff_digests(mine, {}, lo="m", hi=None).send == {"m": ZERO, "z": ZERO}


def test_equal_digests_need_nothing() -> None:
    d = diff_digests({"h1": (1, 5)}, {"h1": (1, 5)})
    assert d.ask == {} and d.send == {}


def test_two_tables_converge_through_digest_exchange() -> None:
    """Play anti-entropy between two tables, one bounded chunk at a time."""
    a, b = RecordTable(), RecordTable()
    for v in range(1, 50):
        a.apply(put(f"k{v % 7}", 1, v))
        a.set_watermark("h1", (1, v))
    for v in range(1, 20):
        b.apply(put(f"j{v % 3}", 3, v, owner="h2"))
        b.set_watermark("h2", (3, v))

    def pull(src: RecordTable, dst: RecordTable, owner: str) -> None:
        while True:
            after = dst.watermark(owner)
            chunk = list(src.records_after(owner, after))[:2]
            more = len(list(src.records_after(owner, after))) > 2
            wm = src.watermark(owner)
            upto = max(after, min(chunk[-1].stamp, wm) if more else wm)
            for r in chunk:
                dst.apply(r)
            dst.advance(owner, after, upto)
            if not more or dst.watermark(owner) <= after:
                return

    d = diff_digests(a.digest(), b.digest())
    for owner in d.send:
        pull(a, b, owner)
    for owner in d.ask:
        pull(b, a, owner)
    assert sorted(map(repr, a.all())) == sorted(map(repr, b.all()))
    assert a.digest() == b.digest()


def test_gap_is_visible_until_filled() -> None:
    t = RecordTable()
    t.set_watermark("h1", (1, 1))
    assert not t.has_gap("h1")
    t.apply(put("c", 1, 3))
    assert t.has_gap("h1")
    t.apply(put("b", 1, 2))
    assert not t.has_gap("h1")


def test_adopt_keeps_an_own_record_below_the_watermark() -> None:
    """A restarted owner (incarnation 2) hears of a record of its first life (incarnation 1)."""
    t = RecordTable()
    t.apply(put("new", 2, 1))
    t.set_watermark("h1", (2, 1))
    old = put("old", 1, 7)
    assert not t.apply(old)  # apply takes it for superseded
    assert t.adopt(old)
    assert t.get(old.ident) == old
    assert [r.key for r in t.records_after("h1", ZERO)] == ["old", "new"]
    assert not t.adopt(put("new", 1, 9))  # the new life's record stays


def test_split_digest_covers_every_owner_in_contiguous_ranges() -> None:
    digest = {f"host-{i:04}": (i, i * 7) for i in range(500)}
    parts = split_digest(digest, budget=1000)
    assert len(parts) > 5
    assert parts[0][0] == "" and parts[-1][1] is None
    for (_, hi, _), (lo, _, _) in itertools.pairwise(parts):
        assert hi == lo  # no owner falls between two parts
    assert dict(e for _, _, entries in parts for e in entries) == digest
    for lo, hi, entries in parts:
        wire = schema.encode(Digest(lo, hi, tuple(entries)))
        assert len(wire) <= 1000 + 64
        assert schema.decode(wire) == Digest(lo, hi, tuple(entries))  # entries inside the range


def test_split_digest_parts_drive_diffs_like_the_whole() -> None:
    mine = {f"h{i:03}": (1, 5) for i in range(0, 300, 2)}
    theirs = {f"h{i:03}": (1, 3) for i in range(0, 300, 3)}
    send: dict[str, tuple[int, int]] = {}
    ask: dict[str, tuple[int, int]] = {}
    for lo, hi, entries in split_digest(theirs, budget=300):
        d = diff_digests(mine, dict(entries), lo, hi)
        send |= d.send
        ask |= d.ask
    whole = diff_digests(mine, theirs)
    assert (send, ask) == (whole.send, whole.ask)


def test_empty_digest_is_one_part_covering_everything() -> None:
    assert split_digest({}, 1000) == [("", None, [])]
