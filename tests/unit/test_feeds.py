"""follow_store: a snapshot from a store that lost its data is applied only after re-publishing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from ipaddress import IPv4Network
from typing import Any

from overlayd.cluster.feeds import follow_store
from overlayd.core.model import Network
from overlayd.core.view import Fact, NetworkPut
from overlayd.store.base import Changes, Snapshot

DEMO = Network("demo", 4096, IPv4Network("10.1.0.0/24"))


class Script:
    """A store whose watch plays batches; the engine and the hook write into one journal."""

    def __init__(self, batches: list[Changes | Snapshot]) -> None:
        self.batches = batches
        self.journal: list[str] = []

    async def watch(self, after_revision: int) -> AsyncIterator[Changes | Snapshot]:
        for batch in self.batches:
            yield batch

    def store_snapshot(self, facts: Iterable[Fact]) -> None:
        self.journal.append(f"snapshot {len(list(facts))}")

    def from_store(self, facts: Iterable[Fact]) -> None:
        self.journal.append(f"changes {len(list(facts))}")

    async def republish(self, why: str) -> None:
        self.journal.append(f"data lost: {why}")


async def test_a_snapshot_marked_data_lost_is_applied_after_the_hook() -> None:
    script = Script(
        [
            Changes([NetworkPut(DEMO)], 5),
            Snapshot([], 1, data_lost="etcd revision went back from 5 to 1"),
            Changes([NetworkPut(DEMO)], 2),
            Snapshot([NetworkPut(DEMO)], 3),  # a re-list after compaction: no hook
        ]
    )
    engine: Any = script
    await follow_store(script, engine, 4, on_data_lost=script.republish)  # type: ignore[arg-type]
    assert script.journal == [
        "changes 1",
        "data lost: etcd revision went back from 5 to 1",
        "snapshot 0",
        "changes 1",
        "snapshot 1",
    ]
