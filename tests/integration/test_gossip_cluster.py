"""Clusters of real GossipNodes on 127.0.0.1 (free ports, no root): spread, failure
detection, refutation, anti-entropy repair, and indifference to garbage.

Timings are shortened (probe every 0.2 s, anti-entropy every 0.5 s) so the tests
run in seconds; every wait polls with a deadline. Spread latencies are printed
(run with -s), not asserted: they depend on the machine.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from overlayd.gossip import (
    GossipConfig,
    GossipMetrics,
    GossipNode,
    Keyring,
    MemberState,
    Record,
    SchemaError,
    schema,
)
from overlayd.gossip.clock import SYSTEM, Clock, ShiftedClock
from overlayd.gossip.framing import Framer
from overlayd.lab import netns

FAST = GossipConfig(probe_interval=0.2, probe_timeout=0.1, anti_entropy_interval=0.5, suspicion_mult=3.0)
KEY = Keyring.generate()


@dataclass
class Member:
    node: GossipNode
    metrics: GossipMetrics
    registry: CollectorRegistry
    learned: dict[tuple[str, str, str], float] = field(default_factory=dict)  # ident -> when
    states: list[tuple[str, MemberState]] = field(default_factory=list)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


async def until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `pred` until true; the seconds it took. Fails with `what` at the deadline."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


class Cluster:
    def __init__(self, config: GossipConfig) -> None:
        self.config = config
        self.members: list[Member] = []
        self.seed: tuple[str, int] | None = None

    async def add(
        self,
        name: str,
        config: GossipConfig | None = None,
        key: bytes = KEY,
        seed: tuple[str, int] | None = None,
        keyring: Keyring | None = None,
        sock: socket.socket | None = None,
        clock: Clock = SYSTEM,
    ) -> Member:
        registry = CollectorRegistry()
        metrics = GossipMetrics(registry)
        box: list[Member] = []

        def on_change(rec: Record) -> None:
            box[0].learned[rec.ident] = time.perf_counter()

        def on_member(info: object) -> None:
            box[0].states.append((info.name, info.state))  # type: ignore[attr-defined]

        node = GossipNode(
            name,
            keyring=keyring or Keyring([key]),
            bind="127.0.0.1",
            port=0,
            seeds=[s for s in (seed or self.seed,) if s],
            on_change=on_change,
            on_member=on_member,
            metrics=metrics,
            config=config or self.config,
            sock=sock,
            clock=clock,
        )
        member = Member(node, metrics, registry)
        box.append(member)
        await node.start()
        self.seed = self.seed or node.address
        self.members.append(member)
        return member

    def nodes(self) -> list[GossipNode]:
        return [m.node for m in self.members]

    def alive_views(self, names: set[str]) -> bool:
        """Every node in `names` sees every other one alive."""
        for n in self.nodes():
            if n.name not in names:
                continue
            alive = {m.name for m in n.members() if m.state == MemberState.ALIVE}
            if not names - {n.name} <= alive:
                return False
        return True

    async def converged(self, timeout: float = 15.0) -> None:
        names = {n.name for n in self.nodes()}
        await until(lambda: self.alive_views(names), timeout, "full membership everywhere")

    async def stop(self) -> None:
        for n in self.nodes():
            await n.stop(leave=False)


@asynccontextmanager
async def cluster(n: int, config: GossipConfig = FAST) -> AsyncIterator[Cluster]:
    c = Cluster(config)
    try:
        for i in range(n):
            await c.add(f"h{i:02}")
        await c.converged()
        yield c
    finally:
        await c.stop()


def has(node: GossipNode, rec: Record) -> bool:
    return node.get(*rec.ident) == rec


async def measure_spread(c: Cluster, rounds: int) -> list[float]:
    """Publish from random nodes; seconds until every other node has each record."""
    spreads = []
    rng = random.Random(3)
    for i in range(rounds):
        src = rng.choice(c.members)
        t0 = time.perf_counter()
        rec = src.node.publish("endpoint", f"net1/c{i}", {"ip": f"10.0.{i // 250}.{i % 250 + 1}"})
        others = [m for m in c.members if m is not src]
        await until(lambda r=rec, o=others: all(has(m.node, r) for m in o), 10, f"record {i} everywhere")
        spreads.append(max(m.learned[rec.ident] for m in others) - t0)
    return spreads


def report(label: str, spreads: list[float]) -> None:
    ms = sorted(s * 1000 for s in spreads)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(
        f"\n{label}: spread to all, n={len(ms)}: median {statistics.median(ms):.2f} ms, "
        f"p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
    )


async def test_record_reaches_all_5() -> None:
    async with cluster(5) as c:
        report("5 nodes", await measure_spread(c, 50))
        # a deletion travels the same way
        src = c.members[0].node
        rec = src.publish("network", "blue", {"vni": 100})
        await until(lambda: all(has(n, rec) for n in c.nodes()), 10, "network everywhere")
        tomb = src.delete("network", "blue")
        await until(lambda: all(has(n, tomb) for n in c.nodes()), 10, "tombstone everywhere")
        assert all(not any(r.key == "blue" for r in n.records()) for n in c.nodes())


async def test_record_reaches_all_30() -> None:
    async with cluster(30) as c:
        report("30 nodes", await measure_spread(c, 50))
        sent = sum(m.metric("overlayd_gossip_messages_sent_total", {"type": "push"}) for m in c.members)
        print(f"30 nodes: {sent / 50:.0f} push datagrams per record (fanout {FAST.fanout})")


async def test_abrupt_stop_becomes_suspect_then_dead() -> None:
    async with cluster(5) as c:
        victim = c.members[-1]
        others = c.members[:-1]
        await victim.node.stop(leave=False)

        def state_everywhere(state: MemberState) -> bool:
            return all(
                any(m.name == victim.node.name and m.state == state for m in o.node.members()) for o in others
            )

        await until(lambda: state_everywhere(MemberState.DEAD), 15, "victim dead everywhere")
        # every observer went through suspect before dead (locally or by hearing it)
        for o in others:
            seen = [s for name, s in o.states if name == victim.node.name]
            assert seen.index(MemberState.SUSPECT) < seen.index(MemberState.DEAD), seen
        assert sum(o.metric("overlayd_gossip_suspicions_total") for o in others) >= 1
        assert all(o.metric("overlayd_gossip_peers", {"state": "dead"}) == 1 for o in others)
        # the rest still work
        rec = others[0].node.publish("endpoint", "net1/after", {"ip": "10.0.0.9"})
        await until(lambda: all(has(o.node, rec) for o in others), 10, "record after a death")


async def test_graceful_leave_is_left_not_dead() -> None:
    async with cluster(5) as c:
        leaver = c.members[-1]
        await leaver.node.stop(leave=True)
        await until(
            lambda: all(
                any(m.name == leaver.node.name and m.state == MemberState.LEFT for m in o.node.members())
                for o in c.members[:-1]
            ),
            10,
            "left everywhere",
        )
        assert all(o.metric("overlayd_gossip_suspicions_total") == 0 for o in c.members[:-1])


async def test_falsely_suspected_node_refutes() -> None:
    config = GossipConfig(
        probe_interval=0.2, probe_timeout=0.1, anti_entropy_interval=0.5, suspicion_mult=10.0
    )
    async with cluster(5, config) as c:
        victim = c.members[2]
        name = victim.node.name
        before = {o.node.name: o.node._ms.get(name).incarnation for o in c.members if o is not victim}  # type: ignore[union-attr]
        # Freeze its receive path: it still runs, but hears nothing (like a stalled process).
        transport = victim.node._transport
        assert transport is not None
        transport.pause_reading()
        try:
            await until(
                lambda: any(
                    any(m.name == name and m.state == MemberState.SUSPECT for m in o.node.members())
                    for o in c.members
                    if o is not victim
                ),
                10,
                "someone suspects the frozen node",
            )
        finally:
            transport.resume_reading()

        def refuted_everywhere() -> bool:
            for o in c.members:
                info = o.node._ms.get(name) if o is not victim else None
                if o is not victim and (
                    info is None or info.state != MemberState.ALIVE or info.incarnation <= before[o.node.name]
                ):
                    return False
            return True

        await until(refuted_everywhere, 10, "the refutation (alive, higher incarnation) everywhere")
        for o in c.members:
            if o is not victim:
                info = o.node._ms.get(name)
                assert info is not None and info.incarnation > before[o.node.name]
                assert all(s != MemberState.DEAD for n, s in o.states if n == name)
        assert victim.metric("overlayd_gossip_refutations_total") >= 1


async def test_anti_entropy_repairs_a_late_node() -> None:
    """Records published before a node exists reach it by anti-entropy, many datagrams' worth."""
    async with cluster(4) as c:
        for i, m in enumerate(c.members):
            for j in range(150):  # ~150 x 4 records: far more than one datagram holds
                m.node.publish(
                    "endpoint",
                    f"net1/{i}-{j}",
                    {"ip": f"10.{i}.{j // 250}.{j % 250 + 1}", "mac": "02:00:00:00:00:01"},
                )
            m.node.delete("endpoint", f"net1/{i}-0")
        late = await c.add("late")
        # what each owner holds of its own is the truth the late node must end up with
        want = sorted(
            repr(r) for m in c.members for r in m.node.records(tombstones=True) if r.owner == m.node.name
        )
        took = await until(
            lambda: sorted(map(repr, late.node.records(tombstones=True))) == want, 20, "late node repaired"
        )
        print(f"\nlate node got {len(want)} records by anti-entropy in {took * 1000:.0f} ms")
        assert late.metric("overlayd_gossip_records_repaired_total") >= len(want)
        assert not any(r.key.endswith("-0") for r in late.node.records())


