"""The local registry (overlayd.daemon.registry): journal, snapshot, group commit, crash leftovers."""

from __future__ import annotations

import asyncio
import json
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overlayd.core.model import Endpoint
from overlayd.daemon.registry import LocalRegistry


def ep(name: str, n: int) -> Endpoint:
    return Endpoint(
        network="blue", name=name, ip=IPv4Address(f"10.1.0.{n}"), mac=f"02:00:00:00:00:{n:02x}", owner="h1"
    )


def reopened(path: Path) -> LocalRegistry:
    registry = LocalRegistry(str(path))
    registry.load()
    return registry


async def test_changes_survive_a_restart(tmp_path: Path) -> None:
    registry = LocalRegistry(str(tmp_path))
    registry.load()
    await registry.add(ep("a", 2))
    await registry.add(ep("b", 3))
    await registry.remove("blue/a")
    assert [e.key for e in reopened(tmp_path).all()] == ["blue/b"]


async def test_concurrent_changes_share_writes_and_all_land(tmp_path: Path) -> None:
    registry = LocalRegistry(str(tmp_path))
    registry.load()
    await asyncio.gather(*(registry.add(ep(f"e{i}", i + 2)) for i in range(100)))
    lines = (tmp_path / "endpoints.journal").read_text().splitlines()
    assert len(lines) == 100
    assert len(reopened(tmp_path).all()) == 100


async def test_journal_is_folded_into_the_snapshot(tmp_path: Path) -> None:
    registry = LocalRegistry(str(tmp_path))
    registry.load()
    for i in range(300):
        await registry.add(ep("same", 2 + i % 200))
    journal = (tmp_path / "endpoints.journal").read_text().splitlines()
    assert len(journal) < 300  # compacted at least once
    again = reopened(tmp_path)
    assert [e.ip for e in again.all()] == [IPv4Address(f"10.1.0.{2 + 299 % 200}")]


async def test_compact_leaves_only_the_snapshot(tmp_path: Path) -> None:
    registry = LocalRegistry(str(tmp_path))
    registry.load()
    await registry.add(ep("a", 2))
    await registry.remove("blue/a")
    await registry.compact()
    assert json.loads((tmp_path / "endpoints.json").read_text())["endpoints"] == []
    assert (tmp_path / "endpoints.journal").read_text() == ""


async def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    registry = LocalRegistry(str(tmp_path))
    registry.load()
    await registry.add(ep("a", 2))
    journal = tmp_path / "endpoints.journal"
    journal.write_text(journal.read_text() + '{"put": {"network": "blue", "na')
    assert [e.key for e in reopened(tmp_path).all()] == ["blue/a"]


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "endpoints.journal").write_text('garbage\n{"remove": "blue/a"}\n')
    with pytest.raises(RuntimeError, match=r"endpoints\.journal:1"):
        reopened(tmp_path)


def test_the_snapshot_of_an_older_version_still_loads(tmp_path: Path) -> None:
    (tmp_path / "endpoints.json").write_text(json.dumps({"endpoints": [ep("old", 9).to_dict()]}))
    assert [e.key for e in reopened(tmp_path).all()] == ["blue/old"]


async def test_removals_are_remembered_across_a_restart_for_the_window(tmp_path: Path) -> None:
    """A removal keeps the address and MAC the endpoint had, from the journal and, once
    folded, from the snapshot; older than `announce.WINDOW` it is forgotten."""
    from overlayd.dataplane.announce import WINDOW

    registry = LocalRegistry(str(tmp_path))
    registry.load()
    await registry.add(ep("a", 2))
    await registry.add(ep("b", 3))
    await registry.remove("blue/a")
    await registry.remove("blue/b")
    again = reopened(tmp_path)
    recalled = again.recent_removals()
    assert [(ip, mac) for ip, mac, _ in recalled] == [
        (IPv4Address("10.1.0.2"), "02:00:00:00:00:02"),
        (IPv4Address("10.1.0.3"), "02:00:00:00:00:03"),
    ]
    assert all(0 <= ago < 60 for _, _, ago in recalled)
    await again.compact()  # into the snapshot, the journal emptied
    assert json.loads((tmp_path / "endpoints.journal").read_text() or "null") is None
    folded = reopened(tmp_path)
    assert [ip for ip, _, _ in folded.recent_removals()] == [IPv4Address("10.1.0.2"), IPv4Address("10.1.0.3")]
    later = folded.recent_removals(now=time.time() + WINDOW + 1)
    assert later == []


def test_malformed_or_older_removal_lines_are_only_lost_hints(tmp_path: Path) -> None:
    """A journal of an older release (no address on its removals) and junk in the removal
    fields load: the endpoint is removed, the hint skipped."""
    snapshot = {"endpoints": [ep("a", 2).to_dict(), ep("b", 3).to_dict()]}
    (tmp_path / "endpoints.json").write_text(json.dumps(snapshot))
    lines = [
        {"remove": "blue/a"},
        {"remove": "blue/b", "ip": "not an ip", "mac": "02:00:00:00:00:03", "at": 1.0},
        {"remove": "blue/c", "ip": "10.1.0.9", "mac": 7, "at": "x"},
    ]
    (tmp_path / "endpoints.journal").write_text("".join(json.dumps(line) + "\n" for line in lines))
    registry = reopened(tmp_path)
    assert registry.all() == []
    assert registry.recent_removals() == []


async def test_a_clean_stop_keeps_the_reconcilers_removals_too(tmp_path: Path) -> None:
    """`keep_removals` adds addresses only the reconciler knew (remote endpoints' removals)
    to the snapshot, beside this host's own, without doubling one it already has; the next
    life recalls them all, oldest first, with their age."""
    registry = LocalRegistry(str(tmp_path))
    registry.load()
    await registry.add(ep("a", 2))
    await registry.remove("blue/a")
    now = time.time()
    remote = (IPv4Address("10.1.0.7"), "02:00:00:00:00:77", 30.0)
    own = (IPv4Address("10.1.0.2"), "02:00:00:00:00:02", 0.0)
    await registry.keep_removals([remote, own], now=now)
    recalled = reopened(tmp_path).recent_removals(now=now)
    assert [(ip, mac) for ip, mac, _ in recalled] == [remote[:2], own[:2]]
    assert recalled[0][2] == pytest.approx(30.0)
    assert json.loads((tmp_path / "endpoints.journal").read_text() or "null") is None  # a snapshot
