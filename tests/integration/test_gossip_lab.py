"""Gossip-only mode end to end: 5 hosts, no KV server, real kernel, real loss and partitions.

Loss and partitions are made with nftables on the underlay bridge (this
machine's kernel has no netem); all of it lives in namespaces the lab made.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from overlayd.dataplane.kstate import veth_name
from overlayd.lab import Lab
from overlayd.lab import netns as nsutil
from overlayd.lab.lab import ETCD_CLIENT_PORT, KV_ADDRESS, Endpoint

pytestmark = pytest.mark.root


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def fdb_macs(lab: Lab, host: str) -> dict[str, str]:
    """MAC -> VTEP of overlayd's FDB entries on `host`."""
    return {
        e["mac"]: e["dst"]
        for e in lab.fdb(host)
        if e.get("ifname", "").startswith("ovvx") and "dst" in e and e["mac"] != "00:00:00:00:00:00"
    }


def programmed_everywhere(lab: Lab, endpoints: list[Endpoint]) -> bool:
    """Every host has an FDB entry towards every remote endpoint's host (and none extra)."""
    for host in lab.hosts:
        want = {ep.mac: lab.host(ep.host).address for ep in endpoints if ep.host != host.name}
        if fdb_macs(lab, host.name) != want:
            return False
    return True


def views(lab: Lab) -> list[list[tuple[str, str, str]]]:
    """Each host's endpoint list (its own endpoints withdrawn after a clash left out)."""
    return [
        sorted(
            (e.name, str(e.ip), e.owner) for e in lab.admin(h.name).endpoint_list() if e.conflict is None
        )
        for h in lab.hosts
    ]


def same_view_everywhere(lab: Lab, expected: int) -> bool:
    all_views = views(lab)
    return all(v == all_views[0] for v in all_views) and len(all_views[0]) == expected


@contextmanager
def underlay_filter(lab: Lab, *rules: str) -> Iterator[None]:
    """nftables rules on the lab's underlay bridge, removed afterwards."""
    ns = lab.underlay_ns
    lab.exec(ns, ["nft", "add", "table", "bridge", "ovtest"])
    lab.exec(ns, ["nft", "add chain bridge ovtest drops { type filter hook forward priority 0 ; }"])
    for rule in rules:
        lab.exec(ns, ["nft", f"add rule bridge ovtest drops {rule}"])
    try:
        yield
    finally:
        lab.exec(ns, ["nft", "delete", "table", "bridge", "ovtest"], check=False)


@pytest.fixture
def gossip_lab(make_lab: Callable[..., Lab]) -> Lab:
    return make_lab(5, store="gossip", lease_ttl=4)


def test_five_hosts_converge_and_ping(gossip_lab: Lab) -> None:
    lab = gossip_lab
    results = lab.ping_all()
    assert all(r.ok for r in results), [(r.src.name, r.dst.name) for r in results if not r.ok]
    assert programmed_everywhere(lab, lab.endpoints)
    status = lab.admin("h1").status()
    assert status.store.url == "gossip"
    assert status.gossip is not None and status.gossip.members == {"alive": 4}
    peers = lab.admin("h1").peers()
    assert {p.name: p.state for p in peers} == {f"h{k}": "alive" for k in range(1, 6)}

    # A new endpoint on h1 is programmed on h2..h5.
    new = lab.add_endpoint("h1", "late")
    wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 10, "late endpoint everywhere")
    lab.wait_ping(lab.endpoints[1].netns, new.ip, timeout=10)
    _, body = lab.status_get("h2", "/metrics")
    assert 'overlayd_convergence_latency_seconds_count{path="gossip"}' in body.decode()


def test_converges_under_packet_loss(gossip_lab: Lab) -> None:
    lab = gossip_lab
    with underlay_filter(lab, "numgen random mod 100 < 20 drop"):
        for k in range(1, 6):
            lab.add_endpoint(f"h{k}", f"lossy{k}", timeout=30)
        wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 60, "convergence under 20% loss")
        wait_until(lambda: same_view_everywhere(lab, 10), 30, "identical views under loss")
    assert all(r.ok for r in lab.ping_all())


