"""The scenarios of issue 9, each a function of a `Run` (see `harness`).

Each injects one fault that bit users of an overlay, waits for what must
follow with deadlines, and checks it; the harness counts lost pings and
wrongly removed kernel entries around it. Numbers follow the issue.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from faults.clusters import ClusterLab, EtcdCluster, ZooKeeperEnsemble
from faults.harness import ALL_BACKENDS, KV_BACKENDS, Run, Scenario
from overlayd.lab.kwatch import Fdb
from overlayd.lab.lab import KV_ADDRESS, Endpoint

# Log lines that mean "this daemon registered itself again" (a new lease or session).
REREGISTER = re.compile(r"granted etcd lease|created consul session|new zookeeper session|expired")


def _kv_pid(run: Run) -> int:
    kv = run.lab.etcd
    assert kv.pid is not None
    return kv.pid


def _cut_from_store(run: Run, host: str) -> None:
    """nftables in `host`'s namespace: nothing to or from the KV server; undone by the cleanup."""
    ns = run.ns(host)
    run.nft(
        ns,
        "table inet faultcut {\n"
        f"  chain out {{ type filter hook output priority 0; ip daddr {KV_ADDRESS} drop; }}\n"
        f"  chain in {{ type filter hook input priority 0; ip saddr {KV_ADDRESS} drop; }}\n"
        "}\n",
    )
    run.cleanups.append(lambda: _heal(run, ns))


def _heal(run: Run, ns: str) -> None:
    run.lab.exec(ns, ["nft", "delete", "table", "inet", "faultcut"], check=False)


def _store_has(run: Run, key: str, owner: str, via: str) -> bool:
    return any(e["key"] == key and e["owner"] == owner for e in run.store_dump(via)["endpoints"])


def _key(ep: Endpoint) -> str:
    return f"{ep.network}/{ep.name}"


def _log_since(run: Run, host: str, mark: int) -> list[str]:
    """What the daemon logged itself since line `mark` (not the access log of our own polling)."""
    return [line for line in run.log_lines(host)[mark:] if "aiohttp.access" not in line]


# --- 1: KV server paused for less than the lease TTL ----------------------------------


def kv_paused(run: Run) -> None:
    lab = run.lab
    pid = _kv_pid(run)
    marks = {h: len(run.log_lines(h)) for h in lab.host_names}
    cpu = {h: run.cpu_seconds(run.daemon_pid(h)) for h in lab.host_names}
    pause = lab.lease_ttl * 0.5
    lab.etcd.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    run.cleanups.append(lambda: lab.etcd.proc.send_signal(signal.SIGCONT))  # type: ignore[union-attr]
    try:
        time.sleep(pause)  # the fault is a duration
    finally:
        lab.etcd.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    assert pid
    for h in lab.host_names:
        used = run.cpu_seconds(run.daemon_pid(h)) - cpu[h]
        run.check(used < 0.25 * pause, f"{h} used {used:.2f}s CPU in a {pause:g}s pause: a busy loop")
    run.converge_s = run.wait(
        lambda: all(run.status(h).store.healthy for h in lab.host_names), 15, "store healthy"
    )
    run.wait(run.all_converged, 15, "every daemon converged after the pause")
    for h in lab.host_names:
        new = _log_since(run, h, marks[h])
        again = [line for line in new if REREGISTER.search(line)]
        run.check(not again, f"{h} registered again after a pause shorter than its lease: {again[:2]}")
        run.check(len(new) <= 30, f"{h} logged {len(new)} lines over one pause")


# --- 2: one host cut off from the KV store, gossip still reaches it --------------------


def host_cut_from_store(run: Run) -> None:
    lab = run.lab
    ep1 = run.endpoint("h1")
    _cut_from_store(run, "h1")
    cut_at = time.monotonic()
    # Its lease or session must really expire in the store (Consul: up to twice the TTL).
    run.wait(
        lambda: not _store_has(run, _key(ep1), "h1", "h2"), 3.5 * lab.lease_ttl, "h1's records to expire"
    )
    held = max(0.0, 2 * lab.lease_ttl - (time.monotonic() - cut_at))
    time.sleep(held)  # the fault is a duration: 2x TTL in all
    for h in ("h2", "h3"):
        run.check(run.knows(h, ep1), f"{h} dropped h1's live endpoint while gossip still heard h1")
    _heal(run, run.ns("h1"))
    run.converge_s = run.wait(
        lambda: _store_has(run, _key(ep1), "h1", "h2"), 15, "h1's records back in the store"
    )
    run.check(run.converge_s <= 5.0, f"h1's records back only after {run.converge_s:.1f}s (bound 5 s)")
    run.wait(run.all_converged, 15, "every daemon converged")


