"""Baselines measured in the same run: what the kernel, the network and the store cost alone.

- `Scratch`: a namespace beside the lab's hosts with the devices overlayd
  would make for one network (bridge `ovbr<vni>`, VXLAN `ovvx<vni>`, learning
  off, `proxy`), built with iproute2. The listener watches it like a host.
  There the benchmarks time the kernel alone: one netlink write
  (`write_floor`), `bridge -batch` + `ip -batch` loading many entries
  (`load_batch`), re-creating a deleted device with its entries (`rebuild`).
- `udp_floor`: one UDP datagram from one host namespace to another, over the
  underlay: the least any gossip message costs.
- `kv_floor`: the store's own put -> watch round trip (`bench.kvprobe`, run
  in a host namespace with the daemon's client libraries).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench.procstat import children_cpu_seconds
from overlayd.lab import Lab
from overlayd.lab import netns as nsh
from overlayd.lab.kwatch import FLOOD_MAC, Entry, Fdb, KernelWatch, Link, Neigh

REPO = Path(__file__).resolve().parent.parent
SCRATCH_VTEP = "198.18.0.250"  # in the lab's underlay subnet, used by no host

# One FDB replace and one neighbour replace, packed as the kernel wants them
# (linux/neighbour.h); sent in one sendmsg, as a batching control plane would.
_HDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTM_NEWNEIGH = 28
_F_REQUEST, _F_REPLACE, _F_CREATE = 0x1, 0x100, 0x400
_AF_INET, _AF_BRIDGE = 2, 7
_NUD_NOARP, _NUD_PERMANENT = 0x40, 0x80
_NTF_SELF = 0x02
_NDA_DST, _NDA_LLADDR = 1, 2


def _nla(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _neigh_msg(family: int, ifindex: int, state: int, flags: int, mac: str, dst: bytes) -> bytes:
    body = _NDMSG.pack(family, ifindex, state, flags, 0)
    body += _nla(_NDA_LLADDR, bytes.fromhex(mac.replace(":", ""))) + _nla(_NDA_DST, dst)
    return _HDR.pack(_HDR.size + len(body), _RTM_NEWNEIGH, _F_REQUEST | _F_REPLACE | _F_CREATE, 0, 0) + body


def random_mac(rng: random.Random) -> str:
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def mac_for(n: int, family: int) -> str:
    """A distinct locally administered MAC for entry number n of a family of them."""
    return (
        f"02:{family & 0xFF:02x}:{n >> 24 & 0xFF:02x}:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"
    )


class Scratch:
    """One network's devices in a namespace of the lab's, made with iproute2."""

    def __init__(self, lab: Lab, vni: int, *, name: str = "x") -> None:
        self.ns = f"{lab.prefix}-{name}"
        self.vni = vni
        self.bridge, self.device = f"ovbr{vni}", f"ovvx{vni}"
        lab.add_namespaces([self.ns])
        self._make_devices()
        self._sock: socket.socket | None = None

    def _vxlan_line(self) -> str:
        # As overlayd makes it: learning off, ARP answered from the neighbour entries.
        return (
            f"link add {self.device} type vxlan id {self.vni} dstport 4789 "
            f"local {SCRATCH_VTEP} nolearning proxy"
        )

    def _make_devices(self) -> None:
        lines = [
            f"link add {self.bridge} type bridge",
            self._vxlan_line(),
            f"link set {self.device} master {self.bridge} up",
            f"link set {self.bridge} up",
        ]
        self.ip_batch(lines)

    def ip_batch(self, lines: Sequence[str]) -> None:
        nsh.run(["ip", "-n", self.ns, "-batch", "-"], input="".join(f"{line}\n" for line in lines))

    def fdb_lines(self, fdb: Sequence[tuple[str, str]]) -> list[str]:
        # The flood MAC holds a list of VTEPs: append, where replace would keep only the last.
        return [
            f"fdb {'append' if m == FLOOD_MAC else 'replace'} {m} dev {self.device} dst {d} self permanent"
            for m, d in fdb
        ]

    def neigh_lines(self, neigh: Sequence[tuple[str, str]]) -> list[str]:
        return [f"neigh replace {ip} lladdr {m} dev {self.device} nud permanent" for ip, m in neigh]

    def bridge_batch(self, lines: Sequence[str]) -> None:
        nsh.run(["bridge", "-n", self.ns, "-batch", "-"], input="".join(f"{line}\n" for line in lines))

    def _ifindex(self) -> int:
        return int(nsh.ip_json("link", "show", "dev", self.device, netns=self.ns)[0]["ifindex"])

    def reset(self) -> None:
        """Delete and re-make the devices: an empty table for the next load."""
        self.close_socket()
        self.ip_batch([f"link del {self.device}", f"link del {self.bridge}"])
        self._make_devices()

    def close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- the kernel floor: one write, seen by the listener ---

    def write_floor(self, watch: KernelWatch, samples: int, rng: random.Random) -> list[float]:
        """Seconds from sending one FDB + neighbour replace (one sendmsg) to the listener seeing both."""
        if self._sock is None:
            self._sock = nsh.socket_in_netns(self.ns, socket.AF_NETLINK, socket.SOCK_RAW)
            self._sock.bind((0, 0))
        index = self._ifindex()
        out: list[float] = []
        for i in range(samples):
            mac = random_mac(rng)
            ip = f"10.254.{i // 250}.{i % 250 + 1}"
            dst = socket.inet_aton(SCRATCH_VTEP)
            msg = _neigh_msg(_AF_BRIDGE, index, _NUD_PERMANENT | _NUD_NOARP, _NTF_SELF, mac, dst)
            msg += _neigh_msg(_AF_INET, index, _NUD_PERMANENT, 0, mac, socket.inet_aton(ip))
            exp = watch.expect({self.ns: [Fdb(self.device, mac, SCRATCH_VTEP), Neigh(self.device, ip, mac)]})
            start = time.monotonic()
            self._sock.send(msg)
            out.append(exp.done_at - start if exp.wait(2.0) and exp.done_at is not None else float("inf"))
            time.sleep(0.005)
        return out

    # --- many entries with the batch tools ---

    def load_batch(
        self,
        watch: KernelWatch,
        fdb: Sequence[tuple[str, str]],
        neigh: Sequence[tuple[str, str]],
        timeout: float,
    ) -> tuple[float | None, float]:
        """`bridge -batch` then `ip -batch`: (seconds until the listener saw every entry, tools' CPU s).

        fdb: (mac, dst); neigh: (ip, mac). Timed from just before `bridge` starts.
        """
        wanted: list[Entry] = [Fdb(self.device, m, d) for m, d in fdb]
        wanted += [Neigh(self.device, ip, m) for ip, m in neigh]
        exp = watch.expect({self.ns: wanted})
        cpu0 = children_cpu_seconds()
        start = time.monotonic()
        self.bridge_batch(self.fdb_lines(fdb))
        self.ip_batch(self.neigh_lines(neigh))
        cpu = children_cpu_seconds() - cpu0
        done = exp.wait(timeout) and exp.done_at is not None
        return (exp.done_at - start if done and exp.done_at is not None else None), cpu

    def rebuild(
        self, watch: KernelWatch, fdb: Sequence[tuple[str, str]], neigh: Sequence[tuple[str, str]]
    ) -> float | None:
        """Delete the VXLAN device and make it again with `fdb`/`neigh` entries, with iproute2.

        Seconds from the deletion to the listener seeing the device and every
        entry back: what a repair done by tools costs.
        """
        self.reset()
        self.bridge_batch(self.fdb_lines(fdb))
        self.ip_batch(self.neigh_lines(neigh))
        gone = watch.expect({self.ns: [Link(self.device)]}, present=False)
        wanted: list[Entry] = [Link(self.device)]
        wanted += [Fdb(self.device, m, d) for m, d in fdb] + [Neigh(self.device, ip, m) for ip, m in neigh]
        start = time.monotonic()
        self.ip_batch([f"link del {self.device}"])
        if not gone.wait(5):
            return None
        back = watch.expect({self.ns: wanted})
        self.ip_batch([self._vxlan_line(), f"link set {self.device} master {self.bridge} up"])
        self.bridge_batch(self.fdb_lines(fdb))
        self.ip_batch(self.neigh_lines(neigh))
        return back.done_at - start if back.wait(10) and back.done_at is not None else None


def udp_floor(lab: Lab, samples: int, rng: random.Random) -> list[float]:
    """Seconds for one UDP datagram between two random host namespaces (send -> recv returns)."""
    out: list[float] = []
    hosts = lab.hosts
    for _ in range(samples):
        a, b = rng.sample(hosts, 2) if len(hosts) > 1 else (hosts[0], hosts[0])
        rx = nsh.socket_in_netns(b.netns, socket.AF_INET, socket.SOCK_DGRAM)
        tx = nsh.socket_in_netns(a.netns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rx.bind((b.address, 0))
            rx.settimeout(2.0)
            port = rx.getsockname()[1]
            tx.sendto(b"warm", (b.address, port))  # ARP resolved before the timed one
            rx.recv(64)
            start = time.monotonic()
            tx.sendto(b"x" * 64, (b.address, port))
            rx.recv(128)
            out.append(time.monotonic() - start)
        except TimeoutError:
            out.append(float("inf"))
        finally:
            rx.close()
            tx.close()
    return out


class FloorError(RuntimeError):
    """A floor could not be measured; the message says why."""


def kv_floor(lab: Lab, samples: int) -> list[float]:
    """The store's put -> watch round trip, measured by `bench.kvprobe` inside host h1's namespace."""
    if lab.kv is None:
        raise FloorError("gossip-only lab has no KV store")
    parts = urlsplit(lab.kv.url)
    prefix = f"/{lab.prefix}/probe/"
    argv = nsh.exec_argv(
        lab.hosts[0].netns,
        [
            sys.executable,
            "-m",
            "bench.kvprobe",
            *("--store", lab.store, "--server", f"{parts.hostname}:{parts.port}"),
            *("--prefix", prefix, "--samples", str(samples)),
        ],
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as exc:
        raise FloorError("kv probe did not finish in 120 s") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FloorError(f"kv probe failed: {tail}")
    values: list[float] = json.loads(done.stdout)["samples"]
    return values
