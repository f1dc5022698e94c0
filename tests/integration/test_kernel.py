"""The netlink layer against the real kernel, each test in namespaces of its own.

Every namespace carries this run's prefix and is removed when the test ends,
also when it fails. The kernel is checked through iproute2's JSON output, an
independent reader, not only through `Kernel.observe()`.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from overlayd.dataplane import netlink as nl
from overlayd.dataplane.commands import (
    AppendFlood,
    Command,
    DeleteFdb,
    DeleteFlood,
    DeleteLink,
    DeleteNeigh,
    EnsureBridge,
    EnsureVxlan,
    ReplaceFdb,
    ReplaceNeigh,
    SetPort,
)
from overlayd.dataplane.diff import diff
from overlayd.dataplane.endpoints import (
    _host_rtnl,
    create_local_endpoint,
    delete_local_endpoint,
    port_exists,
)
from overlayd.dataplane.kernel import Kernel, KernelError, OpResult
from overlayd.dataplane.kstate import (
    BridgeSpec,
    FdbEntry,
    FloodEntry,
    KernelState,
    NeighEntry,
    PortSpec,
    VxlanSpec,
    bridge_name,
    link_alias,
    veth_name,
    vxlan_name,
)
from overlayd.dataplane.nlsync import BlockingRtnl
from overlayd.util.metrics import Metrics

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

RUN_PREFIX = f"ovt{secrets.token_hex(3)}"
_serial = itertools.count()

VTEP = IPv4Address("198.18.5.1")
PEER_A = IPv4Address("198.18.5.2")
PEER_B = IPv4Address("198.18.5.3")
VNI = 4242
BR = bridge_name(VNI)
VX = vxlan_name(VNI)
NET = "blue"


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(run("ip", "-n", ns, "-j", *args) or "[]")


def fdb_show(ns: str, dev: str) -> list[dict[str, Any]]:
    out = run("bridge", "-n", ns, "-j", "fdb", "show", "dev", dev)
    return [e for e in json.loads(out or "[]") if "self" in e.get("flags", [])]


def neigh_show(ns: str, dev: str) -> list[dict[str, Any]]:
    return list(ip_json(ns, "neigh", "show", "dev", dev))


def link_show(ns: str, name: str) -> dict[str, Any]:
    found = ip_json(ns, "-d", "link", "show", "dev", name)
    assert len(found) == 1
    return dict(found[0])


def ping(ns: str, ip: IPv4Address) -> None:
    # -c 1 -w 5: keeps trying for up to 5 s and stops at the first reply.
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-c", "1", "-i", "0.2", "-w", "5", str(ip)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def run_batch(ns: str, tool: str, lines: list[str]) -> None:
    """Many `bridge` or `ip` commands in one process (`-batch`)."""
    done = subprocess.run(
        [tool, "-n", ns, "-batch", "-"], input="\n".join(lines), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def link_exists(ns: str, name: str) -> bool:
    return any(link["ifname"] == name for link in ip_json(ns, "link", "show"))


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Creates namespaces with this run's prefix; removes all of them afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"{RUN_PREFIX}-{next(_serial)}"
        run("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    failures = []
    for name in reversed(made):
        done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        if done.returncode != 0:
            failures.append(f"{name}: {done.stderr.strip()}")
    assert not failures, f"could not remove namespaces: {failures}"


@pytest.fixture
def host(make_netns: Callable[[], str]) -> str:
    """A namespace with an underlay: veth ul0 holding the VTEP address."""
    ns = make_netns()
    run("ip", "-n", ns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
    run("ip", "-n", ns, "addr", "add", f"{VTEP}/24", "dev", "ul0")
    run("ip", "-n", ns, "link", "set", "ul0", "up")
    return ns


@pytest.fixture
async def kernel(host: str) -> AsyncIterator[Kernel]:
    async with Kernel(netns=host) as k:
        yield k


def network_state(
    *,
    vni: int = VNI,
    network: str = NET,
    mtu: int = 1450,
    local: IPv4Address = VTEP,
    mac: str = "02:00:00:00:42:42",
) -> KernelState:
    """Bridge and VXLAN device of one network, no entries."""
    br, vx = bridge_name(vni), vxlan_name(vni)
    want = KernelState()
    want.bridges[br] = BridgeSpec(ifname=br, network=network, mac=mac, mtu=mtu)
    want.vxlans[vx] = VxlanSpec(ifname=vx, network=network, vni=vni, local=local, mtu=mtu, bridge=br)
    return want


def errors(results: list[OpResult]) -> list[tuple[Command, str]]:
    return [(r.command, r.error) for r in results if r.error is not None]


async def converge(kernel: Kernel, want: KernelState) -> list[Command]:
    """Apply diff(want, observe()) and return the commands that were needed."""
    commands = diff(want, await kernel.observe())
    results = await kernel.execute(commands)
    assert [r.command for r in results] == commands
    assert errors(results) == []
    return commands


def mac_of(i: int, prefix: int = 0x0A) -> str:
    return f"02:{prefix:02x}:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def ip_of(i: int) -> IPv4Address:
    return IPv4Address(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")


# --- underlay -------------------------------------------------------------------


async def test_underlay_from_interface_address_or_both(host: str, kernel: Kernel) -> None:
    run("ip", "-n", host, "link", "set", "ul0", "mtu", "1400")
    by_name = await kernel.underlay(interface="ul0", address=None)
    assert (by_name.ifname, by_name.address, by_name.mtu) == ("ul0", VTEP, 1400)
    assert await kernel.underlay(interface=None, address=VTEP) == by_name
    assert await kernel.underlay(interface="ul0", address=VTEP) == by_name


async def test_underlay_errors_are_clear(host: str, kernel: Kernel) -> None:
    run("ip", "-n", host, "addr", "add", "198.18.6.1/24", "dev", "ul1")
    with pytest.raises(KernelError, match="eth9 does not exist"):
        await kernel.underlay(interface="eth9", address=None)
    with pytest.raises(KernelError, match=r"no interface holds the VTEP address 198\.18\.5\.99"):
        await kernel.underlay(interface=None, address=IPv4Address("198.18.5.99"))
    with pytest.raises(KernelError, match=r"198\.18\.6\.1 is not on underlay interface ul0"):
        await kernel.underlay(interface="ul0", address=IPv4Address("198.18.6.1"))
    with pytest.raises(KernelError, match="lo has no IPv4 address"):
        await kernel.underlay(interface="lo", address=None)
    with pytest.raises(KernelError, match="give an interface"):
        await kernel.underlay(interface=None, address=None)


async def test_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(KernelError, match="does not exist"):
        async with Kernel(netns=f"{RUN_PREFIX}-missing"):
            pass


# --- the full cycle ---------------------------------------------------------------


async def test_full_cycle_then_observe_equals_desired(host: str, kernel: Kernel) -> None:
    want = network_state()
    other = network_state(vni=7, network="red", mtu=1400, mac="02:00:00:00:00:07")
    want.bridges.update(other.bridges)
    want.vxlans.update(other.vxlans)
    for i in range(20):
        vtep = PEER_A if i % 2 else PEER_B
        want.fdb.add(FdbEntry(VX, mac_of(i), vtep))
        want.neigh.add(NeighEntry(VX, ip_of(i), mac_of(i)))
    want.flood |= {FloodEntry(VX, PEER_A), FloodEntry(VX, PEER_B)}
    want.fdb.add(FdbEntry(vxlan_name(7), mac_of(1, 0x0B), PEER_A))
    want.flood.add(FloodEntry(vxlan_name(7), PEER_A))

    assert await kernel.observe() == KernelState()
    await converge(kernel, want)
    assert await kernel.observe() == want
    assert diff(want, await kernel.observe()) == []

    # A restarted daemon (a new Kernel) adopts what is there.
    async with Kernel(netns=host) as again:
        assert diff(want, await again.observe()) == []

    # What iproute2 sees: the devices as the design says.
    vx = link_show(host, VX)
    data = vx["linkinfo"]["info_data"]
    assert (data["id"], data["local"], data["port"]) == (VNI, str(VTEP), 4789)
    assert data["learning"] is False and data["proxy"] is True
    assert vx["master"] == BR and vx["mtu"] == 1450 and "UP" in vx["flags"]
    assert vx["ifalias"] == link_alias(NET, "vxlan")
    br = link_show(host, BR)
    assert br["address"] == "02:00:00:00:42:42" and br["mtu"] == 1450 and "UP" in br["flags"]
    assert br["linkinfo"]["info_data"]["stp_state"] == 0
    assert br["ifalias"] == link_alias(NET, "bridge")
    entries = fdb_show(host, VX)
    assert {(e["mac"], e["dst"]) for e in entries} == {
        (e.mac, str(e.dst)) for e in want.fdb if e.device == VX
    } | {("00:00:00:00:00:00", str(PEER_A)), ("00:00:00:00:00:00", str(PEER_B))}
    assert all("permanent" in e["state"] for e in entries)
    neigh = neigh_show(host, VX)
    assert {(n["dst"], n["lladdr"]) for n in neigh} == {(str(n.ip), n.mac) for n in want.neigh}
    assert all(n["state"] == ["PERMANENT"] for n in neigh)

    # And back to nothing: everything ours goes, the underlay stays.
    await converge(kernel, KernelState())
    assert await kernel.observe() == KernelState()
    assert not link_exists(host, BR) and not link_exists(host, VX)
    assert link_exists(host, "ul0")


async def test_fixes_links_in_place(host: str, kernel: Kernel) -> None:
    want = network_state()
    await converge(kernel, want)
    run("ip", "-n", host, "link", "set", BR, "mtu", "1300", "down")
    run("ip", "-n", host, "link", "set", VX, "nomaster", "mtu", "1200")
    have = await kernel.observe()
    assert have.bridges[BR].mtu == 1300 and have.vxlans[VX].bridge == ""
    assert await converge(kernel, want) == [EnsureBridge(want.bridges[BR]), EnsureVxlan(want.vxlans[VX])]
    assert await kernel.observe() == want
    assert "UP" in link_show(host, BR)["flags"]
    # Ensure on a device that is already right is harmless.
    assert errors(await kernel.execute([EnsureBridge(want.bridges[BR])])) == []


async def test_vxlan_with_new_local_address_is_recreated(host: str, kernel: Kernel) -> None:
    run("ip", "-n", host, "addr", "add", "198.18.5.10/24", "dev", "ul0")
    want = network_state()
    want.fdb.add(FdbEntry(VX, mac_of(1), PEER_A))
    want.flood.add(FloodEntry(VX, PEER_A))
    await converge(kernel, want)
    moved = network_state(local=IPv4Address("198.18.5.10"))
    moved.fdb, moved.flood = set(want.fdb), set(want.flood)
    commands = await converge(kernel, moved)
    assert commands[:2] == [DeleteLink(VX), EnsureVxlan(moved.vxlans[VX])]
    assert await kernel.observe() == moved


async def test_endpoint_moving_vtep_is_one_replace(host: str, kernel: Kernel) -> None:
    want = network_state()
    want.fdb.add(FdbEntry(VX, mac_of(1), PEER_A))
    want.flood |= {FloodEntry(VX, PEER_A), FloodEntry(VX, PEER_B)}
    await converge(kernel, want)

    moved = network_state()
    moved.flood = set(want.flood)
    moved.fdb.add(FdbEntry(VX, mac_of(1), PEER_B))
    assert await converge(kernel, moved) == [ReplaceFdb(FdbEntry(VX, mac_of(1), PEER_B))]
    unicast = [e for e in fdb_show(host, VX) if e["mac"] == mac_of(1)]
    assert [e["dst"] for e in unicast] == [str(PEER_B)]
    assert await kernel.observe() == moved


async def test_ip_reused_with_new_mac(host: str, kernel: Kernel) -> None:
    ip = IPv4Address("10.1.0.5")
    want = network_state()
    want.fdb.add(FdbEntry(VX, mac_of(1), PEER_A))
    want.neigh.add(NeighEntry(VX, ip, mac_of(1)))
    await converge(kernel, want)

    reused = network_state()
    reused.fdb.add(FdbEntry(VX, mac_of(2), PEER_B))
    reused.neigh.add(NeighEntry(VX, ip, mac_of(2)))
    commands = await converge(kernel, reused)
    assert ReplaceNeigh(NeighEntry(VX, ip, mac_of(2))) in commands
    assert not any(isinstance(c, DeleteNeigh) for c in commands)
    assert [(n["dst"], n["lladdr"]) for n in neigh_show(host, VX)] == [(str(ip), mac_of(2))]
    assert {e["mac"] for e in fdb_show(host, VX)} == {mac_of(2)}
    assert await kernel.observe() == reused


# --- ownership ------------------------------------------------------------------


async def test_foreign_links_are_invisible_and_untouchable(host: str, kernel: Kernel) -> None:
    # Our naming without our alias, an alias that is not ours, and a plain name.
    run("ip", "-n", host, "link", "add", "ovbr99", "type", "bridge")
    run("ip", "-n", host, "link", "add", "ovbr98", "type", "bridge")
    run("ip", "-n", host, "link", "set", "ovbr98", "alias", "someone-else")
    run(
        "ip",
        "-n",
        host,
        "link",
        "add",
        "ovvx98",
        "type",
        "vxlan",
        "id",
        "98",
        "local",
        str(VTEP),
        "dstport",
        "4789",
    )
    run("ip", "-n", host, "link", "add", "foo0", "type", "veth", "peer", "name", "foo1")
    run("bridge", "-n", host, "fdb", "append", "00:00:00:00:00:00", "dev", "ovvx98", "dst", str(PEER_A))

    assert await kernel.observe() == KernelState()

    names = ["ovbr99", "ovbr98", "ovvx98", "foo0"]
    results = await kernel.execute([DeleteLink(name) for name in names])
    assert all(r.error and "not created by overlayd" in r.error for r in results)
    assert all(link_exists(host, name) for name in names)

    spec = BridgeSpec(ifname="ovbr99", network=NET, mac="02:00:00:00:00:99", mtu=1400)
    (res,) = await kernel.execute([EnsureBridge(spec)])
    assert res.error and "not an overlayd bridge" in res.error
    assert link_show(host, "ovbr99")["mtu"] == 1500

    entries: list[Command] = [
        ReplaceFdb(FdbEntry("ovvx98", mac_of(1), PEER_A)),
        DeleteFlood(FloodEntry("ovvx98", PEER_A)),
        ReplaceNeigh(NeighEntry("ovvx98", ip_of(1), mac_of(1))),
    ]
    results = await kernel.execute(entries)
    assert all(r.error and "not an overlayd VXLAN device" in r.error for r in results)
    assert [(e["mac"], e["dst"]) for e in fdb_show(host, "ovvx98")] == [("00:00:00:00:00:00", str(PEER_A))]
    assert neigh_show(host, "ovvx98") == []


# --- entry semantics ----------------------------------------------------------------


async def test_deleting_what_is_gone_succeeds(kernel: Kernel) -> None:
    await converge(kernel, network_state())
    gone: list[Command] = [
        DeleteFdb(FdbEntry(VX, mac_of(1), PEER_A)),
        DeleteFlood(FloodEntry(VX, PEER_A)),
        DeleteNeigh(NeighEntry(VX, ip_of(1), mac_of(1))),
        # Entries on a device that does not exist are gone with it.
        DeleteFdb(FdbEntry("ovvx404", mac_of(1), PEER_A)),
        DeleteNeigh(NeighEntry("ovvx404", ip_of(1), mac_of(1))),
        DeleteLink("ovbr404"),
    ]
    assert errors(await kernel.execute(gone)) == []


async def test_a_failing_entry_does_not_stop_the_batch(host: str) -> None:
    metrics = Metrics()
    async with Kernel(netns=host, metrics=metrics) as kernel:
        await converge(kernel, network_state())
        commands: list[Command] = [
            ReplaceFdb(FdbEntry(VX, mac_of(1), PEER_A)),
            # The kernel refuses a multicast MAC as a replace target.
            ReplaceFdb(FdbEntry(VX, "01:00:5e:00:00:01", PEER_A)),
            ReplaceFdb(FdbEntry("ovvx404", mac_of(2), PEER_A)),
            ReplaceNeigh(NeighEntry(VX, ip_of(1), mac_of(1))),
            AppendFlood(FloodEntry(VX, PEER_B)),
        ]
        results = await kernel.execute(commands)
    assert [r.command for r in results] == commands
    assert [r.ok for r in results] == [True, False, False, True, True]
    assert "ovvx404 does not exist" in (results[2].error or "")
    assert results[1].error
    assert {(e["mac"], e["dst"]) for e in fdb_show(host, VX)} == {
        (mac_of(1), str(PEER_A)),
        ("00:00:00:00:00:00", str(PEER_B)),
    }
    assert [n["dst"] for n in neigh_show(host, VX)] == [str(ip_of(1))]

    def count(kind: str, result: str) -> float:
        value = metrics.registry.get_sample_value(
            "overlayd_kernel_ops_total", {"kind": kind, "result": result}
        )
        return value or 0.0

    assert count("replace_fdb", "ok") == 1 and count("replace_fdb", "error") == 2
    assert count("replace_neigh", "ok") == 1 and count("append_flood", "ok") == 1


async def test_errors_map_to_their_commands_across_chunks(host: str, kernel: Kernel) -> None:
    await converge(kernel, network_state())
    bad = {0, 511, 512, 513, 1023, 1500}
    commands: list[Command] = [
        ReplaceFdb(FdbEntry(VX, "01:00:5e:00:00:01" if i in bad else mac_of(i), PEER_A)) for i in range(1501)
    ]
    results = await kernel.execute(commands)
    assert [r.command for r in results] == commands
    assert {i for i, r in enumerate(results) if not r.ok} == bad
    assert len(fdb_show(host, VX)) == 1501 - len(bad)


async def test_replace_semantics_survive_reexecute(host: str, kernel: Kernel) -> None:
    await converge(kernel, network_state())
    # Entries someone made with create-only semantics are replaced, not refused.
    run("bridge", "-n", host, "fdb", "add", mac_of(1), "dev", VX, "dst", str(PEER_B), "self", "permanent")
    run("ip", "-n", host, "neigh", "add", str(ip_of(1)), "lladdr", mac_of(9), "dev", VX, "nud", "permanent")
    commands: list[Command] = [
        EnsureBridge(network_state().bridges[BR]),
        EnsureVxlan(network_state().vxlans[VX]),
        ReplaceFdb(FdbEntry(VX, mac_of(1), PEER_A)),
        AppendFlood(FloodEntry(VX, PEER_A)),
        AppendFlood(FloodEntry(VX, PEER_B)),
        ReplaceNeigh(NeighEntry(VX, ip_of(1), mac_of(1))),
    ]
    for _ in range(3):
        assert errors(await kernel.execute(commands)) == []
    have = await kernel.observe()
    assert have.fdb == {FdbEntry(VX, mac_of(1), PEER_A)}
    assert have.flood == {FloodEntry(VX, PEER_A), FloodEntry(VX, PEER_B)}
    assert have.neigh == {NeighEntry(VX, ip_of(1), mac_of(1))}
    assert len(fdb_show(host, VX)) == 3


async def test_two_thousand_entries_in_one_execute(host: str, kernel: Kernel) -> None:
    want = network_state()
    for i in range(2000):
        want.fdb.add(FdbEntry(VX, mac_of(i), PEER_A if i % 3 else PEER_B))
        want.neigh.add(NeighEntry(VX, ip_of(i), mac_of(i)))
    want.flood |= {FloodEntry(VX, PEER_A), FloodEntry(VX, PEER_B)}
    commands = diff(want, await kernel.observe())
    assert sum(isinstance(c, ReplaceFdb) for c in commands) == 2000
    assert errors(await kernel.execute(commands)) == []
    assert await kernel.observe() == want
    assert len(fdb_show(host, VX)) == 2002
    assert len(neigh_show(host, VX)) == 2000


async def test_the_dump_reads_entries_as_the_attribute_scan_does(host: str, kernel: Kernel) -> None:
    """`Kernel.dump` reads the FDB and neighbour tables a datagram at a time in the kernel's
    usual layout; on the real kernel's bytes it must keep exactly what the message-by-message
    attribute scan (`parse_neigh`) keeps: the device's own FDB entries and the permanent
    neighbours on our VXLAN device, over many datagrams, whatever else is in the tables."""
    want = network_state()
    for i in range(1500):
        want.fdb.add(FdbEntry(VX, mac_of(i), PEER_A if i % 3 else PEER_B))
        want.neigh.add(NeighEntry(VX, ip_of(i), mac_of(i)))
    want.flood |= {FloodEntry(VX, PEER_A), FloodEntry(VX, PEER_B)}
    await converge(kernel, want)
    batch = [
        # The bridge's own entries on the VXLAN port, remotes with their own port and VNI,
        # neighbours that are not permanent, entries on a device that is not ours.
        *(f"fdb add {mac_of(i, 0x0B)} dev {VX} master static" for i in range(300)),
        f"fdb append {mac_of(7, 0x0C)} dev {VX} dst {PEER_B} port 5555 vni 77 self permanent",
        *(f"fdb add {mac_of(i, 0x0D)} dev ul0 self permanent" for i in range(50)),
    ]
    run_batch(host, "bridge", batch)
    neigh = [
        *(
            f"neigh replace {ip_of(5000 + i)} lladdr {mac_of(i, 0x0E)} dev {VX} nud reachable"
            for i in range(99)
        ),
        *(
            f"neigh replace 198.18.5.{100 + i} lladdr {mac_of(i, 0x0F)} dev ul0 nud permanent"
            for i in range(50)
        ),
    ]
    run_batch(host, "ip", neigh)

    dump = await kernel.dump(nft_tables=False)
    ours = {link.index for link in dump.links if link.ifname == VX}
    rtnl = kernel.rtnl
    fdb_request, neigh_request = (
        nl.NDMSG.pack(nl.AF_BRIDGE, 0, 0, 0, 0),
        nl.NDMSG.pack(nl.AF_INET, 0, 0, 0, 0),
    )
    every_fdb = await rtnl.query(nl.RTM_GETNEIGH, fdb_request, nl.parse_neigh)
    every_neigh = await rtnl.query(nl.RTM_GETNEIGH, neigh_request, nl.parse_neigh)
    messages = await rtnl.query(nl.RTM_GETNEIGH, fdb_request, lambda data, start, end: end - start)
    assert len(messages) > 1500 + 2 + 300 + 1 + 50  # many datagrams, most of them read
    assert sorted(dump.fdb) == sorted(r for r in every_fdb if r[0] in ours and r[1] & nl.NTF_SELF)
    assert sorted(dump.neigh) == sorted(r for r in every_neigh if r[0] in ours and r[2] & nl.NUD_PERMANENT)
    assert len(dump.fdb) == 1500 + 2 + 1 and len(dump.neigh) == 1500
    have = await kernel.observe()
    assert FdbEntry(VX, mac_of(7, 0x0C), PEER_B) in have.fdb
    assert have.neigh == want.neigh


async def test_unknown_command_raises_before_anything_is_applied(kernel: Kernel) -> None:
    commands: list[Any] = [EnsureBridge(network_state().bridges[BR]), "delete everything"]
    with pytest.raises(TypeError):
        await kernel.execute(commands)
    assert await kernel.observe() == KernelState()


# --- local endpoints --------------------------------------------------------------


async def test_local_endpoint_create_observe_delete(
    host: str, kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    container = make_netns()
    await converge(kernel, network_state())
    port = veth_name(NET, "web-1")
    await create_local_endpoint(
        kernel,
        netns=f"/run/netns/{container}",  # a path works as well as a name
        ifname="eth0",
        host_ifname=port,
        ip=IPv4Address("10.20.0.5"),
        prefixlen=24,
        mac="02:aa:bb:cc:dd:01",
        mtu=1450,
        gateway=IPv4Address("10.20.0.1"),
        bridge=BR,
        network=NET,
    )
    assert await port_exists(kernel, port)
    host_side = link_show(host, port)
    assert host_side["master"] == BR and host_side["mtu"] == 1450
    assert host_side["ifalias"] == link_alias(NET, "port") and "UP" in host_side["flags"]

    inside = link_show(container, "eth0")
    assert inside["address"] == "02:aa:bb:cc:dd:01" and inside["mtu"] == 1450
    assert "UP" in inside["flags"]
    (addr,) = ip_json(container, "-4", "addr", "show", "dev", "eth0")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.20.0.5", 24)]
    assert "UP" in link_show(container, "lo")["flags"]
    routes = ip_json(container, "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.20.0.1", "eth0")]

    have = await kernel.observe()
    assert have.ports == {port: PortSpec(ifname=port, network=NET, bridge=BR, mtu=1450)}

    await delete_local_endpoint(kernel, host_ifname=port)
    assert not link_exists(host, port)
    assert not link_exists(container, "eth0")
    await delete_local_endpoint(kernel, host_ifname=port)  # idempotent
    assert not await port_exists(kernel, port)


async def test_our_links_carry_no_ipv6_link_local(
    host: str, kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    """The overlay is IPv4: a link-local address would only have each link multicast DAD,
    MLD reports and router solicitations, which the bridge floods to every port and the
    VXLAN device to every VTEP (1,000 endpoints coming and going flooded the lab's
    softnet backlogs until pings between untouched hosts were dropped)."""
    container = make_netns()
    await converge(kernel, network_state())
    port = veth_name(NET, "quiet-1")
    await create_local_endpoint(
        kernel,
        netns=container,
        ifname="eth0",
        host_ifname=port,
        ip=IPv4Address("10.20.0.7"),
        prefixlen=24,
        mac="02:aa:bb:cc:dd:07",
        mtu=1450,
        gateway=None,
        bridge=BR,
        network=NET,
    )
    links = [(host, BR), (host, VX), (host, port), (container, "eth0")]
    for ns, name in links:
        assert link_show(ns, name)["inet6_addr_gen_mode"] == "none", (ns, name)
    await asyncio.sleep(1.0)  # DAD and the first MLD report would have gone by now
    for ns, name in links:
        assert ip_json(ns, "-6", "addr", "show", "dev", name) in ([], [{}]), (ns, name)
    sent = run("ip", "netns", "exec", container, "nstat", "-az", "Icmp6OutMsgs").split()
    assert sent[sent.index("Icmp6OutMsgs") + 1] == "0"
    ping(container, IPv4Address("10.20.0.7"))  # IPv4 unaffected
    await delete_local_endpoint(kernel, host_ifname=port)


async def test_set_port_puts_an_endpoint_back_on_its_bridge(
    host: str, kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    container = make_netns()
    want = network_state()
    await converge(kernel, want)
    port = veth_name(NET, "db-1")
    await create_local_endpoint(
        kernel,
        netns=container,
        ifname="eth0",
        host_ifname=port,
        ip=IPv4Address("10.20.0.6"),
        prefixlen=24,
        mac="02:aa:bb:cc:dd:02",
        mtu=1450,
        gateway=None,
        bridge=BR,
        network=NET,
    )
    want.ports[port] = PortSpec(ifname=port, network=NET, bridge=BR, mtu=1450)
    assert diff(want, await kernel.observe()) == []
    run("ip", "-n", host, "link", "set", port, "nomaster", "mtu", "1300")
    assert await converge(kernel, want) == [SetPort(want.ports[port])]
    assert await kernel.observe() == want
    (res,) = await kernel.execute([SetPort(PortSpec("ovep0000000000", NET, BR, 1450))])
    assert res.error and "does not exist" in res.error


async def test_local_endpoint_missing_netns_leaves_nothing(host: str, kernel: Kernel) -> None:
    await converge(kernel, network_state())
    port = veth_name(NET, "lost")
    with pytest.raises(KernelError, match="does not exist"):
        await create_local_endpoint(
            kernel,
            netns=f"{RUN_PREFIX}-nosuchns",
            ifname="eth0",
            host_ifname=port,
            ip=IPv4Address("10.20.0.7"),
            prefixlen=24,
            mac="02:aa:bb:cc:dd:03",
            mtu=1450,
            gateway=None,
            bridge=BR,
            network=NET,
        )
    assert not link_exists(host, port)


async def test_local_endpoint_name_taken_in_netns_leaves_nothing(
    host: str, kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    container = make_netns()
    run("ip", "-n", container, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    await converge(kernel, network_state())
    port = veth_name(NET, "clash")
    with pytest.raises(KernelError, match="eth0 already exists"):
        await create_local_endpoint(
            kernel,
            netns=container,
            ifname="eth0",
            host_ifname=port,
            ip=IPv4Address("10.20.0.8"),
            prefixlen=24,
            mac="02:aa:bb:cc:dd:04",
            mtu=1450,
            gateway=None,
            bridge=BR,
            network=NET,
        )
    assert not link_exists(host, port)
    assert link_show(container, "eth0")["linkinfo"]["info_kind"] == "veth"


async def test_local_endpoint_failing_late_is_rolled_back(
    host: str, kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    container = make_netns()
    await converge(kernel, network_state())
    port = veth_name(NET, "late")
    # The veth and address work; the gateway is off-link, so the route fails.
    with pytest.raises(KernelError, match="cannot set up endpoint eth0"):
        await create_local_endpoint(
            kernel,
            netns=container,
            ifname="eth0",
            host_ifname=port,
            ip=IPv4Address("10.20.0.9"),
            prefixlen=24,
            mac="02:aa:bb:cc:dd:05",
            mtu=1450,
            gateway=IPv4Address("10.99.0.1"),
            bridge=BR,
            network=NET,
        )
    assert not link_exists(host, port)
    assert not link_exists(container, "eth0")
    assert (await kernel.observe()).ports == {}


async def test_local_endpoint_needs_our_bridge(
    host: str, kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    container = make_netns()
    run("ip", "-n", host, "link", "add", "ovbr99", "type", "bridge")
    with pytest.raises(KernelError, match="bridge ovbr99 does not exist"):
        await create_local_endpoint(
            kernel,
            netns=container,
            ifname="eth0",
            host_ifname=veth_name(NET, "x"),
            ip=IPv4Address("10.20.0.10"),
            prefixlen=24,
            mac="02:aa:bb:cc:dd:06",
            mtu=1450,
            gateway=None,
            bridge="ovbr99",
            network=NET,
        )
    assert not link_exists(container, "eth0")


async def test_delete_local_endpoint_refuses_foreign_links(host: str, kernel: Kernel) -> None:
    run("ip", "-n", host, "link", "add", "ovep00foreign", "type", "veth", "peer", "name", "x1")
    for name in ("ul0", "ovep00foreign"):
        with pytest.raises(KernelError, match="refusing"):
            await delete_local_endpoint(kernel, host_ifname=name)
        assert link_exists(host, name)


# --- the dataplane carries traffic -------------------------------------------------------


async def test_two_hosts_reach_each_other_over_the_overlay(
    make_netns: Callable[[], str],
) -> None:
    """Two hosts on one underlay; the entries we program are all the overlay needs."""
    underlay = make_netns()
    run("ip", "-n", underlay, "link", "add", "sw", "type", "bridge")
    run("ip", "-n", underlay, "link", "set", "sw", "up")
    hosts = []
    for n, vtep in ((1, PEER_A), (2, PEER_B)):
        h = make_netns()
        run(
            "ip",
            "-n",
            h,
            "link",
            "add",
            "ul0",
            "netns",
            h,
            "type",
            "veth",
            "peer",
            "name",
            f"h{n}",
            "netns",
            underlay,
        )
        run("ip", "-n", underlay, "link", "set", f"h{n}", "master", "sw", "up")
        run("ip", "-n", h, "addr", "add", f"{vtep}/24", "dev", "ul0")
        run("ip", "-n", h, "link", "set", "ul0", "up")
        hosts.append((h, vtep, make_netns(), IPv4Address(f"10.30.0.{n}"), f"02:aa:00:00:00:0{n}"))

    for h, vtep, container, ip, mac in hosts:
        async with Kernel(netns=h) as kernel:
            underlay_dev = await kernel.underlay(interface=None, address=vtep)
            mtu = underlay_dev.mtu - 50
            want = network_state(local=vtep, mtu=mtu, mac=f"02:00:00:00:00:0{ip.packed[-1]}")
            await converge(kernel, want)
            await create_local_endpoint(
                kernel,
                netns=container,
                ifname="eth0",
                host_ifname=veth_name(NET, str(ip)),
                ip=ip,
                prefixlen=24,
                mac=mac,
                mtu=mtu,
                gateway=None,
                bridge=BR,
                network=NET,
            )
            for _h, other_vtep, _c, other_ip, other_mac in hosts:
                if other_vtep != vtep:
                    want.fdb.add(FdbEntry(VX, other_mac, other_vtep))
                    want.neigh.add(NeighEntry(VX, other_ip, other_mac))
                    want.flood.add(FloodEntry(VX, other_vtep))
            await converge(kernel, want)

    (_, _, c1, _, _), (_, _, _, ip2, mac2) = hosts
    ping(c1, ip2)
    # The container resolved the remote IP to the remote endpoint's MAC.
    assert [n["lladdr"] for n in ip_json(c1, "neigh", "show", str(ip2))] == [mac2]


def test_blocking_batch_answers_each_request_in_order(make_netns: Callable[[], str]) -> None:
    """`BlockingRtnl.requests`: one datagram, one answer per request in order; a failed request
    is reported as its own and does not stop the ones after it. The socket is made by this
    thread entering the namespace (`socket_in_netns_fd`), which leaves it back where it was."""
    ns = make_netns()
    run("ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    index = int(link_show(ns, "d0")["ifindex"])
    home = os.stat("/proc/thread-self/ns/net").st_ino
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        with BlockingRtnl(fd) as rtnl:
            assert os.stat("/proc/thread-self/ns/net").st_ino == home
            answers = rtnl.requests(
                [
                    nl.add_address(index, IPv4Address("10.77.0.1"), 24),
                    nl.add_address(index, IPv4Address("10.77.0.1"), 24),  # EEXIST
                    nl.set_up(index),
                ]
            )
    finally:
        os.close(fd)
    assert [code for code, _ in answers] == [0, errno.EEXIST, 0]
    assert "UP" in link_show(ns, "d0")["flags"]


def test_blocking_rtnl_waits_in_the_kernel_and_times_out(make_netns: Callable[[], str]) -> None:
    """`BlockingRtnl`'s socket blocks without a Python timeout (which would poll before every
    send and receive); the kernel's receive timeout still bounds a wait for an answer."""
    fd = os.open(f"/run/netns/{make_netns()}", os.O_RDONLY)
    try:
        with BlockingRtnl(fd, timeout=0.2) as rtnl:
            assert rtnl._sock.gettimeout() is None
            assert rtnl.get_link("lo") is not None
            start = time.monotonic()
            with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
                rtnl._recv()  # nothing was asked: no answer comes
            assert 0.15 < time.monotonic() - start < 2.0
    finally:
        os.close(fd)


