"""`overlayctl doctor`: checks an operator runs on a host, each OK, WARN or FAIL with a hint.

Client side only, like the rest of overlayctl: what the daemon knows comes
through the admin API (`AdminClient`), what the host knows comes from /proc,
/sys and iproute2 in the namespace the command runs in, which is the host's
(run it in a lab host's namespace with `ip netns exec` to check that host).
Nothing here changes the host: the VXLAN probe, when needed, runs in a
throwaway network namespace (`unshare --net`) that dies with the probe.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from overlayd.api import schema
from overlayd.api.client import AdminClient, ClientError

OK, WARN, FAIL = "OK", "WARN", "FAIL"

VXLAN_PORT = 4789
DEFAULT_GOSSIP_PORT = 7946
VXLAN_OVERHEAD = 50
# Duplicated from dataplane.kstate on purpose (the CLI imports nothing of the daemon).
_OWN_VXLAN_PREFIX, _OWN_ALIAS_PREFIX = "ovvx", "overlayd:"
# A peer that started this far in our future has a clock that is ahead at least that much.
_SKEW_FAIL = 1.0
# Measured offsets: NTP keeps hosts within milliseconds, so half a second means no NTP; at
# 5 s, conflicts between hosts are ordered wrongly; gossip refuses frames beyond its max_skew.
_SKEW_WARN, _SKEW_BAD = 0.5, 5.0
_GOSSIP_MAX_SKEW = 60.0  # GossipConfig.max_skew (clients import nothing of the daemon)
_STORE_SLOW = 0.5  # seconds for one read of the cluster view


@dataclass(frozen=True)
class Check:
    check: str
    result: str  # OK, WARN or FAIL
    message: str
    hint: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# --- the host ---------------------------------------------------------------


def check_socket(path: str) -> Check:
    name = "admin socket"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Check(name, FAIL, f"{path} does not exist", "is overlayd running? `systemctl status overlayd`")
    except OSError as exc:
        return Check(name, FAIL, f"cannot stat {path}: {exc.strerror}")
    if not stat.S_ISSOCK(st.st_mode):
        return Check(name, FAIL, f"{path} is not a socket", "remove it and restart overlayd")
    mode = stat.S_IMODE(st.st_mode)
    problems = []
    if mode & 0o077:
        problems.append(f"mode {mode:04o} lets others connect")
    if st.st_uid != 0:
        problems.append(f"owned by uid {st.st_uid}, not root")
    if problems:
        return Check(
            name,
            FAIL,
            f"{path}: {'; '.join(problems)}",
            "the admin API can create and delete endpoints: it must be root-only (mode 0600); "
            "overlayd makes it so, so something else changed it",
        )
    return Check(name, OK, f"{path}: mode {mode:04o}, owned by root")


def check_vxlan() -> Check:
    """Kernel VXLAN support: the module is loaded, or a device can be made in a throwaway netns."""
    if Path("/sys/module/vxlan").exists():
        return Check("kernel vxlan", OK, "vxlan module loaded")
    return probe_vxlan()


def probe_vxlan() -> Check:
    """Create a VXLAN device in a network namespace that exists only for this command."""
    name = "kernel vxlan"
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return Check(name, WARN, "cannot probe for VXLAN support (needs unshare and ip)", "modprobe vxlan")
    argv = [
        unshare,
        "--net",
        "--",
        ip,
        "link",
        "add",
        "ovdoctor0",
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "0",
    ]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(name, WARN, f"the VXLAN probe did not run: {exc}", "modprobe vxlan")
    if result.returncode == 0:
        return Check(name, OK, "a VXLAN device can be created (the module loads on demand)")
    return Check(
        name,
        FAIL,
        f"cannot create a VXLAN device: {result.stderr.strip() or f'exit {result.returncode}'}",
        "`modprobe vxlan`; the kernel needs CONFIG_VXLAN (and the probe needs root)",
    )


def _listeners(port: int) -> list[tuple[str, int]]:
    """(protocol, socket inode) of every socket bound to `port` in this namespace."""
    found = []
    for proto in ("udp", "udp6", "tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            # TCP: only listening sockets (state 0A); UDP: every bound socket.
            if local_port == port and (proto.startswith("udp") or fields[3] == "0A"):
                found.append((proto.rstrip("6"), int(fields[9])))
    return found


def _socket_owners(inodes: Iterable[int]) -> dict[int, int]:
    """inode -> pid of a process holding that socket open (kernel sockets have none)."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners: dict[int, int] = {}
    if not wanted:
        return owners
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in wanted:
                owners.setdefault(wanted[target], int(proc.name))
    return owners


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _vxlan_devices() -> list[dict[str, Any]]:
    """VXLAN devices in this namespace: name, alias, UDP port (empty if ip fails)."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    result = subprocess.run(
        [ip, "-j", "-d", "link", "show", "type", "vxlan"], capture_output=True, text=True, check=False
    )
    try:
        links = json.loads(result.stdout or "[]")
    except ValueError:
        return []
    out = []
    for link in links:
        data = link.get("linkinfo", {}).get("info_data", {})
        out.append({"name": link.get("ifname", "?"), "alias": link.get("ifalias"), "port": data.get("port")})
    return out


def check_vxlan_port(port: int = VXLAN_PORT) -> Check:
    name = f"udp {port}"
    bound = [inode for proto, inode in _listeners(port) if proto == "udp"]
    if not bound:
        return Check(name, OK, "free (overlayd's VXLAN devices bind it with the first network)")
    owners = _socket_owners(bound)
    if owners:
        held = ", ".join(f"pid {pid} ({_comm(pid)})" for pid in sorted(set(owners.values())))
        return Check(
            name,
            FAIL,
            f"held by a process: {held}",
            f"VXLAN needs UDP {port} for the kernel; stop that process",
        )
    devices = [d for d in _vxlan_devices() if d["port"] == port]
    ours = [d["name"] for d in devices if _is_own_vxlan(d)]
    others = [d["name"] for d in devices if not _is_own_vxlan(d)]
    if others:
        return Check(
            name,
            WARN,
            f"shared with VXLAN devices not made by overlayd: {', '.join(others)}",
            "another overlay (flannel, Docker) on this host: the kernel splits traffic by VNI, "
            "so its VNIs and overlayd's must not overlap",
        )
    if ours:
        return Check(name, OK, f"held by overlayd's VXLAN devices ({', '.join(sorted(ours))})")
    return Check(name, OK, "held by the kernel (VXLAN)")


def _is_own_vxlan(device: dict[str, Any]) -> bool:
    alias = device.get("alias") or ""
    return str(device["name"]).startswith(_OWN_VXLAN_PREFIX) and alias.startswith(_OWN_ALIAS_PREFIX)


def check_gossip_port(port: int, daemon_pid: int | None, configured: bool) -> Check:
    name = f"gossip port {port}"
    sockets = _listeners(port)
    if not sockets:
        if configured:
            return Check(name, FAIL, "nobody listens, but overlayd is configured to gossip on it")
        return Check(name, OK, "free")
    owners = _socket_owners(inode for _, inode in sockets)
    pids = sorted(set(owners.values()))
    if pids and all(pid == daemon_pid for pid in pids):
        return Check(name, OK, f"held by overlayd (pid {daemon_pid})")
    held = ", ".join(f"pid {pid} ({_comm(pid)})" for pid in pids if pid != daemon_pid) or "the kernel"
    return Check(
        name,
        FAIL,
        f"held by {held}",
        "7946 is also the port of Docker Swarm, Serf and memberlist: stop that or move overlayd's gossip",
    )


# --- what the daemon knows --------------------------------------------------


def check_daemon(status: schema.Status | None, error: str | None) -> Check:
    if status is None:
        return Check(
            "daemon", FAIL, error or "no answer", "`systemctl status overlayd`; `journalctl -u overlayd`"
        )
    if status.ready:
        return Check("daemon", OK, f"node {status.node}: {status.summary or 'ready'}")
    return Check(
        "daemon",
        WARN,
        f"node {status.node} not ready yet: {status.summary or 'first reconcile pending'}",
        "it becomes ready after its first reconcile against the store",
    )


def check_mtu(status: schema.Status, networks: Sequence[schema.NetworkListItem]) -> Check:
    name = "mtu"
    underlay = status.underlay
    if underlay is None:
        return Check(name, WARN, "underlay MTU unknown (daemon has no underlay yet)")
    mtu = underlay.mtu
    room = mtu - VXLAN_OVERHEAD
    too_big = {n.name: n.mtu for n in networks if n.mtu is not None and n.mtu > room}
    where = f"underlay {underlay.interface} MTU {mtu}"
    if too_big:
        asked = ", ".join(f"{net} ({value})" for net, value in sorted(too_big.items()))
        return Check(
            name,
            FAIL,
            f"{where} leaves {room} for overlay frames, but networks ask for more: {asked}",
            f"raise the underlay MTU to {max(too_big.values()) + VXLAN_OVERHEAD} or recreate those "
            f"networks with --mtu {room} or less (or without --mtu: derived from the underlay)",
        )
    if room < 1280:
        return Check(name, WARN, f"{where}: overlay frames get only {room} bytes", "IPv6 needs 1280")
    return Check(name, OK, f"{where}: networks get {room} (or their own, smaller MTU)")


def check_gateway_tools(
    networks: Sequence[schema.NetworkListItem], which: Callable[[str], str | None] = shutil.which
) -> Check:
    """Networks with egress or in routed mode need nftables (and `ip`, `nsenter`) on this host."""
    name = "gateway tools"
    needing = sorted(n.name for n in networks if n.egress != "none" or n.mode != "vxlan")
    if not needing:
        return Check(name, OK, "no network has egress or routed mode")
    missing = [tool for tool in ("nft", "ip", "nsenter") if which(tool) is None]
    if missing:
        return Check(
            name,
            FAIL,
            f"{', '.join(missing)} not found, but networks {', '.join(needing)} need it for their gateways",
            "install nftables, iproute2 and util-linux",
        )
    return Check(name, OK, f"nft, ip and nsenter found (for {', '.join(needing)})")


def check_clock(peers: Sequence[schema.Peer], now: float) -> Check:
    """Clock skew against peers, from the offsets gossip measures on each probe.

    Each offset is the peer's clock minus ours, measured NTP-style to within half a round
    trip (well under a millisecond on a LAN), so the thresholds are about the clocks, not
    the measurement. Skew matters because conflicting claims (an address taken on two
    hosts) are ordered by their owners' clocks, and gossip drops datagrams stamped more
    than _GOSSIP_MAX_SKEW seconds off: NTP keeps hosts within milliseconds.
    """
    name = "clock skew"
    others = [p for p in peers if not p.self]
    if not others:
        return Check(name, OK, "no peers to compare with")
    offsets = {p.name: p.clock_offset for p in others if p.clock_offset is not None}
    ntp = "run NTP (chrony or systemd-timesyncd) on every host"
    if offsets:
        worst = max(offsets, key=lambda k: abs(offsets[k]))
        skew = offsets[worst]
        result = OK if abs(skew) < _SKEW_WARN else WARN if abs(skew) < _SKEW_BAD else FAIL
        ahead = "ahead of" if skew >= 0 else "behind"
        amount = f"{abs(skew) * 1e3:.1f} ms" if abs(skew) < 1 else f"{abs(skew):.1f} s"
        message = f"{worst}'s clock is {amount} {ahead} this host's (the largest of {len(offsets)} measured)"
        if result == OK:
            return Check(name, OK, message)
        hint = f"{ntp}; conflicting claims are ordered by the owners' clocks"
        if abs(skew) >= _GOSSIP_MAX_SKEW:
            hint = f"{ntp}; gossip drops datagrams more than {_GOSSIP_MAX_SKEW:.0f} s off, so it is cut off"
        return Check(name, result, message, hint)
    # Without measurements, a peer that started "in the future" still proves its clock is ahead.
    started_ahead = {
        p.name: p.started_at - now
        for p in others
        if p.started_at is not None and p.started_at - now > _SKEW_FAIL
    }
    if started_ahead:
        worst = max(started_ahead, key=lambda k: started_ahead[k])
        return Check(
            name,
            FAIL,
            f"peer {worst} started {started_ahead[worst]:.1f}s in this host's future: its clock is ahead",
            ntp,
        )
    if any(p.state is not None for p in others):  # the daemon gossips: offsets come with its probes
        return Check(
            name,
            WARN,
            "no peer's clock measured yet (gossip probes each peer in turn)",
            "try again in a minute",
        )
    return Check(
        name,
        WARN,
        "not measured: gossip is off, and it is what measures peers' clocks",
        "check NTP on every host by hand (chronyc tracking, timedatectl)",
    )


def check_store(status: schema.Status, probe: schema.StoreProbe | None, error: str | None) -> Check:
    url = status.store.url
    name = "kv store"
    hint = f"is the store at {url} running and reachable from this host? (store.url in the config)"
    if probe is None:
        return Check(name, FAIL, f"{url}: probe failed: {error}", hint)
    if not probe.ok:
        return Check(name, FAIL, f"{url}: {probe.error}", hint)
    latency = probe.latency_ms or 0.0
    message = f"{url} answers: reading the cluster view took {latency:.1f} ms"
    if latency > _STORE_SLOW * 1000:
        return Check(name, WARN, message, "a slow store delays every change; check its disk and network")
    return Check(name, OK, message)


def check_warnings(status: schema.Status) -> Check:
    if not status.warnings:
        return Check("daemon warnings", OK, "none")
    return Check("daemon warnings", WARN, "; ".join(status.warnings), "the daemon said this at start; fix it")


def check_store_data(status: schema.Status) -> Check:
    name = "kv store data"
    if status.store.data_loss is None:
        return Check(name, OK, "the store has not lost data since this daemon started")
    return Check(
        name,
        WARN,
        f"the store lost its data: {status.store.data_loss}; this host kept its dataplane and "
        "re-published its node, endpoints and the networks it knew",
        "find out why the store lost its data (a wiped data directory, a restore from an older "
        "backup); check `overlayctl network ls` and `endpoint ls` on every host",
    )


def check_reconcile(status: schema.Status, diff: schema.Diff | None, error: str | None) -> Check:
    name = "reconcile"
    if diff is None:
        return Check(name, WARN, f"cannot compare kernel and desired state: {error}")
    failed = status.last_reconcile.failed if status.last_reconcile is not None else 0
    if diff.changes:
        return Check(
            name,
            WARN,
            f"{len(diff.changes)} change(s) pending (last pass: {failed} failed)",
            "`overlayctl diff` lists them; `overlayctl status` shows the kernel's errors",
        )
    return Check(name, OK, "the kernel matches the desired state")


# --- all of it --------------------------------------------------------------


def run_checks(client: AdminClient, *, gossip_port: int | None = None) -> list[Check]:
    """Every check, in the order an operator would look (never raises ClientError)."""
    checks = [check_vxlan(), check_vxlan_port(), check_socket(client.socket_path)]
    try:
        status = client.status()
    except ClientError as exc:
        checks.append(check_daemon(None, exc.message))
        gossip = gossip_port or DEFAULT_GOSSIP_PORT
        checks.append(check_gossip_port(gossip, None, configured=False))
        return checks
    checks.append(check_daemon(status, None))
    checks.append(check_warnings(status))
    gossiping = status.gossip
    port = gossip_port or (gossiping.port if gossiping is not None else DEFAULT_GOSSIP_PORT)
    checks.append(check_gossip_port(port, status.pid, configured=gossiping is not None))
    try:
        networks = client.network_list()
        checks.append(check_mtu(status, networks))
        checks.append(check_gateway_tools(networks))
    except ClientError as exc:
        checks.append(Check("mtu", WARN, f"cannot list networks: {exc.message}"))
    try:
        checks.append(check_clock(client.peers(), time.time()))
    except ClientError as exc:
        checks.append(Check("clock skew", WARN, f"cannot list peers: {exc.message}"))
    try:
        checks.append(check_store(status, client.store_probe(), None))
        checks.append(check_store_data(status))
    except ClientError as exc:
        checks.append(check_store(status, None, exc.message))
    try:
        checks.append(check_reconcile(status, client.diff(), None))
    except ClientError as exc:
        checks.append(check_reconcile(status, None, exc.message))
    return checks