# --- 3: the returning host never overwrites what another host took meanwhile ---------


def returning_host_cas(run: Run) -> None:
    lab = run.lab
    ep1 = run.endpoint("h1")
    run.allow_removal(ep1)  # its lease expires: an authoritative delete
    vtep1 = lab.host("h1").address  # and h1, with no endpoint left, gets no more floods
    run.allow(lambda _n, e: isinstance(e, Fdb) and e.mac == "00:00:00:00:00:00" and e.dst == vtep1)
    _cut_from_store(run, "h1")
    run.wait(
        lambda: not _store_has(run, _key(ep1), "h1", "h2"), 3.5 * lab.lease_ttl, "h1's records to expire"
    )
    taker = lab.add_endpoint("h2", "taker", ep1.ip)
    run.allow_removal(taker)
    _heal(run, run.ns("h1"))
    run.wait(
        lambda: run.status("h1").store.healthy and run.status("h1").store.synced, 20, "h1 back on the store"
    )
    # Give h1 the time it needs to re-publish (its session is new), then the store must hold h2's claim.
    deadline = time.monotonic() + 3 * lab.lease_ttl
    while time.monotonic() < deadline:
        eps = [e for e in run.store_dump("h3")["endpoints"] if e["ip"] == ep1.ip]
        run.check(len(eps) == 1 and eps[0]["owner"] == "h2", f"the store's claims of {ep1.ip}: {eps}")
        if any(
            "h1-ep" in c or ep1.ip in c
            for c in run.status("h1").errors + run.status("h1").store.invalid_records
        ):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"h1 never reported that {ep1.ip} was taken meanwhile")
    run.wait(lambda: run.knows("h3", taker), 10, "h3 forwards the taken IP to h2")


# --- 4: a daemon paused while endpoints churn and the store compacts -----------------


def paused_daemon_churn(run: Run) -> None:
    lab = run.lab
    made = [lab.add_endpoint("h2", f"c{k}") for k in range(4)]
    run.wait(lambda: all(run.knows("h1", ep) for ep in made), 15, "h1 knows the new endpoints")
    mark = len(run.log_lines("h1"))
    h1 = lab.host("h1").proc
    assert h1 is not None
    if run.options.get("pause", True):
        h1.send_signal(signal.SIGSTOP)
    run.cleanups.append(lambda: h1.send_signal(signal.SIGCONT))
    try:
        gone, kept = made[:2], made[2:]
        for ep in gone:
            run.allow_removal(ep)
            run.admin("h2").endpoint_remove(network=ep.network, name=ep.name)
            lab.forget_endpoint(ep)
        late = [lab.add_endpoint("h3", f"l{k}") for k in range(2)]
        if run.backend == "etcd" and run.options.get("compact", True):
            rev = run.store_dump("h2")["revision"]
            lab.exec(
                lab.kv_ns,
                ["etcdctl", f"--endpoints={lab.etcd.url.replace('etcd://', 'http://')}", "compact", str(rev)],
            )
        time.sleep(max(0.0, lab.lease_ttl * 0.4 - 1))  # the pause is the fault
    finally:
        h1.send_signal(signal.SIGCONT)
    run.converge_s = run.wait(
        lambda: (
            all(run.forgot("h1", ep) for ep in gone) and all(run.knows("h1", ep) for ep in [*kept, *late])
        ),
        15,
        "h1 caught up after its pause",
        describe=lambda: (
            f"still there: {[ep.name for ep in gone if not run.forgot('h1', ep)]}, "
            f"missing: {[ep.name for ep in [*kept, *late] if not run.knows('h1', ep)]}"
        ),
    )
    run.wait(run.all_converged, 15, "every daemon converged")
    time.sleep(2)  # a reconnect loop would show in the log by now
    new = _log_since(run, "h1", mark)
    run.check(len(new) <= 25, f"h1 logged {len(new)} lines after one pause: {new[-3:]}")