async def test_anti_entropy_alone_converges() -> None:
    """With pushes off (fanout 0) every change still arrives, through digests only."""
    config = GossipConfig(probe_interval=0.2, probe_timeout=0.1, anti_entropy_interval=0.3, fanout=0)
    async with cluster(5, config) as c:
        recs = [m.node.publish("endpoint", f"net1/{m.node.name}", {"ip": "10.0.0.1"}) for m in c.members]
        recs.append(c.members[0].node.delete("endpoint", f"net1/{c.members[0].node.name}"))
        await until(
            lambda: all(has(n, r) for n in c.nodes() for r in recs[1:]), 20, "digest-only convergence"
        )
        assert sum(m.metric("overlayd_gossip_messages_sent_total", {"type": "push"}) for m in c.members) == 0
        assert (
            sum(
                m.metric("overlayd_gossip_anti_entropy_exchanges_total", {"role": "initiator"})
                for m in c.members
            )
            > 0
        )


async def test_flood_of_random_and_forged_datagrams_changes_nothing() -> None:
    async with cluster(5) as c:
        rec = c.members[0].node.publish("endpoint", "net1/real", {"ip": "10.0.0.1"})
        await until(lambda: all(has(n, rec) for n in c.nodes()), 10, "baseline record")
        before = [
            (sorted(map(repr, n.records(tombstones=True))), [(m.name, m.state) for m in n.members()])
            for n in c.nodes()
        ]

        forged_rec = schema.Push(
            3, (schema.Record("endpoint", "net1/evil", "h00", 2**40, 1, {"ip": "6.6.6.6"}),)
        )
        evil_members = schema.Members(
            False, (schema.MemberUpdate("h01", "127.0.0.1", 9, MemberState.DEAD, 2**40),)
        )
        wrong_key = Framer("h03", Keyring([Keyring.generate()]))
        insider = Framer("h02", Keyring([KEY]))
        stale = Framer("h04", Keyring([KEY]), clock=lambda: time.time() - 3600)
        replayed = insider.seal(b"\x93\x01\xa4ping\x01")  # valid frame (bad body) we replay
        packets: list[bytes] = []
        rng = random.Random(5)
        for i in range(1000):
            packets.append(os.urandom(rng.randrange(0, 1500)))  # noise
            packets.append(wrong_key.seal(schema.encode(forged_rec if i % 2 else evil_members)))
            packets.append(stale.seal(schema.encode(forged_rec)))
            packets.append(replayed)
            packets.append(insider.seal(os.urandom(rng.randrange(1, 300))))  # key holder, garbage body
        packets.append(b"\x01" * 5000)  # bigger than the MTU
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i, p in enumerate(packets):
                sock.sendto(p, c.nodes()[i % 5].address)
                if i % 50 == 0:
                    # The nodes share this event loop: let them read, or the kernel drops
                    # datagrams from full socket buffers and the counts below fall short.
                    await asyncio.sleep(0.002)
        await until(
            lambda: (
                sum(
                    m.metric("overlayd_gossip_messages_rejected_total", {"reason": "unknown_key"})
                    for m in c.members
                )
                >= 1000
            ),
            10,
            "forged packets counted",
        )
        rejected = {}
        for reason in (
            "auth",
            "unknown_key",
            "stale",
            "replay",
            "schema",
            "malformed",
            "bad_version",
            "oversized",
        ):
            rejected[reason] = sum(
                m.metric("overlayd_gossip_messages_rejected_total", {"reason": reason}) for m in c.members
            )
        print(f"\nrejected by reason: {rejected}")
        for reason in ("unknown_key", "stale", "replay", "schema"):
            assert rejected[reason] > 0, reason
        after = [
            (sorted(map(repr, n.records(tombstones=True))), [(m.name, m.state) for m in n.members()])
            for n in c.nodes()
        ]
        assert after == before
        assert all(n.get("h00", "endpoint", "net1/evil") is None for n in c.nodes())
        # still working
        rec2 = c.members[3].node.publish("endpoint", "net1/after-flood", {"ip": "10.0.0.2"})
        await until(lambda: all(has(n, rec2) for n in c.nodes()), 10, "record after the flood")


