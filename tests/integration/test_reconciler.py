"""The reconciler against a real kernel: drift repaired from notifications, no flapping, overruns.

Each test runs a `Reconciler` for one host namespace (a view with a local
endpoint's network and remote endpoints), then changes the kernel behind
its back with iproute2 and waits (polling, with a deadline) for the repair.
A second notification socket in the namespace records every neighbour
change, so "nothing else was touched" is observed, not assumed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from test_kernel import RUN_PREFIX, VTEP, fdb_show, link_exists, link_show, neigh_show, run

from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import ClusterView, EndpointDeleted, EndpointPut, NetworkPut, NodePut
from overlayd.dataplane import netlink as nl
from overlayd.dataplane.commands import Command, Op
from overlayd.dataplane.desired import DesiredState
from overlayd.dataplane.endpoints import create_local_endpoint, delete_local_endpoint
from overlayd.dataplane.kernel import Kernel
from overlayd.dataplane.kstate import bridge_name, veth_name, vxlan_name
from overlayd.dataplane.monitor import Monitor
from overlayd.dataplane.reconciler import Reconciler
from overlayd.util.metrics import Metrics

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

LOCAL = "h1"
NET = Network(name="blue", vni=4343, subnet=IPv4Network("10.43.0.0/16"))
VX, BR = vxlan_name(NET.vni), bridge_name(NET.vni)
REMOTE_VTEPS = [IPv4Address("198.18.5.2"), IPv4Address("198.18.5.3")]


def endpoint(i: int, owner: str) -> Endpoint:
    return Endpoint(
        network=NET.name,
        name=f"e{i}",
        ip=IPv4Address(f"10.43.{i >> 8}.{i & 255}"),
        mac=f"02:43:00:00:{(i >> 8) & 255:02x}:{i & 255:02x}",
        owner=owner,
    )


def view_with(remote: int) -> ClusterView:
    v = ClusterView()
    v.apply(NetworkPut(NET))
    v.apply(NodePut(Node(name=LOCAL, vtep=VTEP, started_at=0.0)))
    for k, vtep in enumerate(REMOTE_VTEPS):
        v.apply(NodePut(Node(name=f"r{k}", vtep=vtep, started_at=0.0)))
    # The local endpoint's port is not made here: the network needs only its record.
    v.apply(EndpointPut(endpoint(1, LOCAL)))
    for i in range(2, 2 + remote):
        v.apply(EndpointPut(endpoint(i, f"r{i % 2}")))
    return v


@pytest.fixture
def host() -> Iterator[str]:
    ns = f"{RUN_PREFIX}-rc{os.getpid() % 1000}"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "-n", ns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        run("ip", "-n", ns, "addr", "add", f"{VTEP}/24", "dev", "ul0")
        run("ip", "-n", ns, "link", "set", "ul0", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


class Changes:
    """Every neighbour/FDB notification in a namespace: (type, ifindex, mac, dst)."""

    def __init__(self, ns: str) -> None:
        self.seen: list[tuple[int, int, str, bytes]] = []
        self._monitor = Monitor(netns=ns, on_datagram=self._datagram, on_overrun=self._overrun)
        self.overruns = 0

    def start(self) -> None:
        self._monitor.start()

    def close(self) -> None:
        self._monitor.close()

    def _overrun(self) -> None:
        self.overruns += 1

    def _datagram(self, data: bytes) -> None:
        for kind, _flags, _seq, start, end in nl.messages(data):
            if kind in (nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH):
                raw = nl.parse_neigh(data, start, end)
                if raw is not None:
                    self.seen.append((kind, raw[0], raw[3].hex(":"), raw[4]))


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def running(host: str) -> AsyncIterator[tuple[Reconciler, ClusterView, Kernel]]:
    view = view_with(remote=40)
    async with Kernel(netns=host) as kernel:
        desired = DesiredState(view, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500)
        reconciler = Reconciler(kernel=kernel, desired=desired, metrics=Metrics(), verify_interval=3600)
        task = asyncio.create_task(reconciler.run())
        try:
            await asyncio.wait_for(reconciler.first_pass_done.wait(), 10)
            yield reconciler, view, kernel
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def fdb_of(host: str) -> dict[str, str]:
    return {e["mac"]: e["dst"] for e in fdb_show(host, VX) if e["mac"] != "00:00:00:00:00:00"}


async def test_converges_and_a_pass_with_nothing_dirty_writes_nothing(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    reconciler, _, _ = running
    assert len(fdb_of(host)) == 40
    assert len(neigh_show(host, VX)) == 40
    report = await reconciler.reconcile("test")
    assert (report.applied, report.failed) == (0, 0)


async def test_a_pass_reads_the_echoes_of_its_own_writes_and_they_change_nothing(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    reconciler, view, _ = running
    heard = reconciler.mirror.notifications
    fresh = endpoint(77, "r1")
    reconciler.desired.apply([d for d in [view.change(EndpointPut(fresh))] if d is not None])
    report = await reconciler.reconcile("test")
    # Read within the pass (the kernel queued the FDB echo within the write), not at the
    # event loop's next turn; equal to what the pass wrote, so nothing is left to compare.
    assert report.applied == 2
    assert reconciler.mirror.notifications > heard
    assert not reconciler.mirror.dirty
    assert fdb_of(host)[fresh.mac] == str(REMOTE_VTEPS[1])


async def test_a_pass_reads_just_the_echoes_its_entry_writes_cause(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    """After a remote endpoint's entries are written or removed, the pass reads as many
    notifications as the writes cause and stops there, without a read that finds the socket
    empty; its drain before the writes reads only if something waits (a late notification of
    an earlier change may); and no echo is left behind: the next drain finds nothing to read."""
    reconciler, view, _ = running
    monitor = reconciler._monitor
    reads: list[tuple[int, int]] = []  # (limit, datagrams read)
    read = monitor._read

    def counted(limit: int, on_datagram: Callable[[bytes], None] | None = None) -> int:
        got = read(limit, on_datagram)
        reads.append((limit, got))
        return got

    monitor._read = counted  # type: ignore[method-assign]
    try:
        fresh = endpoint(78, "r0")
        for fact in (EndpointPut(fresh), EndpointDeleted(fresh.key)):
            reconciler.desired.apply([d for d in [view.change(fact)] if d is not None])
            heard = reconciler.mirror.notifications
            reads.clear()
            report = await reconciler.reconcile("test")
            assert report.applied == 2  # FDB and neighbour entry
            # The writes' echoes, last: an FDB entry's, and on removal the neighbour's too
            # (the kernel sends it from port 0). Before them, only a drain that found something.
            echoes = 1 if isinstance(fact, EndpointPut) else 2
            *drained, last = reads
            assert last == (echoes, echoes)
            assert all(got > 0 for _, got in drained), reads  # never an empty read
            assert reconciler.mirror.notifications == heard + echoes + sum(got for _, got in drained)
            assert not reconciler.mirror.dirty
            reads.clear()
            monitor.drain()
            assert reads == []
        assert fresh.mac not in fdb_of(host)
    finally:
        monitor._read = read  # type: ignore[method-assign]


async def test_a_drain_reads_what_waits_and_reports_an_overrun(host: str) -> None:
    """The drain asks the socket before reading: whatever waits is still read, and an
    overrun (ENOBUFS) is still reported. The event loop does not run in between: only the
    drain reads."""
    heard: list[bytes] = []
    overruns: list[int] = []
    monitor = Monitor(netns=host, on_datagram=heard.append, on_overrun=lambda: overruns.append(1))
    small = Monitor(
        netns=host, on_datagram=lambda _: None, on_overrun=lambda: overruns.append(2), rcvbuf=4096
    )
    monitor.start()
    small.start()
    try:
        monitor.drain()
        small.drain()
        heard.clear()  # a late notice of the namespace's making may have waited
        assert overruns == []
        run("ip", "-n", host, "link", "set", "ul0", "mtu", "1400")
        monitor.drain()
        assert any(nl.RTM_NEWLINK in [m[0] for m in nl.messages(data)] for data in heard)
        heard.clear()
        batch = "".join(
            f"neigh replace 198.18.6.{i} lladdr 02:66:00:00:00:{i:02x} dev ul0\n" for i in range(1, 250)
        )
        subprocess.run(["ip", "-n", host, "-batch", "-"], input=batch, text=True, check=True)  # noqa: ASYNC221
        small.drain()
        assert overruns == [2] and small.overruns == 1
        monitor.drain()  # its buffer held them all
        assert len(heard) >= 249 and overruns == [2]
    finally:
        monitor.close()
        small.close()


async def test_periodic_verifies_keep_their_pace_between_changes(host: str) -> None:
    view = view_with(remote=4)
    async with Kernel(netns=host) as kernel:
        desired = DesiredState(view, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500)
        reconciler = Reconciler(kernel=kernel, desired=desired, metrics=Metrics(), verify_interval=0.2)
        task = asyncio.create_task(reconciler.run())
        try:
            await asyncio.wait_for(reconciler.first_pass_done.wait(), 10)
            periodic: set[float] = set()
            fresh = endpoint(88, "r0")
            for i in range(40):  # 2 s of a change every 50 ms: the wake-up timer outlives passes
                fact = EndpointPut(fresh) if i % 2 == 0 else EndpointDeleted(fresh.key)
                desired.apply([d for d in [view.change(fact)] if d is not None])
                reconciler.trigger()
                await asyncio.sleep(0.05)
                last = reconciler.last_full
                if last is not None and last.trigger == "periodic":
                    periodic.add(last.started_at)
            assert len(periodic) >= 3, periodic
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_passes_one_after_another_leave_the_rest_of_the_daemon_its_turns(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    reconciler, _, _ = running
    mirror = reconciler.mirror
    key = next(iter(mirror.tables.fdb))
    ticks = 0
    seen: list[int] = []  # the ticker's count at each pass's writes
    assume_all = mirror.assume_all

    def flapping(cmds: Iterable[Command]) -> None:
        # As if each write's echo came back other than written: the key is dirty again.
        assume_all(cmds)
        if len(seen) < 20:
            seen.append(ticks)
            del mirror.tables.fdb[key]
            mirror.dirty.fdb.add(key)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    mirror.assume_all = flapping  # type: ignore[method-assign]
    task = asyncio.create_task(ticker())
    try:
        del mirror.tables.fdb[key]
        mirror.dirty.fdb.add(key)
        reconciler.trigger()
        await wait_until(lambda: len(seen) == 20, "20 passes")
    finally:
        task.cancel()
        mirror.assume_all = assume_all  # type: ignore[method-assign]
    assert all(later > earlier for earlier, later in itertools.pairwise(seen)), seen


async def test_a_deleted_fdb_entry_is_repaired_and_nothing_else_flaps(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    changes = Changes(host)
    changes.start()
    try:
        victim = endpoint(7, "r1")
        dst = fdb_of(host)[victim.mac]
        run("bridge", "-n", host, "fdb", "del", victim.mac, "dev", VX, "dst", dst, "self")
        await wait_until(lambda: victim.mac in fdb_of(host), "the FDB entry to come back")
        await wait_until(lambda: len(changes.seen) >= 2, "the delete and the repair to be seen")
        await asyncio.sleep(0)  # let any (wrong) further writes show up
        touched = {mac for _, _, mac, _ in changes.seen}
        assert touched == {victim.mac}, touched
    finally:
        changes.close()


async def test_an_altered_neighbour_is_put_back(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    victim = endpoint(9, "r1")
    run(
        "ip",
        "-n",
        host,
        "neigh",
        "replace",
        str(victim.ip),
        "lladdr",
        "02:66:66:66:66:66",
        "dev",
        VX,
        "nud",
        "permanent",
    )

    def restored() -> bool:
        return any(n["dst"] == str(victim.ip) and n["lladdr"] == victim.mac for n in neigh_show(host, VX))

    await wait_until(restored, "the neighbour entry to be put back")


async def test_a_deleted_neighbour_is_put_back(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    # The kernel's notification of a deleted neighbour carries no MAC: read all the same.
    victim = endpoint(11, "r1")
    run("ip", "-n", host, "neigh", "del", str(victim.ip), "dev", VX)

    def restored() -> bool:
        return any(n["dst"] == str(victim.ip) and n["lladdr"] == victim.mac for n in neigh_show(host, VX))

    await wait_until(restored, "the neighbour entry to be put back", timeout=1.0)


async def test_an_entry_added_behind_our_back_is_removed(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    run(
        "bridge",
        "-n",
        host,
        "fdb",
        "append",
        "02:77:77:77:77:77",
        "dev",
        VX,
        "dst",
        "198.18.5.99",
        "self",
        "permanent",
    )
    await wait_until(lambda: "02:77:77:77:77:77" not in fdb_of(host), "the foreign entry to go")
    assert len(fdb_of(host)) == 40


async def test_a_deleted_vxlan_device_is_recreated_with_every_entry(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    run("ip", "-n", host, "link", "del", VX)
    await wait_until(lambda: link_exists(host, VX) and len(fdb_of(host)) == 40, "the device and its entries")
    await wait_until(lambda: len(neigh_show(host, VX)) == 40, "the neighbour entries")
    flood = {e["dst"] for e in fdb_show(host, VX) if e["mac"] == "00:00:00:00:00:00"}
    assert flood == {str(v) for v in REMOTE_VTEPS}


async def test_a_deleted_bridge_is_recreated_and_the_vxlan_device_put_back_on_it(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    run("ip", "-n", host, "link", "del", BR)

    def back() -> bool:
        if not link_exists(host, BR):
            return False
        details = subprocess.run(
            ["ip", "-n", host, "-d", "link", "show", VX], capture_output=True, text=True
        ).stdout
        return f"master {BR}" in details

    await wait_until(back, "the bridge and the VXLAN device's master")


async def test_a_local_endpoint_s_port_taken_off_its_bridge_is_put_back(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    # Leaving the bridge, the port's bridge-family messages say "deleted"; the mirror
    # follows the link's own messages instead, which say it lost its master.
    reconciler, _, kernel = running
    local = endpoint(1, LOCAL)
    port = veth_name(NET.name, local.name)
    container = f"{host}-c1"
    run("ip", "netns", "add", container)
    try:
        await create_local_endpoint(
            kernel,
            netns=container,
            ifname="eth0",
            host_ifname=port,
            ip=local.ip,
            prefixlen=NET.subnet.prefixlen,
            mac=local.mac,
            mtu=1450,
            gateway=None,
            bridge=BR,
            network=NET.name,
        )
        await wait_until(lambda: port in reconciler.mirror.tables.ports, "the port in the mirror")
        run("ip", "-n", host, "link", "set", port, "nomaster")
        await wait_until(lambda: link_show(host, port).get("master") == BR, "the port back on its bridge")
        assert reconciler.mirror.tables.ports[port].bridge == BR
        # Gone, and the reconciler done with that, before the fixture stops it: a stop that
        # meets a wake-up can be lost (`asyncio.wait_for` on Python 3.11).
        await delete_local_endpoint(kernel, host_ifname=port)
        await wait_until(
            lambda: port not in reconciler.mirror.tables.ports and not reconciler.mirror.dirty,
            "the port gone from the mirror, and that taken by a pass",
        )
    finally:
        run("ip", "netns", "del", container)


async def test_view_changes_cost_only_what_they_touch(
    host: str, running: tuple[Reconciler, ClusterView, Kernel]
) -> None:
    reconciler, view, _ = running
    changes = Changes(host)
    changes.start()
    try:
        fresh = endpoint(200, "r0")
        delta = view.change(EndpointPut(fresh))
        assert delta is not None
        reconciler.desired.apply([delta])
        reconciler.trigger()
        await wait_until(lambda: fresh.mac in fdb_of(host), "the new endpoint's entry")
        await wait_until(lambda: any(m == fresh.mac for _, _, m, _ in changes.seen), "its notification")
        await asyncio.sleep(0.05)
        assert {mac for _, _, mac, _ in changes.seen} == {fresh.mac}
    finally:
        changes.close()


async def test_deletions_wait_while_held(host: str) -> None:
    view = view_with(remote=10)
    async with Kernel(netns=host) as kernel:
        desired = DesiredState(view, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500)
        first = Reconciler(kernel=kernel, desired=desired, metrics=Metrics(), verify_interval=3600)
        await first.reconcile_full("setup")
        assert len(fdb_of(host)) == 10
        # A restart that knows nothing of the remote endpoints yet: nothing may go.
        empty = view_with(remote=0)
        held = Reconciler(
            kernel=kernel,
            desired=DesiredState(empty, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500),
            metrics=Metrics(),
            verify_interval=3600,
            hold_deletions=True,
        )
        report = await held.reconcile_full("startup")
        assert report.held == 20 + 2  # FDB and neighbour entries, and both flood entries
        assert len(fdb_of(host)) == 10
        held.release_hold()
        await held.reconcile_full("hold-released")
        assert fdb_of(host) == {}


async def test_an_overrun_is_counted_and_the_kernel_read_again(host: str) -> None:
    """A receive buffer too small for a burst: the kernel drops notifications (ENOBUFS)."""
    view = view_with(remote=5)
    metrics = Metrics()
    async with Kernel(netns=host) as kernel:
        desired = DesiredState(view, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500)
        reconciler = Reconciler(
            kernel=kernel, desired=desired, metrics=metrics, verify_interval=3600, monitor_rcvbuf=4096
        )
        task = asyncio.create_task(reconciler.run())
        try:
            await asyncio.wait_for(reconciler.first_pass_done.wait(), 10)
            # 2,000 foreign entries on our device in one burst, while the loop is not reading.
            batch = "".join(
                f"fdb append 02:88:00:00:{i >> 8:02x}:{i & 255:02x} dev {VX} dst 198.18.5.77 self permanent\n"
                for i in range(2000)
            )
            # Blocking the event loop is the point: nobody reads while the kernel sends.
            subprocess.run(["bridge", "-n", host, "-batch", "-"], input=batch, text=True, check=True)  # noqa: ASYNC221
            await wait_until(lambda: reconciler.overruns >= 1, "an overrun to be counted")
            await wait_until(lambda: len(fdb_of(host)) == 5, "the foreign entries to go", timeout=20)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_failing_write_is_retried_with_backoff_until_it_succeeds(host: str) -> None:
    """A foreign link holds our VXLAN device's name: every pass fails until it goes away.

    Nobody triggers the reconciler after the link is removed: the retry timer
    alone brings the kernel to the desired state, and the errors are reported
    meanwhile.
    """
    run("ip", "-n", host, "link", "add", VX, "type", "bridge")
    view = view_with(remote=3)
    async with Kernel(netns=host) as kernel:
        desired = DesiredState(view, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500)
        reconciler = Reconciler(kernel=kernel, desired=desired, metrics=Metrics(), verify_interval=3600)
        task = asyncio.create_task(reconciler.run())
        try:
            await wait_until(lambda: reconciler.passes >= 3, "a first pass and two retries")
            assert any("exists but is not an overlayd vxlan" in line for line in reconciler.errors)
            assert reconciler.last is not None and reconciler.last.failed
            assert not reconciler.first_pass_done.is_set()
            run("ip", "-n", host, "link", "del", VX)
            await wait_until(lambda: link_exists(host, VX) and len(fdb_of(host)) == 3, "the retry alone")
            await wait_until(reconciler.first_pass_done.is_set, "a pass without failures")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_the_monitor_filter_drops_only_the_neighbour_echoes_of_the_given_port(host: str) -> None:
    """Our own neighbour writes never reach the mirror's socket; anyone else's do."""
    seen: list[tuple[int, int, bytes]] = []  # (port, message type, destination)

    def datagram(data: bytes) -> None:
        for kind, _flags, _seq, start, end in nl.messages(data):
            if kind in (nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH):
                raw = nl.parse_neigh(data, start, end)
                if raw is not None:
                    seen.append((nl.message_port(data, start), kind, raw[4]))

    monitor = Monitor(netns=host, on_datagram=datagram, on_overrun=lambda: None)
    monitor.start()
    try:
        async with Kernel(netns=host) as kernel:
            assert monitor.ignore_echoes(kernel.rtnl.port)
            link = await kernel.link("ul0")
            assert link is not None
            ours, theirs = IPv4Address("198.18.5.77"), IPv4Address("198.18.5.78")
            message = nl.entry_message("replace_neigh", link.index, nl.mac_bytes("02:77:00:00:00:01"), ours)
            assert await kernel.rtnl.batch([message]) == [(0, "")]
            mac = "02:77:00:00:00:02"
            run("ip", "-n", host, "neigh", "replace", str(theirs), "lladdr", mac, "dev", "ul0")
            await wait_until(lambda: any(dst == theirs.packed for _, _, dst in seen), "iproute2's neighbour")
            assert any(n["dst"] == str(ours) for n in neigh_show(host, "ul0"))  # ours was written
            assert [dst for port, _, dst in seen if dst == ours.packed or port == kernel.rtnl.port] == []
    finally:
        monitor.close()


async def test_the_monitor_filter_drops_a_bridges_port_messages_and_keeps_the_links_own(host: str) -> None:
    """A port put on a bridge and taken off: the bridge's AF_BRIDGE messages about it (which
    the mirror skips) never arrive; the link's own, which say where it is, all do."""
    seen: list[tuple[int, int, int, int | None]] = []  # (type, family, ifindex, master)

    def datagram(data: bytes) -> None:
        for kind, _flags, _seq, start, end in nl.messages(data):
            if kind in (nl.RTM_NEWLINK, nl.RTM_DELLINK):
                link = nl.parse_link(data, start, end)
                master = link.master if link is not None else None
                seen.append((kind, data[start], nl.link_index_of(data, start), master))

    run("ip", "-n", host, "link", "add", "fbr0", "type", "bridge")
    monitor = Monitor(netns=host, on_datagram=datagram, on_overrun=lambda: None)
    monitor.start()
    try:
        async with Kernel(netns=host) as kernel:
            assert monitor.ignore_echoes(kernel.rtnl.port)
            run("ip", "-n", host, "link", "add", "fp0", "type", "veth", "peer", "name", "fp1")
            bridge, port = await kernel.link("fbr0"), int(link_show(host, "fp0")["ifindex"])
            assert bridge is not None
            run("ip", "-n", host, "link", "set", "fp0", "master", "fbr0", "up")
            run("ip", "-n", host, "link", "set", "fp0", "nomaster")
            run("ip", "-n", host, "link", "del", "fp0")
            deleted = (nl.RTM_DELLINK, 0, port)
            await wait_until(lambda: any((k, f, i) == deleted for k, f, i, _ in seen), "the delete")
            assert [f for _, f, i, _ in seen if i == port and f == nl.AF_BRIDGE] == []
            masters = [m for k, _, i, m in seen if i == port and k == nl.RTM_NEWLINK]
            assert bridge.index in masters and masters[-1] in (None, 0)
    finally:
        monitor.close()


