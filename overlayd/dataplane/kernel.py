"""Netlink: the one place where overlayd reads and writes the kernel.

`Kernel` owns two netlink sockets in one network namespace:

- a pyroute2 `AsyncIPRoute` for the few link writes that carry nested
  attributes pyroute2 encodes well (bridges and VXLAN devices);
- an `Rtnl` (a raw NETLINK_ROUTE socket, `dataplane.rtnl`) with messages
  packed by `dataplane.netlink`, for the bulk: the dumps `observe()` reads,
  the FDB / neighbour batches `execute()` writes, and a new endpoint's veth.
  pyroute2 costs 100-200 us per entry: measured here, one awaited `fdb()`
  call per entry ran ~5k entries/s, pyroute2's `nlm_request_batch` ~8.7k/s,
  and dumping 10,000 FDB entries took ~380 ms. Hand-packed batches run
  ~150-200k entries/s (`bridge -batch` ~90k/s in the same runs), and
  `observe()` reads 20,000 entries in ~60 ms plus GC pauses.

Ownership: a link is ours only if `kstate.is_ours(name, alias)`; entries are
ours only on our VXLAN devices. `observe()` sees nothing else, and every
write checks the target first, so foreign objects are never touched.

Errors: `execute()` never raises for one failing operation; each command gets
an `OpResult` whose `error` says what the kernel said. Unknown command types
raise `TypeError` before anything is applied.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, NamedTuple, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from overlayd.dataplane import netlink as nl
from overlayd.dataplane.commands import (
    AnnounceArp,
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
from overlayd.dataplane.kstate import (
    VXLAN_PREFIX,
    BridgeSpec,
    KernelState,
    PortSpec,
    VxlanSpec,
    link_alias,
)
from overlayd.dataplane.mirror import Mirror
from overlayd.dataplane.netlink import LinkInfo, gratuitous_arp
from overlayd.dataplane.nsock import netns_path, socket_in_netns
from overlayd.dataplane.rtnl import LOST, KernelError, Rtnl
from overlayd.util.metrics import Metrics

__all__ = [
    "Kernel",
    "KernelError",
    "LinkInfo",
    "OpResult",
    "Underlay",
    "error_text",
    "gratuitous_arp",
    "netns_path",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Underlay:
    """The host's underlay: where VXLAN packets leave, and how big they may be."""

    ifname: str
    address: IPv4Address
    mtu: int


class OpResult(NamedTuple):
    """Outcome of one command: `error` is None when the kernel applied it."""

    command: Command
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def open_iproute(netns: str | None) -> Any:
    """An AsyncIPRoute in `netns` (None: this namespace), without pyroute2's fork.

    groups=0: never subscribe to notifications nobody reads (they would pile
    up in pyroute2's queue). ext_ack: errors carry the kernel's reason.
    """
    if netns is None:
        return AsyncIPRoute(groups=0, ext_ack=True)
    # SOCK_DGRAM: pyroute2 hands the socket to asyncio as a datagram transport.
    sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    return AsyncIPRoute(fileno=sock.detach(), groups=0, ext_ack=True)


def error_text(exc: BaseException) -> str:
    """One line for an error from netlink or from overlayd's own checks."""
    if isinstance(exc, NetlinkError):
        detail = str(exc.args[1]) if len(exc.args) > 1 and exc.args[1] else ""
        return _errno_text(exc.code, detail)
    return str(exc) or repr(exc)


def error_code_text(code: int, detail: str = "") -> str:
    """One line for a kernel error code from a batch answer (LOST: the answer never came)."""
    if code == LOST:
        return detail or "outcome unknown (acknowledgement lost)"
    return _errno_text(code, detail)


def _errno_text(code: int, detail: str = "") -> str:
    """'<strerror> (errno N)', plus the kernel's extended-ack explanation if any."""
    text = f"{os.strerror(code)} (errno {code})"
    return f"{text}: {detail}" if detail and detail != os.strerror(code) else text


