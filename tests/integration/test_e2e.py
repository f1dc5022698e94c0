"""Multi-host end to end: real daemons in namespaces, real etcd, real kernel, real pings."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from overlayd.api.client import AdminClient, ClientError
from overlayd.clients.cli import main as overlayctl
from overlayd.lab import Lab
from overlayd.lab import netns as nsutil
from overlayd.lab.lab import Endpoint

pytestmark = pytest.mark.root


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def vxlan_fdb(lab: Lab, host: str) -> dict[str, set[str]]:
    """MAC -> destinations of the FDB entries on overlayd's VXLAN devices."""
    out: dict[str, set[str]] = {}
    for entry in lab.fdb(host):
        if entry.get("ifname", "").startswith("ovvx") and "dst" in entry:
            out.setdefault(entry["mac"], set()).add(entry["dst"])
    return out


def vxlan_neigh(lab: Lab, host: str) -> dict[str, str]:
    """IP -> MAC of the neighbour entries on overlayd's VXLAN devices."""
    return {
        n["dst"]: n.get("lladdr", "") for n in lab.neighbours(host) if n.get("dev", "").startswith("ovvx")
    }


def knows(lab: Lab, host: str, ep: Endpoint, vtep: str) -> bool:
    return vxlan_fdb(lab, host).get(ep.mac) == {vtep} and vxlan_neigh(lab, host).get(ep.ip) == ep.mac


def forgot(lab: Lab, host: str, ep: Endpoint) -> bool:
    return ep.mac not in vxlan_fdb(lab, host) and ep.ip not in vxlan_neigh(lab, host)


def endpoint_of(lab: Lab, host: str) -> Endpoint:
    return next(ep for ep in lab.endpoints if ep.host == host)


def vtep(lab: Lab, host: str) -> str:
    return lab.host(host).address


def converged(client: AdminClient) -> bool:
    return client.diff().changes == ()