def test_partition_and_heal_converge_to_one_state(gossip_lab: Lab) -> None:
    lab = gossip_lab
    h5 = lab.host("h5").address
    with underlay_filter(lab, f"ip saddr {h5} drop", f"ip daddr {h5} drop"):
        lab.add_endpoint("h1", "during-a", ip="10.100.0.50")
        cut_off = lab.add_endpoint("h5", "during-b", ip="10.100.0.51")
        # Both sides take the same free address: a clash only the heal reveals.
        lab.add_endpoint("h1", "clash-a", ip="10.100.0.77")
        clash = lab.add_endpoint("h5", "clash-b", ip="10.100.0.77")
        lab.forget_endpoint(clash)
        # h1's side never hears of h5's new endpoints while the partition lasts.
        time_limit = time.monotonic() + 2
        while time.monotonic() < time_limit:
            assert cut_off.mac not in fdb_macs(lab, "h1")
            time.sleep(0.2)
    wait_until(lambda: same_view_everywhere(lab, 8), 60, "one view everywhere after the heal")
    wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 30, "kernels agree after the heal")
    # The older claim won everywhere; h5 withdrew its endpoint and says why.
    [loser] = [e for e in lab.admin("h5").endpoint_list() if e.name == "clash-b"]
    assert loser.conflict is not None and "10.100.0.77" in loser.conflict, loser
    assert clash.mac not in fdb_macs(lab, "h1")
    assert any("clash-b" in line for line in lab.admin("h5").status().store.invalid_records)
    failed = [(r.src.name, r.dst.name) for r in lab.ping_all() if not r.ok]
    assert failed == []


def link(lab: Lab, ns: str, ifname: str) -> dict[str, Any]:
    [found] = nsutil.ip_json("link", "show", "dev", ifname, netns=ns)
    return found


def test_endpoint_that_loses_a_late_clash_is_detached_and_down(make_lab: Callable[..., Lab]) -> None:
    """Both sides of a partition claim one IP; after the heal the newer claim's veth leaves its bridge."""
    lab = make_lab(3, store="gossip", lease_ttl=4)
    h3 = lab.host("h3").address
    with underlay_filter(lab, f"ip saddr {h3} drop", f"ip daddr {h3} drop"):
        winner = lab.add_endpoint("h1", "clash-a", ip="10.100.0.77")
        loser = lab.add_endpoint("h3", "clash-b", ip="10.100.0.77")
        port = veth_name("demo", loser.name)
        # Until the heal, h3 knows of no clash: its endpoint is on the bridge and up.
        attached = link(lab, lab.host("h3").netns, port)
        assert attached.get("master", "").startswith("ovbr") and "UP" in attached["flags"], attached
    lab.forget_endpoint(loser)

    def withdrawn() -> bool:
        listed = {e.name: e for e in lab.admin("h3").endpoint_list()}
        return "clash-b" in listed and listed["clash-b"].conflict is not None

    wait_until(withdrawn, 60, "h3 to withdraw clash-b after the heal")
    # Its veth stays for the operator to inspect, but off the bridge and down.
    wait_until(lambda: "master" not in link(lab, lab.host("h3").netns, port), 10, "clash-b's veth detached")
    detached = link(lab, lab.host("h3").netns, port)
    assert "UP" not in detached["flags"] and detached["operstate"] == "DOWN", detached
    assert "eth0" in nsutil.link_names(loser.netns)
    # The address is the winner's, from h3's side too: its other endpoint reaches h1's over VXLAN.
    wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 30, "kernels agree after the heal")
    h3_ep = next(ep for ep in lab.endpoints if ep.host == "h3")
    lab.wait_ping(h3_ep.netns, winner.ip, timeout=10)
    neighbours = nsutil.ip_json("neigh", "show", winner.ip, netns=h3_ep.netns)
    assert [n["lladdr"] for n in neighbours if "lladdr" in n] == [winner.mac], neighbours


def test_killed_daemon_endpoints_removed_after_grace(gossip_lab: Lab) -> None:
    lab = gossip_lab
    assert all(r.ok for r in lab.ping_all())
    victim = next(ep for ep in lab.endpoints if ep.host == "h2")
    survivors = [h.name for h in lab.hosts if h.name != "h2"]
    h1_ep = next(ep for ep in lab.endpoints if ep.host == "h1")
    h3_ep = next(ep for ep in lab.endpoints if ep.host == "h3")
    pinger = lab.pinger(h1_ep.netns, h3_ep.ip, interval=0.05)
    try:
        lab.kill_daemon("h2")
        for host in survivors:
            wait_until(lambda h=host: victim.mac not in fdb_macs(lab, h), 30, f"h2's endpoint gone on {host}")
        wait_until(
            lambda: {p.name: p.state for p in lab.admin("h1").peers()}.get("h2") in ("dead", None),
            10,
            "h2 dead in h1's peers",
        )
    finally:
        stats = pinger.stop()
    assert set(stats.lost_seqs) <= {stats.transmitted}, stats


