"""The ZooKeeper watch's mirror: re-reads in, ordered changes out (no server needed)."""

from __future__ import annotations

from overlayd.store.zktree import Dirs, Gone, Mirror, Put, Reads, Rec

D = Dirs("/c/t/v1")
NET = "/c/t/v1/networks"
EPS = "/c/t/v1/endpoints"


def test_classify_names_directories_and_records() -> None:
    top, dirs, records = D.classify(
        [
            EPS,
            NET,
            f"{EPS}/demo",
            f"{NET}/a",
            f"{EPS}/demo/web",
            "/c/t/v1/vni/42",
            "/c/t/v1/ipam/demo/10.0.0.1",
        ]
    )
    assert top
    assert dirs == {NET, f"{EPS}/demo"}
    assert records == {f"{NET}/a", f"{EPS}/demo/web"}  # claims are not records


def test_a_records_deletion_lists_its_directory_instead_of_reading_it() -> None:
    web, db = f"{EPS}/demo/web", f"{EPS}/demo/db"
    # The record's data watch and its directory's child watch, in one batch: one listing.
    assert D.plan([(web, True), (f"{EPS}/demo", False)]) == Reads(False, {f"{EPS}/demo"}, set(), {web})
    # Alone, or beside a change of another record (which is read as before).
    assert D.plan([(web, True), (db, False), (f"{NET}/a", True)]) == Reads(
        False, {f"{EPS}/demo", NET}, {db}, {web, f"{NET}/a"}
    )
    # A directory's deletion is listed (and found gone) as before; endpoints/ itself is `top`.
    assert D.plan([(f"{EPS}/demo", True), (EPS, True)]) == Reads(True, {f"{EPS}/demo"}, set(), set())
    assert D.plan([("/c/t/v1/ipam/demo/10.0.0.1", True)]) == Reads(False, set(), set(), set())


def test_a_deleted_record_listed_again_is_read_again() -> None:
    # Deleted and made anew before the listing: its data watch went with the deletion,
    # so it must be read (which arms it again), though the mirror knows the path.
    m = Mirror({f"{EPS}/demo/a": Rec(3, b""), f"{EPS}/demo/b": Rec(4, b"")}, revision=4)
    gone, read = m.sync_dir(f"{EPS}/demo", ["a", "b"], zxid=9, reread={f"{EPS}/demo/a", f"{EPS}/demo/x"})
    assert gone == [] and read == {f"{EPS}/demo/a"}
    # Not listed: gone, as any known record missing from a listing.
    gone, read = m.sync_dir(f"{EPS}/demo", ["b"], zxid=10, reread={f"{EPS}/demo/a"})
    assert gone == [Gone(f"{EPS}/demo/a", 10)] and read == set()
    assert m.put(f"{EPS}/demo/a", Rec(8, b"new")) == Put(f"{EPS}/demo/a", Rec(8, b"new"))


def test_put_reports_only_new_or_newer_reads() -> None:
    m = Mirror()
    assert m.put(f"{NET}/a", Rec(5, b"1")) == Put(f"{NET}/a", Rec(5, b"1"))
    assert m.put(f"{NET}/a", Rec(5, b"1")) is None  # the same read again
    assert m.put(f"{NET}/a", Rec(4, b"0")) is None  # a stale read
    assert m.put(f"{NET}/a", Rec(9, b"2")) == Put(f"{NET}/a", Rec(9, b"2"))


def test_directory_listing_reports_gone_and_new() -> None:
    m = Mirror({f"{EPS}/demo/a": Rec(3, b""), f"{EPS}/demo/b": Rec(4, b"")}, revision=4)
    gone, new = m.sync_dir(f"{EPS}/demo", ["b", "c"], zxid=7)
    assert gone == [Gone(f"{EPS}/demo/a", 7)]
    assert new == {f"{EPS}/demo/c"}
    assert m.subdirs(EPS) == {"demo"}
    assert m.drop_dir(f"{EPS}/demo", 9) == [Gone(f"{EPS}/demo/b", 9)]
    assert m.subdirs(EPS) == set() and not m.records


def test_full_reread_diff_comes_out_in_zxid_order() -> None:
    m = Mirror({f"{NET}/old": Rec(2, b""), f"{NET}/same": Rec(3, b"")}, revision=3)
    changes = m.replace({f"{NET}/same": Rec(3, b""), f"{NET}/n2": Rec(8, b""), f"{NET}/n1": Rec(6, b"")}, 10)
    ordered = m.advance(changes, 10)
    assert [(type(c).__name__, c.path, c.zxid) for c in ordered] == [
        ("Put", f"{NET}/n1", 6),
        ("Put", f"{NET}/n2", 8),
        ("Gone", f"{NET}/old", 10),
    ]
    assert m.revision == 10
    assert m.advance([], 4) == [] and m.revision == 10  # never goes back
