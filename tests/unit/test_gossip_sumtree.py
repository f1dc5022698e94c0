"""The hash tree anti-entropy compares (pure), and its messages on the wire."""

from __future__ import annotations

import random

import msgpack
import pytest

from overlayd.gossip import schema
from overlayd.gossip.schema import (
    MemberEntries,
    MemberState,
    MemberUpdate,
    SchemaError,
    Step,
    Sums,
    Watermarks,
)
from overlayd.gossip.sumtree import DEPTH, FANOUT, SumTree, check_node, entry_hash, node_of


def tree_of(entries: dict[str, str]) -> SumTree:
    t = SumTree()
    for key, value in entries.items():
        t.set(key, entry_hash(value))
    return t


def all_sums(t: SumTree) -> list[tuple[int, ...]]:
    out = []
    for level in range(DEPTH):
        for node in range(FANOUT**level):
            out.append(t.children(level, node))
    return out


ENTRIES = {f"h{i:03}": f"h{i:03}/1/{i}" for i in range(300)}


def test_same_entries_same_sums_whatever_the_order() -> None:
    keys = list(ENTRIES)
    random.Random(1).shuffle(keys)
    a = tree_of(ENTRIES)
    b = tree_of({k: ENTRIES[k] for k in keys})
    assert a.root == b.root != 0
    assert all_sums(a) == all_sums(b)
    assert len(a) == a.count(0, 0) == 300


def test_one_changed_entry_changes_one_child_per_level_along_its_path() -> None:
    a, b = tree_of(ENTRIES), tree_of(ENTRIES)
    b.set("h042", entry_hash("h042/1/43"))
    node = 0
    for level in range(DEPTH):
        mine, theirs = a.children(level, node), b.children(level, node)
        differing = [j for j in range(FANOUT) if mine[j] != theirs[j]]
        assert len(differing) == 1
        node = node * FANOUT + differing[0]
        assert node == node_of("h042", level + 1)
    # and its leaf lists it
    assert "h042" in a.keys_under(DEPTH, node)


def test_removing_entries_takes_them_out_of_sums_counts_and_listings() -> None:
    t = tree_of(ENTRIES)
    for key in ENTRIES:
        t.set(key, None)
    assert t.root == 0 and len(t) == 0 and t.count(0, 0) == 0
    assert all(s == 0 for sums in all_sums(t) for s in sums)
    assert t.keys_under(0, 0) == []
    t.set("x", None)  # removing what is not there: nothing happens
    assert len(t) == 0


def test_keys_under_partition_the_keys_at_every_level() -> None:
    t = tree_of(ENTRIES)
    for level in range(DEPTH + 1):
        seen: list[str] = []
        for node in range(FANOUT**level):
            keys = t.keys_under(level, node)
            assert len(keys) == t.count(level, node)
            assert all(node_of(k, level) == node for k in keys)
            seen += keys
        assert sorted(seen) == sorted(ENTRIES)


def test_tree_nodes_are_checked() -> None:
    check_node(0, 0, leaf_ok=False)
    check_node(DEPTH, FANOUT**DEPTH - 1, leaf_ok=True)
    for level, node, leaf_ok in ((0, 1, True), (DEPTH, 0, False), (DEPTH + 1, 0, True), (1, FANOUT, True)):
        with pytest.raises(ValueError):
            check_node(level, node, leaf_ok=leaf_ok)


# --- on the wire -----------------------------------------------------------------------------------


def leaf_names(level: int, node: int, n: int) -> list[str]:
    names = [f"n{i}" for i in range(5000)]
    return [x for x in names if node_of(x, level) == node][:n]


def test_tree_messages_round_trip() -> None:
    node = node_of("h001", 2)
    names = leaf_names(2, node, 3)
    msgs: list[schema.Message] = [
        Sums("records", 0, (0,), tuple(range(FANOUT))),
        Sums("members", 1, (3, 7), tuple(range(2 * FANOUT))),
        Watermarks(2, (node,), tuple((x, (5, i + 1)) for i, x in enumerate(names))),
        Watermarks(DEPTH, (0,), ()),
        MemberEntries(
            2,
            (node,),
            Step.ANSWER,
            tuple(MemberUpdate(x, "10.0.0.1", 7946, MemberState.DEAD, 3) for x in names),
        ),
    ]
    for msg in msgs:
        assert schema.decode(schema.encode(msg)) == msg


OUTSIDE = next(x for x in (f"n{i}" for i in range(100)) if node_of(x, 1) != 0)


@pytest.mark.parametrize(
    "wire",
    [
        [1, "sums", "routes", 0, [0], [0] * FANOUT],  # unknown table
        [1, "sums", "records", 0, [0], [0] * (FANOUT - 1)],  # sums missing
        [1, "sums", "records", 0, [0, 0], [0] * 2 * FANOUT],  # the same node twice
        [1, "sums", "records", 0, [], []],  # no node
        [1, "sums", "records", DEPTH, [0], [0] * FANOUT],  # leaves have no children
        [1, "sums", "records", 1, [FANOUT], [0] * FANOUT],  # no such node
        [1, "sums", "records", 0, [0], [-1] + [0] * (FANOUT - 1)],  # sums are non-negative int64
        [1, "watermarks", 1, [0], [[OUTSIDE, 1, 1]]],  # an owner outside the node it is sent for
        [1, "member-entries", 0, [0], 3, []],  # no such step
        [1, "member-entries", 0, [0], True, []],  # a boolean is no step
    ],
)
def test_bad_tree_messages_are_schema_errors(wire: list[object]) -> None:
    with pytest.raises(SchemaError):
        schema.decode(msgpack.packb(wire))