FLOOD_SCRIPT = r"""
import os, random, socket, sys
target, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rng = random.Random(7)
for i in range(count):
    kind = i % 4
    if kind == 0:
        data = os.urandom(rng.randrange(1, 1400))
    elif kind == 1:   # right version byte, garbage after it
        data = bytes([1]) + os.urandom(rng.randrange(8, 600))
    elif kind == 2:   # an insecure-looking frame with a msgpack-ish body
        data = bytes([1, 0, 0, 0, 0]) + os.urandom(rng.randrange(16, 300))
    else:
        data = b"\x00" * rng.randrange(0, 64)
    s.sendto(data, (target, port))
print("sent", count)
"""


def test_flood_of_random_and_forged_datagrams_changes_nothing(gossip_lab: Lab) -> None:
    lab = gossip_lab
    before = views(lab)
    attacker = f"{lab.prefix}-atk"
    lab._attach(attacker, "atk", "198.18.0.200")  # an extra machine on the underlay
    try:
        for host in lab.hosts:
            out = lab.exec(attacker, ["python3", "-c", FLOOD_SCRIPT, host.address, "7946", "1000"]).stdout
            assert "sent 1000" in out
        # Every host still serves, and still learns new things.
        for host in lab.hosts:
            assert lab.admin(host.name).status().ready is True
        assert views(lab) == before
        lab.add_endpoint("h3", "after-flood")
        wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 15, "new endpoint after the flood")
        _, body = lab.status_get("h1", "/metrics")
        rejected = sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith("overlayd_gossip_messages_rejected_total{")
        )
        # Counted and dropped (some never reach the daemon: the socket buffer overflows first).
        assert rejected >= 100, rejected
    finally:
        nsutil.delete_netns(attacker)


