"""Conformance: records in and out, compare-and-set, allocation races, sizes — every backend."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from support import DEMO, PREFIX, Backend, Stores, endpoint, network, node, view_of

from overlayd.core.config import from_flat
from overlayd.core.view import EndpointPut, NetworkPut, NodePut
from overlayd.store.base import AlreadyExists, NotFoundError, Store, StoreError, StoreUnavailable
from overlayd.store.factory import make_store as factory_make_store

MakeStore = Callable[..., Awaitable[Store]]


async def test_put_get_list_delete(make_store: MakeStore) -> None:
    store = await make_store("h1")
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    other = network("other", 7)
    await store.create_network(other)
    ep = endpoint("web", "10.1.0.5", "h1")
    await store.create_endpoint(ep)

    snap = await store.snapshot()
    assert NetworkPut(DEMO) in snap.facts and NetworkPut(other) in snap.facts
    assert EndpointPut(ep) in snap.facts
    assert [f.node.name for f in snap.facts if isinstance(f, NodePut)] == ["h1"]
    assert snap.revision > 0

    moved = endpoint("web", "10.1.0.5", "h1")  # a new MAC: re-publishing replaces the record
    await store.publish_endpoint(moved)
    assert (await view_of(store)).endpoints[ep.key] == moved

    await store.delete_endpoint(moved)
    await store.delete_endpoint(moved)  # idempotent
    await store.delete_network("other")
    with pytest.raises(NotFoundError):
        await store.delete_network("other")
    view = await view_of(store)
    assert list(view.networks) == ["demo"] and not view.endpoints
    # Released claims can be taken again.
    await store.create_network(network("again", 7))
    await store.create_endpoint(endpoint("web2", "10.1.0.5", "h1"))


async def test_compare_and_set_conflicts(make_store: MakeStore) -> None:
    a, b = await make_store("h1"), await make_store("h2")
    await a.open_session(node("h1", 1))
    await b.open_session(node("h2", 2))
    await a.create_network(DEMO)

    with pytest.raises(AlreadyExists) as info:
        await b.create_network(DEMO)
    assert info.value.what == "network name"
    with pytest.raises(AlreadyExists) as info:
        await b.create_network(network("other", 42))
    assert info.value.what == "VNI" and info.value.holder == "demo"

    await a.create_endpoint(endpoint("web", "10.1.0.5", "h1"))
    with pytest.raises(AlreadyExists) as info:
        await b.create_endpoint(endpoint("web", "10.1.0.6", "h2"))
    assert info.value.what == "endpoint name"
    with pytest.raises(AlreadyExists) as info:
        await b.create_endpoint(endpoint("db", "10.1.0.5", "h2"))
    assert info.value.what == "IP" and info.value.holder == "demo/web"
    # Publishing may not steal an IP another endpoint holds either.
    with pytest.raises(AlreadyExists) as info:
        await b.publish_endpoint(endpoint("db", "10.1.0.5", "h2"))
    assert info.value.what == "IP"

    view = await view_of(a)
    assert list(view.networks) == ["demo"] and list(view.endpoints) == ["demo/web"]


async def test_allocation_races_never_duplicate(make_store: MakeStore) -> None:
    stores = [await make_store(f"h{i}") for i in range(1, 5)]
    for i, store in enumerate(stores, 1):
        await store.open_session(node(f"h{i}", i))

    # 4 clients race for 3 VNIs with 12 differently named networks.
    nets = await asyncio.gather(
        *(stores[i % 4].create_network(network(f"n{i}", 100 + i % 3)) for i in range(12)),
        return_exceptions=True,
    )
    assert sum(r is None for r in nets) == 3
    assert all(isinstance(r, AlreadyExists) and r.what == "VNI" for r in nets if r is not None)
    await stores[0].create_network(DEMO)

    # ... and for the same 5 addresses with 40 differently named endpoints.
    eps = await asyncio.gather(
        *(
            stores[i % 4].create_endpoint(endpoint(f"ep{i}", f"10.1.0.{10 + i % 5}", f"h{i % 4 + 1}"))
            for i in range(40)
        ),
        return_exceptions=True,
    )
    assert sum(r is None for r in eps) == 5
    assert all(isinstance(r, AlreadyExists) and r.what == "IP" for r in eps if r is not None)

    view = await view_of(stores[3])
    vnis = [n.vni for n in view.networks.values()]
    ips = [ep.ip for ep in view.endpoints.values()]
    assert len(vnis) == len(set(vnis)) == 4
    assert len(ips) == len(set(ips)) == 5


async def test_64_kib_values(stores: Stores) -> None:
    store = await stores.make("h1")
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    # A legitimate record this big (a long netns path) goes in and comes out whole.
    big = endpoint("big", "10.1.0.7", "h1", netns="/run/netns/" + "n" * 65536)
    await store.create_endpoint(big)
    assert (await view_of(store)).endpoints[big.key] == big
    # A raw 64 KiB value that is not a record is skipped.
    await stores.raw_put("networks/blob", b"\xff" * 65536)
    view = await view_of(store)
    assert list(view.networks) == ["demo"]
    assert any("networks/blob" in line for line in stores.invalid)
    # Far too big for any backend: a clear error, and the store keeps working.
    huge = endpoint("huge", "10.1.0.8", "h1", netns="x" * (3 << 20))
    with pytest.raises(StoreError) as info:
        await store.create_endpoint(huge)
    assert "\n" not in str(info.value)
    await store.create_endpoint(endpoint("after", "10.1.0.9", "h1"))
    assert "demo/after" in (await view_of(store)).endpoints
    assert "demo/huge" not in (await view_of(store)).endpoints


async def test_unreachable_server_is_a_clear_error(backend: Backend, tmp_path: Path) -> None:
    if backend.variant_of is not None:
        pytest.skip(f"no server involved: the same as {backend.variant_of}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = backend.server()
    url = server.url.rsplit(":", 1)[0] + f":{port}{backend.url_path}"
    server.cleanup()
    config = from_flat({"underlay.address": "198.18.0.1", "store.url": url, "store.prefix": PREFIX})
    store = factory_make_store(config.store, state_dir=str(tmp_path))
    with pytest.raises(StoreUnavailable) as info:
        await asyncio.wait_for(store.connect(), 20)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "\n" not in str(info.value)
    await store.close()
