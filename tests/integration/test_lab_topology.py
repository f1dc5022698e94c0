"""The lab's own machinery, without overlayd: iproute2 helpers, topology, teardown."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from overlayd.lab import Lab, LabError, lab_down, lab_status, netns
from overlayd.lab import lab as labmod
from overlayd.lab.nshttp import NetnsHTTPConnection, request
from overlayd.lab.proc import read_start_time


def gone(pid: int) -> bool:
    found = read_start_time(pid)
    return found is None or found[1] == "Z"


def assert_nothing_left(lab: Lab) -> None:
    assert [ns for ns in netns.list_netns() if ns.startswith(lab.prefix + "-")] == []
    assert not lab.dir.exists()


# --- without root ---------------------------------------------------------------


def test_check_ifname() -> None:
    assert netns.check_ifname("ul0") == "ul0"
    assert netns.check_ifname("x" * 15) == "x" * 15
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(ValueError):
            netns.check_ifname(bad)


def test_command_error_names_the_command_and_quotes_stderr() -> None:
    with pytest.raises(netns.CommandError) as info:
        netns.run(["sh", "-c", "echo 'it broke' >&2; exit 3"])
    assert info.value.returncode == 3
    assert info.value.stderr == "it broke"
    assert "exit 3" in str(info.value) and "it broke" in str(info.value)
    with pytest.raises(netns.CommandError, match="command not found"):
        netns.run(["no-such-command-here"])


def test_prefix_and_host_count_are_checked() -> None:
    for bad in ("", "Lab", "a-b", "1ab", "a" * 17):
        with pytest.raises(LabError, match="invalid lab prefix"):
            Lab(prefix=bad)
    with pytest.raises(LabError, match="number of hosts"):
        Lab(hosts=0, prefix="x")
    with pytest.raises(LabError, match="unsupported store"):
        Lab(prefix="x", store="redis")
    with pytest.raises(LabError, match="unsupported egress"):
        Lab(prefix="x", egress="snat")
    with pytest.raises(LabError, match="unsupported mode"):
        Lab(prefix="x", mode="bgp")


def test_config_file_format(tmp_path: Path) -> None:
    lab = Lab(hosts=2, prefix="cfg", root=tmp_path, lease_ttl=3, reconcile_interval=0.5)
    labdir = tmp_path / "cfg"
    assert lab.config_text("h2") == (
        '[node]\nname = "h2"\n'
        '[underlay]\ninterface = "ul0"\naddress = "198.18.0.12"\n'
        '[store]\nurl = "etcd://198.18.0.1:2379"\nprefix = "/cfg/v1/"\nlease_ttl = 3\n'
        f'[admin]\nsocket = "{labdir}/h2/overlayd.sock"\n'
        '[status]\nlisten = "127.0.0.1:9480"\n'
        f'[state]\ndir = "{labdir}/h2/state"\n'
        "[reconcile]\ninterval = 0.5\n"
        '[log]\nlevel = "info"\n'
        # /run/netns is shared by the lab's hosts: each daemon's gateway namespaces carry its name.
        '[egress]\nnetns_prefix = "cfg-h2-gw"\n'
    )
    parsed = tomllib.loads(Lab(prefix="cfg", root=tmp_path).config_text("h1"))
    assert parsed["reconcile"]["interval"] == 30.0
    assert parsed["store"]["lease_ttl"] == 10


# --- namespaces (root) -----------------------------------------------------------


@pytest.mark.root
def test_netns_veth_address_ping_and_delete(lab_prefix: str) -> None:
    a, b = f"{lab_prefix}-a", f"{lab_prefix}-b"
    netns.add_netns(a)
    netns.add_netns(b)
    try:
        assert netns.netns_exists(a) and a in netns.list_netns()
        netns.add_veth(a, "va", b, "vb", mtu=1400)
        for ns, ifname, addr in ((a, "va", "198.19.0.1/30"), (b, "vb", "198.19.0.2/30")):
            netns.add_address(ns, ifname, addr)
            netns.set_up(ns, ifname)
        assert netns.addresses(a, "va") == ["198.19.0.1/30"]
        assert {link["ifname"]: link["mtu"] for link in netns.links(b)}["vb"] == 1400
        assert set(netns.link_names(a)) == {"lo", "va"}
        ping = netns.run_in(a, ["ping", "-n", "-c", "1", "-W", "2", "198.19.0.2"], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        with pytest.raises(netns.CommandError, match="File exists"):
            netns.add_netns(a)
        with pytest.raises(netns.CommandError, match=r"ip -n .* link add va"):
            netns.add_veth(a, "va", b, "vb2")
    finally:
        assert netns.delete_netns(a)
        assert netns.delete_netns(b)
    assert not netns.netns_exists(a)
    assert not netns.delete_netns(a)  # already gone: no error


@pytest.mark.root
def test_socket_in_netns_reaches_only_that_namespace(lab_prefix: str) -> None:
    ns = f"{lab_prefix}-s"
    own = os.readlink("/proc/thread-self/ns/net")
    netns.add_netns(ns)
    try:
        server = netns.socket_in_netns(ns)
        with server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            with netns.socket_in_netns(ns) as inside:
                inside.settimeout(2)
                inside.connect(("127.0.0.1", port))
            with socket.socket() as outside:
                outside.settimeout(2)
                assert outside.connect_ex(("127.0.0.1", port)) != 0
        # Only a helper thread entered the namespace; this one never moved.
        assert os.readlink("/proc/thread-self/ns/net") == own
    finally:
        netns.delete_netns(ns)


@pytest.mark.root
def test_netns_pids_and_tc(lab_prefix: str) -> None:
    ns = f"{lab_prefix}-p"
    netns.add_netns(ns)
    sleeper = subprocess.Popen(netns.exec_argv(ns, ["sleep", "60"]))
    try:
        labmod.wait_for(lambda: sleeper.pid in netns.netns_pids(ns), 5, "sleep in netns")
        # tbf, not netem: this machine's kernel has no sch_netem.
        rate = ("rate", "1mbit", "burst", "32kbit", "latency", "400ms")
        netns.tc(ns, "qdisc", "replace", "dev", "lo", "root", "tbf", *rate)
        assert "tbf" in netns.tc(ns, "qdisc", "show", "dev", "lo")
    finally:
        sleeper.kill()
        sleeper.wait()
        netns.delete_netns(ns)


# --- the lab topology (root, no daemons) ---------------------------------------------


@pytest.mark.root
def test_underlay_topology_and_down(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=3, up=False)
    lab.up(daemons=False)

    record = json.loads(lab.record_path.read_text())
    p = lab.prefix
    assert record["namespaces"] == [f"{p}-ul", f"{p}-kv", f"{p}-h1", f"{p}-h2", f"{p}-h3"]
    for h in lab.hosts:
        link = {x["ifname"]: x for x in netns.links(h.netns)}["ul0"]
        assert link["mtu"] == 1500 and link["operstate"] == "UP"
        assert netns.addresses(h.netns, "ul0") == [f"{h.address}/24"]
    assert [h.address for h in lab.hosts] == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
    assert netns.addresses(lab.kv_ns, "ul0") == ["198.18.0.1/24"]
    assert set(netns.link_names(lab.underlay_ns)) == {"lo", "br0", "kv", "h1", "h2", "h3"}

    results = {
        (h.name, dst): lab.ping(h.netns, dst)
        for h in lab.hosts
        for dst in ("198.18.0.1", "198.18.0.11", "198.18.0.12", "198.18.0.13")
    }
    assert all(results.values()), results

    # etcd answers on the underlay, from a host's namespace.
    conn = NetnsHTTPConnection(lab.hosts[1].netns, "198.18.0.1", 2379)
    status, body = request(conn, "GET", "/health")
    assert status == 200 and json.loads(body)["health"] == "true"

    # Another process sees the same lab through lab.json.
    loaded = Lab.load(lab.prefix)
    assert loaded is not None
    report = loaded.describe()
    assert report["store"]["alive"] and report["store"]["pid"] == lab.etcd.pid
    assert [h["vtep"] for h in report["hosts"]] == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]

    # Traffic keeps flowing while measured.
    pinger = lab.pinger(lab.hosts[0].netns, lab.hosts[2].address, interval=0.05)
    labmod.wait_for(lambda: lab.ping(lab.hosts[2].netns, lab.hosts[0].address), 5, "reverse ping")
    stats = pinger.stop()
    assert stats.transmitted >= 1 and stats.lost_seqs == [], stats

    etcd_pid = lab.etcd.pid
    assert etcd_pid is not None
    assert lab_down(lab.prefix) == 0
    assert gone(etcd_pid)
    assert_nothing_left(lab)
    assert lab_down(lab.prefix) == 0  # idempotent


@pytest.mark.root
def test_lab_status_reports_the_lab(make_lab: Callable[..., Lab], capsys: pytest.CaptureFixture[str]) -> None:
    lab = make_lab(hosts=2, up=False)
    assert lab_status(lab.prefix, json_out=True) == 1
    assert "no lab" in capsys.readouterr().err
    lab.up(daemons=False)
    assert lab_status(lab.prefix, json_out=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefix"] == lab.prefix
    assert report["store"]["url"] == "etcd://198.18.0.1:2379"
    assert report["store"]["netns"] == f"{lab.prefix}-kv"
    assert [d["netns"] for d in report["daemons"]] == [f"{lab.prefix}-h1", f"{lab.prefix}-h2"]
    assert all(d["pid"] is None and not d["alive"] for d in report["daemons"])
    assert lab_status(lab.prefix, json_out=False) == 0
    assert f"{lab.prefix}-h2" in capsys.readouterr().out


@pytest.mark.root
def test_lab_status_table_of_a_gossip_lab(
    make_lab: Callable[..., Lab], capsys: pytest.CaptureFixture[str]
) -> None:
    """The default lab has no KV server: the table says so instead of failing on its namespace."""
    lab = make_lab(hosts=2, up=False, store="gossip")
    lab.up(daemons=False)
    assert lab_status(lab.prefix, json_out=False) == 0
    out = capsys.readouterr().out
    assert "store: gossip only (no KV server" in out
    assert f"{lab.prefix}-h2" in out and f"{lab.prefix}-kv" not in out


@pytest.mark.root
def test_existing_lab_is_refused_and_left_alone(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=1, up=False)
    lab.up(daemons=False)
    again = Lab(hosts=1, prefix=lab.prefix)
    with pytest.raises(LabError, match="already exists"):
        again.up(daemons=False)
    assert lab.etcd.running() and netns.netns_exists(lab.hosts[0].netns)


@pytest.mark.root
def test_failed_up_removes_what_it_made(
    make_lab: Callable[..., Lab], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A daemon that dies at once: up must report it with its log and clean up.
    monkeypatch.setattr(
        labmod, "overlayd_argv", lambda: ["sh", "-c", "echo 'bad config: boom' >&2; exit 3", "x"]
    )
    lab = make_lab(hosts=2, up=False)
    with pytest.raises(LabError) as info:
        lab.up()
    message = str(info.value)
    assert "exited (status 3)" in message and "bad config: boom" in message
    assert not lab.etcd.running()
    assert_nothing_left(lab)


@pytest.mark.root
def test_down_without_record_removes_lab_namespaces_and_their_processes(lab_prefix: str) -> None:
    ns = f"{lab_prefix}-h1"
    netns.add_netns(ns)
    sleeper = subprocess.Popen(netns.exec_argv(ns, ["sleep", "60"]))
    try:
        labmod.wait_for(lambda: sleeper.pid in netns.netns_pids(ns), 5, "sleep in netns")
        assert lab_down(lab_prefix) == 0
        assert sleeper.wait(timeout=10) is not None
        assert not netns.netns_exists(ns)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        netns.delete_netns(ns)