def test_concurrent_network_creation_resolves_deterministically(gossip_lab: Lab) -> None:
    import threading

    lab = gossip_lab
    outcomes: dict[str, object] = {}

    def create(host: str) -> None:
        try:
            outcomes[host] = lab.admin(host).network_create(name="race", subnet="10.50.0.0/24", vni=5000)
        except Exception as exc:
            outcomes[host] = exc

    threads = [threading.Thread(target=create, args=(h,)) for h in ("h2", "h4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [h for h, o in outcomes.items() if not isinstance(o, Exception)]
    losers = [o for o in outcomes.values() if isinstance(o, Exception)]
    assert len(winners) == 1, outcomes
    assert len(losers) == 1 and "already" in str(losers[0]), outcomes
    wait_until(
        lambda: all(
            [n.name for n in lab.admin(h.name).network_list()].count("race") == 1 for h in lab.hosts
        ),
        10,
        "one race network everywhere",
    )
    assert lab.admin("h1").network_inspect("race").vni == 5000


def test_etcd_outage_endpoint_spreads_by_gossip_and_is_stored_after(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(3, store="etcd", gossip=True)
    assert all(r.ok for r in lab.ping_all())
    before = {h.name: fdb_macs(lab, h.name) for h in lab.hosts}
    monitors = {h: watch_deletions(lab, h) for h in ("h1", "h2", "h3")}
    try:
        lab.etcd.stop()
        wait_until(lambda: lab.admin("h1").status().store.healthy is False, 20, "h1 sees etcd down")
        outage = lab.add_endpoint("h1", "outage")
        wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 15, "outage endpoint everywhere")
        for ep in lab.endpoints:
            if ep.host != "h1":
                lab.wait_ping(ep.netns, outage.ip, timeout=10)
        assert lab.admin("h1").status().store.pending_writes == 1
        lab.etcd.start()
        wait_until(lambda: lab.admin("h1").status().store.pending_writes == 0, 30, "replayed to etcd")
    finally:
        deleted = {h: stop_monitor(p) for h, p in monitors.items()}
    # The endpoint is in the store now: a daemon that knows nothing but the store sees it.
    lab.stop_daemon("h3")
    lab.start_daemon("h3")
    assert "outage" in {e.name for e in lab.admin("h3").endpoint_list()}
    # Nothing that was programmed before the outage was removed from any kernel meanwhile.
    assert deleted == {"h1": [], "h2": [], "h3": []}, deleted
    for host, macs in before.items():
        assert macs.items() <= fdb_macs(lab, host).items()


def etcd_keys(lab: Lab, under: str) -> list[str]:
    """Keys in the lab's etcd under the store prefix + `under`, read with etcdctl in its namespace."""
    endpoint = f"{KV_ADDRESS}:{ETCD_CLIENT_PORT}"
    argv = ["etcdctl", f"--endpoints={endpoint}", "get", "--prefix", "--keys-only", lab.store_prefix + under]
    out = lab.exec(lab.kv_ns, argv).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_etcd_outage_endpoint_removal_is_replayed_to_the_store(make_lab: Callable[..., Lab]) -> None:
    """An endpoint removed while etcd is down goes by gossip at once, and from etcd when it returns."""
    lab = make_lab(3, store="etcd", gossip=True)
    doomed = lab.add_endpoint("h1", "doomed")
    wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 15, "doomed endpoint everywhere")
    assert etcd_keys(lab, "endpoints/demo/doomed") and etcd_keys(lab, f"ipam/demo/{doomed.ip}")
    lab.etcd.stop()
    try:
        wait_until(lambda: lab.admin("h1").status().store.healthy is False, 20, "h1 sees etcd down")
        lab.admin("h1").endpoint_remove(network="demo", name="doomed")  # not refused: queued
        lab.forget_endpoint(doomed)
        assert lab.admin("h1").status().store.pending_writes == 1
        # The others hear of it by gossip, long before the store is back.
        wait_until(lambda: programmed_everywhere(lab, lab.endpoints), 15, "doomed gone from every kernel")
        for host in ("h2", "h3"):
            assert "doomed" not in {e.name for e in lab.admin(host).endpoint_list()}
    finally:
        lab.etcd.start()
    wait_until(lambda: lab.admin("h1").status().store.pending_writes == 0, 30, "the removal replayed")
    # The record and its IP claim are gone from etcd itself.
    assert etcd_keys(lab, "endpoints/demo/") == [
        f"{lab.store_prefix}endpoints/demo/{ep.name}" for ep in sorted(lab.endpoints, key=lambda e: e.name)
    ]
    assert etcd_keys(lab, f"ipam/demo/{doomed.ip}") == []
    # A daemon that knows nothing but the store does not bring it back.
    lab.stop_daemon("h3")
    lab.start_daemon("h3")
    assert "doomed" not in {e.name for e in lab.admin("h3").endpoint_list()}
    assert doomed.mac not in fdb_macs(lab, "h3")


def watch_deletions(lab: Lab, host: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        nsutil.exec_argv(lab.host(host).netns, ["bridge", "monitor", "fdb"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_monitor(proc: subprocess.Popen[str]) -> list[str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return [
        line for line in out.splitlines() if line.startswith("Deleted") and "ovvx" in line and "dst" in line
    ]


def test_kv_expired_endpoint_never_comes_back_through_gossip(make_lab: Callable[..., Lab]) -> None:
    """Peers keep a dead host's gossip records; the KV store's expiry still wins everywhere."""
    lab = make_lab(3, store="etcd", gossip=True, lease_ttl=3)
    assert all(r.ok for r in lab.ping_all())
    dead = next(ep for ep in lab.endpoints if ep.host == "h2")
    lab.kill_daemon("h2")
    for host in ("h1", "h3"):
        wait_until(lambda h=host: dead.mac not in fdb_macs(lab, h), 20, f"h2's endpoint expired on {host}")
    # A daemon that starts now learns h2's old records from its peers' gossip tables.
    lab.stop_daemon("h3")
    lab.start_daemon("h3")
    deadline = time.monotonic() + 5  # a few anti-entropy rounds (2 s each in the lab)
    while time.monotonic() < deadline:
        assert dead.name not in {e.name for e in lab.admin("h3").endpoint_list()}
        assert dead.mac not in fdb_macs(lab, "h3")
        time.sleep(0.2)