async def test_the_monitor_filter_drops_a_bridges_own_entries_and_keeps_a_vxlan_devices(host: str) -> None:
    """A bridge's forwarding entries (a port's own MAC, one added by hand), which the mirror
    skips, never arrive; a VXLAN device's own (NTF_SELF) entries
    by anyone else, which the mirror keeps, all do, added and removed."""
    seen: list[tuple[int, int, int, bytes]] = []  # (type, ifindex, ndm_flags, MAC)

    def datagram(data: bytes) -> None:
        for kind, _flags, _seq, start, end in nl.messages(data):
            if kind in (nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH) and data[start] == nl.AF_BRIDGE:
                # By hand: `parse_neigh` skips entries without a destination (a bridge's).
                _family, index, _state, flags, _type = nl.NDMSG.unpack_from(data, start)
                mac = nl.attrs(data, start + nl.NDMSG.size, end).get(nl.NDA_LLADDR, b"")
                seen.append((kind, index, flags, mac))

    run("ip", "-n", host, "link", "add", "fbr1", "type", "bridge")
    run("ip", "-n", host, "link", "add", "fvx1", "type", "vxlan", "id", "4242", "dstport", "4789")
    monitor = Monitor(netns=host, on_datagram=datagram, on_overrun=lambda: None)
    monitor.start()
    try:
        async with Kernel(netns=host) as kernel:
            assert monitor.ignore_echoes(kernel.rtnl.port)
            run("ip", "-n", host, "link", "add", "fq0", "type", "veth", "peer", "name", "fq1")
            run("ip", "-n", host, "link", "set", "fq0", "master", "fbr1", "up")
            run("bridge", "-n", host, "fdb", "add", "02:51:00:00:00:01", "dev", "fq0", "master", "static")
            vxlan = int(link_show(host, "fvx1")["ifindex"])
            mac = "02:51:00:00:00:02"
            run("bridge", "-n", host, "fdb", "append", mac, "dev", "fvx1", "dst", "198.18.9.2", "self")
            run("bridge", "-n", host, "fdb", "del", mac, "dev", "fvx1", "dst", "198.18.9.2", "self")
            gone = (nl.RTM_DELNEIGH, vxlan, bytes.fromhex(mac.replace(":", "")))
            await wait_until(lambda: any((k, i, m) == gone for k, i, _, m in seen), "the VXLAN removal")
            assert [flags for _, _, flags, _ in seen if not flags & nl.NTF_SELF] == []
            assert [(k, i) for k, i, _, _ in seen] == [(nl.RTM_NEWNEIGH, vxlan), (nl.RTM_DELNEIGH, vxlan)]
            # The bridge did make them (sent before the VXLAN ones: they would have come first).
            assert "02:51:00:00:00:01" in run("bridge", "-n", host, "fdb", "show", "dev", "fq0")
    finally:
        monitor.close()