def test_all_pairs_ping_and_delete_propagates_and_reused_ip_goes_to_new_host(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab(3)
    results = lab.ping_all()
    assert all(r.ok for r in results), [(r.src.name, r.dst.name) for r in results if not r.ok]

    old = endpoint_of(lab, "h1")
    for host in ("h2", "h3"):
        assert knows(lab, host, old, vtep(lab, "h1"))

    lab.admin("h1").endpoint_remove(network="demo", name=old.name)
    lab.forget_endpoint(old)
    for host in ("h2", "h3"):
        wait_until(lambda h=host: forgot(lab, h, old), 10, f"{old.name} gone from {host}")
    assert old.ip not in {str(ep.ip) for ep in lab.admin("h2").endpoint_list()}

    # The released IP is taken by a new endpoint on h3: h2 must send to h3 now.
    reused = lab.add_endpoint("h3", "reuse", ip=old.ip)
    assert reused.ip == old.ip and reused.mac != old.mac
    wait_until(lambda: knows(lab, "h2", reused, vtep(lab, "h3")), 10, "h2 to learn the reused IP")
    assert old.mac not in vxlan_fdb(lab, "h2")
    h2_ep = endpoint_of(lab, "h2")
    lab.wait_ping(h2_ep.netns, reused.ip, timeout=10)
    # The container on h2 resolved the address to the new endpoint's MAC (h3), not the old one.
    neigh = nsutil.ip_json("neigh", "show", netns=h2_ep.netns)
    assert {n["dst"]: n.get("lladdr") for n in neigh}.get(reused.ip) == reused.mac
    assert converged(lab.admin("h2")) and converged(lab.admin("h3"))


def test_killed_host_expires_while_other_traffic_flows(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(3, lease_ttl=3)
    assert all(r.ok for r in lab.ping_all())
    h1, h2, h3 = (endpoint_of(lab, h) for h in ("h1", "h2", "h3"))

    pinger = lab.pinger(h1.netns, h3.ip, interval=0.05)
    try:
        lab.kill_daemon("h2")
        for host in ("h1", "h3"):
            wait_until(lambda h=host: forgot(lab, h, h2), 20, f"h2's endpoint to expire on {host}")
        wait_until(lambda: "h2" not in {p.name for p in lab.admin("h1").peers()}, 10, "h2 peer gone")
    finally:
        stats = pinger.stop()
    assert stats.transmitted > 20
    # Only the very last request may still have been in flight when ping was stopped.
    assert set(stats.lost_seqs) <= {stats.transmitted}, stats
    assert knows(lab, "h1", h3, vtep(lab, "h3")) and knows(lab, "h3", h1, vtep(lab, "h1"))


@contextmanager
def watch_overlay_entries(lab: Lab, host: str) -> Iterator[list[str]]:
    """Collect every FDB/neighbour change on overlayd's VXLAN devices in `host`'s kernel."""
    ns = lab.host(host).netns
    seen: list[list[str]] = []
    procs: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []
    lines: list[str] = []
    try:
        for argv in (["bridge", "monitor", "fdb"], ["ip", "monitor", "neigh"]):
            proc = subprocess.Popen(
                nsutil.exec_argv(ns, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            procs.append(proc)
            out: list[str] = []
            seen.append(out)
            # A reader thread per monitor: the test polls what it read, with a deadline.
            reader = threading.Thread(target=lambda p=proc, o=out: o.extend(p.stdout or ()), daemon=True)
            reader.start()
            readers.append(reader)
        # Prove both monitors are listening before the test acts: a sentinel
        # entry on the underlay interface must show up in each. A monitor that
        # has not subscribed yet misses it, so it is written again until seen.
        neigh = "ip neigh replace 198.18.0.250 lladdr 02:5e:00:00:00:02 dev ul0 nud permanent"
        sentinels = [
            ("02:5e:00:00:00:01", ["bridge", "fdb", "replace", "02:5e:00:00:00:01", "dev", "ul0"]),
            ("198.18.0.250", neigh.split()),
        ]
        for out, (sentinel, write) in zip(seen, sentinels, strict=True):
            deadline = time.monotonic() + 10
            while not any(sentinel in line for line in out):
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after 10s waiting for monitor shows {sentinel}")
                lab.exec(ns, write)
                time.sleep(0.2)
        yield lines
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=10)
        for reader in readers:
            reader.join(timeout=10)
        lines += [line for out in seen for line in out if _is_overlay_entry(line)]
        lab.exec(ns, ["bridge", "fdb", "del", "02:5e:00:00:00:01", "dev", "ul0"], check=False)
        lab.exec(ns, ["ip", "neigh", "del", "198.18.0.250", "dev", "ul0"], check=False)


def _is_overlay_entry(line: str) -> bool:
    """A monitor line about an entry overlayd manages: permanent, on a VXLAN device.

    Bridge-learnt entries (dynamic, "master ovbr...", REACHABLE) come and go
    with traffic; `ip monitor neigh` shows those too, as bridge-family lines.
    """
    return "ovvx" in line and ("dst " in line or "PERMANENT" in line.upper())


def test_restart_keeps_every_kernel_entry_and_traffic(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(3)
    assert all(r.ok for r in lab.ping_all())
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: converged(lab.admin(h)), 10, f"{host} converged")
    before = {host: (vxlan_fdb(lab, host), vxlan_neigh(lab, host)) for host in ("h1", "h2")}
    h1, h2 = endpoint_of(lab, "h1"), endpoint_of(lab, "h2")

    pinger = lab.pinger(h2.netns, h1.ip, interval=0.05)
    try:
        with watch_overlay_entries(lab, "h1") as h1_changes, watch_overlay_entries(lab, "h2") as h2_changes:
            assert lab.stop_daemon("h1", sig=signal.SIGTERM) == 0
            lab.start_daemon("h1")  # waits until ready: the first reconcile is done
            wait_until(lambda: converged(lab.admin("h1")), 10, "h1 converged after restart")
            lab.wait_ping(h1.netns, h2.ip, timeout=10)
    finally:
        stats = pinger.stop()
    assert h1_changes == [] and h2_changes == [], (h1_changes, h2_changes)
    after = {host: (vxlan_fdb(lab, host), vxlan_neigh(lab, host)) for host in ("h1", "h2")}
    assert after == before
    assert set(stats.lost_seqs) <= {stats.transmitted}, stats
    assert lab.admin("h1").status().last_reconcile is not None


def cli(socket: str, *args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = overlayctl(["--socket", socket, *args])
    return code, out.getvalue(), err.getvalue()


def test_bad_input_gets_clear_errors_and_changes_nothing(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, up=False).up(demo=False)
    sock = str(lab.host("h1").admin_socket)
    client = lab.admin("h1")

    def fails(status: int, contains: str, call: Callable[[], Any]) -> None:
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.status == status, info.value
        assert contains in str(info.value), info.value
        assert "\n" not in str(info.value)

    code, _, err = cli(sock, "network", "create", "tiny", "--subnet", "10.9.0.0/30", "--vni", "900")
    assert code == 0, err
    before_networks = client.network_list()
    before_endpoints = client.endpoint_list()

    # Through overlayctl: one line on stderr, non-zero exit.
    for args, expect_code, text in [
        (("network", "create", "x", "--subnet", "10.1.0.0/33"), 2, "invalid IPv4 subnet"),
        (("network", "create", "x", "--subnet", "10.1.0.0/24", "--vni", "0"), 2, "invalid VNI"),
        (("network", "create", "x", "--subnet", "10.1.0.0/24", "--vni", "16777216"), 2, "invalid VNI"),
        (("network", "create", "tiny", "--subnet", "10.2.0.0/24"), 1, "already exists"),
        (("network", "create", "y", "--subnet", "10.2.0.0/24", "--vni", "900"), 1, "VNI 900"),
        (("endpoint", "add", "nope", "e1", "--netns", "whatever"), 1, "network nope not found"),
        (("network", "rm", "nope"), 1, "not found"),
    ]:
        code, _, err = cli(sock, *args)
        assert code == expect_code, (args, code, err)
        assert text in err, (args, err)
        assert err.strip().count("\n") == 0 or expect_code == 2, err

    # Daemon-side validation, bypassing the CLI's own checks.
    fails(400, "invalid VNI", lambda: client.network_create(name="z", subnet="10.3.0.0/24", vni=0))
    fails(400, "invalid VNI", lambda: client.network_create(name="z", subnet="10.3.0.0/24", vni=2**24))
    fails(400, "invalid subnet", lambda: client.network_create(name="z", subnet="10.3.0.1/24"))
    fails(400, "gateway", lambda: client.network_create(name="z", subnet="10.3.0.0/24", gateway="10.4.0.1"))

    ns = f"{lab.prefix}-bad"
    nsutil.add_netns(ns)
    try:
        fails(
            400,
            "not a usable address",
            lambda: client.endpoint_add(network="tiny", name="e1", netns=ns, ip="10.9.0.9"),
        )
        fails(400, "not found", lambda: client.endpoint_add(network="tiny", name="e1", netns=f"{ns}-missing"))
        first = client.endpoint_add(network="tiny", name="e1", netns=ns)
        assert str(first.ip) == "10.9.0.1"  # the failed attempts consumed no address
        fails(409, "already exists", lambda: client.endpoint_add(network="tiny", name="e1", netns=ns))
        fails(
            400,
            "eth0",  # eth0 is taken in that namespace: rolled back, IP released
            lambda: client.endpoint_add(network="tiny", name="e2", netns=ns),
        )
        ns2 = f"{lab.prefix}-bad2"
        nsutil.add_netns(ns2)
        try:
            second = client.endpoint_add(network="tiny", name="e2", netns=ns2)
            assert str(second.ip) == "10.9.0.2"
            fails(
                409,
                "no free address",
                lambda: client.endpoint_add(network="tiny", name="e3", netns=ns2, ifname="eth1"),
            )
            fails(409, "still has 2 endpoint", lambda: client.network_remove("tiny"))
            client.endpoint_remove(network="tiny", name="e2")
        finally:
            nsutil.delete_netns(ns2)
        client.endpoint_remove(network="tiny", name="e1")
    finally:
        nsutil.delete_netns(ns)

    assert client.network_list() == before_networks
    assert client.endpoint_list() == before_endpoints
    host_links = nsutil.link_names(lab.host("h1").netns)
    assert not [name for name in host_links if name.startswith("ovep")], host_links
    wait_until(lambda: converged(client), 10, "converged")
    client.network_remove("tiny")
    assert "tiny" not in {n.name for n in client.network_list()}

    # No daemon: a clear one-line error.
    code, _, err = cli(f"{lab.dir}/nobody.sock", "status")
    assert code == 1 and "cannot reach overlayd" in err and err.count("\n") == 1