async def test_a_cancelled_program_has_finished_when_the_cancel_arrives(
    kernel: Kernel, tmp_path: Path
) -> None:
    # A teardown cancels the reconciler mid-pass; an `ip netns add` it had started must not
    # finish after the teardown has looked (it would leave a namespace nobody owns).
    started, done = tmp_path / "started", tmp_path / "done"
    script = f"touch {started}; sleep 0.3; touch {done}"
    running = asyncio.create_task(kernel._program(["sh", "-c", script]))
    deadline = asyncio.get_running_loop().time() + 10
    while not started.exists():  # cancel once the program runs, not while it is being started
        assert asyncio.get_running_loop().time() < deadline, "the program never started"
        await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert done.exists()


def test_a_link_thread_keeps_its_host_socket_until_a_job_fails(make_netns: Callable[[], str]) -> None:
    """`_host_rtnl`: one socket per thread and namespace, reused from job to job; another
    namespace gets a new one; a job that fails leaves it closed, and the next gets a new one."""
    first, second = make_netns(), make_netns()
    with _host_rtnl(first) as a:
        assert a.get_link("lo") is not None
    with _host_rtnl(first) as again:
        assert again is a
    with _host_rtnl(second) as b:
        assert b is not a and b.get_link("lo") is not None
    assert a._sock.fileno() == -1  # closed when the thread moved on
    with pytest.raises(KernelError), _host_rtnl(second) as failing:
        assert failing is b
        raise KernelError("the job failed")
    assert b._sock.fileno() == -1
    with _host_rtnl(second) as fresh:
        assert fresh is not b and fresh.get_link("lo") is not None
