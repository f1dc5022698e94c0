"""The kernel watch against the real kernel: a namespace with a VXLAN device, entries made with iproute2.

This is the measuring tool of the benchmarks (and of the fault-injection
tests): what it reports must be what the kernel did, when it did it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from overlayd.lab.kwatch import Fdb, KernelWatch, Link, Neigh

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("bridge") is None, reason="needs iproute2"),
]

VX, BR = "ovvx42", "ovbr42"
MAC = "02:00:00:00:00:01"
PEER = "198.18.7.2"


def sh(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"


def make_vxlan(ns: str) -> None:
    """The devices overlayd makes for a network: a bridge and a VXLAN device on it."""
    sh("ip", "-n", ns, "link", "add", BR, "type", "bridge")
    add_vxlan(ns)


def add_vxlan(ns: str) -> None:
    sh(
        *("ip", "-n", ns, "link", "add", VX, "type", "vxlan", "id", "42", "dstport", "4789"),
        *("local", "198.18.7.1", "nolearning", "proxy"),
    )
    sh("ip", "-n", ns, "link", "set", VX, "master", BR, "up")


@pytest.fixture
def ns(lab_prefix: str) -> Iterator[str]:
    name = f"{lab_prefix}-kw"
    sh("ip", "netns", "add", name)
    try:
        make_vxlan(name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.mark.parametrize("isolated", [True, False], ids=["own-process", "thread"])
def test_fdb_entry_added_and_deleted_with_bridge(ns: str, isolated: bool) -> None:
    entry = Fdb(VX, MAC, PEER)
    with KernelWatch([ns], isolated=isolated) as watch:
        assert watch.entries(ns) == {Link(VX): pytest.approx(watch.entries(ns)[Link(VX)])}
        added = watch.expect({ns: [entry]})
        start = time.monotonic()
        sh("bridge", "-n", ns, "fdb", "add", MAC, "dev", VX, "dst", PEER, "self", "permanent")
        assert added.wait(5.0)
        assert added.done_at is not None and start < added.done_at < time.monotonic()
        assert watch.present(ns, entry) == added.done_at

        removed = watch.expect({ns: [entry]}, present=False)
        start = time.monotonic()
        sh("bridge", "-n", ns, "fdb", "del", MAC, "dev", VX, "dst", PEER, "self")
        assert removed.wait(5.0)
        assert removed.done_at is not None and start < removed.done_at
        assert watch.present(ns, entry) is None
        assert watch.gone_at(ns, entry) == removed.done_at

        events = watch.events(netns=ns, since=added.done_at)
        assert [(e.entry, e.present, e.exact) for e in events] == [(entry, True, True), (entry, False, True)]
        assert watch.overruns() == []


def test_entries_present_at_start_neighbours_and_a_deleted_device(ns: str) -> None:
    sh("bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", VX, "dst", PEER, "self", "permanent")
    with KernelWatch([ns]) as watch:
        flood = Fdb(VX, "00:00:00:00:00:00", PEER)
        assert set(watch.entries(ns)) == {Link(VX), flood}
        neigh = Neigh(VX, "10.100.0.7", MAC)
        exp = watch.expect({ns: [neigh]})
        sh("ip", "-n", ns, "neigh", "replace", "10.100.0.7", "lladdr", MAC, "dev", VX, "nud", "permanent")
        assert exp.wait(5.0)
        # A replace with another MAC is the old entry gone and a new one there.
        other = Neigh(VX, "10.100.0.7", "02:00:00:00:00:02")
        exp = watch.expect({ns: [other]})
        sh(
            "ip",
            "-n",
            ns,
            "neigh",
            "replace",
            "10.100.0.7",
            "lladdr",
            other.mac,
            "dev",
            VX,
            "nud",
            "permanent",
        )
        assert exp.wait(5.0)
        assert watch.present(ns, neigh) is None

        gone = watch.expect({ns: [Link(VX), flood, other]}, present=False)
        sh("ip", "-n", ns, "link", "del", VX)
        assert gone.wait(5.0)
        assert watch.entries(ns) == {}
        back = watch.expect({ns: [Link(VX)]})
        add_vxlan(ns)
        assert back.wait(5.0)


def test_an_overrun_is_reported_and_the_state_read_again(ns: str) -> None:
    macs = [f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(3000)]
    # A receive buffer far too small for a burst of 3000 notifications.
    with KernelWatch([ns], rcvbuf=4096) as watch:
        exp = watch.expect({ns: [Fdb(VX, mac, PEER) for mac in macs]})
        start = time.monotonic()
        lines = "".join(f"fdb replace {mac} dev {VX} dst {PEER} self permanent\n" for mac in macs)
        sh("bridge", "-n", ns, "-batch", "-", stdin=lines)
        assert exp.wait(10.0), f"{exp.remaining} of {exp.total} missing"
        assert watch.overruns(since=start), "a 4 KiB buffer kept up with 3000 notifications?"
        assert exp.inexact  # learnt (partly) from reading the table again, not from notifications
        assert len([e for e in watch.entries(ns) if isinstance(e, Fdb)]) == 3000