async def test_push_that_skips_a_version_pulls_the_gap_at_once() -> None:
    """No anti-entropy at all: a node that hears version 2 but missed version 1 asks for it."""
    # Default probe timing: with a 0.1 s probe timeout a loaded CI machine makes members
    # flap dead and alive, and the state sync on rejoin hands over `first` before any gap
    # shows, so the request this test is about never needs to happen.
    config = GossipConfig(anti_entropy_interval=3600.0)
    async with cluster(3, config) as c:
        owner = c.members[0].node
        first = owner.publish("endpoint", "net1/first", {"ip": "10.0.0.1"})
        await until(lambda: all(has(n, first) for n in c.nodes()), 10, "first record")
        # a node that joins now missed `first`; the next push reveals the gap
        late = await c.add("late", config)
        await c.converged()
        second = owner.publish("endpoint", "net1/second", {"ip": "10.0.0.2"})
        await until(lambda: has(late.node, second) and has(late.node, first), 10, "gap pulled")
        assert late.metric("overlayd_gossip_messages_sent_total", {"type": "request"}) >= 1


async def test_restarted_node_gets_back_its_previous_records() -> None:
    """Peers hold records of a node's previous life; the restarted node hears of them and
    can delete what it no longer owns (its tombstone supersedes the old record everywhere)."""
    async with cluster(4) as c:
        old = c.members[-1]
        kept = old.node.publish("endpoint", "net1/kept", {"ip": "10.0.0.1"})
        gone = old.node.publish("endpoint", "net1/gone", {"ip": "10.0.0.2"})
        await until(lambda: all(has(n, kept) and has(n, gone) for n in c.nodes()), 10, "records spread")
        await old.node.stop(leave=False)
        c.members.remove(old)
        new = await c.add(old.node.name, seed=c.members[0].node.address)
        assert new.node.incarnation > old.node.incarnation
        await until(lambda: {kept.ident, gone.ident} <= set(new.learned), 10, "own old records heard of")
        await c.converged()
        again = new.node.publish("endpoint", "net1/kept", {"ip": "10.0.0.1"})
        tomb = new.node.delete("endpoint", "net1/gone")
        await until(lambda: all(has(n, again) and has(n, tomb) for n in c.nodes()), 10, "new life everywhere")