# --- 5: an endpoint moves between hosts -----------------------------------------------


def endpoint_moves(run: Run) -> None:
    lab = run.lab
    mover = lab.add_endpoint("h2", "mover")  # never sends traffic itself
    run.wait(lambda: run.knows("h1", mover) and run.knows("h3", mover), 10, "everyone knows mover on h2")
    run.allow_removal(mover)
    h2, h3 = lab.host("h2"), lab.host("h3")
    run.admin("h2").endpoint_remove(network=mover.network, name=mover.name)
    lab.forget_endpoint(mover)
    moved = lab.add_endpoint("h3", "mover2", mover.ip)
    start = time.monotonic()
    run.converge_s = run.wait(
        lambda: (
            (run.knows("h1", moved, h3.address) and run.forgot("h2", moved))
            or run.knows("h1", moved, h3.address)
        ),
        10,
        "h1 forwards the moved endpoint to h3",
    )
    # From here on, nothing for it may reach h2: count VXLAN packets into h2 carrying its MAC.
    mac = moved.mac.replace(":", "")
    run.nft(
        h2.netns,
        "table inet faultcap {\n"
        "  chain in { type filter hook input priority -10;\n"
        f"    udp dport 4789 @th,128,48 0x{mac} counter name moved; }}\n"
        "  counter moved { }\n"
        "}\n",
    )
    run.cleanups.append(
        lambda: lab.exec(h2.netns, ["nft", "delete", "table", "inet", "faultcap"], check=False)
    )
    ep1 = run.endpoint("h1")
    out = lab.exec(
        ep1.netns, ["ping", "-n", "-c", "20", "-i", "0.05", "-W", "1", moved.ip], check=False
    ).stdout
    answered = int(m.group(1)) if (m := re.search(r"(\d+) received", out)) else 0
    run.check(answered >= 19, f"pings to the moved endpoint: {answered}/20 answered")
    counted = lab.exec(h2.netns, ["nft", "list", "counter", "inet", "faultcap", "moved"]).stdout
    packets = int(m.group(1)) if (m := re.search(r"packets (\d+)", counted)) else -1
    run.check(packets == 0, f"{packets} packets for the moved endpoint reached the old host h2")
    for h in lab.host_names:
        for entry in lab.fdb(h):
            if entry.get("mac") == moved.mac:
                run.check(
                    entry.get("dst") != h2.address, f"{h} has an FDB entry for it pointing at h2: {entry}"
                )
    run.note(f"moved in {time.monotonic() - start:.2f}s")


# --- 6: a daemon killed while peers delete endpoints ---------------------------------


def killed_while_deleting(run: Run) -> None:
    lab = run.lab
    doomed = [lab.add_endpoint("h2", f"d{k}") for k in range(3)]
    run.wait(lambda: all(run.knows("h1", ep) for ep in doomed), 15, "h1 knows the doomed endpoints")
    lab.kill_daemon("h1")
    for ep in doomed:
        run.allow_removal(ep)
        run.admin("h2").endpoint_remove(network=ep.network, name=ep.name)
        lab.forget_endpoint(ep)
    run.wait(lambda: all(run.forgot("h3", ep) for ep in doomed), 15, "h3 removed them")
    lab.start_daemon("h1")
    ready = time.monotonic()
    run.converge_s = run.wait(
        lambda: all(run.forgot("h1", ep) for ep in doomed), 30, "h1 removed the stale entries"
    )
    bound = 6.0
    run.check(
        run.converge_s <= bound,
        f"h1 removed the stale entries {run.converge_s:.1f}s after ready (bound {bound:g}s)",
    )
    status = run.status("h1")
    run.check(status.view.complete, "h1's view not complete after removing stale entries")
    if status.view.complete_at is not None:
        after = status.view.complete_at - (time.time() - (time.monotonic() - ready))
        run.note(f"view complete {after:.2f}s after ready")