async def test_an_address_a_local_endpoint_gave_up_is_announced_when_it_comes_back_remote(host: str) -> None:
    """New addresses (a join) go in unannounced; one that local containers knew by a local
    endpoint's MAC is announced when a remote endpoint takes it, with its new MAC."""
    view = view_with(remote=4)
    view.apply(EndpointPut(endpoint(299, LOCAL)))  # the network stays on this host after e1 goes
    metrics = Metrics()

    def announced() -> float:
        # Sent or not: this bridge has no ports, so without carrier the send itself fails.
        return sum(
            metrics.registry.get_sample_value(
                "overlayd_kernel_ops_total", {"kind": Op.ANNOUNCE_ARP.value, "result": result}
            )
            or 0.0
            for result in ("ok", "error")
        )

    async with Kernel(netns=host, metrics=metrics) as kernel:
        desired = DesiredState(view, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500)
        reconciler = Reconciler(kernel=kernel, desired=desired, metrics=metrics, verify_interval=3600)
        await reconciler.reconcile_full("setup")
        before = announced()

        fresh = endpoint(300, "r0")  # an address nobody here knew
        reconciler.desired.apply([d for d in [view.change(EndpointPut(fresh))] if d is not None])
        await reconciler.reconcile("change")
        assert fresh.mac in fdb_of(host)
        assert announced() == before

        local = endpoint(1, LOCAL)  # its container is gone; the address is taken elsewhere
        reconciler.local_endpoint_gone(local.ip, local.mac)
        taker = Endpoint(network=NET.name, name="taker", ip=local.ip, mac="02:43:00:00:ff:01", owner="r1")
        deltas = [view.change(EndpointDeleted(local.key)), view.change(EndpointPut(taker))]
        reconciler.desired.apply([d for d in deltas if d is not None])
        await reconciler.reconcile("change")
        assert taker.mac in fdb_of(host)
        assert announced() == before + 1
        reconciler.close()


