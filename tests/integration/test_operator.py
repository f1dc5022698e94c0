"""overlayctl doctor and teardown against real daemons in a lab, run inside the host's namespace."""

from __future__ import annotations

import json
import os
import pty
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from overlayd.api.client import ClientError
from overlayd.lab import Lab, netns
from overlayd.lab.proc import read_start_time

pytestmark = pytest.mark.root

OVERLAYCTL = str(Path(sys.executable).parent / "overlayctl")


def overlayctl(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    """overlayctl run on `host`: in its network namespace, against its admin socket."""
    h = lab.host(host)
    argv = [OVERLAYCTL, "--socket", str(h.admin_socket), *args]
    return lab.exec(h.netns, argv, check=False, timeout=60)


def doctor(lab: Lab, host: str) -> tuple[int, dict[str, dict[str, Any]]]:
    result = overlayctl(lab, host, "doctor", "--json")
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {c["check"]: c for c in report["checks"]}


def test_doctor_on_a_healthy_host_then_three_faults(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1)
    code, checks = doctor(lab, "h1")
    assert code == 0, checks
    assert {name: c["result"] for name, c in checks.items()} == {
        "kernel vxlan": "OK",
        "udp 4789": "OK",
        "admin socket": "OK",
        "daemon": "OK",
        "gossip port 7946": "OK",
        "mtu": "OK",
        "clock skew": "OK",
        "kv store": "OK",
        "reconcile": "OK",
        "daemon warnings": "OK",
        "gateway tools": "OK",
        "kv store data": "OK",
    }
    assert "overlayd's VXLAN devices" in checks["udp 4789"]["message"]  # the demo network's
    assert "MTU 1500: networks get 1450" in checks["mtu"]["message"]
    assert lab.etcd.url in checks["kv store"]["message"]
    assert (lab.admin("h1").status().store.latency_ms or 0) > 0  # the probe's, now in /status

    # Fault 1: a network asking for more than the underlay leaves.
    lab.create_network("jumbo", "10.101.0.0/24", mtu=1500)
    # Fault 2: someone else on the gossip port (a socket of this test process inside h1).
    squatter = netns.socket_in_netns(lab.host("h1").netns, socket.AF_INET, socket.SOCK_DGRAM)
    # Fault 3: an admin socket others may connect to.
    admin_socket = lab.host("h1").admin_socket
    try:
        squatter.bind(("0.0.0.0", 7946))
        os.chmod(admin_socket, 0o666)
        code, checks = doctor(lab, "h1")
    finally:
        squatter.close()
        os.chmod(admin_socket, 0o600)
    assert code == 1
    failed = {name for name, c in checks.items() if c["result"] == "FAIL"}
    assert failed == {"mtu", "gossip port 7946", "admin socket"}, checks
    assert "jumbo (1500)" in checks["mtu"]["message"]
    assert f"pid {os.getpid()}" in checks["gossip port 7946"]["message"]
    assert all(checks[name]["hint"] for name in failed)

    # People get one line per check and a hint under each failure; the MTU fault is still there.
    text = overlayctl(lab, "h1", "doctor")
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    mtu_line = next(i for i, line in enumerate(lines) if line.startswith("FAIL  mtu"))
    assert lines[mtu_line + 1].strip().startswith("hint: raise the underlay MTU to 1550")
    lab.admin("h1").network_remove("jumbo")
    assert overlayctl(lab, "h1", "doctor").returncode == 0


def _gone(pid: int) -> bool:
    found = read_start_time(pid)
    return found is None or found[1] == "Z"


def test_teardown_removes_the_host_and_tells_the_others(make_lab: Callable[..., Lab]) -> None:
    # A long lease: anything h2 forgets within seconds was released, not expired.
    lab = make_lab(2, lease_ttl=30)
    h1_ep, h2_ep = lab.endpoints
    assert lab.wait_ping(h2_ep.netns, h1_ep.ip) < 20
    h1 = lab.host("h1")
    proc = h1.proc
    assert proc is not None

    result = overlayctl(lab, "h1", "teardown", "--yes")
    assert result.returncode == 0, result.stderr
    # Progress on stderr, the outcome on stdout.
    assert f"[1/1] removing endpoint demo/{h1_ep.name}" in result.stderr
    assert "removing overlay links and releasing the lease of h1" in result.stderr
    assert result.stdout.startswith("tore down node h1: 1 endpoint(s), ")
    assert "lease released; overlayd is stopping" in result.stdout

    # The daemon exits by itself, with status 0 (systemd's Restart=on-failure leaves it down).
    lab.wait_for(lambda: _gone(proc.pid), 10, "overlayd on h1 to exit")
    assert proc.returncode() in (0, None)
    names = netns.link_names(h1.netns)
    assert not [n for n in names if n.startswith("ov")], names
    assert "eth0" not in netns.link_names(h1_ep.netns)

    # h2 forgets h1 at once (the lease was released, not left to expire in 30 s).
    def h2_forgot() -> bool:
        peers = {p.name for p in lab.admin("h2").peers()}
        endpoints = {e.name for e in lab.admin("h2").endpoint_list()}
        # Entries overlayd programmed carry a remote VTEP ("dst"); bridge-learnt ones do not.
        macs = {e.get("mac") for e in lab.fdb("h2") if "dst" in e}
        return "h1" not in peers and h1_ep.name not in endpoints and h1_ep.mac not in macs

    lab.wait_for(h2_forgot, 5, "h2 to drop h1, its endpoint and its FDB entry")

    # Starting overlayd again joins the host anew, with nothing of its own.
    h1.proc = None
    lab.start_daemon("h1")
    assert "h1" in {p.name for p in lab.admin("h2").peers()} or lab.wait_for(
        lambda: "h1" in {p.name for p in lab.admin("h2").peers()}, 10, "h1 back in h2's peers"
    )
    assert lab.admin("h1").status().endpoints.local == 0


def test_teardown_api_removes_what_is_left(make_lab: Callable[..., Lab]) -> None:
    """The daemon's half alone (what the CLI calls last): endpoints still there go too."""
    lab = make_lab(1)
    h1 = lab.host("h1")
    (ep,) = lab.endpoints
    proc = h1.proc
    assert proc is not None
    with pytest.raises(ClientError, match="this is node 'h1'"):
        lab.admin("h1").teardown("h2")  # naming another node is refused, nothing happens
    assert lab.admin("h1").status().ready is True

    report = lab.admin("h1").teardown("h1")
    assert report.endpoints_removed == (f"demo/{ep.name}",)
    assert report.lease_released is True and report.errors == ()
    # The endpoint's veth went with the endpoint; then the network's devices.
    vni = lab.networks[0]["vni"]
    assert sorted(report.links_removed) == [f"ovbr{vni}", f"ovvx{vni}"], report
    assert "eth0" not in netns.link_names(ep.netns)
    lab.wait_for(lambda: _gone(proc.pid), 10, "overlayd on h1 to exit")
    assert not [n for n in netns.link_names(h1.netns) if n.startswith("ov")]
    assert json.loads((h1.state_dir / "endpoints.json").read_text())["endpoints"] == []
    assert not (h1.state_dir / "etcd-lease").exists()


def test_teardown_asks_for_the_node_name_on_a_terminal(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1)
    h1 = lab.host("h1")
    argv = netns.exec_argv(h1.netns, [OVERLAYCTL, "--socket", str(h1.admin_socket), "teardown"])

    def answer(text: str) -> subprocess.CompletedProcess[str]:
        controller, terminal = pty.openpty()  # stdin is a terminal, so it asks
        try:
            os.write(controller, text.encode())
            return subprocess.run(
                argv, stdin=terminal, capture_output=True, text=True, timeout=60, check=False
            )
        finally:
            os.close(controller)
            os.close(terminal)

    wrong = answer("h2\n")
    assert wrong.returncode == 1, wrong.stderr
    assert "Type the node name (h1)" in wrong.stderr and "its 1 local endpoint(s)" in wrong.stderr
    assert "teardown aborted: nothing was changed" in wrong.stderr
    assert lab.admin("h1").status().endpoints.local == 1 and lab.daemon_alive("h1")

    right = answer("h1\n")
    assert right.returncode == 0, right.stderr
    assert right.stdout.startswith("tore down node h1: 1 endpoint(s)")


def test_teardown_with_the_store_down_reports_what_it_could_not_do(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, lease_ttl=5)
    h1 = lab.host("h1")
    (ep,) = lab.endpoints
    proc = h1.proc
    assert proc is not None
    lab.etcd.stop()

    result = overlayctl(lab, "h1", "teardown", "--yes", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    # The kernel side is done all the same; the store side is left to the lease.
    assert report["lease_released"] is False
    assert any("expire within 5s" in err for err in report["errors"]), report
    assert f"demo/{ep.name}" in report["endpoints_removed"]
    assert "teardown: lease not released" in result.stderr
    lab.wait_for(lambda: _gone(proc.pid), 10, "overlayd on h1 to exit")
    assert not [n for n in netns.link_names(h1.netns) if n.startswith("ov")]
    assert "eth0" not in netns.link_names(ep.netns)


def test_doctor_measures_clock_skew_against_gossiping_peers(make_lab: Callable[..., Lab]) -> None:
    """The clocks are one machine's, so the skew gossip measures is close to zero, and real."""
    lab = make_lab(3, store="gossip")

    def measured() -> bool:
        return all(p.clock_offset is not None for p in lab.admin("h1").peers() if not p.self)

    lab.wait_for(measured, 20, "h1 to measure its peers' clocks")
    offsets = [p.clock_offset for p in lab.admin("h1").peers() if not p.self]
    assert all(o is not None and abs(o) < 0.1 for o in offsets), offsets
    _, checks = doctor(lab, "h1")
    assert checks["clock skew"]["result"] == "OK", checks["clock skew"]
    assert "measured" in checks["clock skew"]["message"]
    # The lab's configs hold the gossip key: written for root's eyes only, so nothing warns.
    assert checks["daemon warnings"]["result"] == "OK", checks["daemon warnings"]
    assert stat.S_IMODE(lab.host("h1").config_path.stat().st_mode) == 0o600