async def test_partition_heals() -> None:
    """Cut one node off until both sides declare each other dead; after the heal every node
    sees every other alive again, and records made on both sides meanwhile reach everyone."""
    async with cluster(5) as c:
        island, mainland = c.members[-1], c.members[:-1]
        name = island.node.name
        transport = island.node._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        default_rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Hear nothing: stop reading and shrink the receive buffer to its minimum, so what
        # arrives meanwhile is dropped (as in a real cut) instead of queued for later.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        transport.pause_reading()
        try:

            def split() -> bool:
                island_view = {m.name: m.state for m in island.node.members()}
                return all(s == MemberState.DEAD for s in island_view.values()) and all(
                    any(m.name == name and m.state == MemberState.DEAD for m in o.node.members())
                    for o in mainland
                )

            await until(split, 20, "both sides of the partition declare the other dead")
            on_island = island.node.publish("endpoint", "net1/island", {"ip": "10.0.0.1"})
            on_main = mainland[0].node.publish("endpoint", "net1/main", {"ip": "10.0.0.2"})
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, default_rcvbuf // 2)  # the kernel doubles it
            transport.resume_reading()
        # Both sides believe the other dead; anti-entropy knocks on dead members' doors, and
        # each node that hears it is believed dead refutes with a higher incarnation.
        took = await until(lambda: c.alive_views({n.name for n in c.nodes()}), 20, "healed membership")
        print(f"\npartition healed (all alive everywhere) {took * 1000:.0f} ms after reconnecting")
        await until(
            lambda: all(has(n, on_island) and has(n, on_main) for n in c.nodes()), 20, "healed records"
        )


