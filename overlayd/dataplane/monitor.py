"""The notification socket: link, neighbour, address, route and netconf changes in one namespace.

A raw NETLINK_ROUTE socket bound to the link and neighbour multicast groups
(the latter carries bridge FDB and IPv4 neighbour changes alike), and to
the IPv4 address, route and netconf groups (`GROUPS`; a gateway namespace's
monitor takes `INSIDE_GROUPS`: all but neighbours). The event
loop calls `_readable` when datagrams wait; each is handed, unparsed, to
`on_datagram` (the kernel mirror parses it). Reading stops after a bounded
number of datagrams per wake-up so a flood of notifications cannot starve
the rest of the daemon.

An overrun (ENOBUFS: the kernel dropped notifications because the receive
buffer was full) means the mirror can no longer be trusted; it is counted
and reported through `on_overrun`, and the reconciler re-reads everything.
Never ignored.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

from overlayd.dataplane import netlink as nl
from overlayd.dataplane.nsock import socket_in_netns

log = logging.getLogger(__name__)

_SO_RCVBUFFORCE: Final = 33
# Room for ~300k notifications: a 10,000-endpoint join writes 20,000 entries
# at once and each comes back as one.
RCVBUF: Final = 32 * 1024 * 1024
_RECV_SIZE: Final = 256 * 1024
_PER_WAKEUP: Final = 256
GROUPS: Final = (
    nl.RTMGRP_LINK | nl.RTMGRP_NEIGH | nl.RTMGRP_IPV4_IFADDR | nl.RTMGRP_IPV4_ROUTE | nl.RTMGRP_IPV4_NETCONF
)
INSIDE_GROUPS: Final = nl.RTMGRP_LINK | nl.RTMGRP_IPV4_IFADDR | nl.RTMGRP_IPV4_ROUTE | nl.RTMGRP_IPV4_NETCONF


_SO_ATTACH_FILTER: Final = 26
_BPF_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_BPF_LD_H_ABS, _BPF_LD_W_ABS, _BPF_LD_B_ABS = 0x28, 0x20, 0x30
_BPF_JEQ_K, _BPF_JSET_K, _BPF_RET_K = 0x15, 0x45, 0x06
# struct ndmsg after the header: family, 3 pad bytes, ifindex (4), state (2), then flags.
_NDM_FLAGS: Final = nl.HDR.size + 10


def _as_loaded(fmt: str, value: int) -> int:
    """`value` packed in host order as the message carries it, read back the way BPF's
    absolute loads read (network order)."""
    return int.from_bytes(struct.pack(fmt, value), "big")


def echo_filter(port: int) -> bytes:
    """A classic BPF program: drop RTM_NEWNEIGH / RTM_DELNEIGH whose nlmsg_pid is `port`,
    a bridge's own forwarding entries (AF_BRIDGE neighbour messages without NTF_SELF:
    the entry of each port's MAC and every MAC the bridge learns or forgets, which the
    mirror skips unread: it keeps only the VXLAN devices' entries, which carry NTF_SELF),
    and a bridge's link messages about its ports (RTM_NEWLINK / RTM_DELLINK of family
    AF_BRIDGE, which the mirror skips unread too); accept everything else.

    Of the notifications an endpoint added on this host makes, the kernel drops five
    bridge port messages and two forwarding entries (its port's MAC, and the container's
    as the bridge learns it) here.

    Each notification is a datagram of one message, so the header and the family byte
    after it are the message's own.
    """
    new, gone = _as_loaded("=H", nl.RTM_NEWNEIGH), _as_loaded("=H", nl.RTM_DELNEIGH)
    link, unlink = _as_loaded("=H", nl.RTM_NEWLINK), _as_loaded("=H", nl.RTM_DELLINK)
    family = nl.HDR.size  # ifi_family or ndm_family: the payload's first byte
    insns = [
        (_BPF_LD_H_ABS, 0, 0, 4),  # 0: nlmsg_type
        (_BPF_JEQ_K, 5, 0, new),  # 1: -> 7, load the port
        (_BPF_JEQ_K, 4, 0, gone),  # 2: -> 7
        (_BPF_JEQ_K, 1, 0, link),  # 3: -> 5, load the family
        (_BPF_JEQ_K, 0, 9, unlink),  # 4: neither kind -> 14, accept
        (_BPF_LD_B_ABS, 0, 0, family),  # 5
        (_BPF_JEQ_K, 6, 7, nl.AF_BRIDGE),  # 6: a bridge's word on a port -> 13, drop; else accept
        (_BPF_LD_W_ABS, 0, 0, 12),  # 7: nlmsg_pid
        (_BPF_JEQ_K, 4, 0, _as_loaded("=I", port)),  # 8: ours -> 13, drop
        (_BPF_LD_B_ABS, 0, 0, family),  # 9
        (_BPF_JEQ_K, 0, 3, nl.AF_BRIDGE),  # 10: an IPv4 neighbour -> 14, accept
        (_BPF_LD_B_ABS, 0, 0, _NDM_FLAGS),  # 11
        (_BPF_JSET_K, 1, 0, nl.NTF_SELF),  # 12: a device's own entry (VXLAN) -> 14, accept
        (_BPF_RET_K, 0, 0, 0),  # 13: drop
        (_BPF_RET_K, 0, 0, 0xFFFFFFFF),  # 14: accept
    ]
    return b"".join(_BPF_INSN.pack(*insn) for insn in insns)


class Monitor:
    def __init__(
        self,
        *,
        netns: str | None,
        on_datagram: Callable[[bytes], None],
        on_overrun: Callable[[], None],
        rcvbuf: int = RCVBUF,
        groups: int = GROUPS,
    ) -> None:
        self._netns = netns
        self._on_datagram = on_datagram
        self._on_overrun = on_overrun
        self._rcvbuf = rcvbuf
        self._groups = groups
        self._sock: socket.socket | None = None
        self._poll: Callable[[int], list[tuple[int, int]]] | None = None  # the socket's, while open
        self._loop: asyncio.AbstractEventLoop | None = None
        self.overruns = 0
        self.echoes_filtered = False  # `ignore_echoes` took: our neighbour writes send none here

    def start(self) -> None:
        """Subscribe; from now on every change is delivered (call before the first dump)."""
        if self._netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        else:
            sock = socket_in_netns(self._netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self._rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            sock.bind((0, self._groups))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.echoes_filtered = False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        self._poll = poller.poll
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def ignore_echoes(self, port: int) -> bool:
        """Have the kernel drop, before they are queued here, the neighbour notifications
        of changes the socket with netlink port `port` asked for (our own entry writes: the
        mirror recorded each when the kernel acknowledged it). A join writes one neighbour
        entry per remote endpoint: that many datagrams not woken for, copied or looked at.
        And a bridge's messages about its ports and its own forwarding entries, which the
        mirror skips (`echo_filter`).

        A socket filter (classic BPF) on the message header. False if it could not be
        attached: the echoes then arrive, and the mirror skips them by their port.
        """
        if self._sock is None or not port:
            return False
        program = echo_filter(port)
        code = ctypes.create_string_buffer(program, len(program))
        fprog = struct.pack("HL", len(program) // _BPF_INSN.size, ctypes.addressof(code))
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        except OSError as exc:
            log.warning("cannot filter our own neighbour echoes out (%s): reading them", exc)
            return False
        self.echoes_filtered = True
        return True

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._poll = None

    def drain(self) -> None:
        """Read everything waiting now (before a pass compares against the mirror).

        Asked first with a poll that reads nothing: before nearly every pass nothing
        waits, and a read that finds the socket empty raises (BlockingIOError), about
        four times the cost of the poll. An overrun shows in the poll too (POLLERR), and
        the read that follows reports it as ever.
        """
        if self._poll is None or not self._poll(0):
            return
        while self._read(_PER_WAKEUP) == _PER_WAKEUP:
            pass

    def _readable(self) -> None:
        self._read(_PER_WAKEUP)

    def read_some(self) -> None:
        """Read what waits now, as much as one wake-up of the event loop would: a caller that
        just wrote to the kernel takes its echoes here (the kernel queued them within the
        write), without a loop iteration to be woken for them."""
        self._read(_PER_WAKEUP)

    def read_echoes(self, expected: int, on_echo: Callable[[bytes], None] | None = None) -> None:
        """Read the `expected` notifications a write just caused (the kernel queued them
        within the write), and no more: once they all came, no read is spent finding the
        socket empty. If fewer came (a write that changed nothing sends none), the read
        that finds it empty ends this, as in `read_some`. Whatever else waits (someone
        else's change) is read, in order, when the event loop sees the socket readable or
        by the next pass's drain; a pass never compares before draining.

        `on_echo`: what takes each of them instead of `on_datagram` (a caller that looks
        at the outcome once, after all of them, rather than per datagram)."""
        if expected > 0:
            self._read(min(expected, _PER_WAKEUP), on_echo)

    def _read(self, limit: int, on_datagram: Callable[[bytes], None] | None = None) -> int:
        sock = self._sock
        if sock is None:
            return 0
        handle = on_datagram or self._on_datagram
        count = 0
        while count < limit:
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    log.warning("netlink notifications overran the receive buffer: re-reading the kernel")
                    self._on_overrun()
                    continue
                raise
            count += 1
            handle(data)
        return count