# --- 7: leftover devices and foreign names ---------------------------------------------


def _links(run: Run, host: str) -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = json.loads(
        run.lab.exec(run.ns(host), ["ip", "-d", "-j", "link", "show"]).stdout
    )
    return links


def leftover_devices(run: Run) -> None:
    lab = run.lab
    ns = run.ns("h1")
    links = _links(run, "h1")
    vx = next(link for link in links if str(link["ifname"]).startswith("ovvx"))
    br = next(link for link in links if str(link["ifname"]).startswith("ovbr"))
    vni = vx["linkinfo"]["info_data"]["id"]
    run.allow(lambda n, _e: n == ns)  # h1's own devices are replaced in this scenario
    lab.stop_daemon("h1")
    lab.exec(ns, ["ip", "link", "del", str(vx["ifname"])])
    lab.exec(ns, ["ip", "link", "del", str(br["ifname"])])
    # A leftover VXLAN device holding the VNI with wrong settings, and a foreign device
    # with the name overlayd wants for the bridge.
    lab.exec(
        ns,
        [
            "ip",
            "link",
            "add",
            "leftvx",
            "type",
            "vxlan",
            "id",
            str(vni),
            "dstport",
            "4789",
            "local",
            lab.host("h1").address,
            "learning",
        ],
    )
    lab.exec(ns, ["ip", "link", "set", "leftvx", "up"])
    lab.exec(ns, ["ip", "link", "add", str(br["ifname"]), "type", "bridge"])  # not ours: no ifalias
    run.cleanups.append(lambda: lab.exec(ns, ["ip", "link", "del", "leftvx"], check=False))
    mark = len(run.log_lines("h1"))
    lab.start_daemon("h1", wait=False)
    run.wait(lambda: lab.is_ready("h1"), 60, "h1 ready despite the leftovers")
    time.sleep(3)  # a crash loop or a retry storm would show by now
    run.check(lab.daemon_alive("h1"), f"h1 died: {lab.log_tail('h1', 5)}")
    new = _log_since(run, "h1", mark)
    run.check(len(new) <= 60, f"h1 logged {len(new)} lines in a few seconds")
    errors = " ".join(run.status("h1").errors)
    ep1, ep2 = run.endpoint("h1"), run.endpoint("h2")
    repaired = lab.ping(ep1.netns, ep2.ip)
    reported = str(vni) in errors or "leftvx" in errors or str(br["ifname"]) in errors
    run.check(repaired or reported, f"neither repaired nor reported: errors={errors!r}")
    run.note("repaired" if repaired else f"reported: {errors[:120]}")
    # Once the operator removes the leftovers, the daemon repairs the network by itself.
    lab.exec(ns, ["ip", "link", "del", "leftvx"], check=False)
    lab.exec(ns, ["ip", "link", "del", str(br["ifname"])], check=False)
    run.converge_s = run.wait(lambda: lab.ping(ep1.netns, ep2.ip), 40, "h1's network repaired")


# --- 8: underlay link down and up; an endpoint's veth deleted ---------------------------