def cut(c: Cluster, side: list[Member]) -> Callable[[], None]:
    """Drop every datagram between `side` and the rest, both ways; returns the heal.

    Each node sends from its own socket, so the source port says who sent a datagram.
    """
    ports = {m.node.port for m in side}
    nodes = c.nodes()
    for node in nodes:
        inside = node.port in ports
        deliver = node._datagram

        def filtered(
            data: bytes,
            addr: tuple[str, int],
            deliver: Callable[[bytes, tuple[str, int]], None] = deliver,
            inside: bool = inside,
        ) -> None:
            if (addr[1] in ports) == inside:
                deliver(data, addr)

        node._datagram = filtered  # type: ignore[method-assign]

    def heal() -> None:
        for node in nodes:
            del node._datagram

    return heal


async def test_records_made_on_both_sides_of_a_partition_reach_everyone() -> None:
    """The lab's partition, record by record: the first records of each side are pushed
    at the cut (and lost), more are made, and one deleted, once each side declares the other
    dead; after the heal every node holds the same table."""
    async with cluster(5) as c:
        island, mainland = c.members[-1], c.members[:-1]
        name = island.node.name
        for m in c.members:
            m.node.publish("endpoint", f"net1/{m.node.name}-before", {"ip": "10.0.0.1"})
        await until(lambda: all(len(n.records()) == 5 for n in c.nodes()), 10, "baseline")
        heal = cut(c, [island])
        try:
            made = [
                island.node.publish("endpoint", "net1/island-at-cut", {"ip": "10.0.1.1"}),
                mainland[0].node.publish("endpoint", "net1/main-at-cut", {"ip": "10.0.1.2"}),
            ]

            def split() -> bool:
                return all(m.state == MemberState.DEAD for m in island.node.members()) and all(
                    any(m.name == name and m.state == MemberState.DEAD for m in o.node.members())
                    for o in mainland
                )

            await until(split, 20, "both sides of the partition declare the other dead")
            made += [
                island.node.publish("endpoint", "net1/island-while-dead", {"ip": "10.0.1.3"}),
                island.node.delete("endpoint", f"net1/{name}-before"),
                mainland[1].node.publish("endpoint", "net1/main-while-dead", {"ip": "10.0.1.4"}),
            ]
        finally:
            heal()
        await until(lambda: c.alive_views({n.name for n in c.nodes()}), 20, "healed membership")
        await until(lambda: all(has(n, r) for n in c.nodes() for r in made), 20, "every record everywhere")

        def table(n: GossipNode) -> list[str]:
            return sorted(map(repr, n.records(tombstones=True)))

        await until(lambda: all(table(n) == table(island.node) for n in c.nodes()), 10, "one table")
        digests = [n._table.digest() for n in c.nodes()]
        assert all(d == digests[0] for d in digests), digests


