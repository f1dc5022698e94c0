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

Gateway namespaces (`ip netns add`/`delete`, pinned under /run/netns) and
nftables tables (`nft -j`, in a gateway namespace through `nsenter --net`)
are the two things done by running a program; see `dataplane.nft` for why.
Inside a gateway namespace the same raw netlink socket does the work, one
per namespace, kept while the namespace lives.

Ownership: a link is ours only if `kstate.is_ours(name, alias)`; entries are
ours only on our VXLAN devices; addresses only on our links; routes only
with our protocol number; a gateway namespace only by its name and only if
every link in it is ours; an nftables table only by the name `overlayd`.
`observe()` sees nothing else, and every write checks the target first, so
foreign objects are never touched.

Errors: `execute()` never raises for one failing operation; each command gets
an `OpResult` whose `error` says what the kernel said. Unknown command types
raise `TypeError` before anything is applied.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import operator
import os
import re
import shutil
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from itertools import compress, repeat
from typing import Any, NamedTuple, TypeVar, cast

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from overlayd.dataplane import netlink as nl
from overlayd.dataplane import nft
from overlayd.dataplane.bulk import gc_paused
from overlayd.dataplane.commands import (
    AnnounceArp,
    AppendFlood,
    Command,
    DeleteAddr,
    DeleteFdb,
    DeleteFlood,
    DeleteLink,
    DeleteNeigh,
    DeleteNetns,
    DeleteNft,
    DeleteRoute,
    EnableForwarding,
    EnsureBridge,
    EnsureNetns,
    EnsureVeth,
    EnsureVxlan,
    ReplaceAddr,
    ReplaceFdb,
    ReplaceNeigh,
    ReplaceNft,
    ReplaceRoute,
    SetInnerLink,
    SetPort,
)
from overlayd.dataplane.kstate import (
    HOST_NS,
    NFT_TABLE,
    RTPROT_OVERLAYD,
    VXLAN_PREFIX,
    BridgeSpec,
    InnerLinkSpec,
    KernelState,
    NftKey,
    NftTable,
    PortSpec,
    VethSpec,
    VxlanSpec,
    is_inner,
    link_alias,
)
from overlayd.dataplane.mirror import Dump, Mirror, NsDump
from overlayd.dataplane.netlink import LinkInfo, gratuitous_arp
from overlayd.dataplane.nsock import netns_path, socket_in_netns
from overlayd.dataplane.rtnl import LOST, KernelError, Rtnl
from overlayd.util.metrics import Metrics

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
# How long one run of `ip netns` or `nft` may take.
_PROGRAM_TIMEOUT = 20.0
# Routed bridges answer ARP for other hosts' endpoints at once (the kernel's default
# waits up to 0.8 s at random before a proxy answer to a broadcast).
_PROXY_DELAY_MS = 0

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
    # The subnet the address is on: hosts inside it share this host's segment (routed mode
    # reaches them without encapsulation). None: treat every other host as behind a router.
    network: IPv4Network | None = None


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

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        netns: str | None = None,
        gateway_netns_prefix: str = "ovgw",
    ) -> None:
        self._metrics = metrics
        self._netns = netns
        self._ipr: Any = None
        self._rtnl: Rtnl | None = None
        self._packet: socket.socket | None = None
        self.gateway_netns_prefix = gateway_netns_prefix
        self._gateway_re = re.compile(rf"{re.escape(gateway_netns_prefix)}\d+")
        # Gateway namespace -> (its pin's inode, a raw netlink socket in it).
        self._inside: dict[str, tuple[tuple[int, int], Rtnl]] = {}

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
        for _pin, inside in self._inside.values():
            inside.close()
        self._inside.clear()
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

    async def _dump_rows(
        self, msg_type: int, body: bytes, read: Callable[[bytes, int, list[T]], nl.DumpPart]
    ) -> list[T]:
        try:
            return await self._raw.dump_rows(msg_type, body, read)
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
        raw = await self._dump(nl.RTM_GETADDR, nl.IFADDRMSG.pack(nl.AF_INET, 0, 0, 0, 0), nl.parse_addr_full)
        addrs = [(a.ifindex, a.address.ip) for a in raw]
        subnet = {(a.ifindex, a.address.ip): a.address.network for a in raw}
        links = {link.index: link for link in await self.links()}
        if interface is None:
            if address is None:
                raise KernelError("underlay: give an interface, a VTEP address, or both")
            holders = [index for index, ip in addrs if ip == address and index in links]
            if not holders:
                raise KernelError(f"no interface holds the VTEP address {address}")
            dev = links[holders[0]]
            return Underlay(dev.ifname, address, dev.mtu, subnet[(dev.index, address)])
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
        return Underlay(found.ifname, address, found.mtu, subnet[(found.index, address)])

    async def dump(self, *, nft_tables: bool = True) -> Dump:
        """Every link, address, route and per-interface setting in the namespace, the
        FDB and neighbour entries the mirror keeps (on our VXLAN devices: the FDB entries
        the device holds itself, the permanent neighbours), as raw rows; each gateway
        namespace's links, addresses and routes; overlayd's nftables tables (unless
        `nft_tables` is false: reading them runs `nft`, a few milliseconds a namespace).

        The neighbour tables are read only if one of our VXLAN devices exists:
        entries are ours only on those.
        """
        out = Dump(links=await self.links())
        ours = {link.index for link in out.links if link.kind == "vxlan" and link.ours}
        if ours:
            # The bulk of the dump, two messages per remote endpoint: read a datagram at a
            # time, keeping only what the mirror keeps (entries the device holds itself, not
            # its bridge's; permanent neighbours). Tens of thousands of rows: made without
            # the cycle collector stepping in (`bulk`).
            with gc_paused():
                out.fdb = await self._dump_rows(
                    nl.RTM_GETNEIGH,
                    nl.NDMSG.pack(nl.AF_BRIDGE, 0, 0, 0, 0),
                    partial(nl.neigh_dump_rows, devices=ours, flags=nl.NTF_SELF),
                )
                out.neigh = await self._dump_rows(
                    nl.RTM_GETNEIGH,
                    nl.NDMSG.pack(nl.AF_INET, 0, 0, 0, 0),
                    partial(nl.neigh_dump_rows, devices=ours, state=nl.NUD_PERMANENT),
                )
        out.addrs = await self._dump(
            nl.RTM_GETADDR, nl.IFADDRMSG.pack(nl.AF_INET, 0, 0, 0, 0), nl.parse_addr_full
        )
        out.routes = await self._dump(nl.RTM_GETROUTE, nl.route_dump_request(), nl.parse_route)
        out.netconf = await self._dump(nl.RTM_GETNETCONF, nl.netconf_dump_request(), nl.parse_netconf)
        for name in self.gateway_namespaces():
            inside = await self._dump_inside(name)
            if inside is not None:
                out.namespaces[name] = inside
        if nft_tables or out.namespaces:
            out.nft = await self.nft_tables([HOST_NS, *out.namespaces])
        return out

    async def observe(self) -> KernelState:
        """What overlayd owns in the kernel now, in the shape of the desired state."""
        mirror = Mirror()
        mirror.load_dump(await self.dump())
        return mirror.tables.state()

    # --- gateway namespaces ------------------------------------------------------

    def gateway_namespaces(self) -> list[str]:
        """Namespaces pinned under /run/netns with a name a gateway namespace of ours would have."""
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if self._gateway_re.fullmatch(n) and self._pin(n) is not None)

    def _pin(self, name: str) -> tuple[int, int] | None:
        """(device, inode) of the namespace pinned at /run/netns/NAME, None if there is none.

        A plain file left there is no namespace: a pin made in another mount namespace
        (a daemon in a sandbox of its own) shows only as the empty file it was bound on.
        """
        try:
            st = os.stat(os.path.join(NETNS_DIR, name))
        except FileNotFoundError:
            return None
        if st.st_dev != _nsfs_device():
            return None
        return (st.st_dev, st.st_ino)

    def inside(self, name: str) -> Rtnl:
        """A raw netlink socket in gateway namespace `name` (reopened if it was made anew)."""
        pin = self._pin(name)
        if pin is None:
            self.forget_namespace(name)
            raise KernelError(f"network namespace {name} does not exist")
        cached = self._inside.get(name)
        if cached is not None and cached[0] == pin:
            return cached[1]
        self.forget_namespace(name)
        try:
            rtnl = Rtnl.open(os.path.join(NETNS_DIR, name))
        except OSError as exc:
            raise KernelError(f"cannot open netlink in {name}: {exc}") from exc
        self._inside[name] = (pin, rtnl)
        return rtnl

    def forget_namespace(self, name: str) -> None:
        cached = self._inside.pop(name, None)
        if cached is not None:
            cached[1].close()

    async def _dump_inside(self, name: str) -> NsDump | None:
        """A gateway namespace's links, addresses and routes; None if it is not ours."""
        try:
            rtnl = self.inside(name)
            links = await rtnl.query(nl.RTM_GETLINK, nl.IFINFOMSG.pack(0, 0, 0, 0, 0), nl.parse_link)
            foreign = [
                link.ifname
                for link in links
                if link.ifname != "lo" and not is_inner(link.ifname, link.kind, link.alias)
            ]
            if foreign:
                log.warning("namespace %s is not overlayd's (it holds %s): leaving it alone", name, foreign)
                self.forget_namespace(name)
                return None
            addrs = await rtnl.query(
                nl.RTM_GETADDR, nl.IFADDRMSG.pack(nl.AF_INET, 0, 0, 0, 0), nl.parse_addr_full
            )
            routes = await rtnl.query(nl.RTM_GETROUTE, nl.route_dump_request(), nl.parse_route)
        except (KernelError, NetlinkError) as exc:
            log.warning("cannot read namespace %s: %s", name, error_text(exc))
            return None
        return NsDump(links=links, addrs=addrs, routes=routes)

    async def _program(self, argv: list[str], stdin: bytes | None = None) -> str:
        """Run a program (ip, nft), returning its output; KernelError with its stderr if it fails."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise KernelError(f"cannot run {argv[0]}: {exc}") from exc
        try:
            async with asyncio.timeout(_PROGRAM_TIMEOUT):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise KernelError(f"{' '.join(argv[:3])} did not finish in {_PROGRAM_TIMEOUT:g}s") from None
        except asyncio.CancelledError:
            # The program runs on without us. A cancelled pass (a teardown stops the
            # reconciler) must not leave it behind: an `ip netns add` finishing after the
            # teardown has looked would leave a gateway namespace nobody owns.
            await _finish(proc)
            raise
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip().splitlines()
            raise KernelError(f"{' '.join(argv)}: {text[-1] if text else f'exit {proc.returncode}'}")
        return out.decode(errors="replace")

    async def _ensure_netns(self, name: str) -> None:
        if self._pin(name) is not None:
            return
        self.forget_namespace(name)
        if _exists(name):
            # A stale pin (no namespace behind it): `ip netns delete` unmounts and unlinks.
            await self._program(["ip", "netns", "delete", name])
        await self._program(["ip", "netns", "add", name])
        # Loopback up: nothing inside talks to itself today, but a namespace without it surprises.
        rtnl = self.inside(name)
        ((code, text),) = await rtnl.batch([nl.set_up(nl.LOOPBACK_INDEX)])
        if code:
            raise KernelError(f"loopback up in {name}: {error_code_text(code, text)}")

    async def _delete_netns(self, name: str) -> None:
        self.forget_namespace(name)
        if not _exists(name):
            return
        if not self._gateway_re.fullmatch(name):
            raise KernelError(f"refusing to delete namespace {name}: not an overlayd gateway namespace")
        await self._program(["ip", "netns", "delete", name])

    # --- nftables ----------------------------------------------------------------

    def _nft_argv(self, netns: str, *args: str) -> list[str]:
        base = ["nft", "-j", *args]
        if netns == HOST_NS:
            return base
        return ["nsenter", f"--net={os.path.join(NETNS_DIR, netns)}", *base]

    async def nft_tables(self, namespaces: list[str]) -> dict[NftKey, NftTable]:
        """Our nftables tables in `namespaces` as the kernel has them (none without nft)."""
        out: dict[NftKey, NftTable] = {}
        if shutil.which("nft") is None:
            return out
        for netns in namespaces:
            try:
                families = nft.parse_tables(
                    json.loads(await self._program(self._nft_argv(netns, "list", "tables")))
                )
                for family in sorted(families):
                    listing = await self._program(
                        self._nft_argv(netns, "list", "table", family, NFT_TABLE)
                    )
                    out[(netns, family)] = nft.parse_table(netns, family, json.loads(listing))
            except (KernelError, ValueError) as exc:
                log.warning("cannot read nftables%s: %s", f" in {netns}" if netns else "", exc)
        return out

    async def _replace_nft(self, table: NftTable) -> None:
        payload = json.dumps(nft.replace_commands(table)).encode()
        await self._program(self._nft_argv(table.netns, "-f", "-"), stdin=payload)
        # Read back what the transaction left: the kernel must hold exactly this table now.
        listing = await self._program(
            self._nft_argv(table.netns, "list", "table", table.family, NFT_TABLE)
        )
        found = nft.parse_table(table.netns, table.family, json.loads(listing))
        if found != table:
            raise KernelError(f"nft table {table.family} {NFT_TABLE} reads back other than written")

    async def _delete_nft(self, netns: str, family: str) -> None:
        payload = json.dumps(nft.delete_commands(family)).encode()
        await self._program(self._nft_argv(netns, "-f", "-"), stdin=payload)

    # --- writing ---------------------------------------------------------------

    async def execute(
        self, commands: Sequence[Command], *, devices: Mapping[str, int] | None = None
    ) -> list[OpResult]:
        """Apply commands in order; one result per command, in the same order.

        Consecutive entry commands go to the kernel as one batch; link
        commands run one at a time between batches, so an entry never goes
        ahead of the device it needs. Announcements go out after everything
        else in this call: by then the entries that make the announced
        address reachable are in place.

        `devices`: overlayd VXLAN devices the caller knows the kernel holds right now
        (name -> ifindex; the reconciler's mirror, kept from notifications). Entries on
        them are written without asking the kernel for the device first, a round trip
        per device and batch. Any link command in this call may change them: from
        there on every device is asked for again.
        """
        kinds = _KIND_OF
        for cmd in commands:
            if cmd.__class__ not in kinds:
                raise TypeError(f"the kernel executor does not know {cmd!r}")
        known: Mapping[str, int] = devices if devices is not None else {}
        results: list[OpResult | None] = [None] * len(commands)
        pending: list[int] = []  # positions of entry commands waiting for their batch
        pending_l3: list[int] = []  # addresses, routes, forwarding: batched per namespace
        announcements: list[int] = []
        for i, cmd in enumerate(commands):
            kind = kinds[cmd.__class__]
            if kind is _ENTRY:
                if pending_l3:
                    await self._apply_l3(commands, pending_l3, results)
                    pending_l3 = []
                pending.append(i)
            elif kind is _ANNOUNCE:
                announcements.append(i)
            elif kind is _L3:
                if pending:
                    await self._apply_batch(commands, pending, results, known)
                    pending = []
                pending_l3.append(i)
            else:
                if pending:
                    await self._apply_batch(commands, pending, results, known)
                    pending = []
                if pending_l3:
                    await self._apply_l3(commands, pending_l3, results)
                    pending_l3 = []
                known = {}
                results[i] = await self._apply_link(cmd)
        if pending:
            await self._apply_batch(commands, pending, results, known)
        if pending_l3:
            await self._apply_l3(commands, pending_l3, results)
        for i in announcements:
            results[i] = self._announce(commands[i])  # type: ignore[arg-type]
        done: list[OpResult] = list(filter(None, results))  # an OpResult, a 2-tuple, is never false
        if self._metrics is not None:
            _count(self._metrics, done)
        return done

    async def _apply_batch(
        self,
        commands: Sequence[Command],
        positions: list[int],
        results: list[OpResult | None],
        known: Mapping[str, int],
    ) -> None:
        if len(positions) == len(commands):
            # Every command is an entry (a join's batches): no loop per entry over positions.
            results[:] = await self._apply_entries(commands, known)  # type: ignore[arg-type]
            return
        batch: list[_EntryCommand] = [commands[i] for i in positions]  # type: ignore[misc]
        for i, result in zip(positions, await self._apply_entries(batch, known), strict=True):
            results[i] = result

    async def _apply_l3(
        self, commands: Sequence[Command], positions: list[int], results: list[OpResult | None]
    ) -> None:
        """Addresses, routes and forwarding switches: one batch per namespace, in order."""
        by_ns: dict[str, list[int]] = {}
        for i in positions:
            by_ns.setdefault(_l3_netns(commands[i]), []).append(i)  # type: ignore[arg-type]
        for netns, where in by_ns.items():
            try:
                rtnl = self._raw if netns == HOST_NS else self.inside(netns)
                names = await self._link_table(netns)
            except (KernelError, NetlinkError) as exc:
                for i in where:
                    results[i] = OpResult(commands[i], error_text(exc))
                continue
            msgs: list[bytes] = []
            sent: list[int] = []
            for i in where:
                cmd = cast(_L3Command, commands[i])
                try:
                    msg = self._l3_message(cmd, netns, names)
                except KernelError as exc:
                    results[i] = OpResult(cmd, str(exc))
                    continue
                if msg is None:
                    results[i] = OpResult(cmd, None)  # a delete of what is gone already
                    continue
                msgs.append(msg)
                sent.append(i)
            answers = await rtnl.batch(msgs)
            for i, (code, text) in zip(sent, answers, strict=True):
                cmd = cast(_L3Command, commands[i])
                gone = code in (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)
                if code == 0 or (gone and isinstance(cmd, DeleteAddr | DeleteRoute)):
                    results[i] = OpResult(cmd, None)
                else:
                    results[i] = OpResult(cmd, error_code_text(code, text))

    async def _link_table(self, netns: str) -> dict[str, LinkInfo]:
        if netns == HOST_NS:
            links = await self.links()
        else:
            links = await self.inside(netns).query(
                nl.RTM_GETLINK, nl.IFINFOMSG.pack(0, 0, 0, 0, 0), nl.parse_link
            )
        return {link.ifname: link for link in links}

    @staticmethod
    def _l3_message(cmd: _L3Command, netns: str, links: dict[str, LinkInfo]) -> bytes | None:
        def device(name: str, *, ours: bool) -> LinkInfo | None:
            link = links.get(name)
            if link is not None and ours and netns == HOST_NS and not link.ours:
                raise KernelError(f"{name} is not an overlayd link; not touching its addresses")
            return link

        match cmd:
            case ReplaceAddr((_, name, address)):
                link = device(name, ours=True)
                if link is None:
                    raise KernelError(f"device {name} does not exist")
                return nl.replace_address(link.index, address)
            case DeleteAddr((_, name, address)):
                link = device(name, ours=True)
                return None if link is None else nl.delete_address(link.index, address)
            case ReplaceRoute((_, dst), route):
                link = device(route.device, ours=False)
                if link is None:
                    raise KernelError(f"device {route.device} does not exist")
                return nl.replace_route(dst, oif=link.index, via=route.via, protocol=RTPROT_OVERLAYD)
            case DeleteRoute((_, dst)):
                return nl.delete_route(dst, protocol=RTPROT_OVERLAYD)
            case EnableForwarding(_, name):
                link = device(name, ours=False)
                if link is None:
                    raise KernelError(f"device {name} does not exist")
                return nl.set_devconf(link.index, {nl.IPV4_DEVCONF_FORWARDING: 1})
        raise TypeError(f"not a layer 3 command: {cmd!r}")

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

    async def _entry_device(self, name: str) -> int | str | None:
        """The ifindex of our VXLAN device `name`; None if there is none; else why not."""
        try:
            dev = await self.link(name)
        except KernelError as exc:
            return str(exc)
        if dev is None:
            return None
        if not dev.ours or dev.kind != "vxlan" or not dev.ifname.startswith(VXLAN_PREFIX):
            return f"{dev.ifname} is not an overlayd VXLAN device; not touching it"
        return dev.index

    async def _apply_entries(self, cmds: Sequence[_EntryCommand], known: Mapping[str, int]) -> list[OpResult]:
        # Each device resolved once: one of ours the caller knows, or asked for (it must
        # be one of our VXLAN devices). Tens of thousands of entries in a join: one loop,
        # with one packer per command class and device (`_entry_packer`), made once.
        devices: dict[str, int | str | None] = {}
        packers: dict[tuple[type, str], Callable[[Any], bytes]] = {}
        results: list[OpResult | None] = [None] * len(cmds)
        msgs: list[bytes] = []
        sent: list[int] = []  # position in cmds of each message
        for i, cmd in enumerate(cmds):
            name = cmd.entry.device
            pack = packers.get((cmd.__class__, name))
            if pack is None:
                dev = devices.get(name, _UNRESOLVED)
                if dev is _UNRESOLVED:
                    dev = devices[name] = known[name] if name in known else await self._entry_device(name)
                if dev.__class__ is not int:
                    if dev is None:
                        # An entry cannot outlive its device: deleting it is done.
                        error = None if isinstance(cmd, _DELETES) else (f"device {name} does not exist")
                        results[i] = OpResult(cmd, error)
                    else:
                        results[i] = OpResult(cmd, str(dev))
                    continue
                pack = packers[(cmd.__class__, name)] = _entry_packer(cmd.__class__, dev)
            try:
                msgs.append(pack(cmd))
            except ValueError as exc:
                results[i] = OpResult(cmd, str(exc))
                continue
            sent.append(i)

        answers = await self._raw.batch(msgs)
        if len(sent) == len(cmds) and answers.count(_ACCEPTED) == len(answers):
            # Every entry went out and the kernel refused none (nearly every batch): the
            # results made at C speed, with no loop over them here.
            return list(map(_applied, zip(cmds, repeat(None))))
        for i, (code, text) in zip(sent, answers, strict=True):
            cmd = cmds[i]
            if code == 0:
                results[i] = _applied((cmd, None))
            elif code == errno.ENOENT and isinstance(cmd, _DELETES):
                results[i] = OpResult(cmd, None)
            elif code == LOST:
                results[i] = OpResult(cmd, text)
            else:
                results[i] = OpResult(cmd, _errno_text(code, text))
        return results  # type: ignore[return-value]  # every position was filled

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
                case EnsureNetns(spec):
                    await self._ensure_netns(spec.name)
                case DeleteNetns(name):
                    await self._delete_netns(name)
                case EnsureVeth(spec):
                    await self._ensure_veth(spec)
                case SetInnerLink(spec):
                    await self._set_inner_link(spec)
                case ReplaceNft(table):
                    await self._replace_nft(table)
                case DeleteNft(netns, family):
                    await self._delete_nft(netns, family)
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
            await self._silence_ipv6(link.index, ifname)
            await self.ipr.link("set", index=link.index, ifalias=alias, state="up")
        except BaseException:
            await self.ipr.link("del", index=link.index)
            raise

    async def _silence_ipv6(self, index: int, ifname: str) -> None:
        """No IPv6 link-local on one of our links, set before it first comes up: the
        overlay is IPv4, and a link-local address only multicasts (see `nl.no_ipv6_link_local`)."""
        ((code, text),) = await self._raw.batch([nl.no_ipv6_link_local(index)])
        if code and code != errno.EAFNOSUPPORT:  # EAFNOSUPPORT: a kernel without IPv6
            raise KernelError(f"{ifname} without IPv6 link-local: {error_code_text(code, text)}")

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
            link = await self.link(spec.ifname)
            if link is None:
                raise KernelError(f"{spec.ifname} vanished right after it was created")
        else:
            await self.ipr.link("set", index=link.index, address=mac, mtu=spec.mtu, ifalias=alias, state="up")
        if spec.routed or link.forwarding or link.proxy_arp:
            # A routed network's gateway: the bridge forwards, and answers ARP for
            # endpoints on other hosts (it has a host route for each) with its MAC.
            on = int(spec.routed)
            requests = [
                nl.set_devconf(link.index, {nl.IPV4_DEVCONF_FORWARDING: on, nl.IPV4_DEVCONF_PROXY_ARP: on})
            ]
            if spec.routed:
                requests.append(nl.set_proxy_delay(link.index, _PROXY_DELAY_MS))
            for code, text in await self._raw.batch(requests):
                if code:
                    raise KernelError(f"IPv4 settings of {spec.ifname}: {error_code_text(code, text)}")

    async def _ensure_veth(self, spec: VethSpec) -> None:
        """The host side of a veth pair into a gateway namespace; made with its peer if missing."""
        alias = link_alias(spec.network, spec.role)
        link = await self._owned(spec.ifname, "veth", spec.role)
        master = await self._bridge_index(spec.bridge) if spec.bridge else 0
        if link is None:
            path = os.path.join(NETNS_DIR, spec.netns)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise KernelError(f"cannot open namespace {spec.netns}: {exc}") from exc
            try:
                request = nl.create_veth(
                    ifname=spec.ifname,
                    mtu=spec.mtu,
                    master=master,
                    peer=spec.peer,
                    peer_netns_fd=fd,
                    peer_mac=nl.mac_bytes(spec.peer_mac),
                )
                ((code, text),) = await self._raw.batch([request])
            finally:
                os.close(fd)
            if code:
                raise KernelError(f"cannot create veth {spec.ifname}: {error_code_text(code, text)}")
            ((code, text),) = await self._raw.batch([nl.set_alias(spec.ifname, alias)])
            if code:
                await self._raw.batch([nl.delete_link_by_name(spec.ifname)])
                raise KernelError(f"cannot mark {spec.ifname} as overlayd's: {error_code_text(code, text)}")
            link = await self.link(spec.ifname)
            if link is None:
                raise KernelError(f"{spec.ifname} vanished right after it was created")
            # Down until its peer is up (no carrier): no IPv6 configured yet.
            await self._silence_ipv6(link.index, spec.ifname)
        else:
            await self.ipr.link(
                "set", index=link.index, mtu=spec.mtu, master=master, ifalias=alias, state="up"
            )
        ((code, text),) = await self._raw.batch(
            [nl.set_devconf(link.index, {nl.IPV4_DEVCONF_FORWARDING: int(spec.forwarding)})]
        )
        if code:
            raise KernelError(f"IPv4 forwarding on {spec.ifname}: {error_code_text(code, text)}")

    async def _set_inner_link(self, spec: InnerLinkSpec) -> None:
        """Inside a gateway namespace: the veth's end marked ours, with its MAC and MTU, up, forwarding."""
        rtnl = self.inside(spec.netns)
        found = await rtnl.query(nl.RTM_GETLINK, nl.get_link_request(spec.ifname), nl.parse_link, dump=False)
        if not found:
            raise KernelError(f"{spec.ifname} does not exist in {spec.netns}")
        index = found[0].index
        silence = nl.no_ipv6_link_local(index)  # before up: it would multicast into the network
        requests = [
            nl.set_link(index, mac=nl.mac_bytes(spec.mac), mtu=spec.mtu),
            nl.set_alias(spec.ifname, link_alias(spec.network or "?", "inner")),
            nl.set_devconf(index, {nl.IPV4_DEVCONF_FORWARDING: int(spec.forwarding)}),
            silence,
            nl.set_link(index, up=spec.up),
        ]
        for request, (code, text) in zip(requests, await rtnl.batch(requests), strict=True):
            if code == errno.EAFNOSUPPORT and request is silence:  # a kernel without IPv6
                continue
            if code:
                raise KernelError(f"{spec.ifname} in {spec.netns}: {error_code_text(code, text)}")

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
_L3_COMMANDS = (ReplaceAddr, DeleteAddr, ReplaceRoute, DeleteRoute, EnableForwarding)
_LINK_COMMANDS = (
    EnsureBridge,
    EnsureVxlan,
    SetPort,
    DeleteLink,
    EnsureNetns,
    DeleteNetns,
    EnsureVeth,
    SetInnerLink,
    ReplaceNft,
    DeleteNft,
)
_EntryCommand = ReplaceFdb | DeleteFdb | AppendFlood | DeleteFlood | ReplaceNeigh | DeleteNeigh
_L3Command = ReplaceAddr | DeleteAddr | ReplaceRoute | DeleteRoute | EnableForwarding
_DELETES = (DeleteFdb, DeleteFlood, DeleteNeigh)
# What `execute` does with each command class (looked up once per command).
_ENTRY, _L3, _LINK, _ANNOUNCE = "entry", "l3", "link", "announce"
_KIND_OF: dict[type, str] = {
    **dict.fromkeys(_ENTRY_COMMANDS, _ENTRY),
    **dict.fromkeys(_L3_COMMANDS, _L3),
    **dict.fromkeys(_LINK_COMMANDS, _LINK),
    AnnounceArp: _ANNOUNCE,
}
# The `kind` label of each command class: its `Op`'s value (a Python-level property), read once.
# Every command class has `op`; `type` does not say so, hence getattr.
_OP_KIND: dict[type, str] = {cls: getattr(cls, "op").value for cls in _KIND_OF}  # noqa: B009
_UNRESOLVED: Any = object()
# OpResult((command, None)) without NamedTuple's Python-level __new__: one per entry of a batch.
_applied: Callable[[tuple[Command, None]], OpResult] = partial(tuple.__new__, OpResult)
_command_class = operator.attrgetter("command.__class__")
_error_of = operator.itemgetter(1)
# What `Rtnl.batch` answers for a request the kernel took without a word.
_ACCEPTED = (0, "")


# Tallied one result at a time up to this many results (a remote change's two or three),
# by a Counter at C speed above (a join's thousands).
_SMALL_TALLY = 32


def _count(metrics: Metrics, done: list[OpResult]) -> None:
    """The ops metric, by kind and result; the kind by class (an enum's `.value` is a
    Python call)."""
    kind_of = _OP_KIND
    if len(done) <= _SMALL_TALLY:
        series = metrics.kernel_ops_by
        for command, error in done:
            series(kind_of[command.__class__], "ok" if error is None else "error").inc()
        return
    tally = Counter(map(_command_class, done))
    refused = compress(done, map(operator.is_not, map(_error_of, done), repeat(None)))
    failed = Counter(map(_command_class, refused))
    for cls, count in tally.items():
        kind = kind_of[cls]
        bad = failed.get(cls, 0)
        if count > bad:
            metrics.kernel_ops_by(kind, "ok").inc(count - bad)
        if bad:
            metrics.kernel_ops_by(kind, "error").inc(bad)


def _exists(name: str) -> bool:
    """Something is at /run/netns/NAME (a stat of a tmpfs entry: it never blocks)."""
    return os.path.lexists(os.path.join(NETNS_DIR, name))


_NSFS: list[int] = []


def _nsfs_device() -> int:
    """The device number of nsfs, where every namespace file lives (read once)."""
    if not _NSFS:
        _NSFS.append(os.stat("/proc/self/ns/net").st_dev)
    return _NSFS[0]


def _l3_netns(cmd: _L3Command) -> str:
    match cmd:
        case ReplaceAddr(key) | DeleteAddr(key):
            return key[0]
        case ReplaceRoute(key, _) | DeleteRoute(key):
            return key[0]
        case EnableForwarding(netns, _):
            return netns
    raise TypeError(f"not a layer 3 command: {cmd!r}")


def _entry_packer(cls: type[_EntryCommand], ifindex: int) -> Callable[[Any], bytes]:
    """The request of each command of class `cls` on device `ifindex`: the command's MAC and
    address packed after a head made once (`netlink.entry_head`); one call per entry.
    Raises ValueError for a command whose MAC is not one."""
    tail, dst_head = nl.ENTRY_TAIL.pack, nl.DST_HEAD
    if cls is DeleteNeigh:
        delete_head, delete_tail = nl.delete_neigh_head(ifindex), nl.DELETE_NEIGH_TAIL.pack
        return lambda cmd: delete_tail(delete_head, int(cmd.entry.ip))
    if cls is AppendFlood or cls is DeleteFlood:
        flood_head = nl.entry_head("append_flood" if cls is AppendFlood else "delete_flood", ifindex)
        return lambda cmd: tail(flood_head, nl.FLOOD_MAC_BYTES, dst_head, int(cmd.entry.dst))
    head = nl.entry_head(_ENTRY_OP[cls], ifindex)
    fromhex, mac_bytes = bytes.fromhex, nl.mac_bytes
    # FdbEntry and NeighEntry: (device, mac, dst) and (device, ip, mac).
    fdb = cls is ReplaceFdb or cls is DeleteFdb
    mac_and_address = operator.itemgetter(1, 2) if fdb else operator.itemgetter(2, 1)

    def pack(cmd: ReplaceFdb | DeleteFdb | ReplaceNeigh) -> bytes:
        mac, address = mac_and_address(cmd.entry)
        try:
            raw = fromhex(mac.replace(":", ""))  # `mac_bytes` inline: a call less per entry
        except ValueError:
            raw = b""
        if len(raw) != 6:
            raw = mac_bytes(mac)  # raises the ValueError that names it
        return tail(head, raw, dst_head, int(address))

    return pack


_ENTRY_OP: dict[type, str] = {
    ReplaceFdb: "replace_fdb",
    DeleteFdb: "delete_fdb",
    ReplaceNeigh: "replace_neigh",
}


async def _finish(proc: asyncio.subprocess.Process) -> None:
    """Wait for a program whose caller was cancelled (killed after `_PROGRAM_TIMEOUT`)."""
    try:
        async with asyncio.timeout(_PROGRAM_TIMEOUT):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
