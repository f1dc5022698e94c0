"""The lab the join and idle benchmarks share: 3 hosts on etcd (watch only), hosts appearing by store writes.

A joining host is only records: its node record (VTEP: a lab underlay
address no namespace uses) and its endpoints with their address claims, in
overlayd's key layout and bytes (`overlayd.store.keys`, `overlayd.core.model`),
bound to one etcd lease and written at once through etcd's gateway. Every
lab host has an endpoint of its own in network `bench` (a /16), so each
programs the joiner's entries: per endpoint an FDB entry (MAC -> joiner's
VTEP) and a neighbour entry (IP -> MAC), plus one flood entry.

Gossip stays off here: the records reach the daemons by the store's watch
only, so the figures are about the store path and the kernel work.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bench import procstat, promtext
from bench.common import expected_view, vxlan_device
from bench.context import Context
from bench.etcdgw import EtcdGateway
from bench.floors import Scratch, mac_for
from overlayd.core.model import Endpoint, Node
from overlayd.lab import Lab
from overlayd.lab.kwatch import FLOOD_MAC, Entry, Expectation, Fdb, KernelWatch, Neigh
from overlayd.lab.lab import ETCD_CLIENT_PORT, KV_ADDRESS, host_address
from overlayd.store.keys import KeyLayout, encode

KEY = "j3"
NETWORK, SUBNET = "bench", IPv4Network("10.200.0.0/16")
BLOCK = 16384  # addresses per joiner; block 0 is left to the daemons' own allocations
LEASE_TTL = 900


@dataclass
class Joiner:
    name: str
    vtep: str
    entries: list[tuple[str, str]]  # (ip, mac)
    lease: int = 0

    def fdb(self) -> list[tuple[str, str]]:
        """(mac, dst) as a host holds them, the flood entry included."""
        return [(mac, self.vtep) for _ip, mac in self.entries] + [(FLOOD_MAC, self.vtep)]

    def neigh(self) -> list[tuple[str, str]]:
        return list(self.entries)

    def kernel_entries(self, device: str) -> list[Entry]:
        out: list[Entry] = [Fdb(device, mac, dst) for mac, dst in self.fdb()]
        return out + [Neigh(device, ip, mac) for ip, mac in self.entries]


@dataclass
class IdleStats:
    """The daemons over one quiet window: CPU per minute, RSS, and their own reconcile timings."""

    window: float
    cpu_per_min: dict[str, float] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    incremental: dict[str, promtext.Passes | None] = field(default_factory=dict)
    full: dict[str, promtext.Passes | None] = field(default_factory=dict)
    full_cumulative: dict[str, promtext.Passes | None] = field(default_factory=dict)
    unlabelled: dict[str, promtext.Passes | None] = field(default_factory=dict)


class JoinLab:
    def __init__(self, ctx: Context, lab: Lab) -> None:
        self.ctx = ctx
        self.lab = lab
        record = lab.create_network(NETWORK, str(SUBNET), via=lab.hosts[0])
        self.vni = int(record.vni)
        self.device = vxlan_device(self.vni)
        self.anchors = [lab.add_endpoint(h, f"{h.name}-ja", network=NETWORK) for h in lab.hosts]
        self.layout = KeyLayout(lab.store_prefix)
        self.gateway = EtcdGateway(lab.kv_ns, KV_ADDRESS, ETCD_CLIENT_PORT)
        self.network_value = self._read(self.layout.network(NETWORK))
        self.scratch = Scratch(lab, self.vni, name="xj")
        self.watch: KernelWatch = ctx.watch([h.netns for h in lab.hosts] + [self.scratch.ns])
        self.joiners = 0
        self.loaded: Joiner | None = None
        self.idle_base: IdleStats | None = None
        if not self.watch.expect(expected_view(lab, self.anchors, self.device)).wait(20.0):
            ctx.say("join lab: anchors not programmed everywhere after 20 s; going on")

    def _read(self, key: str) -> bytes:
        data = self.gateway.call("/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()})
        kvs = data.get("kvs") or []
        if not kvs:
            raise RuntimeError(f"etcd has no {key}")
        return base64.b64decode(kvs[0]["value"])

    # --- joiners ---

    def joiner(self, size: int) -> Joiner:
        """A new joiner's identity and `size` endpoints (distinct IPs, MACs, VTEP)."""
        index = self.joiners
        self.joiners += 1
        base = int(SUBNET.network_address) + (index + 1) * BLOCK
        if size >= BLOCK or (index + 2) * BLOCK > SUBNET.num_addresses:
            raise ValueError(f"joiner {index} with {size} endpoints does not fit in {SUBNET}")
        entries = [(str(IPv4Address(base + n + 1)), mac_for(n, 0x40 + index)) for n in range(size)]
        vtep = host_address(len(self.lab.hosts) + 1 + index)
        return Joiner(f"bj{index}", vtep, entries)

    def write(self, joiner: Joiner) -> tuple[float, float, int]:
        """Write the joiner's records at once: (monotonic start, seconds to write, transactions)."""
        now = time.time()
        node = Node(joiner.name, IPv4Address(joiner.vtep), now)
        items: list[tuple[bytes, bytes]] = []
        for n, (ip, mac) in enumerate(joiner.entries):
            ep = Endpoint(NETWORK, f"{joiner.name}-e{n}", IPv4Address(ip), mac, joiner.name, 1, now)
            items.append((self.layout.endpoint(NETWORK, ep.name).encode(), encode(ep)))
            items.append((self.layout.ip_claim(NETWORK, ep.ip).encode(), ep.key.encode()))
        joiner.lease = self.gateway.grant(LEASE_TTL)
        start = time.monotonic()
        # The node record first, so its VTEP is known before its endpoints arrive.
        self.gateway.put(self.layout.node(joiner.name).encode(), encode(node), lease=joiner.lease)
        txns = self.gateway.put_many(items, lease=joiner.lease)
        return start, time.monotonic() - start, txns + 1

    def expect(self, joiner: Joiner, *, present: bool = True) -> Expectation:
        entries = joiner.kernel_entries(self.device)
        return self.watch.expect({h.netns: entries for h in self.lab.hosts}, present=present)

    def leave(self, joiner: Joiner, timeout: float) -> bool:
        """Revoke the joiner's lease (etcd deletes its records); True once every kernel dropped them."""
        gone = self.expect(joiner, present=False)
        self.gateway.revoke(joiner.lease)
        if self.loaded is joiner:
            self.loaded = None
        return gone.wait(timeout)

    # --- the daemons ---

    def pids(self) -> dict[str, int]:
        return {h.name: h.proc.pid for h in self.lab.hosts if h.proc is not None}

    def cpu(self) -> dict[str, float]:
        return {name: procstat.sample(pid).cpu_seconds for name, pid in self.pids().items()}

    def rss(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.pids().items():
            rss = procstat.sample(pid).rss_mb
            if rss is not None:
                out[name] = rss
        return out

    def metrics(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for h in self.lab.hosts:
            status, body = self.lab.status_get(h, "/metrics")
            out[h.name] = body.decode(errors="replace") if status == 200 else ""
        return out

    def idle(self, window: float, *, nudges: int = 3) -> IdleStats:
        """Watch the daemons over `window` seconds of quiet.

        `nudges` times in the window the network record is written again with
        the same bytes: every daemon sees a change that changes nothing, the
        trigger of an incremental no-op pass.
        """
        stats = IdleStats(window)
        before_text, before_cpu = self.metrics(), self.cpu()
        start = time.monotonic()
        for k in range(nudges):
            time.sleep(max(0.0, start + window * (k + 1) / (nudges + 1) - time.monotonic()))
            self.gateway.put(self.layout.network(NETWORK).encode(), self.network_value)
        time.sleep(max(0.0, start + window - time.monotonic()))
        elapsed = time.monotonic() - start
        after_text, after_cpu = self.metrics(), self.cpu()
        stats.rss_mb = self.rss()
        for name, cpu in after_cpu.items():
            stats.cpu_per_min[name] = (cpu - before_cpu.get(name, cpu)) / elapsed * 60.0
            stats.incremental[name] = _delta(after_text[name], before_text[name], "incremental")
            stats.full[name] = _delta(after_text[name], before_text[name], "full")
            stats.full_cumulative[name] = promtext.reconcile_passes(after_text[name], "full")
            now, then = (
                promtext.unlabelled_passes(after_text[name]),
                promtext.unlabelled_passes(before_text[name]),
            )
            stats.unlabelled[name] = now.minus(then) if now is not None and then is not None else now
        return stats

    def dump_seconds(self) -> float:
        """iproute2 reading one host's tables for the device (the least a full verify must do)."""
        ns = self.lab.hosts[0].netns
        start = time.monotonic()
        self.lab.exec(ns, ["bridge", "fdb", "show", "dev", self.device])
        self.lab.exec(ns, ["ip", "neigh", "show", "dev", self.device])
        return time.monotonic() - start

    def close(self) -> None:
        self.ctx.unwatch(self.watch)
        self.scratch.close_socket()


def _delta(after: str, before: str, kind: str) -> promtext.Passes | None:
    now, then = promtext.reconcile_passes(after, kind), promtext.reconcile_passes(before, kind)
    if now is None:
        return None
    return now.minus(then) if then is not None else now


def take(ctx: Context, lab: Lab) -> JoinLab:
    """The join lab handed over with `lab`, or a new one prepared on it."""
    found = ctx.handoff.get(KEY)
    if isinstance(found, JoinLab) and found.lab is lab:
        return found
    joinlab = JoinLab(ctx, lab)
    ctx.handoff[KEY] = joinlab
    return joinlab