# One node per process, as in a real cluster: the in-process tests above share one event
# loop, so their spread is dominated by serialising every node's work on one CPU.
_CHILD = """
import asyncio, base64, os, sys, time
from overlayd.gossip import GossipConfig, GossipNode, Keyring

async def main() -> None:
    cfg = GossipConfig(probe_interval=0.2, probe_timeout=0.1, anti_entropy_interval=0.5)
    def on_change(rec):
        print(f"learned {rec.key} {time.perf_counter()}", flush=True)
    host, port = os.environ["SEED"].split(":")
    node = GossipNode(sys.argv[1], keyring=Keyring.from_base64([os.environ["KEY"]]), bind="127.0.0.1",
                      port=0, seeds=[(host, int(port))], on_change=on_change, config=cfg)
    await node.start()
    print(f"port {node.port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await node.stop()

asyncio.run(main())
"""


async def test_spread_between_processes() -> None:
    n_children, rounds = 9, 30
    c = Cluster(FAST)
    procs: list[asyncio.subprocess.Process] = []
    try:
        origin = await c.add("p00")
        env = {
            **os.environ,
            "KEY": base64.b64encode(KEY).decode(),
            "SEED": "{}:{}".format(*origin.node.address),
        }
        for i in range(1, n_children + 1):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _CHILD,
                    f"p{i:02}",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                )
            )
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 20)
            assert line.startswith(b"port "), line
        await until(
            lambda: sum(m.state == MemberState.ALIVE for m in origin.node.members()) == n_children,
            20,
            "all processes joined",
        )
        learned: dict[str, list[float]] = {}

        async def read(p: asyncio.subprocess.Process) -> None:
            assert p.stdout is not None
            while line := await p.stdout.readline():
                _, key, when = line.decode().split()
                learned.setdefault(key, []).append(float(when))

        readers = [asyncio.create_task(read(p)) for p in procs]
        await asyncio.sleep(1.0)  # let membership settle everywhere (only the origin was checked)
        spreads = []
        for r in range(rounds):
            t0 = time.perf_counter()
            origin.node.publish("endpoint", f"net1/p{r}", {"ip": f"10.0.0.{r + 1}"})
            key = f"net1/p{r}"
            await until(lambda k=key: len(learned.get(k, ())) == n_children, 10, f"{key} in every process")
            spreads.append(max(learned[key]) - t0)
        report(f"{n_children + 1} processes", spreads)
        for t in readers:
            t.cancel()
    finally:
        for p in procs:
            if p.returncode is None:
                assert p.stdin is not None
                p.stdin.close()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except TimeoutError:
                p.kill()  # by its own handle (PID), never by name
                await p.wait()
        await c.stop()


async def test_each_node_measures_how_far_off_the_others_clock_is() -> None:
    """Two nodes on loopback; b's wall clock (its frames' timestamps, its tombstones) runs
    3 s ahead. From their probes each estimates the other's offset: +3 s and -3 s, within
    half a loopback round trip (what overlayctl peers and doctor then show)."""
    c = Cluster(FAST)
    try:
        a = await c.add("ca")
        b = await c.add("cb", clock=ShiftedClock(SYSTEM, 3.0))
        await c.converged()

        def offset(m: Member, peer: str) -> float | None:
            return next((i.clock_offset for i in m.node.members() if i.name == peer), None)

        await until(lambda: offset(a, "cb") is not None and offset(b, "ca") is not None, 10, "offsets")
        # let a few more probes in, so the filter has a fast round trip to pick
        await until(
            lambda: a.metric("overlayd_gossip_messages_sent_total", {"type": "ping"}) >= 10, 10, "pings"
        )
        ab, ba = offset(a, "cb"), offset(b, "ca")
        print(f"\nclock offsets: a sees b {ab:+.6f} s, b sees a {ba:+.6f} s (truth +3, -3)")
        assert ab == pytest.approx(3.0, abs=0.02)
        assert ba == pytest.approx(-3.0, abs=0.02)
    finally:
        await c.stop()