def underlay_flap_and_veth(run: Run) -> None:
    lab = run.lab
    ns = run.ns("h1")
    ep1, ep2 = run.endpoint("h1"), run.endpoint("h2")
    lab.exec(ns, ["ip", "link", "set", "ul0", "down"])
    time.sleep(2)  # the fault is a duration
    lab.exec(ns, ["ip", "link", "set", "ul0", "up"])
    run.converge_s = run.wait(lambda: lab.ping(ep1.netns, ep2.ip), 20, "h1 reachable after the underlay flap")
    run.wait(run.all_converged, 15, "every daemon converged after the flap")
    # The host side of h1-ep's veth deleted behind the daemon's back.
    info = run.admin("h1").endpoint_check(network=ep1.network, name=ep1.name)
    port = next(  # h1 has one endpoint: its veth is the only port of an overlayd bridge
        str(link["ifname"])
        for link in _links(run, "h1")
        if link.get("linkinfo", {}).get("info_kind") == "veth"
        and str(link.get("master", "")).startswith("ovbr")
    )
    lab.exec(ns, ["ip", "link", "del", port])
    t = time.monotonic()

    def back_or_reported() -> bool:
        if lab.ping(ep1.netns, ep2.ip):
            return True
        check = run.admin("h1").endpoint_check(network=ep1.network, name=ep1.name)
        return not check.found and any(ep1.name in e or port in e for e in run.status("h1").errors)

    # Its entries on the other hosts lead nowhere now, and are replaced below.
    run.allow_removal(ep1)
    run.wait(back_or_reported, 15, "the deleted veth recreated or reported")
    recreated = lab.ping(ep1.netns, ep2.ip)
    how = "recreated" if recreated else "reported"
    run.note(f"veth: {how} in {time.monotonic() - t:.1f}s (was found={info.found})")
    if not recreated:
        # The operator's answer to the report: a new endpoint into the same namespace, then
        # the broken one removed (h1 never has none, so nothing else of h1 goes meanwhile).
        run.admin("h1").endpoint_add(network=ep1.network, name=ep1.name + "-2", netns=ep1.netns)
        run.admin("h1").endpoint_remove(network=ep1.network, name=ep1.name)
        lab.forget_endpoint(ep1)
        run.converge_s = run.wait(lambda: lab.ping(ep1.netns, ep2.ip), 15, "the re-added endpoint reachable")


# --- 9: a gossip partition, then a fast leave, rejoin and re-create ---------------------


def gossip_partition(run: Run) -> None:
    lab = run.lab
    ul = lab.underlay_ns
    seconds = float(run.options.get("partition_s", 60.0))
    h1 = lab.host("h1")
    ep1 = run.endpoint("h1")
    if run.backend == "gossip":
        # Without a store, gossip is the only authority: a host dead past the grace goes.
        run.allow_removal(ep1)
        for h in ("h2", "h3"):
            run.allow_removal(run.endpoint(h))
        run.allow(lambda _n, e: isinstance(e, Fdb) and e.mac == "00:00:00:00:00:00")
    run.nft(
        ul,
        "table bridge faultpart {\n"
        "  chain cut { type filter hook forward priority 0;\n"
        f"    ip saddr {h1.address} udp dport 7946 drop; ip daddr {h1.address} udp dport 7946 drop;\n"
        f"    ip saddr {h1.address} tcp dport 7946 drop; ip daddr {h1.address} tcp dport 7946 drop; }}\n"
        "}\n",
    )
    run.cleanups.append(lambda: lab.exec(ul, ["nft", "delete", "table", "bridge", "faultpart"], check=False))
    time.sleep(seconds)  # the fault is a duration
    lab.exec(ul, ["nft", "delete", "table", "bridge", "faultpart"])

    def one_view() -> bool:
        for h in lab.host_names:
            members = run.status(h).gossip.members
            others = len(lab.host_names) - 1  # a member counts the others, not itself
            if members.get("alive", 0) != others or sum(members.values()) != others:
                return False
        return True

    run.converge_s = run.wait(one_view, 30, "one membership view after the heal")
    run.wait(
        lambda: all(run.knows(a, run.endpoint(b)) for a in lab.host_names for b in lab.host_names if a != b),
        30,
        "every endpoint known everywhere after the heal",
    )
    # Fast leave and rejoin of h2, then its endpoint removed and re-created at once
    # (same name, same address); a second endpoint keeps the network on h2 meanwhile.
    ep2 = run.endpoint("h2")
    keep = lab.add_endpoint("h2", "h2-keep")
    run.wait(lambda: run.knows("h1", keep) and run.knows("h3", keep), 15, "h2-keep everywhere")
    lab.stop_daemon("h2")
    lab.start_daemon("h2")
    run.allow_removal(ep2)
    run.admin("h2").endpoint_remove(network=ep2.network, name=ep2.name)
    lab.forget_endpoint(ep2)
    made: list[Any] = []

    def recreate() -> bool:  # 503 while h2's view is still completing after its restart
        client = run.admin("h2")
        made.append(client.endpoint_add(network=ep2.network, name=ep2.name, netns=ep2.netns, ip=ep2.ip))
        return True

    run.wait(recreate, 15, "the endpoint re-created on h2", interval=0.1)
    again = Endpoint("h2", ep2.network, ep2.name, ep2.netns, str(made[-1].ip), made[-1].mac)
    run.wait(
        lambda: run.knows("h1", again) and run.knows("h3", again), 15, "the re-created endpoint everywhere"
    )
    time.sleep(3)  # a tombstone winning late would remove it now
    run.check(
        run.knows("h1", again) and run.knows("h3", again), "the re-created endpoint lost to its tombstone"
    )
    run.wait(run.all_converged, 15, "every daemon converged")


