"""Records, polling and watch collection shared by the conformance tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from overlayd.core.config import from_flat
from overlayd.core.model import Endpoint, Network, Node, random_mac
from overlayd.core.view import ClusterView, Fact
from overlayd.store.base import AlreadyExists, Changes, Snapshot, Store, StoreUnavailable
from overlayd.store.factory import make_store as factory_make_store
from overlayd.util.metrics import Metrics

PREFIX = "/t/v1/"
DEMO = Network(name="demo", vni=42, subnet=IPv4Network("10.1.0.0/24"))


def network(name: str, vni: int) -> Network:
    return Network(name=name, vni=vni, subnet=IPv4Network(f"10.{vni % 250}.0.0/24"))


def node(name: str, last_octet: int = 1) -> Node:
    return Node(name=name, vtep=IPv4Address(f"198.18.0.{last_octet}"), started_at=time.time())


def endpoint(name: str, ip: str, owner: str, network: str = "demo", netns: str = "") -> Endpoint:
    return Endpoint(
        network=network,
        name=name,
        ip=IPv4Address(ip),
        mac=random_mac(),
        owner=owner,
        created_at=time.time(),
        netns=netns,
    )


async def view_of(store: Store) -> ClusterView:
    view = ClusterView()
    view.replace_all((await store.snapshot()).facts)
    return view


async def poll(check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def retry(op: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    """Run `op` until the server answers (it may still be coming back).

    A write that failed as "unreachable" may still have landed (any backend:
    the answer, not the request, was lost), so a retry that finds its own
    write already there counts as done.
    """
    deadline = time.monotonic() + timeout
    failed = False
    while True:
        try:
            await op()
            return
        except AlreadyExists:
            if not failed:
                raise
            return
        except StoreUnavailable:
            failed = True
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Collector:
    """Runs `store.watch(revision)` in a task; keeps every fact, batch and the view they build."""

    def __init__(self, store: Store, revision: int, view: ClusterView | None = None) -> None:
        self.facts: list[Fact] = []
        self.batches: list[Changes | Snapshot] = []
        self.view = view or ClusterView()
        self.revisions: list[int] = []
        self._task = asyncio.create_task(self._run(store, revision))

    async def _run(self, store: Store, revision: int) -> None:
        async for batch in store.watch(revision):
            self.batches.append(batch)
            self.revisions.append(batch.revision)
            if isinstance(batch, Snapshot):
                self.view.replace_all(batch.facts)
            else:
                self.facts.extend(batch.facts)
                for fact in batch.facts:
                    self.view.apply(fact)

    def check_alive(self) -> bool:
        if self._task.done():
            self._task.result()  # raises what killed the watch
            raise AssertionError("the watch ended")
        return True

    async def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        await poll(lambda: self.check_alive() and check(), timeout, what)

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    @property
    def snapshots(self) -> int:
        return sum(isinstance(b, Snapshot) for b in self.batches)


@dataclass(frozen=True)
class Backend:
    name: str
    server: Callable[[], Any]
    raw_put: Callable[[Any, str, bytes], Awaitable[None]]
    expire: Callable[[Any, Store], Awaitable[None]]
    url_path: str = ""  # appended to the server's URL (ZooKeeper: the chroot)
    min_ttl: int = 2  # the shortest lease/session TTL (seconds) the backend accepts
    variant_of: str | None = None  # another server version for the same client


@dataclass
class Stores:
    """`await stores.make(node, ttl, state)` -> a connected Store; every one is closed after the test."""

    backend: Backend
    server: Any
    tmp_path: Path
    made: list[Store]
    invalid: list[str]

    def url(self) -> str:
        return str(self.server.url) + self.backend.url_path

    async def make(
        self,
        node: str = "h1",
        ttl: int = 10,
        state: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Store:
        """`settings`: more configuration keys (flat, e.g. {"store.watch_pace": 1.0})."""
        config = from_flat(
            {
                "node.name": node,
                "underlay.address": "198.18.0.1",
                "store.url": self.url(),
                "store.prefix": PREFIX,
                "store.lease_ttl": ttl,
                **(settings or {}),
            }
        )
        store = factory_make_store(
            config.store,
            state_dir=str(self.tmp_path / (state or node)),
            metrics=Metrics(),
            on_invalid=self.invalid.append,
        )
        await store.connect()
        self.made.append(store)
        return store

    async def raw_put(self, key: str, value: bytes) -> None:
        await self.backend.raw_put(self.server, PREFIX + key, value)

    async def expire(self, store: Store) -> None:
        await self.backend.expire(self.server, store)