async def test_key_rotation_while_running() -> None:
    """Install K2 everywhere, make it primary everywhere, drop K1: records flow throughout."""
    rings = [Keyring([KEY]) for _ in range(4)]
    c = Cluster(FAST)
    try:
        for i, ring in enumerate(rings):
            await c.add(f"r{i}", keyring=ring)  # the daemon keeps the ring it passes in, and changes it
        await c.converged()
        new_key = Keyring.generate()
        steps = [
            lambda r: r.install(new_key),
            lambda r: r.use(new_key),
            lambda r: r.remove(KEY),
        ]
        for step_no, step in enumerate(steps):
            for i, ring in enumerate(rings):
                step(ring)
                # a record in the middle of every step: half the nodes have moved on
                rec = c.members[i].node.publish("endpoint", f"net1/s{step_no}-{i}", {"ip": "10.0.0.1"})
                await until(lambda r=rec: all(has(n, r) for n in c.nodes()), 10, f"record in step {step_no}")
        assert all(
            m.metric("overlayd_gossip_messages_rejected_total", {"reason": "unknown_key"}) == 0
            for m in c.members
        )
        await c.converged()
    finally:
        await c.stop()


async def test_a_node_with_another_key_cannot_join() -> None:
    async with cluster(3) as c:
        stranger = await c.add("stranger", key=Keyring.generate())
        await until(
            lambda: (
                sum(
                    m.metric("overlayd_gossip_messages_rejected_total", {"reason": "unknown_key"})
                    for m in c.members[:3]
                )
                > 0
            ),
            10,
            "the stranger's join rejected",
        )
        # its join (and every retry) is refused, so neither side ever lists the other
        assert stranger.node.members() == []
        assert all(not any(m.name == "stranger" for m in n.members()) for n in c.nodes()[:3])


async def test_insecure_cluster_only_talks_to_insecure_nodes() -> None:
    c = Cluster(FAST)
    try:
        a = await c.add("i0", keyring=Keyring.insecure())
        b = await c.add("i1", keyring=Keyring.insecure())
        await c.converged()
        rec = a.node.publish("endpoint", "net1/plain", {"ip": "10.0.0.1"})
        await until(lambda: has(b.node, rec), 10, "record between insecure nodes")
        keyed = await c.add("s0")  # joins through i0 with encrypted packets: refused
        await until(
            lambda: a.metric("overlayd_gossip_messages_rejected_total", {"reason": "unknown_key"}) > 0,
            10,
            "the keyed node's packets rejected by an insecure one",
        )
        assert keyed.node.members() == []
        assert all(m.name != "s0" for n in (a.node, b.node) for m in n.members())
    finally:
        await c.stop()


async def test_publish_rejects_what_cannot_travel() -> None:
    async with cluster(2) as c:
        node = c.members[0].node
        with pytest.raises(ValueError, match="fit"):
            node.publish("endpoint", "net1/huge", {"blob": "x" * 2000})
        with pytest.raises(SchemaError):
            node.publish("endpoint", "net1/bytes", {"raw": b"\x00"})
        with pytest.raises(SchemaError):
            node.publish("", "net1/x", {})
        assert node.records() == []
        ok = node.publish("endpoint", "net1/ok", {"ip": "10.0.0.1"})
        assert ok.version == 1  # failed attempts used no version: peers see no gap
        await until(lambda: has(c.members[1].node, ok), 10, "the good record")


_DROP_20_PERCENT = """
table inet gossiploss {
    chain out {
        type filter hook output priority 0;
        udp dport 1-65535 numgen random mod 100 < 20 drop
    }
}
"""


