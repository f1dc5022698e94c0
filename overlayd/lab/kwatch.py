"""Kernel watch: when FDB, neighbour and link entries appear and vanish, per namespace.

Benchmarks and fault-injection tests ask "when did this host's kernel hold the
entry?", not "when does the daemon say it programmed it". `KernelWatch` opens
one NETLINK_ROUTE socket in each namespace it is given, subscribed to
RTNLGRP_LINK and RTNLGRP_NEIGH (the latter carries AF_BRIDGE FDB and AF_INET
neighbour notifications alike), reads the current tables once, and from then
on records a CLOCK_MONOTONIC timestamp (`time.monotonic()`) for every change
to overlayd's VXLAN devices (names starting `ovvx`, configurable) and to the
entries on them:

    Fdb(device, mac, dst)    a unicast or flood FDB entry: MAC -> remote VTEP
    Neigh(device, ip, mac)   a neighbour entry: IP -> MAC
    Link(name)               the device itself

Ask with `present()` / `gone_at()`, or register an `Expectation` ("these
entries present in these namespaces") before acting and wait on it: it
completes at the timestamp of the event that satisfied it.

Why it is built this way:

- Netlink delivers no kernel timestamp (SO_TIMESTAMP is not honoured on
  netlink sockets), so the time is taken when the listener reads the message.
  By default the listener runs in a child process of its own, raised in
  priority, that drains each socket and stamps every datagram before decoding
  anything: the measuring process's own threads (clients of the daemons)
  never hold a GIL the listener needs, and CLOCK_MONOTONIC is one clock for
  every process on the machine.
- A listener that falls behind loses notifications (ENOBUFS). The receive
  buffer is large (64 MiB, forced), and an overrun is never hidden: it is
  recorded with its time (`overruns()`), and the namespace is read again so the
  state stays right; events learnt from that re-read are marked inexact.
  A figure whose window holds an overrun must say so instead of reporting.
- Standard library only, nothing of the daemon: the tool that measures must
  share no code with what it measures. The child runs this file as a script.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType
from typing import Any, NamedTuple

DEFAULT_PREFIXES = ("ovvx",)
RCVBUF = 64 * 1024 * 1024
FLOOD_MAC = "00:00:00:00:00:00"

# --- netlink constants (linux/netlink.h, rtnetlink.h, neighbour.h, if_link.h) ---

_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK = 16, 17, 18
_RTM_NEWNEIGH, _RTM_DELNEIGH, _RTM_GETNEIGH = 28, 29, 30
_RTNLGRP_LINK, _RTNLGRP_NEIGH = 1, 3
_AF_UNSPEC, _AF_INET, _AF_BRIDGE, _AF_INET6 = 0, 2, 7, 10
_NDA_DST, _NDA_LLADDR = 1, 2
_NTF_PROXY = 0x08
_NUD_INCOMPLETE, _NUD_FAILED = 0x01, 0x20
_IFLA_IFNAME = 3
_SO_RCVBUFFORCE = 33
_CLONE_NEWNET = 0x40000000
_NLA_TYPE_MASK = 0x3FFF

_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_NLA = struct.Struct("=HH")


# --- what is watched ----------------------------------------------------------------


class Fdb(NamedTuple):
    """An FDB entry on a VXLAN device (the all-zero MAC is a flood entry)."""

    device: str
    mac: str
    dst: str


class Neigh(NamedTuple):
    """A neighbour entry on a VXLAN device."""

    device: str
    ip: str
    mac: str


class Link(NamedTuple):
    """A watched device."""

    name: str


Entry = Fdb | Neigh | Link


class Event(NamedTuple):
    """One change: `entry` became present (or absent) in `netns` at monotonic time `t`.

    `exact` is False when the change was learnt from reading a table (at the
    start, or again after an overrun), so `t` is only an upper bound.
    """

    t: float
    netns: str
    entry: Entry
    present: bool
    exact: bool = True


class KernelWatchError(RuntimeError):
    """The listener could not start, or died; the message says why."""


# --- decoding (pure) --------------------------------------------------------------


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4:
            break
        out[kind & _NLA_TYPE_MASK] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return out


def _address(raw: bytes) -> str | None:
    if len(raw) == 4:
        return str(IPv4Address(raw))
    if len(raw) == 16:
        return str(IPv6Address(raw))
    return None


class Change(NamedTuple):
    """What one netlink message says about a watched entry (before state is applied)."""

    entry: Entry
    present: bool
    # Neighbour deletions may come without the MAC, FDB deletions without the
    # destination: then every entry of that (device, key) goes.
    partial: bool = False


class Decoder:
    """Netlink messages in, `Change`s out; keeps the ifindex -> name map it needs.

    Pure: no I/O, so the parsing is tested without root. Only devices whose
    name starts with one of `prefixes` are watched. FDB entries count only with
    a destination (a VXLAN device's own entries, not the bridge's), neighbour
    entries only with a link-layer address (a failed or incomplete resolution
    is absent), and link messages only of family AF_UNSPEC: the AF_BRIDGE
    RTM_DELLINK a port gets when it leaves its bridge does not mean the device
    is gone.
    """

    def __init__(self, prefixes: Sequence[str] = DEFAULT_PREFIXES) -> None:
        self.prefixes = tuple(prefixes)
        self.names: dict[int, str] = {}

    def watched(self, name: str | None) -> bool:
        return name is not None and name.startswith(self.prefixes)

    def feed(self, data: bytes) -> tuple[list[Change], list[tuple[int, int, int]]]:
        """Decode one datagram: (changes, [(type, seq, pid) of DONE/ERROR messages])."""
        changes: list[Change] = []
        ends: list[tuple[int, int, int]] = []
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind, _flags, seq, pid = _HDR.unpack_from(data, offset)
            if length < _HDR.size or offset + length > len(data):
                break
            start, end = offset + _HDR.size, offset + length
            if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                ends.append((kind, seq, pid))
            elif kind in (_RTM_NEWLINK, _RTM_DELLINK):
                changes.extend(self._link(kind, data, start, end))
            elif kind in (_RTM_NEWNEIGH, _RTM_DELNEIGH):
                change = self._neigh(kind, data, start, end)
                if change is not None:
                    changes.append(change)
            offset = (end + 3) & ~3
        return changes, ends

    def _link(self, kind: int, data: bytes, start: int, end: int) -> list[Change]:
        if end - start < _IFINFOMSG.size:
            return []
        family, _type, index, _flags, _change = _IFINFOMSG.unpack_from(data, start)
        raw = _attrs(data, start + _IFINFOMSG.size, end).get(_IFLA_IFNAME)
        name = raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None
        if name is None or family != _AF_UNSPEC:
            if name is not None and index not in self.names:
                self.names[index] = name
            return []
        out: list[Change] = []
        old = self.names.get(index)
        if kind == _RTM_DELLINK:
            # Kept after deletion: the device's entries' deletions may come later.
            self.names[index] = name
            if self.watched(name):
                out.append(Change(Link(name), False))
            return out
        if old is not None and old != name and self.watched(old):
            out.append(Change(Link(old), False))  # renamed
        self.names[index] = name
        if self.watched(name):
            out.append(Change(Link(name), True))
        return out

    def _neigh(self, kind: int, data: bytes, start: int, end: int) -> Change | None:
        if end - start < _NDMSG.size:
            return None
        family, index, state, flags, _type = _NDMSG.unpack_from(data, start)
        device = self.names.get(index)
        if not self.watched(device) or flags & _NTF_PROXY:
            return None
        assert device is not None
        a = _attrs(data, start + _NDMSG.size, end)
        raw_mac, raw_dst = a.get(_NDA_LLADDR), a.get(_NDA_DST)
        mac = raw_mac.hex(":") if raw_mac is not None and len(raw_mac) == 6 else None
        dst = _address(raw_dst) if raw_dst is not None else None
        present = kind == _RTM_NEWNEIGH
        if family == _AF_BRIDGE:
            if mac is None:
                return None
            if dst is None:
                # A bridge entry without a destination is not a VXLAN entry; a
                # deletion without one removes every destination of the MAC.
                return Change(Fdb(device, mac, ""), False, partial=True) if not present else None
            return Change(Fdb(device, mac, dst), present)
        if family in (_AF_INET, _AF_INET6) and dst is not None:
            if present and (mac is None or state & (_NUD_INCOMPLETE | _NUD_FAILED)):
                # Known but unresolved: no IP -> MAC mapping in this kernel.
                return Change(Neigh(device, dst, ""), False, partial=True)
            if mac is None:
                return Change(Neigh(device, dst, ""), False, partial=True)
            return Change(Neigh(device, dst, mac), present)
        return None


# --- state (pure) -----------------------------------------------------------------


class Expectation:
    """Entries that should all be present (or all absent) in some namespaces.

    `done_at` is the monotonic time of the event that completed it, per
    namespace in `done_at_by_ns`; entries already in the wanted state when it
    is registered count from the time they got there. `remaining` and `total`
    say how far it got (for "did not complete: N of M").
    """

    def __init__(self, wanted: Mapping[str, Iterable[Entry]], present: bool) -> None:
        self.present = present
        self.wanted: dict[str, frozenset[Entry]] = {ns: frozenset(es) for ns, es in wanted.items()}
        self.pending: dict[str, set[Entry]] = {ns: set(es) for ns, es in self.wanted.items()}
        self.latest: dict[str, float] = {ns: float("-inf") for ns in self.wanted}
        self.done_at_by_ns: dict[str, float] = {}
        self.done_at: float | None = None
        self.inexact = False
        # The watch it is registered with: waits go through it (its lock, its failure).
        self._watch: KernelWatch | None = None

    @property
    def total(self) -> int:
        return sum(len(es) for es in self.wanted.values())

    @property
    def remaining(self) -> int:
        return sum(len(es) for es in self.pending.values())

    @property
    def done(self) -> bool:
        return self.done_at is not None

    def _update(self, ns: str, entry: Entry, present: bool, t: float, exact: bool) -> None:
        if self.done_at is not None or entry not in self.wanted.get(ns, ()):
            return
        pending = self.pending[ns]
        if present == self.present:
            if entry in pending:
                pending.discard(entry)
                self.latest[ns] = max(self.latest[ns], t)
                self.inexact |= not exact
                if not pending:
                    self.done_at_by_ns[ns] = self.latest[ns]
                    if all(not p for p in self.pending.values()):
                        self.done_at = max(self.done_at_by_ns.values(), default=t)
        else:
            # Undone before the whole set got there: completion must be "all at once".
            pending.add(entry)
            self.done_at_by_ns.pop(ns, None)

    def wait(self, timeout: float) -> bool:
        """Block until done or `timeout` seconds; True if done. KernelWatchError if the watch died."""
        if self._watch is None:
            raise KernelWatchError("expectation is not registered with a watch")
        return self._watch.wait_until(lambda: self.done_at is not None, timeout)


@dataclass
class _NsState:
    present: dict[Entry, float] = field(default_factory=dict)
    gone: dict[Entry, float] = field(default_factory=dict)
    # (device, mac) -> its FDB destinations; (device, ip) -> its neighbour entries.
    fdb_dsts: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    neigh_macs: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    unconfirmed: set[Entry] | None = None  # during a (re)read of the tables


class WatchState:
    """Per-namespace entries with the time each appeared or vanished. Pure.

    Applies kernel semantics the notifications leave implicit: a new unicast
    FDB entry replaces the MAC's previous destination (only the flood MAC
    holds several), a neighbour entry replaces the IP's previous MAC, and a
    deleted device takes its entries with it.
    """

    def __init__(self, namespaces: Sequence[str], *, keep_events: bool = True) -> None:
        self.ns: dict[str, _NsState] = {ns: _NsState() for ns in namespaces}
        self.events: list[Event] = []
        self.keep_events = keep_events
        self.overruns: list[tuple[str, float]] = []
        self.expectations: list[Expectation] = []

    def _record(self, ns: str, entry: Entry, present: bool, t: float, exact: bool) -> None:
        st = self.ns[ns]
        if present:
            if entry in st.present:
                return
            st.present[entry] = t
            st.gone.pop(entry, None)
        else:
            if st.present.pop(entry, None) is None:
                return
            st.gone[entry] = t
        match entry:
            case Fdb(device, mac, dst):
                dsts = st.fdb_dsts.setdefault((device, mac), set())
                (dsts.add if present else dsts.discard)(dst)
            case Neigh(device, ip, mac):
                macs = st.neigh_macs.setdefault((device, ip), set())
                (macs.add if present else macs.discard)(mac)
        if self.keep_events:
            self.events.append(Event(t, ns, entry, present, exact))
        for exp in self.expectations:
            exp._update(ns, entry, present, t, exact)
        self.expectations = [e for e in self.expectations if not e.done]

    def apply(self, ns: str, change: Change, t: float, exact: bool = True) -> None:
        st = self.ns[ns]
        entry = change.entry
        if st.unconfirmed is not None and change.present:
            st.unconfirmed.discard(entry)
        match entry:
            case Fdb(device, mac, dst):
                known = st.fdb_dsts.get((device, mac), set())
                if change.present:
                    if mac != FLOOD_MAC:  # replace: one destination per unicast MAC
                        for old in [d for d in known if d != dst]:
                            self._record(ns, Fdb(device, mac, old), False, t, exact)
                    self._record(ns, entry, True, t, exact)
                else:
                    for old in list(known) if change.partial else [dst]:
                        self._record(ns, Fdb(device, mac, old), False, t, exact)
            case Neigh(device, ip, mac):
                known = st.neigh_macs.get((device, ip), set())
                if change.present:
                    for old in [m for m in known if m != mac]:
                        self._record(ns, Neigh(device, ip, old), False, t, exact)
                    self._record(ns, entry, True, t, exact)
                else:
                    for old in list(known) if change.partial else [mac]:
                        self._record(ns, Neigh(device, ip, old), False, t, exact)
            case Link(name):
                if not change.present:
                    # The kernel drops a deleted device's entries, with or without telling.
                    for other in [e for e in st.present if not isinstance(e, Link) and e.device == name]:
                        self._record(ns, other, False, t, exact)
                self._record(ns, entry, change.present, t, exact)

    def sync_start(self, ns: str) -> None:
        """A full read of the tables begins: whatever it does not show is gone at its end."""
        st = self.ns[ns]
        st.unconfirmed = set(st.present)

    def sync_end(self, ns: str, t: float) -> None:
        st = self.ns[ns]
        leftovers, st.unconfirmed = st.unconfirmed or set(), None
        for entry in sorted(leftovers, key=lambda e: isinstance(e, Link)):  # entries before devices
            self._record(ns, entry, False, t, False)

    def overrun(self, ns: str, t: float) -> None:
        self.overruns.append((ns, t))

    def register(self, exp: Expectation) -> None:
        """Start tracking `exp`, counting what is already in the wanted state."""
        for ns, entries in exp.wanted.items():
            if ns not in self.ns:
                raise KernelWatchError(f"namespace {ns!r} is not watched")
            st = self.ns[ns]
            since = st.present if exp.present else st.gone
            for entry in entries:
                there = entry in st.present
                if there == exp.present:
                    # Absent and never seen counts from -inf: it was never there.
                    exp._update(ns, entry, exp.present, since.get(entry, float("-inf")), True)
        if not exp.done and not exp.total:
            exp.done_at = float("-inf")
        if not exp.done:
            self.expectations.append(exp)


# --- the listener (I/O) -------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join("/run/netns", netns)


def _socket_in_netns(netns: str) -> socket.socket:
    """A NETLINK_ROUTE socket made in `netns`, without forking.

    setns(2) switches only the calling thread, and a socket belongs to the
    namespace of the thread that creates it: a short-lived thread enters the
    namespace, makes the socket and exits (taking the switch with it).
    """
    result: list[socket.socket | OSError] = []

    def make() -> None:
        try:
            fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result.append(exc)
            return
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result.append(OSError(err, f"setns({netns}): {os.strerror(err)}"))
                return
            result.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
        except OSError as exc:
            result.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=make, name=f"kwatch-{netns}", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


_DUMPS = (
    (_RTM_GETLINK, _IFINFOMSG.pack(_AF_UNSPEC, 0, 0, 0, 0)),
    (_RTM_GETNEIGH, _NDMSG.pack(_AF_BRIDGE, 0, 0, 0, 0)),
    (_RTM_GETNEIGH, _NDMSG.pack(_AF_INET, 0, 0, 0, 0)),
)


class _Source:
    """One namespace's subscribed socket and where its table reads stand."""

    def __init__(self, netns: str, prefixes: Sequence[str], rcvbuf: int) -> None:
        self.netns = netns
        self.decoder = Decoder(prefixes)
        self.rcvbuf = rcvbuf
        self.sock = self._open()
        self.dumps: list[tuple[int, bytes]] = []
        self.dump_seq = 0
        self.seq = 0

    def _open(self) -> socket.socket:
        sock = _socket_in_netns(self.netns)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            # Subscribe before reading the tables: a change between the two is not missed.
            sock.bind((0, (1 << (_RTNLGRP_LINK - 1)) | (1 << (_RTNLGRP_NEIGH - 1))))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def reopen(self) -> None:
        """After an overrun: a fresh socket, so no half-read dump or lost message lingers."""
        self.sock.close()
        self.sock = self._open()
        self.dumps = []
        self.dump_seq = 0

    @property
    def portid(self) -> int:
        port: int = self.sock.getsockname()[0]
        return port

    def start_sync(self) -> None:
        self.dumps = list(_DUMPS)
        self._next_dump()

    def _next_dump(self) -> None:
        # The kernel runs one dump per socket at a time: the next goes after DONE.
        msg_type, body = self.dumps.pop(0)
        self.seq += 1
        self.dump_seq = self.seq
        self.sock.send(
            _HDR.pack(_HDR.size + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_DUMP, self.seq, 0) + body
        )

    def dump_finished(self, ends: Sequence[tuple[int, int, int]]) -> bool:
        """True when the last table read of a sync has ended (starts the next one otherwise)."""
        if not self.dump_seq or not any(seq == self.dump_seq and pid == self.portid for _k, seq, pid in ends):
            return False
        if self.dumps:
            self._next_dump()
            return False
        self.dump_seq = 0
        return True


