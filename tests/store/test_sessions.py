"""Conformance: owned records live exactly as long as their owner's lease/session."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import DEMO, Collector, Stores, endpoint, node, poll, retry, view_of

from overlayd.core.view import EndpointDeleted, NodeDeleted
from overlayd.store.base import AlreadyExists, StoreUnavailable


async def test_owned_records_expire_after_the_owner_dies_and_not_before(stores: Stores) -> None:
    ttl = stores.backend.min_ttl
    owner, watcher = await stores.make("h1", ttl=ttl), await stores.make("h2")
    await owner.open_session(node("h1", 1))
    await owner.create_network(DEMO)
    ep = endpoint("web", "10.1.0.5", "h1")
    await owner.create_endpoint(ep)
    keeper = asyncio.create_task(owner.keep_session())
    snap = await watcher.snapshot()
    seen = Collector(watcher, snap.revision)
    try:
        # Alive: its records stay well past the TTL.
        deadline = time.monotonic() + 1.5 * ttl
        while time.monotonic() < deadline:
            view = await view_of(watcher)
            assert ep.key in view.endpoints and "h1" in view.nodes
            await asyncio.sleep(0.25)
        keeper.cancel()
        await owner.close()  # dies: no keepalive, no goodbye
        died = time.monotonic()
        view = await view_of(watcher)
        assert ep.key in view.endpoints, "owned records vanished the moment the owner went quiet"

        async def gone() -> bool:
            view = await view_of(watcher)
            return ep.key not in view.endpoints and "h1" not in view.nodes

        await poll(gone, 4 * ttl + 5, "the owner's records to expire")
        expired_after = time.monotonic() - died
        await seen.wait(
            lambda: EndpointDeleted(ep.key) in seen.facts and NodeDeleted("h1") in seen.facts,
            10,
            "the watch to report the expiry",
        )
    finally:
        keeper.cancel()
        await seen.stop()
    assert expired_after > 0.5
    assert "demo" in (await view_of(watcher)).networks  # networks belong to no lease
    # The IP claim went with the owner: the address can be taken again.
    await watcher.open_session(node("h2", 2))
    await watcher.create_endpoint(endpoint("web2", "10.1.0.5", "h2"))


async def test_restarted_daemon_resumes_its_session(stores: Stores) -> None:
    ttl = stores.backend.min_ttl
    first = await stores.make("h1", ttl=ttl, state="shared")
    await first.open_session(node("h1", 1))
    await first.create_network(DEMO)
    ep = endpoint("keep", "10.1.0.20", "h1")
    await first.create_endpoint(ep)
    await first.close()

    second = await stores.make("h1", ttl=ttl, state="shared")
    await second.open_session(node("h1", 1))
    await second.publish_endpoint(ep)  # what a restarted daemon does for what it hosts
    keeper = asyncio.create_task(second.keep_session())
    watcher = await stores.make("h2")
    snap = await watcher.snapshot()
    seen = Collector(watcher, snap.revision)
    try:
        # Well past the first session's TTL: the records never blink out.
        deadline = time.monotonic() + 2 * ttl
        while time.monotonic() < deadline:
            view = await view_of(watcher)
            assert view.endpoints.get(ep.key) == ep and "h1" in view.nodes
            await asyncio.sleep(0.25)
        assert seen.check_alive()
    finally:
        keeper.cancel()
        await seen.stop()
    assert EndpointDeleted(ep.key) not in seen.facts and NodeDeleted("h1") not in seen.facts


async def test_lost_session_is_replaced_and_records_republished(stores: Stores) -> None:
    ttl = stores.backend.min_ttl
    store = await stores.make("h1", ttl=ttl)
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    ep = endpoint("phoenix", "10.1.0.30", "h1")
    await store.create_endpoint(ep)
    watcher = await stores.make("h2")

    async def seen(present: bool) -> bool:
        """Whether another client of the server sees h1's records (all present, or all gone)."""
        try:
            view = await view_of(watcher)
        except StoreUnavailable:
            return False
        there = [view.endpoints.get(ep.key) == ep, "h1" in view.nodes]
        return all(there) if present else not any(there)

    keeper = asyncio.create_task(store.keep_session())
    try:
        assert await seen(present=True)
        # Paused, so nothing can put the records back before we have looked.
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await stores.expire(store)  # as if an outage had outlasted the lease
        # The server itself dropped them: another client sees them gone.
        await poll(lambda: seen(present=False), 4 * ttl + 5, "the expired records to vanish from the server")
        assert "demo" in (await view_of(watcher)).networks  # networks belong to no lease

        keeper = asyncio.create_task(store.keep_session())
        await poll(lambda: seen(present=True), 15 + ttl, "re-publication under a new lease/session")
        # Still owned: the new lease is kept alive too.
        await asyncio.sleep(1.5 * ttl)
        assert await seen(present=True)
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)


async def test_deleting_a_lapsed_endpoint_leaves_the_ip_to_whoever_took_it(stores: Stores) -> None:
    ttl = stores.backend.min_ttl
    first, second = await stores.make("h1", ttl=ttl), await stores.make("h2")
    await first.open_session(node("h1", 1))
    await first.create_network(DEMO)
    ours = endpoint("web", "10.1.0.40", "h1")
    await first.create_endpoint(ours)
    await stores.expire(first)  # our claim lapses with the session...

    async def lapsed() -> bool:
        return ours.key not in (await view_of(second)).endpoints

    await poll(lapsed, 4 * ttl + 5, "the lapsed endpoint to vanish")
    await second.open_session(node("h2", 2))
    theirs = endpoint("db", "10.1.0.40", "h2")
    await second.create_endpoint(theirs)  # ...and someone else takes the address
    await retry(lambda: first.delete_endpoint(ours))

    assert (await view_of(second)).endpoints.get(theirs.key) == theirs
    with pytest.raises(AlreadyExists) as info:
        await second.create_endpoint(endpoint("other", "10.1.0.40", "h2"))
    assert info.value.what == "IP" and info.value.holder == theirs.key
