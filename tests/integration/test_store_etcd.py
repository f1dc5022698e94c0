"""etcd-only behaviour of the etcd backend, against a real etcd server.

What every backend must do is in the conformance suite (tests/store); this
file keeps what only etcd has: a history that can be compacted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import aetcd
import pytest

from overlayd.core.config import StoreConfig, parse_store_url
from overlayd.core.model import Endpoint, Network, Node, random_mac
from overlayd.core.view import ClusterView, EndpointPut
from overlayd.store.base import Changes, Snapshot
from overlayd.store.etcd import EtcdStore
from overlayd.store.keys import encode
from overlayd.util.metrics import Metrics

PREFIX = "/t/v1/"


def store_config(url: str, ttl: int = 10) -> StoreConfig:
    scheme, endpoints = parse_store_url(url)
    return StoreConfig(url=url, scheme=scheme, endpoints=endpoints, prefix=PREFIX, lease_ttl=ttl)


@pytest.fixture
async def make_store(etcd_server: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[EtcdStore]]]:
    made: list[EtcdStore] = []

    async def make(node: str = "h1", ttl: int = 10, state: str | None = None) -> EtcdStore:
        store = EtcdStore(
            store_config(etcd_server.url, ttl),
            state_dir=str(tmp_path / (state or node)),
            metrics=Metrics(),
        )
        await store.connect()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def node(name: str, last_octet: int = 1) -> Node:
    return Node(name=name, vtep=IPv4Address(f"198.18.0.{last_octet}"), started_at=time.time())


def endpoint(name: str, ip: str, owner: str, network: str = "demo") -> Endpoint:
    return Endpoint(
        network=network, name=name, ip=IPv4Address(ip), mac=random_mac(), owner=owner, created_at=time.time()
    )


DEMO = Network(name="demo", vni=42, subnet=IPv4Network("10.1.0.0/24"))


async def test_compacted_history_yields_a_snapshot(make_store: Any, etcd_server: Any) -> None:
    store = await make_store("h1")
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    start = (await store.snapshot()).revision
    ep = endpoint("a", "10.1.0.9", "h1")
    await store.create_endpoint(ep)
    await store.delete_endpoint(ep)
    raw = aetcd.Client(host="127.0.0.1", port=etcd_server.client_port)
    await raw.connect()
    try:
        head = (await raw.get_prefix(PREFIX.encode())).header.revision
        await raw.compact(head)
    finally:
        await raw.close()
    stream = store.watch(start).__aiter__()
    batch = await asyncio.wait_for(stream.__anext__(), 10)
    assert isinstance(batch, Snapshot)
    view = ClusterView()
    view.replace_all(batch.facts)
    assert ep.key not in view.endpoints and "demo" in view.networks
    await stream.aclose()


async def test_a_transaction_of_records_is_one_batch(make_store: Any, etcd_server: Any) -> None:
    # What a joining host writes: many endpoints with their address claims in one
    # transaction. etcd sends it as one watch response; followers get one batch of
    # the records (the claims are not records) instead of one pass per record.
    store = await make_store("h2")
    await store.create_network(DEMO)
    start = (await store.snapshot()).revision
    eps = [endpoint(f"e{i}", f"10.1.0.{10 + i}", "h1") for i in range(20)]
    raw = aetcd.Client(host="127.0.0.1", port=etcd_server.client_port)
    await raw.connect()
    try:
        tx = raw.transactions
        puts = []
        for ep in eps:
            puts.append(tx.put(f"{PREFIX}endpoints/{ep.key}".encode(), encode(ep)))
            puts.append(tx.put(f"{PREFIX}ipam/demo/{ep.ip}".encode(), ep.key.encode()))
        ok, _ = await raw.transaction(compare=[], success=puts, failure=[])
        assert ok
    finally:
        await raw.close()
    stream = store.watch(start).__aiter__()
    try:
        batch = await asyncio.wait_for(stream.__anext__(), 10)
    finally:
        await stream.aclose()
    assert isinstance(batch, Changes)
    assert batch.facts == [EndpointPut(ep) for ep in eps]