# --- 10: one host's underlay MTU is 1450 -----------------------------------------------


def small_mtu(run: Run) -> None:
    lab = run.lab
    h3 = lab.host("h3")
    lab.stop_daemon("h3")
    lab.exec(lab.underlay_ns, ["ip", "link", "set", "h3", "mtu", "1450"])
    lab.exec(h3.netns, ["ip", "link", "set", "ul0", "mtu", "1450"])
    lab.start_daemon("h3")
    run.allow(lambda n, _e: n == h3.netns)
    # The host was 1450 from the start: its endpoint is made on it (one made before the
    # underlay shrank keeps its MTU; see the row's note).
    old = run.endpoint("h3")
    lab.add_endpoint("h3", "h3-ep2")
    run.allow_removal(old)
    run.admin("h3").endpoint_remove(network=old.network, name=old.name)
    lab.forget_endpoint(old)

    def vx_mtu() -> int:
        return int(next(link["mtu"] for link in _links(run, "h3") if str(link["ifname"]).startswith("ovvx")))

    run.converge_s = run.wait(lambda: vx_mtu() == 1400, 20, "h3's VXLAN MTU follows its underlay (1400)")
    ep1, ep3 = run.endpoint("h1"), run.endpoint("h3")
    run.wait(lambda: lab.ping(ep1.netns, ep3.ip), 15, "h1-ep reaches h3-ep")
    rates = [_iperf3(run, ep1, ep3, reverse) for reverse in (False, True)]
    mtu3 = lab.exec(ep3.netns, ["cat", "/sys/class/net/eth0/mtu"]).stdout.strip()
    run.note(f"iperf3 h1->h3 {rates[0]:.0f}, h3->h1 {rates[1]:.0f} Mbit/s; h3's endpoint MTU {mtu3}")


def _iperf3(run: Run, client: Endpoint, server: Endpoint, reverse: bool) -> float:
    """Mbit/s of a 2 s iperf3 run (`reverse`: the server sends); fails the row if it stalls."""
    lab = run.lab
    port = 5201
    started = lab.exec(server.netns, ["iperf3", "-s", "-1", "-p", str(port), "-D"], check=False)
    run.check(started.returncode == 0, f"iperf3 server: {started.stderr}")
    run.wait(
        lambda: "LISTEN" in lab.exec(server.netns, ["ss", "-ltn", f"sport = :{port}"]).stdout,
        5,
        "iperf3 listening",
    )
    argv = ["iperf3", "-c", server.ip, "-p", str(port), "-t", "2", "-J", "--connect-timeout", "3000"]
    done = lab.exec(client.netns, [*argv, *(["-R"] if reverse else [])], check=False, timeout=30)
    way = f"{server.host}->{client.host}" if reverse else f"{client.host}->{server.host}"
    run.check(done.returncode == 0, f"iperf3 {way} failed: {done.stdout[-300:]} {done.stderr[-300:]}")
    moved = json.loads(done.stdout)["end"]["sum_received"]["bytes"]
    run.check(moved > 1_000_000, f"iperf3 {way} moved only {moved} bytes (a silent drop)")
    return float(moved) * 8 / 2 / 1e6


# --- 11: store cluster members fail ----------------------------------------------------


