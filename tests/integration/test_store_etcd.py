"""The etcd backend against a real etcd server (started per test on free ports)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import aetcd
import pytest

from overlayd.config import StoreConfig, parse_store_url
from overlayd.metrics import Metrics
from overlayd.model import Endpoint, Network, Node, random_mac
from overlayd.state import ClusterView, EndpointDeleted, EndpointPut, NetworkPut
from overlayd.store.base import AlreadyExists, Changes, Snapshot, StoreUnavailable
from overlayd.store.etcd import EtcdStore

PREFIX = "/t/v1/"


def store_config(url: str, ttl: int = 10) -> StoreConfig:
    scheme, endpoints = parse_store_url(url)
    return StoreConfig(url=url, scheme=scheme, endpoints=endpoints, prefix=PREFIX, lease_ttl=ttl)


@pytest.fixture
async def make_store(
    etcd_server: Any, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[EtcdStore]]]:
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
    return Endpoint(network=network, name=name, ip=IPv4Address(ip), mac=random_mac(), owner=owner,
                    created_at=time.time())


DEMO = Network(name="demo", vni=42, subnet=IPv4Network("10.1.0.0/24"))


async def poll(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def view_of(store: EtcdStore) -> ClusterView:
    view = ClusterView()
    view.replace_all((await store.snapshot()).facts)
    return view


async def test_network_name_and_vni_are_compare_and_set(make_store: Any) -> None:
    a, b = await make_store("h1"), await make_store("h2")
    results = await asyncio.gather(
        a.create_network(DEMO), b.create_network(DEMO), return_exceptions=True
    )
    assert sum(r is None for r in results) == 1
    [lost] = [r for r in results if r is not None]
    assert isinstance(lost, AlreadyExists) and lost.what == "network name"

    with pytest.raises(AlreadyExists) as info:
        await b.create_network(Network(name="other", vni=42, subnet=IPv4Network("10.2.0.0/24")))
    assert info.value.what == "VNI" and info.value.holder == "demo"
    view = await view_of(a)
    assert list(view.networks) == ["demo"]


async def test_ip_claims_never_duplicate_under_concurrency(make_store: Any) -> None:
    stores = [await make_store(f"h{i}") for i in range(1, 5)]
    for i, store in enumerate(stores, 1):
        await store.open_session(node(f"h{i}", i))
    await stores[0].create_network(DEMO)
    # 4 clients race for the same 5 addresses with 20 differently named endpoints.
    attempts = [
        stores[i % 4].create_endpoint(endpoint(f"ep{i}", f"10.1.0.{10 + i % 5}", f"h{i % 4 + 1}"))
        for i in range(20)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    winners = [r for r in results if r is None]
    assert len(winners) == 5
    assert all(isinstance(r, AlreadyExists) and r.what == "IP" for r in results if r is not None)
    view = await view_of(stores[0])
    ips = [ep.ip for ep in view.endpoints.values()]
    assert len(ips) == len(set(ips)) == 5

    with pytest.raises(AlreadyExists) as info:
        await stores[0].create_endpoint(endpoint("ep0", "10.1.0.99", "h1"))
    assert info.value.what == "endpoint name"


async def test_lease_expiry_removes_owned_records_only(make_store: Any) -> None:
    dying, watcher = await make_store("h1", ttl=2), await make_store("h2")
    await dying.open_session(node("h1", 1))
    await dying.create_network(DEMO)
    ep = endpoint("web", "10.1.0.5", "h1")
    await dying.create_endpoint(ep)
    start = (await watcher.snapshot()).revision
    assert ep.key in (await view_of(watcher)).endpoints

    await dying.close()  # no keepalive from now on: the lease runs out
    seen: list[Any] = []

    async def collect() -> None:
        async for batch in watcher.watch(start):
            assert isinstance(batch, Changes)
            seen.extend(batch.facts)

    task = asyncio.create_task(collect())
    try:
        async def gone() -> bool:
            view = await view_of(watcher)
            return ep.key not in view.endpoints and "h1" not in view.nodes

        await poll(gone, 10, "lease expiry to delete h1's records")
        await poll(lambda: _true(EndpointDeleted(ep.key) in seen), 5, "watch delete event")
    finally:
        task.cancel()
    view = await view_of(watcher)
    assert "demo" in view.networks  # networks are not owned by any lease
    # The IP claim went with the lease: the address can be taken again.
    await watcher.open_session(node("h2", 2))
    await watcher.create_endpoint(endpoint("web2", "10.1.0.5", "h2"))


async def _true(value: bool) -> bool:
    return value


async def test_watch_resumes_after_server_restart(make_store: Any, etcd_server: Any) -> None:
    writer, watcher = await make_store("h1"), await make_store("h2")
    await writer.create_network(DEMO)
    start = (await watcher.snapshot()).revision
    seen: list[Any] = []

    async def collect() -> None:
        async for batch in watcher.watch(start):
            seen.extend(batch.facts if isinstance(batch, Changes) else [])

    task = asyncio.create_task(collect())
    try:
        await writer.create_network(Network(name="before", vni=7, subnet=IPv4Network("10.7.0.0/24")))
        await poll(lambda: _true(any(_is_net(f, "before") for f in seen)), 10, "event before restart")
        etcd_server.restart()
        # Written as soon as the server is back, likely before the watch has reconnected.
        await _retry(lambda: writer.create_network(
            Network(name="after", vni=8, subnet=IPv4Network("10.8.0.0/24"))))
        await poll(lambda: _true(any(_is_net(f, "after") for f in seen)), 20, "event after restart")
    finally:
        task.cancel()
    names = [f.network.name for f in seen if isinstance(f, NetworkPut)]
    assert names == ["before", "after"]  # in order, nothing lost, nothing repeated


def _is_net(fact: Any, name: str) -> bool:
    return isinstance(fact, NetworkPut) and fact.network.name == name


async def _retry(op: Callable[[], Awaitable[None]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await op()
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


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


async def test_restarted_daemon_resumes_its_lease(make_store: Any) -> None:
    first = await make_store("h1", ttl=5, state="shared")
    await first.open_session(node("h1", 1))
    await first.create_network(DEMO)
    ep = endpoint("keep", "10.1.0.20", "h1")
    await first.create_endpoint(ep)
    await first.close()

    second = await make_store("h1", ttl=5, state="shared")
    await second.open_session(node("h1", 1))
    keeper = asyncio.create_task(second.keep_session())
    try:
        # Well past the first lease's TTL: only the resumed lease keeps the endpoint alive.
        await asyncio.sleep(0)  # let keep_session start
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert ep.key in (await view_of(second)).endpoints
            await asyncio.sleep(0.5)
    finally:
        keeper.cancel()


async def test_lost_lease_is_replaced_and_records_republished(make_store: Any, etcd_server: Any) -> None:
    store = await make_store("h1", ttl=2)
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    ep = endpoint("phoenix", "10.1.0.30", "h1")
    await store.create_endpoint(ep)
    raw = aetcd.Client(host="127.0.0.1", port=etcd_server.client_port)
    await raw.connect()
    try:
        kv = await raw.get((PREFIX + "endpoints/demo/phoenix").encode())
        await raw.revoke_lease(kv.lease)  # as if the lease had expired during an outage
    finally:
        await raw.close()
    assert ep.key not in (await view_of(store)).endpoints
    keeper = asyncio.create_task(store.keep_session())
    try:
        async def back() -> bool:
            view = await view_of(store)
            return view.endpoints.get(ep.key) == ep and "h1" in view.nodes

        await poll(back, 10, "re-publication under a new lease")
    finally:
        keeper.cancel()


async def test_invalid_values_are_reported_and_skipped(make_store: Any, etcd_server: Any) -> None:
    store = await make_store("h1")
    await store.create_network(DEMO)
    start = (await store.snapshot()).revision
    raw = aetcd.Client(host="127.0.0.1", port=etcd_server.client_port)
    await raw.connect()
    try:
        await raw.put((PREFIX + "endpoints/demo/junk").encode(), b"{not json")
        await raw.put((PREFIX + "networks/evil").encode(), b'{"name": "evil", "vni": 0}')
        await raw.put((PREFIX + "networks/big").encode(), b"x" * 65536)
    finally:
        await raw.close()
    await store.create_network(Network(name="fine", vni=9, subnet=IPv4Network("10.9.0.0/24")))
    view = await view_of(store)
    assert sorted(view.networks) == ["demo", "fine"] and not view.endpoints

    stream = store.watch(start).__aiter__()
    batch = await asyncio.wait_for(stream.__anext__(), 10)
    assert isinstance(batch, Changes) and batch.facts[0] == NetworkPut(
        Network(name="fine", vni=9, subnet=IPv4Network("10.9.0.0/24"))
    )
    await stream.aclose()


async def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = EtcdStore(store_config(f"etcd://127.0.0.1:{port}"), state_dir=str(tmp_path))
    with pytest.raises(StoreUnavailable) as info:
        await asyncio.wait_for(store.connect(), 15)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "\n" not in str(info.value)


async def test_delete_endpoint_releases_ip_and_is_idempotent(make_store: Any) -> None:
    store = await make_store("h1")
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    ep = endpoint("tmp", "10.1.0.40", "h1")
    await store.create_endpoint(ep)
    await store.delete_endpoint(ep)
    await store.delete_endpoint(ep)
    reuse = endpoint("tmp2", "10.1.0.40", "h1")
    await store.create_endpoint(reuse)
    view = await view_of(store)
    assert EndpointPut(reuse).endpoint == view.endpoints[reuse.key]
    assert ep.key not in view.endpoints
