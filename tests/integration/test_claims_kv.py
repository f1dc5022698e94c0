"""`KvClaims` beside gossip, against a real etcd and two real gossip nodes on loopback.

An endpoint's removal goes out by gossip before the store answers (peers withdraw
the store's record on the owner's word); a removal the store refuses is taken
back: the record is published again, and the endpoint stays.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from overlayd.cluster.claims import KvClaims, WriteBehind
from overlayd.cluster.peering import ENDPOINT, Peering
from overlayd.core.admission import Admission, GossipFact, NetworkClaimed, Outcome
from overlayd.core.config import GossipSettings, StoreConfig, parse_store_url
from overlayd.core.model import Endpoint, Network, Node, random_mac
from overlayd.core.view import ClusterView, EndpointPut, Fact
from overlayd.gossip.schema import Record
from overlayd.lab import EtcdServer
from overlayd.lab.netns import free_port
from overlayd.store.base import StoreError
from overlayd.store.etcd import EtcdStore
from overlayd.util.metrics import Metrics

PREFIX = "/claims/v1/"
PASSWORD = "pa55-Word"
DEMO = Network(name="demo", vni=42, subnet=IPv4Network("10.1.0.0/24"))


class Sink:
    """The engine's side of claiming, without the kernel behind it: the admission alone."""

    def __init__(self, node: str) -> None:
        self.admission = Admission(node=node, authority=True)

    @property
    def view(self) -> ClusterView:
        return self.admission.view

    def from_own(self, facts: Iterable[Fact | NetworkClaimed]) -> Outcome:
        return self.admission.from_own(facts)

    def from_gossip(self, facts: Iterable[GossipFact]) -> Outcome:
        return self.admission.from_gossip(facts)

    def from_store(self, facts: Iterable[Fact]) -> Outcome:
        return self.admission.from_store(facts)

    def store_snapshot(self, facts: Iterable[Fact]) -> Outcome:
        return self.admission.store_snapshot(facts)


@dataclass
class Heard:
    """What the observing peer heard of endpoint records, in order: (key, tombstone)."""

    records: list[tuple[str, bool]] = field(default_factory=list)

    def record(self, record: Record) -> None:
        if record.kind == ENDPOINT:
            self.records.append((record.key, record.tombstone))

    def of(self, key: str) -> list[bool]:
        return [tombstone for k, tombstone in self.records if k == key]


@dataclass
class Pair:
    owner: KvClaims
    store: EtcdStore
    sink: Sink
    heard: Heard


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def gossip(port: int, peer: int | None) -> GossipSettings:
    return GossipSettings(
        port=port, bind="127.0.0.1", insecure=True, peers=(("127.0.0.1", peer),) if peer else ()
    )


@pytest.fixture
async def pair(etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[Pair]:
    """h1 claims through etcd with gossip beside it; h2 only listens to gossip."""
    etcdctl = ["etcdctl", f"--endpoints={etcd_server.client_url}"]
    env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
    for args in (
        ["user", "add", f"root:{PASSWORD}"],
        ["user", "add", f"overlayd:{PASSWORD}"],
        ["role", "add", "overlayd"],
        ["role", "grant-permission", "overlayd", "readwrite", PREFIX, "--prefix=true"],
        ["user", "grant-role", "overlayd", "overlayd"],
        ["auth", "enable"],
    ):
        subprocess.run([*etcdctl, *args], check=True, capture_output=True, env=env, timeout=30)  # noqa: ASYNC221 (setup, before anything runs)
    scheme, endpoints = parse_store_url(etcd_server.url)
    config = StoreConfig(
        url=etcd_server.url,
        scheme=scheme,
        endpoints=endpoints,
        prefix=PREFIX,
        username="overlayd",
        password=PASSWORD,
    )
    store = EtcdStore(config, state_dir=str(tmp_path), metrics=Metrics())
    await store.connect()
    heard = Heard()
    port1, port2 = free_port(), free_port()
    listener = Peering(
        node_name="h2",
        settings=gossip(port2, None),
        advertise=IPv4Address("127.0.0.1"),
        registry=CollectorRegistry(),
        on_record=heard.record,
    )
    speaker = Peering(
        node_name="h1",
        settings=gossip(port1, port2),
        advertise=IPv4Address("127.0.0.1"),
        registry=CollectorRegistry(),
        on_record=lambda _: None,
    )
    sink = Sink("h1")
    try:
        await listener.start()
        await speaker.start()
        await wait_for(lambda: any(m.name == "h2" for m in speaker.members()), 10, "h1 to meet h2")
        await store.open_session(Node("h1", IPv4Address("198.18.0.1"), time.time()))
        await store.create_network(DEMO)
        claims = KvClaims(
            store=store,
            engine=sink,
            node="h1",
            peering=speaker,
            pending=WriteBehind(store, report=lambda _: None),
        )
        yield Pair(claims, store, sink, heard)
    finally:
        await speaker.stop(leave=False)
        await listener.stop(leave=False)
        await store.close()


def new_endpoint() -> Endpoint:
    return Endpoint("demo", "a", IPv4Address("10.1.0.2"), random_mac(), "h1", created_at=time.time())


async def stored(store: EtcdStore, key: str) -> bool:
    snapshot = await store.snapshot()
    return any(isinstance(fact, EndpointPut) and fact.endpoint.key == key for fact in snapshot.facts)


async def test_removal_goes_out_by_gossip_before_the_store_answers(
    pair: Pair, etcd_server: EtcdServer
) -> None:
    ep = new_endpoint()
    await pair.owner.create_endpoint(ep, contested=False)
    await wait_for(lambda: pair.heard.of(ep.key) == [False], 10, "h2 to hear the endpoint")
    pid = etcd_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the store cannot answer the delete
    try:
        removal = asyncio.create_task(pair.owner.delete_endpoint(ep))
        await wait_for(lambda: pair.heard.of(ep.key) == [False, True], 10, "h2 to hear the removal")
        assert not removal.done(), "the removal reached h2 only after the store answered"
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(removal, 60)
    assert ep.key not in pair.sink.view.endpoints
    await wait_for(lambda: not pair.owner.pending.deletes, 30, "a deferred store delete to be written")
    assert not await stored(pair.store, ep.key)


async def test_a_removal_the_store_refuses_is_taken_back(pair: Pair, etcd_server: EtcdServer) -> None:
    ep = new_endpoint()
    await pair.owner.create_endpoint(ep, contested=False)
    await wait_for(lambda: pair.heard.of(ep.key) == [False], 10, "h2 to hear the endpoint")
    etcdctl = ["etcdctl", f"--endpoints={etcd_server.client_url}", f"--user=root:{PASSWORD}"]
    env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
    for args in (
        ["role", "revoke-permission", "overlayd", PREFIX, "--prefix=true"],
        ["role", "grant-permission", "overlayd", "read", PREFIX, "--prefix=true"],
    ):
        await asyncio.to_thread(
            subprocess.run, [*etcdctl, *args], check=True, capture_output=True, env=env, timeout=30
        )
    with pytest.raises(StoreError):
        await pair.owner.delete_endpoint(ep)
    # h2 dropped it on the removal and takes it back: the last word is a record, not a tombstone.
    await wait_for(lambda: pair.heard.of(ep.key)[-1:] == [False], 10, "h2 to hear the endpoint again")
    assert pair.heard.of(ep.key) == [False, True, False]
    assert ep.key in pair.sink.view.endpoints
    assert not pair.owner.pending.deletes
    assert await stored(pair.store, ep.key)