@pytest.mark.root
async def test_converges_with_20_percent_packet_loss(lab_prefix: str) -> None:
    """Five nodes on the loopback of a namespace of our own, which drops 20% of packets."""
    ns = lab_prefix + "gl"
    netns.add_netns(ns)
    c = Cluster(FAST)
    try:
        # (nftables rather than tc netem, which not every kernel has)
        netns.run_in(ns, ["nft", "-f", "-"], input=_DROP_20_PERCENT)
        for i in range(5):
            sock = netns.socket_in_netns(ns, socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            await c.add(f"l{i}", sock=sock)
        await c.converged(timeout=30)
        rng = random.Random(11)
        spreads = []
        for i in range(30):
            src = rng.choice(c.members)
            t0 = time.perf_counter()
            rec = src.node.publish("endpoint", f"net1/l{i}", {"ip": f"10.0.0.{i + 1}"})
            await until(lambda r=rec: all(has(n, r) for n in c.nodes()), 30, f"record {i} despite loss")
            spreads.append(max(m.learned[rec.ident] for m in c.members if m is not src) - t0)
        report("5 nodes, 20% loss", spreads)
        # let SWIM run a while under loss: every node sends 25 more probes
        pings = [m.metric("overlayd_gossip_messages_sent_total", {"type": "ping"}) for m in c.members]
        await until(
            lambda: all(
                m.metric("overlayd_gossip_messages_sent_total", {"type": "ping"}) >= p + 25
                for m, p in zip(c.members, pings, strict=True)
            ),
            30,
            "25 probe rounds under loss",
        )
        sent = sum(m.metric("overlayd_gossip_sent_bytes_total") for m in c.members)
        received = sum(m.metric("overlayd_gossip_received_bytes_total") for m in c.members)
        print(f"5 nodes, 20% loss: {received / sent:.0%} of the bytes sent arrived")
        assert received / sent < 0.9  # the loss is real
        false_deaths = sum(s == MemberState.DEAD for m in c.members for _, s in m.states)
        suspicions = sum(m.metric("overlayd_gossip_suspicions_total") for m in c.members)
        print(f"5 nodes, 20% loss: {suspicions:.0f} suspicions, {false_deaths} dead declarations (all false)")
        await c.converged(timeout=30)  # whatever was suspected or declared dead came back
    finally:
        await c.stop()
        netns.delete_netns(ns)


@pytest.mark.root
async def test_partition_longer_than_dead_reap_heals_through_seeds(lab_prefix: str) -> None:
    """Split 3 | 2 until each side has forgotten the other entirely; after the heal the side
    whose seed is across the cut finds its way back through the seed."""
    ns = lab_prefix + "gp"
    netns.add_netns(ns)
    config = GossipConfig(
        probe_interval=0.2, probe_timeout=0.1, anti_entropy_interval=0.3, suspicion_mult=2.0, dead_reap=0.5
    )
    c = Cluster(config)
    try:
        for i in range(5):
            sock = netns.socket_in_netns(ns, socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            await c.add(f"s{i}", sock=sock)  # all seeded with s0
        await c.converged()
        a, b = c.members[:3], c.members[3:]
        ports_a = ", ".join(str(m.node.port) for m in a)
        ports_b = ", ".join(str(m.node.port) for m in b)
        netns.run_in(
            ns,
            ["nft", "-f", "-"],
            input=f"""
table inet gossipcut {{
    chain out {{
        type filter hook output priority 0;
        udp sport {{ {ports_a} }} udp dport {{ {ports_b} }} drop
        udp sport {{ {ports_b} }} udp dport {{ {ports_a} }} drop
    }}
}}
""",
        )

        def forgotten() -> bool:
            names_a, names_b = {m.node.name for m in a}, {m.node.name for m in b}
            return all({p.name for p in m.node.members()} == names_a - {m.node.name} for m in a) and all(
                {p.name for p in m.node.members()} == names_b - {m.node.name} for m in b
            )

        await until(forgotten, 30, "each side forgot the other (dead, then reaped)")
        netns.run_in(ns, ["nft", "delete", "table", "inet", "gossipcut"])
        took = await until(lambda: c.alive_views({n.name for n in c.nodes()}), 30, "healed membership")
        print(f"\nlong partition healed through the seed in {took * 1000:.0f} ms")
    finally:
        await c.stop()
        netns.delete_netns(ns)