Sink = Callable[[str, Sequence[tuple[float, bool, Change]]], None]


class Listener:
    """Sockets in each namespace, drained and stamped; callbacks with what changed.

    `sink(ns, [(t, exact, change)...])` gets changes; `on_sync(ns, phase, t)`
    brackets each full read of the tables ("start"/"end"); `on_overrun(ns, t)`
    reports ENOBUFS. Runs in the calling thread until `stop_fd` is readable
    (or reaches EOF).
    """

    def __init__(
        self,
        namespaces: Sequence[str],
        *,
        prefixes: Sequence[str] = DEFAULT_PREFIXES,
        rcvbuf: int = RCVBUF,
        sink: Sink,
        on_sync: Callable[[str, str, float], None],
        on_overrun: Callable[[str, float], None],
    ) -> None:
        self.sources = [_Source(ns, prefixes, rcvbuf) for ns in namespaces]
        self.sink, self.on_sync, self.on_overrun = sink, on_sync, on_overrun
        self.syncing: set[str] = set()

    def close(self) -> None:
        for src in self.sources:
            src.sock.close()

    def _sync(self, src: _Source) -> None:
        self.on_sync(src.netns, "start", time.monotonic())
        self.syncing.add(src.netns)
        src.start_sync()

    def run(self, stop_fd: int, on_ready: Callable[[], None]) -> None:
        sel = selectors.DefaultSelector()
        for src in self.sources:
            sel.register(src.sock, selectors.EVENT_READ, src)
            self._sync(src)
        sel.register(stop_fd, selectors.EVENT_READ, None)
        ready = False
        try:
            while True:
                for key, _mask in sel.select():
                    if key.data is None:
                        return  # told to stop (or the parent is gone)
                    src = key.data
                    overrun_at = self._drain(src)
                    if overrun_at is not None:
                        self.on_overrun(src.netns, overrun_at)
                        sel.unregister(src.sock)
                        src.reopen()
                        sel.register(src.sock, selectors.EVENT_READ, src)
                        self._sync(src)
                if not ready and not self.syncing:
                    ready = True
                    on_ready()
        finally:
            sel.close()

    def _drain(self, src: _Source) -> float | None:
        """Read everything queued, stamping each datagram as it comes; the time of an overrun."""
        batch: list[tuple[float, bytes]] = []
        overrun_at: float | None = None
        while True:
            try:
                data = src.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                overrun_at = time.monotonic()
                break
            batch.append((time.monotonic(), data))
        for t, data in batch:
            changes, ends = src.decoder.feed(data)
            exact = src.netns not in self.syncing
            if changes:
                self.sink(src.netns, [(t, exact, c) for c in changes])
            if ends and src.dump_finished(ends):
                self.syncing.discard(src.netns)
                self.on_sync(src.netns, "end", t)
        return overrun_at