async def test_a_new_local_endpoint_announces_itself_if_a_remote_one_had_its_address(host: str) -> None:
    """The reconciler says whether a new local endpoint must announce its address: while a
    remote endpoint's neighbour entry holds it with another MAC, and after that entry is
    removed (a container here may still know that MAC); never for an address nobody had."""
    view = view_with(remote=2)  # e2 and e3, remote
    metrics = Metrics()
    async with Kernel(netns=host, metrics=metrics) as kernel:
        desired = DesiredState(view, local_node=LOCAL, local_vtep=VTEP, underlay_mtu=1500)
        reconciler = Reconciler(kernel=kernel, desired=desired, metrics=metrics, verify_interval=3600)
        await reconciler.reconcile_full("setup")
        device, gone, fresh = VX, endpoint(2, "r0"), endpoint(300, LOCAL)
        assert reconciler.own_announcement_needed(device, gone.ip, "02:43:00:00:ff:02")
        assert not reconciler.own_announcement_needed(device, gone.ip, gone.mac)  # its own MAC
        assert not reconciler.own_announcement_needed(device, fresh.ip, fresh.mac)

        reconciler.desired.apply([d for d in [view.change(EndpointDeleted(gone.key))] if d is not None])
        await reconciler.reconcile("change")
        assert gone.ip not in {ip for _, ip in reconciler.mirror.tables.neigh}
        assert reconciler.own_announcement_needed(device, gone.ip, "02:43:00:00:ff:02")
        assert not reconciler.own_announcement_needed(device, fresh.ip, fresh.mac)
        reconciler.close()