def _kill_leader(run: Run) -> str:
    """Kill (SIGKILL) the etcd leader or the ZooKeeper leader; restart Consul's one server."""
    lab = run.lab
    kv = lab.etcd
    if isinstance(kv, EtcdCluster):
        urls = ",".join(f"http://{m.host}:{m.client_port}" for m in kv.members)
        out = lab.exec(
            lab.kv_ns, ["etcdctl", f"--endpoints={urls}", "endpoint", "status", "-w", "json"]
        ).stdout
        status = json.loads(out)
        leader_id = status[0]["Status"]["leader"]
        index = next(k for k, s in enumerate(status) if s["Status"]["header"]["member_id"] == leader_id)
        member = kv.members[index]
        assert member.proc is not None
        member.proc.send_signal(signal.SIGKILL)
        return f"killed etcd leader {member.name}"
    if isinstance(kv, ZooKeeperEnsemble):
        zk = next(m for m in kv.members if "Mode: leader" in m.four_letter("srvr"))
        assert zk.proc is not None
        zk.proc.send_signal(signal.SIGKILL)
        return f"killed zookeeper leader {zk.myid}"
    kv.stop()
    kv.start()
    return f"restarted {lab.store}"


def _add_while_unavailable(run: Run, host: str, name: str) -> Endpoint:
    """Add an endpoint, retrying while the admin API answers that the store is unavailable
    (as a container runtime retries a CNI ADD)."""
    lab = run.lab
    ns = f"{lab.prefix}-{name}"
    lab.add_namespaces([ns])
    made: list[Any] = []

    def add() -> bool:
        made.append(run.admin(host).endpoint_add(network="demo", name=name, netns=ns))
        return True

    run.wait(add, 30, f"endpoint {name} added on {host}", interval=0.2)
    ep = Endpoint(host, "demo", name, ns, str(made[-1].ip), made[-1].mac)
    lab.endpoints.append(ep)
    return ep


def store_member_fails(run: Run) -> None:
    lab = run.lab
    before = lab.add_endpoint("h2", "before")
    run.wait(lambda: run.knows("h1", before) and run.knows("h3", before), 10, "everyone knows 'before'")
    run.allow_removal(before)
    run.note(_kill_leader(run))

    # Changes right after the failure, while the store elects or comes back: none may be lost.
    def remove_before() -> bool:
        run.admin("h2").endpoint_remove(network="demo", name="before")
        return True

    run.wait(remove_before, 30, "'before' removed through h2")
    lab.forget_endpoint(before)
    during = _add_while_unavailable(run, "h2", "during")
    after = _add_while_unavailable(run, "h3", "after")
    run.converge_s = run.wait(
        lambda: (
            run.knows("h1", during)
            and run.knows("h3", during)
            and run.knows("h1", after)
            and run.forgot("h1", before)
            and run.forgot("h3", before)
        ),
        30,
        "watches resumed with every change",
    )
    run.wait(run.all_converged, 15, "every daemon converged")


# --- 12: the store loses its data ------------------------------------------------------


def store_data_lost(run: Run) -> None:
    lab = run.lab
    kv = lab.etcd
    kv.stop()
    for child in Path(kv.workdir).iterdir():
        if child.is_dir():
            shutil.rmtree(child)
    kv.start()
    started = time.monotonic()

    def republished() -> bool:
        dump = run.store_dump("h2")
        return (
            [n["name"] for n in dump["networks"]] == ["demo"]
            and {n["name"] for n in dump["nodes"]} == set(lab.host_names)
            and {e["key"] for e in dump["endpoints"]} == {_key(ep) for ep in lab.endpoints}
        )

    run.converge_s = run.wait(republished, 40, "networks, nodes and endpoints re-published")
    for h in lab.host_names:
        st = run.status(h)
        run.check(getattr(st.store, "data_loss", None), f"{h}'s /status does not say the store lost data")
        run.check("overlayd_store_data_loss" in run.metrics(h), f"{h}'s /metrics does not say it")
    later = lab.add_endpoint("h2", "later", timeout=30)
    run.wait(lambda: run.knows("h1", later) and run.knows("h3", later), 15, "a new endpoint after the loss")
    run.note(f"re-published in {time.monotonic() - started:.1f}s")


# --- 13: churn ---------------------------------------------------------------------------