# --- the watch (API) --------------------------------------------------------------


class KernelWatch:
    """Watch `namespaces`; use as a context manager, or `start()` and `stop()`.

    `isolated=True` (the default) runs the listener in a child process of its
    own (see the module docstring); False runs it in a thread of this process.
    """

    def __init__(
        self,
        namespaces: Sequence[str],
        *,
        prefixes: Sequence[str] = DEFAULT_PREFIXES,
        isolated: bool = True,
        rcvbuf: int = RCVBUF,
        keep_events: bool = True,
    ) -> None:
        if not namespaces:
            raise ValueError("KernelWatch needs at least one namespace")
        self.namespaces = list(dict.fromkeys(namespaces))
        self.prefixes = tuple(prefixes)
        self.isolated = isolated
        self.rcvbuf = rcvbuf
        self.state = WatchState(self.namespaces, keep_events=keep_events)
        self._cond = threading.Condition()
        self._ready = False
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._stop_r, self._stop_w = -1, -1

    # --- life cycle ---

    def start(self, timeout: float = 15.0) -> KernelWatch:
        """Start listening; returns once every namespace's tables have been read."""
        if self.isolated:
            self._start_child()
        else:
            self._start_thread()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        if not self._ready:
            why = self._failure or f"tables not read within {timeout:g}s"
            self.stop()
            raise KernelWatchError(f"kernel watch on {', '.join(self.namespaces)}: {why}")
        return self

    def _start_thread(self) -> None:
        self._stop_r, self._stop_w = os.pipe()
        listener = Listener(
            self.namespaces,
            prefixes=self.prefixes,
            rcvbuf=self.rcvbuf,
            sink=self._apply_changes,
            on_sync=self._on_sync,
            on_overrun=self._on_overrun,
        )

        def run() -> None:
            try:
                listener.run(self._stop_r, self._on_ready)
            except Exception as exc:
                self._fail(f"listener failed: {exc!r}")
            finally:
                listener.close()

        self._thread = threading.Thread(target=run, name="kwatch", daemon=True)
        self._thread.start()

    def _start_child(self) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "--rcvbuf", str(self.rcvbuf)]
        for prefix in self.prefixes:
            argv += ["--prefix", prefix]
        argv += ["--", *self.namespaces]
        self._popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._thread = threading.Thread(target=self._read_child, name="kwatch-reader", daemon=True)
        self._thread.start()

    def _read_child(self) -> None:
        popen = self._popen  # `stop()` clears the attribute while this thread still reads
        assert popen is not None and popen.stdout is not None and popen.stderr is not None
        fd = popen.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            with self._cond:
                for line in lines:
                    self._apply_line(json.loads(line))
                self._cond.notify_all()
        err = popen.stderr.read().decode(errors="replace").strip()
        self._fail(f"listener process exited: {err.splitlines()[-1] if err else 'no message'}")

    def _apply_line(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "c":
            _, t, ns_index, present, exact, partial, what, *fields = msg
            entry: Entry = Fdb(*fields) if what == "f" else Neigh(*fields) if what == "n" else Link(*fields)
            change = Change(entry, bool(present), bool(partial))
            self.state.apply(self.namespaces[ns_index], change, t, bool(exact))
        elif kind == "sync":
            _, ns_index, phase, t = msg
            ns = self.namespaces[ns_index]
            self.state.sync_start(ns) if phase == "start" else self.state.sync_end(ns, t)
        elif kind == "overrun":
            self.state.overrun(self.namespaces[msg[1]], msg[2])
        elif kind == "ready":
            self._ready = True

    def _apply_changes(self, ns: str, changes: Sequence[tuple[float, bool, Change]]) -> None:
        with self._cond:
            for t, exact, change in changes:
                self.state.apply(ns, change, t, exact)
            self._cond.notify_all()

    def _on_sync(self, ns: str, phase: str, t: float) -> None:
        with self._cond:
            self.state.sync_start(ns) if phase == "start" else self.state.sync_end(ns, t)
            self._cond.notify_all()

    def _on_overrun(self, ns: str, t: float) -> None:
        with self._cond:
            self.state.overrun(ns, t)

    def _on_ready(self) -> None:
        with self._cond:
            self._ready = True
            self._cond.notify_all()

    def _fail(self, why: str) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = why
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop listening (the child by its PID: EOF on its stdin, then SIGKILL if needed)."""
        if self._popen is not None:
            popen, self._popen = self._popen, None
            if popen.stdin is not None:
                popen.stdin.close()
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        with self._cond:
            self._failure = self._failure or "stopped"

    def __enter__(self) -> KernelWatch:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- questions ---

    def _check(self) -> None:
        if self._failure is not None and self._failure != "stopped":
            raise KernelWatchError(self._failure)

    def present(self, ns: str, entry: Entry) -> float | None:
        """Since when `entry` is in `ns` (monotonic), or None if it is not."""
        with self._cond:
            return self.state.ns[ns].present.get(entry)

    def gone_at(self, ns: str, entry: Entry) -> float | None:
        """When `entry` last left `ns`, or None if it is there or was never seen."""
        with self._cond:
            return self.state.ns[ns].gone.get(entry)

    def entries(self, ns: str) -> dict[Entry, float]:
        """Everything watched in `ns` now, with the time each appeared."""
        with self._cond:
            return dict(self.state.ns[ns].present)

    def events(self, *, since: float = float("-inf"), netns: str | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self.state.events if e.t >= since and (netns is None or e.netns == netns)]

    def overruns(
        self, *, since: float = float("-inf"), until: float = float("inf")
    ) -> list[tuple[str, float]]:
        """(namespace, time) of every ENOBUFS in [since, until]: figures measured then are unsound."""
        with self._cond:
            return [(ns, t) for ns, t in self.state.overruns if since <= t <= until]

    def expect(self, wanted: Mapping[str, Iterable[Entry]], *, present: bool = True) -> Expectation:
        """Track `wanted` (namespace -> entries) until all are present (or all absent)."""
        exp = Expectation(wanted, present)
        with self._cond:
            self._check()
            exp._watch = self
            self.state.register(exp)
        return exp

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` (called under the watch's lock after each change) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                self._check()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


# --- the child process -------------------------------------------------------------


def _encode_change(t: float, ns_index: int, exact: bool, change: Change) -> list[Any]:
    entry = change.entry
    what = "f" if isinstance(entry, Fdb) else "n" if isinstance(entry, Neigh) else "l"
    return ["c", t, ns_index, int(change.present), int(exact), int(change.partial), what, *entry]


def _child_main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="kernel watch listener (started by KernelWatch)")
    parser.add_argument("--prefix", action="append", default=[])
    parser.add_argument("--rcvbuf", type=int, default=RCVBUF)
    parser.add_argument("namespaces", nargs="+")
    args = parser.parse_args(argv)
    index = {ns: i for i, ns in enumerate(args.namespaces)}
    out = sys.stdout.buffer

    def write(msgs: Iterator[list[Any]] | list[list[Any]]) -> None:
        out.write(b"".join(json.dumps(m, separators=(",", ":")).encode() + b"\n" for m in msgs))
        out.flush()

    try:
        # The measuring instrument goes first: it stamps and sleeps, it does not compute.
        os.setpriority(os.PRIO_PROCESS, 0, -5)
    except OSError:
        pass
    listener = Listener(
        args.namespaces,
        prefixes=tuple(args.prefix) or DEFAULT_PREFIXES,
        rcvbuf=args.rcvbuf,
        sink=lambda ns, changes: write(_encode_change(t, index[ns], ex, c) for t, ex, c in changes),
        on_sync=lambda ns, phase, t: write([["sync", index[ns], phase, t]]),
        on_overrun=lambda ns, t: write([["overrun", index[ns], t]]),
    )
    try:
        # EOF on stdin (the parent closed it, or died) ends the listener.
        listener.run(sys.stdin.fileno(), lambda: write([["ready"]]))
    except BrokenPipeError:
        return 0
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
