"""Conformance: the watch — every change, in order, across a server restart; junk skipped."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from support import DEMO, Collector, Stores, endpoint, network, node, poll, retry, view_of

from overlayd.core.view import ClusterView, EndpointDeleted, EndpointPut, NetworkDeleted, NetworkPut, NodePut
from overlayd.store.base import Changes, Snapshot, Store

MakeStore = Callable[..., Awaitable[Store]]


def lost_in(batch: Changes | Snapshot) -> bool:
    return isinstance(batch, Snapshot) and batch.data_lost is not None


def net_puts(facts: list[Any]) -> list[str]:
    return [f.network.name for f in facts if isinstance(f, NetworkPut)]


async def watched_with_history(
    stores: Stores, settings: dict[str, Any] | None = None
) -> tuple[Store, Store, Collector]:
    """A writer (h1) and a watcher (h2, with `settings`), both in session, six networks
    written (a revision or index well above a new server's), and the watch started after them."""
    writer = await stores.make("h1")
    watcher = await stores.make("h2", settings=settings)
    await writer.open_session(node("h1", 1))
    await watcher.open_session(node("h2", 2))
    for i in range(6):
        await writer.create_network(network(f"n{i}", 10 + i))
    snap = await watcher.snapshot()
    return writer, watcher, Collector(watcher, snap.revision)


def wipe(server: Any) -> None:
    """Stop the server, delete its data, start it again (empty)."""
    server.stop()
    shutil.rmtree(server.data_dir)
    server.start()


async def test_watch_delivers_every_change_in_order(make_store: MakeStore) -> None:
    writer, watcher = await make_store("h1"), await make_store("h2")
    await writer.open_session(node("h1", 1))
    await writer.create_network(DEMO)
    snap = await watcher.snapshot()
    seen = Collector(watcher, snap.revision)
    try:
        names = [f"n{i}" for i in range(8)]
        for i, name in enumerate(names):
            await writer.create_network(network(name, 100 + i))
        ep = endpoint("web", "10.1.0.5", "h1")
        await writer.create_endpoint(ep)
        # A backend may fold several changes of ONE key between two reads of
        # it into the latest (ZooKeeper does); so the next change of this key
        # waits until the watch has seen the previous one.
        await seen.wait(lambda: EndpointPut(ep) in seen.facts, 10, "the endpoint")
        await writer.delete_endpoint(ep)
        await writer.delete_network("n3")
        await seen.wait(lambda: NetworkDeleted("n3") in seen.facts, 10, "the network deletion")
        await seen.wait(lambda: EndpointDeleted(ep.key) in seen.facts, 10, "the endpoint deletion")
    finally:
        await seen.stop()
    assert seen.snapshots == 0
    assert net_puts(seen.facts) == names  # in order, each once
    assert seen.facts.index(EndpointPut(ep)) < seen.facts.index(EndpointDeleted(ep.key))
    assert seen.revisions == sorted(seen.revisions)
    # The watch started from the snapshot and what it delivered builds today's view.
    view = await view_of(watcher)
    start = await view_of(watcher)
    start.replace_all(snap.facts)
    for fact in seen.facts:
        start.apply(fact)
    assert (start.networks, start.endpoints) == (view.networks, view.endpoints)


async def test_watch_resumes_after_server_restart(stores: Stores) -> None:
    writer, watcher = await stores.make("h1"), await stores.make("h2")
    await writer.open_session(node("h1", 1))
    await writer.create_network(DEMO)
    await writer.create_endpoint(endpoint("stay", "10.1.0.5", "h1"))
    doomed = endpoint("doomed", "10.1.0.6", "h1")
    await writer.create_endpoint(doomed)
    keeper = asyncio.create_task(writer.keep_session())
    snap = await watcher.snapshot()
    seen = Collector(watcher, snap.revision)
    try:
        await writer.create_network(network("before", 7))
        await seen.wait(lambda: "before" in net_puts(seen.facts), 10, "the change before the restart")
        await asyncio.to_thread(stores.server.restart)  # the event loop runs on meanwhile
        # Written as soon as the server is back, most likely before the watch has reconnected.
        await retry(lambda: writer.create_network(network("after", 8)))
        await retry(lambda: writer.delete_endpoint(doomed))
        await retry(lambda: writer.create_network(network("later", 9)))
        await seen.wait(lambda: "later" in net_puts(seen.facts), 30, "the changes after the restart")
        await seen.wait(lambda: EndpointDeleted(doomed.key) in seen.facts, 10, "the deletion")
        assert net_puts(seen.facts) == ["before", "after", "later"]  # in order, nothing lost or repeated
        assert seen.snapshots == 0

        # The writer's records outlive the restart (its lease/session normally does; on
        # a machine so loaded that it lapsed, keep_session has re-published them).
        async def kept() -> bool:
            view = await view_of(watcher)
            return "demo/stay" in view.endpoints and "h1" in view.nodes

        await poll(kept, 15, "the writer's records after the restart")
    finally:
        keeper.cancel()
        await seen.stop()


async def test_watch_says_when_the_server_lost_its_data(stores: Stores) -> None:
    """A server that comes back empty (or from an older backup) is not the truth: the watch
    hands over the new content marked `data_lost`, so the daemon keeps its dataplane and
    re-publishes first (etcd: another cluster ID or the revision gone back; Consul: the
    index gone back; ZooKeeper: the zxid gone back)."""
    _, watcher, seen = await watched_with_history(stores)
    keeper = asyncio.create_task(watcher.keep_session())  # as in the daemon
    try:
        await asyncio.to_thread(wipe, stores.server)  # the event loop runs on meanwhile
        await seen.wait(lambda: any(lost_in(b) for b in seen.batches), 60, "the data loss noticed")
    finally:
        keeper.cancel()
        await seen.stop()
    lost = next(b for b in seen.batches if lost_in(b))
    assert isinstance(lost, Snapshot) and lost.data_lost is not None
    assert any(why in lost.data_lost for why in ("went back", "cluster ID", "made anew"))
    assert not net_puts(lost.facts)  # what the new server holds: nothing of ours


async def test_a_paced_watch_held_back_still_sees_the_server_lose_its_data(stores: Stores) -> None:
    """A burst holds a paced watch back (etcd: its watch cancelled for the pace, on the
    stream it keeps open); a server wiped during that pause is still noticed."""
    pace = 3.0
    writer, watcher, seen = await watched_with_history(stores, {"store.watch_pace": pace})
    keeper = asyncio.create_task(watcher.keep_session())
    try:
        await writer.create_network(network("a", 30))
        await seen.wait(lambda: "a" in net_puts(seen.facts), 10, "the change after a quiet spell")
        await writer.create_network(network("b", 31))  # within the pace: the watch holds back
        await seen.wait(lambda: "b" in net_puts(seen.facts), 10 + pace, "the burst's change")
        await asyncio.to_thread(wipe, stores.server)
        await seen.wait(lambda: any(lost_in(b) for b in seen.batches), 60, "the data loss noticed")
    finally:
        keeper.cancel()
        await seen.stop()
    lost = next(b for b in seen.batches if lost_in(b))
    assert isinstance(lost, Snapshot) and not net_puts(lost.facts)


async def test_watch_says_data_lost_when_the_new_server_passed_its_revision(stores: Stores) -> None:
    """The emptied server is written to past the revision the watch stands at before the
    watch looks again (daemons re-publish within milliseconds of a wipe), so no revision
    or index ever goes back where the watch can see it: the loss is still reported."""
    writer, watcher = await stores.make("h1"), await stores.make("h2")
    await writer.open_session(node("h1", 1))
    for i in range(3):
        await writer.create_network(network(f"n{i}", 10 + i))
    snap = await watcher.snapshot()
    watch = watcher.watch(snap.revision)
    await writer.create_network(network("seen", 20))
    # The watch has started and stands between two steps: it asks nothing until the next one.
    first = await asyncio.wait_for(anext(watch), 30)
    assert not lost_in(first) and "seen" in net_puts(first.facts)
    server = stores.server
    server.stop()
    shutil.rmtree(server.data_dir)
    server.start()
    rewriter = await stores.make("h3")
    await retry(lambda: rewriter.open_session(node("h3", 3)))
    for i in range(200):
        if (await rewriter.snapshot()).revision > first.revision:
            break
        await retry(lambda i=i: rewriter.create_network(network(f"again{i}", 100 + i)))
    assert (await rewriter.snapshot()).revision > first.revision, "the new server never passed the old one"
    try:
        batches = []
        while not any(lost_in(b) for b in batches):
            batches.append(await asyncio.wait_for(anext(watch), 60))
            assert len(batches) < 50, f"no data loss reported in {batches}"
        # Nothing before the report handed over the old networks as deleted.
        assert not any(isinstance(f, NetworkDeleted) for b in batches for f in b.facts)
    finally:
        await watch.aclose()


async def test_invalid_values_are_reported_and_skipped(stores: Stores) -> None:
    store = await stores.make("h1")
    await store.create_network(DEMO)
    snap = await store.snapshot()
    seen = Collector(store, snap.revision)
    try:
        await stores.raw_put("endpoints/demo/junk", b"{not json")
        await stores.raw_put("networks/evil", b'{"name": "evil", "vni": 0}')
        await stores.raw_put("networks/big", b"x" * 65536)
        await stores.raw_put("nodes/liar", b'{"name": "other", "vtep": "198.18.0.9"}')
        fine = network("fine", 9)
        await store.create_network(fine)
        await seen.wait(lambda: NetworkPut(fine) in seen.facts, 10, "the valid record after the junk")
        await seen.wait(lambda: len(stores.invalid) >= 4, 10, "the junk to be reported")
    finally:
        await seen.stop()
    assert seen.facts == [NetworkPut(fine)]
    reported = "\n".join(stores.invalid)
    for key in ("endpoints/demo/junk", "networks/evil", "networks/big", "nodes/liar"):
        assert key in reported
    view = await view_of(store)
    assert sorted(view.networks) == ["demo", "fine"] and not view.endpoints and not view.nodes
    assert not any(isinstance(f, NodePut) for f in (await store.snapshot()).facts)


async def test_watch_follows_a_burst_of_concurrent_writers(make_store: MakeStore) -> None:
    writers = [await make_store(f"h{i}") for i in range(1, 4)]
    watcher = await make_store("w")
    for i, store in enumerate(writers, 1):
        await store.open_session(node(f"h{i}", i))
    await writers[0].create_network(DEMO)
    snap = await watcher.snapshot()
    start = ClusterView()
    start.replace_all(snap.facts)
    seen = Collector(watcher, snap.revision, start)
    try:
        await writers[1].create_network(network("burst", 77))
        eps = [endpoint(f"e{i}", f"10.1.0.{10 + i}", f"h{i % 3 + 1}") for i in range(30)]
        await asyncio.gather(*(writers[i % 3].create_endpoint(ep) for i, ep in enumerate(eps)))
        await asyncio.gather(*(writers[i % 3].delete_endpoint(ep) for i, ep in enumerate(eps) if i % 2))
        await writers[2].create_endpoint(endpoint("x", "10.77.0.5", "h3", network="burst"))
        await writers[1].delete_network("burst")
        final = await view_of(watcher)
        await seen.wait(
            lambda: (
                (seen.view.networks, seen.view.endpoints, seen.view.nodes)
                == (final.networks, final.endpoints, final.nodes)
            ),
            15,
            "the watch's view to match the store",
        )
    finally:
        await seen.stop()
    assert len(seen.view.endpoints) == 16  # 15 survivors of the burst + "x" (its network is gone)
    assert seen.revisions == sorted(seen.revisions)


async def test_a_paced_watch_reads_what_changed_within_the_pace_in_one_round(stores: Stores) -> None:
    """`store.watch_pace`: Consul's and ZooKeeper's watches poll, and beside gossip they read
    at most one round per pace. The first change after a quiet spell is read at once; the
    ones made while the pace runs come in one batch. etcd's watch is a stream: the burst's
    first change comes on the open stream (then closed for the pace), the rest together
    when it reopens."""
    pace = 3.0  # far longer than the writes below take, even on a loaded machine
    writer = await stores.make("h1")
    watcher = await stores.make("h2", settings={"store.watch_pace": pace})
    await writer.open_session(node("h1", 1))
    await writer.create_network(DEMO)
    snap = await watcher.snapshot()
    seen = Collector(watcher, snap.revision)
    try:
        first = endpoint("first", "10.1.0.2", "h1")
        await writer.create_endpoint(first)
        await seen.wait(lambda: EndpointPut(first) in seen.facts, 10, "the first endpoint")
        before = len(seen.batches)
        burst = [endpoint(f"b{i}", f"10.1.0.{10 + i}", "h1") for i in range(5)]
        for ep in burst:
            await writer.create_endpoint(ep)
        await seen.wait(lambda: all(EndpointPut(ep) in seen.facts for ep in burst), 10 + pace, "the burst")
    finally:
        await seen.stop()
    assert seen.snapshots == 0
    burst_batches = [b.facts for b in seen.batches[before:]]
    if stores.backend.name.startswith("etcd"):
        assert len(burst_batches) <= 2, burst_batches
    else:
        assert len(burst_batches) == 1, burst_batches