def churn(run: Run) -> None:
    from concurrent.futures import ThreadPoolExecutor

    lab = run.lab
    total = int(run.options.get("endpoints", 1000))
    hosts = lab.host_names
    churning: list[str] = list(run.options.get("only", hosts))  # the hosts that get endpoints
    rss0 = {h: run.rss_kib(run.daemon_pid(h)) for h in hosts}
    names = [f"{lab.prefix}-x{k}" for k in range(total)]
    lab.add_namespaces(names)
    # A network of its own, large enough for every endpoint (gossip-only: per-host blocks).
    lab.create_network("churn", "10.200.0.0/20")
    run.wait(lambda: all("churn" in run.status(h).networks for h in hosts), 20, "every host knows 'churn'")
    t = time.monotonic()

    def add(k: int) -> str:
        host = churning[k % len(churning)]
        run.admin(host, timeout=60).endpoint_add(network="churn", name=f"x{k}", netns=names[k])
        return host

    with ThreadPoolExecutor(8) as pool:
        owners = list(pool.map(add, range(total)))
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda k: run.admin(owners[k], timeout=60).endpoint_remove(network="churn", name=f"x{k}"),
                range(total),
            )
        )
    rate = 2 * total / (time.monotonic() - t)

    def remove_network() -> bool:  # once h1 has heard of every removal
        run.admin(hosts[0]).network_remove("churn")
        return True

    run.wait(remove_network, 60, "network churn removed", interval=0.2)
    run.converge_s = run.wait(run.all_converged, 120, "every daemon converged")

    def as_before() -> bool:  # every kernel holds exactly what it held before the churn
        return all(set(run.kernel(h)) == set(run.before[run.ns(h)]) for h in hosts)

    run.wait(
        as_before,
        30,
        "every kernel as before the churn",
        describe=lambda: str({h: len(set(run.kernel(h)) ^ set(run.before[run.ns(h)])) for h in hosts}),
    )
    rss1 = {h: run.rss_kib(run.daemon_pid(h)) for h in hosts}
    grew = {h: round(rss1[h] / rss0[h] - 1, 3) for h in hosts}
    run.note(f"{rate:.0f} ops/s; RSS growth {grew}")
    run.check(all(g <= 0.10 for g in grew.values()), f"memory grew more than 10%: {grew}")


SCENARIOS: list[Scenario] = [
    Scenario(1, "KV server paused < TTL", kv_paused, KV_BACKENDS, "etcd", untouched=("h1", "h2", "h3")),
    Scenario(
        2,
        "host cut from KV, gossip on",
        host_cut_from_store,
        KV_BACKENDS,
        "etcd",
        gossip_beside=True,
        untouched=("h1", "h2", "h3"),
    ),
    Scenario(3, "returning host: CAS", returning_host_cas, KV_BACKENDS, "etcd"),
    Scenario(
        4,
        "paused daemon, churn, compaction",
        paused_daemon_churn,
        ALL_BACKENDS,
        "etcd",
        untouched=("h2", "h3"),
    ),
    Scenario(5, "endpoint moved", endpoint_moves, ALL_BACKENDS, "gossip"),
    Scenario(6, "killed while peers delete", killed_while_deleting, ALL_BACKENDS, "gossip"),
    Scenario(7, "leftover and foreign devices", leftover_devices, ("gossip", "etcd"), "gossip"),
    Scenario(8, "underlay flap, veth deleted", underlay_flap_and_veth, ("gossip", "etcd"), "gossip"),
    Scenario(
        9,
        "gossip partition 60 s, rejoin",
        gossip_partition,
        ("gossip", *KV_BACKENDS),
        "etcd",
        gossip_beside=True,
        short_options={"partition_s": 20.0},
    ),
    Scenario(10, "underlay MTU 1450", small_mtu, ("gossip", "etcd"), "gossip", untouched=("h1", "h2")),
    Scenario(
        11,
        "store member killed / restarted",
        store_member_fails,
        KV_BACKENDS,
        "etcd",
        untouched=("h1", "h2", "h3"),
        lab_class=ClusterLab,
    ),
    Scenario(12, "store lost its data", store_data_lost, KV_BACKENDS, "etcd", untouched=("h1", "h2", "h3")),
    Scenario(
        13,
        "churn 1,000 endpoints, 5 hosts",
        churn,
        ALL_BACKENDS,
        "gossip",
        hosts=5,
        untouched=("h1", "h2"),
        short_options={"endpoints": 100},
    ),
]


def by_number(number: int) -> Scenario:
    return next(s for s in SCENARIOS if s.number == number)