class Kernel:
    """Netlink access to one network namespace (the current one by default).

    Use as `async with Kernel(metrics=m) as kernel:`. Not safe to share
    between event loops; within one loop, calls may run concurrently.
    """

    def __init__(self, *, metrics: Metrics | None = None, netns: str | None = None) -> None:
        self._metrics = metrics
        self._netns = netns
        self._ipr: Any = None
        self._rtnl: Rtnl | None = None
        self._packet: socket.socket | None = None

    @property
    def netns(self) -> str | None:
        return self._netns

    async def __aenter__(self) -> Kernel:
        self._open()
        return self

    def _open(self) -> None:
        # Synchronous on purpose: it happens once, at startup.
        if self._netns is not None and not os.path.exists(netns_path(self._netns)):
            raise KernelError(f"network namespace {self._netns} does not exist")
        try:
            self._rtnl = Rtnl.open(self._netns)
            # groups=0: never subscribe to notifications nobody reads (they
            # would pile up in pyroute2's queue); flags=0: never create a netns.
            # ext_ack: errors carry the kernel's reason, not just an errno.
            self._ipr = open_iproute(self._netns)
        except BaseException as exc:
            self._close()
            if isinstance(exc, OSError):
                where = self._netns or "this namespace"
                raise KernelError(f"cannot open netlink in {where}: {exc}") from exc
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._packet is not None:
            self._packet.close()
            self._packet = None
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    @property
    def ipr(self) -> Any:
        """The pyroute2 AsyncIPRoute, for link writes in `dataplane` modules only."""
        if self._ipr is None:
            raise RuntimeError("Kernel is not open (use `async with Kernel()`)")
        return self._ipr

    @property
    def rtnl(self) -> Rtnl:
        """The raw netlink socket, for batched writes in `dataplane` modules only."""
        return self._raw

    @property
    def _raw(self) -> Rtnl:
        if self._rtnl is None:
            raise RuntimeError("Kernel is not open (use `async with Kernel()`)")
        return self._rtnl

    # --- reading ---------------------------------------------------------------

    async def _dump(
        self, msg_type: int, body: bytes, parse: Callable[[bytes, int, int], T | None]
    ) -> list[T]:
        try:
            return await self._raw.query(msg_type, body, parse)
        except NetlinkError as exc:
            raise KernelError(f"netlink dump (type {msg_type}): {error_text(exc)}") from exc

    async def links(self) -> list[LinkInfo]:
        """Every link in the namespace (ours or not)."""
        return await self._dump(nl.RTM_GETLINK, nl.IFINFOMSG.pack(0, 0, 0, 0, 0), nl.parse_link)

    async def link(self, ifname: str) -> LinkInfo | None:
        """One link by name, or None if there is none."""
        if not ifname or len(ifname.encode()) > nl.IFNAMSIZ:
            return None  # no such name can exist; the kernel would say EINVAL/ERANGE
        name = ifname.encode() + b"\0"
        nla = nl.NLA.pack(4 + len(name), nl.IFLA_IFNAME) + name + bytes(-len(name) % 4)
        try:
            found = await self._raw.query(
                nl.RTM_GETLINK, nl.IFINFOMSG.pack(0, 0, 0, 0, 0) + nla, nl.parse_link, dump=False
            )
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise KernelError(f"cannot read link {ifname}: {error_text(exc)}") from exc
        return found[0] if found else None

    async def underlay(self, *, interface: str | None, address: IPv4Address | None) -> Underlay:
        """The underlay from an interface name and/or the VTEP address it holds.

        With only an interface, the VTEP address is its first IPv4 address;
        with only an address, the interface is the one holding it; with both,
        they must agree. The MTU is the interface's: overlay MTUs derive from it.
        """
        addrs = await self._dump(nl.RTM_GETADDR, nl.IFADDRMSG.pack(nl.AF_INET, 0, 0, 0, 0), nl.parse_addr)
        links = {link.index: link for link in await self.links()}
        if interface is None:
            if address is None:
                raise KernelError("underlay: give an interface, a VTEP address, or both")
            holders = [index for index, ip in addrs if ip == address and index in links]
            if not holders:
                raise KernelError(f"no interface holds the VTEP address {address}")
            dev = links[holders[0]]
            return Underlay(ifname=dev.ifname, address=address, mtu=dev.mtu)
        found = next((lk for lk in links.values() if lk.ifname == interface), None)
        if found is None:
            raise KernelError(f"underlay interface {interface} does not exist")
        on_dev = [ip for index, ip in addrs if index == found.index]
        if address is None:
            if not on_dev:
                raise KernelError(f"underlay interface {interface} has no IPv4 address")
            address = on_dev[0]
        elif address not in on_dev:
            held = ", ".join(map(str, on_dev)) or "none"
            raise KernelError(
                f"VTEP address {address} is not on underlay interface {interface} "
                f"(its IPv4 addresses: {held})"
            )
        return Underlay(ifname=found.ifname, address=address, mtu=found.mtu)

    async def dump(self) -> tuple[list[LinkInfo], list[nl.RawNeigh], list[nl.RawNeigh]]:
        """Every link, bridge FDB entry and IPv4 neighbour entry in the namespace, unparsed.

        The neighbour tables are read only if one of our VXLAN devices exists:
        entries are ours only on those.
        """
        links = await self.links()
        if not any(link.kind == "vxlan" and link.ours for link in links):
            return links, [], []
        fdb = await self._dump(nl.RTM_GETNEIGH, nl.NDMSG.pack(nl.AF_BRIDGE, 0, 0, 0, 0), nl.parse_neigh)
        neigh = await self._dump(nl.RTM_GETNEIGH, nl.NDMSG.pack(nl.AF_INET, 0, 0, 0, 0), nl.parse_neigh)
        return links, fdb, neigh

    async def observe(self) -> KernelState:
        """What overlayd owns in the kernel now, in the shape of the desired state."""
        mirror = Mirror()
        mirror.load(*await self.dump())
        return mirror.tables.state()

    # --- writing ---------------------------------------------------------------

    async def execute(self, commands: Sequence[Command]) -> list[OpResult]:
        """Apply commands in order; one result per command, in the same order.

        Consecutive entry commands go to the kernel as one batch; link
        commands run one at a time between batches, so an entry never goes
        ahead of the device it needs. Announcements go out after everything
        else in this call: by then the entries that make the announced
        address reachable are in place.
        """
        for cmd in commands:
            if not isinstance(cmd, _KNOWN_COMMANDS):
                raise TypeError(f"the kernel executor does not know {cmd!r}")
        results: list[OpResult | None] = [None] * len(commands)
        pending: list[int] = []  # positions of entry commands waiting for their batch
        announcements: list[int] = []
        for i, cmd in enumerate(commands):
            if isinstance(cmd, AnnounceArp):
                announcements.append(i)
            elif isinstance(cmd, _ENTRY_COMMANDS):
                pending.append(i)
            else:
                if pending:
                    await self._apply_batch(commands, pending, results)
                    pending = []
                results[i] = await self._apply_link(cmd)
        if pending:
            await self._apply_batch(commands, pending, results)
        for i in announcements:
            results[i] = self._announce(commands[i])  # type: ignore[arg-type]
        done = [r for r in results if r is not None]
        if self._metrics is not None:
            # One counter update per (kind, result), not per command: labels() costs microseconds.
            tally = Counter((r.command.op.value, r.error is None) for r in done)
            for (kind, ok), count in tally.items():
                self._metrics.kernel_ops.labels(kind=kind, result="ok" if ok else "error").inc(count)
        return done

    async def _apply_batch(
        self, commands: Sequence[Command], positions: list[int], results: list[OpResult | None]
    ) -> None:
        batch: list[_EntryCommand] = [commands[i] for i in positions]  # type: ignore[misc]
        for i, result in zip(positions, await self._apply_entries(batch), strict=True):
            results[i] = result

    def _announce(self, cmd: AnnounceArp) -> OpResult:
        """Send one gratuitous ARP out of the bridge (to local ports only)."""
        try:
            self._packet_sender().sendto(gratuitous_arp(cmd.ip, cmd.mac), (cmd.bridge, 0))
        except OSError as exc:
            return OpResult(cmd, f"cannot send on {cmd.bridge}: {error_text(exc)}")
        return OpResult(cmd, None)

    def _packet_sender(self) -> socket.socket:
        """One send-only packet socket, kept for the Kernel's life.

        Protocol 0: the socket receives nothing, so the kernel attaches no
        packet hook; binding and closing a receiving packet socket each cost
        an RCU grace period (~10-20 ms), far more than the send.
        """
        if self._packet is None:
            if self._netns is None:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            else:
                sock = socket_in_netns(self._netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
            sock.setblocking(False)
            self._packet = sock
        return self._packet

    async def _apply_entries(self, cmds: Sequence[_EntryCommand]) -> list[OpResult]:
        # Resolve each device once: it must be one of our VXLAN devices.
        devices: dict[str, LinkInfo | KernelError | None] = {}
        for cmd in cmds:
            name = cmd.entry.device
            if name not in devices:
                try:
                    devices[name] = await self.link(name)
                except KernelError as exc:
                    devices[name] = exc

        results: list[OpResult | None] = [None] * len(cmds)
        msgs: list[bytes] = []
        sent: list[int] = []  # position in cmds of each message
        for i, cmd in enumerate(cmds):
            dev = devices[cmd.entry.device]
            if isinstance(dev, KernelError):
                results[i] = OpResult(cmd, str(dev))
                continue
            if dev is None:
                # An entry cannot outlive its device: deleting it is done.
                error = None if isinstance(cmd, _DELETES) else (f"device {cmd.entry.device} does not exist")
                results[i] = OpResult(cmd, error)
                continue
            if not dev.ours or dev.kind != "vxlan" or not dev.ifname.startswith(VXLAN_PREFIX):
                results[i] = OpResult(cmd, f"{dev.ifname} is not an overlayd VXLAN device; not touching it")
                continue
            try:
                msgs.append(entry_message(cmd, dev.index))
            except ValueError as exc:
                results[i] = OpResult(cmd, str(exc))
                continue
            sent.append(i)

        answers = await self._raw.batch(msgs)
        for i, (code, text) in zip(sent, answers, strict=True):
            cmd = cmds[i]
            if code == 0 or (code == errno.ENOENT and isinstance(cmd, _DELETES)):
                results[i] = OpResult(cmd, None)
            elif code == LOST:
                results[i] = OpResult(cmd, text)
            else:
                results[i] = OpResult(cmd, _errno_text(code, text))
        return [r for r in results if r is not None]

    async def _apply_link(self, cmd: Command) -> OpResult:
        try:
            match cmd:
                case EnsureBridge(spec):
                    await self._ensure_bridge(spec)
                case EnsureVxlan(spec):
                    await self._ensure_vxlan(spec)
                case SetPort(spec):
                    await self._set_port(spec)
                case DeleteLink(ifname):
                    await self._delete_link(ifname)
                case _:
                    raise TypeError(f"not a link command: {cmd!r}")
        except (NetlinkError, KernelError, OSError, ValueError) as exc:
            return OpResult(cmd, error_text(exc))
        return OpResult(cmd, None)

    async def _owned(self, ifname: str, kind: str, role: str) -> LinkInfo | None:
        """The link named `ifname` if it is ours with `kind`; None if absent; else refuse."""
        link = await self.link(ifname)
        if link is None:
            return None
        found = link.role()
        if link.kind != kind or found is None or found[0] != role:
            raise KernelError(
                f"{ifname} exists but is not an overlayd {role} "
                f"(kind {link.kind}, alias {link.alias!r}); not touching it"
            )
        return link

    async def _create_owned(self, ifname: str, alias: str, **create: Any) -> None:
        """Create a link, then mark it ours and bring it up.

        The kernel ignores IFLA_IFALIAS in a create request, so the alias
        takes a second message. If that fails the device is deleted again:
        a device with our name but no mark would be nobody's to clean up.
        """
        await self.ipr.link("add", ifname=ifname, **create)
        link = await self.link(ifname)
        if link is None:
            raise KernelError(f"{ifname} vanished right after it was created")
        try:
            await self.ipr.link("set", index=link.index, ifalias=alias, state="up")
        except BaseException:
            await self.ipr.link("del", index=link.index)
            raise

    async def _bridge_index(self, bridge: str) -> int:
        link = await self._owned(bridge, "bridge", "bridge")
        if link is None:
            raise KernelError(f"bridge {bridge} does not exist")
        return link.index

    async def _ensure_bridge(self, spec: BridgeSpec) -> None:
        alias = link_alias(spec.network, "bridge")
        mac = nl.mac_bytes(spec.mac).hex(":")
        link = await self._owned(spec.ifname, "bridge", "bridge")
        if link is None:
            # The MAC is fixed at creation: otherwise the bridge takes the
            # lowest port MAC, changes it as ports come and go, and every
            # change flushes the permanent neighbours behind it.
            await self._create_owned(
                spec.ifname, alias, kind="bridge", address=mac, mtu=spec.mtu, br_stp_state=0
            )
            return
        await self.ipr.link("set", index=link.index, address=mac, mtu=spec.mtu, ifalias=alias, state="up")

    async def _ensure_vxlan(self, spec: VxlanSpec) -> None:
        alias = link_alias(spec.network, "vxlan")
        master = await self._bridge_index(spec.bridge)
        link = await self._owned(spec.ifname, "vxlan", "vxlan")
        if link is None:
            await self._create_owned(
                spec.ifname,
                alias,
                kind="vxlan",
                vxlan_id=spec.vni,
                vxlan_local=str(spec.local),
                vxlan_port=spec.port,
                # Entries come from the control plane, never from traffic.
                vxlan_learning=0,
                # ARP suppression: the device answers ARP from its neighbour
                # entries instead of flooding requests to every VTEP.
                vxlan_proxy=1,
                mtu=spec.mtu,
                master=master,
            )
            return
        if (link.vni, link.local, link.port) != (spec.vni, spec.local, spec.port):
            raise KernelError(
                f"{spec.ifname} has vni {link.vni} local {link.local} port {link.port}, "
                f"want vni {spec.vni} local {spec.local} port {spec.port}: "
                "these cannot change on a live device, delete it first"
            )
        await self.ipr.link("set", index=link.index, mtu=spec.mtu, master=master, ifalias=alias, state="up")

    async def _set_port(self, spec: PortSpec) -> None:
        master = await self._bridge_index(spec.bridge)
        link = await self._owned(spec.ifname, "veth", "port")
        if link is None:
            raise KernelError(f"port {spec.ifname} does not exist")
        await self.ipr.link(
            "set",
            index=link.index,
            mtu=spec.mtu,
            master=master,
            ifalias=link_alias(spec.network, "port"),
            state="up",
        )

    async def _delete_link(self, ifname: str) -> None:
        link = await self.link(ifname)
        if link is None:
            return
        if not link.ours:
            raise KernelError(f"refusing to delete {ifname}: not created by overlayd")
        try:
            await self.ipr.link("del", index=link.index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


_ENTRY_COMMANDS = (ReplaceFdb, DeleteFdb, AppendFlood, DeleteFlood, ReplaceNeigh, DeleteNeigh)
_LINK_COMMANDS = (EnsureBridge, EnsureVxlan, SetPort, DeleteLink)
_EntryCommand = ReplaceFdb | DeleteFdb | AppendFlood | DeleteFlood | ReplaceNeigh | DeleteNeigh
_DELETES = (DeleteFdb, DeleteFlood, DeleteNeigh)
_KNOWN_COMMANDS = (*_ENTRY_COMMANDS, *_LINK_COMMANDS, AnnounceArp)


def entry_message(cmd: _EntryCommand, ifindex: int) -> bytes:
    """The netlink request for one entry command, with sequence number 0."""
    match cmd:
        case ReplaceFdb(e) | DeleteFdb(e):
            return nl.entry_message(cmd.op.value, ifindex, nl.mac_bytes(e.mac), e.dst)
        case AppendFlood(e) | DeleteFlood(e):
            return nl.entry_message(cmd.op.value, ifindex, nl.FLOOD_MAC_BYTES, e.dst)
        case ReplaceNeigh(e):
            return nl.entry_message(cmd.op.value, ifindex, nl.mac_bytes(e.mac), e.ip)
        case DeleteNeigh(e):
            return nl.delete_neigh_message(ifindex, e.ip)
    raise TypeError(f"not an entry command: {cmd!r}")
