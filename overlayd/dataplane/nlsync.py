"""A blocking NETLINK_ROUTE socket, for a worker thread.

Creating a veth pair, moving one end into another namespace and deleting a
pair are the slowest things overlayd asks of the kernel: the kernel does the
work inside `sendmsg`, under its RTNL lock, and on a busy host that can take
milliseconds. Done on the event loop, every request of the daemon would wait
behind it; done here, in a thread (`asyncio.to_thread`), only the add that
needs it waits, and the loop keeps serving gossip, the store and other adds.

Each request goes with NLM_F_ACK and is answered before the next is sent, so
every answer is the (errno, kernel's explanation) of exactly one request.

The socket blocks, with the kernel's own receive timeout (SO_RCVTIMEO), not
Python's: a socket with a Python timeout polls before every send and receive,
two system calls and two hand-overs of the GIL (to the event loop, which waits
for it) where one does. A send needs no timeout: the kernel does the work
within it, and waiting for its RTNL lock is not something a poll could bound.
"""

from __future__ import annotations

import itertools
import socket
import struct
from types import TracebackType
from typing import Final

from overlayd.dataplane import netlink as nl
from overlayd.util.nsutil import check_thread_home, socket_in_netns, socket_in_netns_fd

_RECV_SIZE: Final = 64 * 1024
_TIMEOUT: Final = 10.0


class BlockingRtnl:
    def __init__(self, netns: str | int | None, *, timeout: float = _TIMEOUT) -> None:
        """`netns`: a namespace's name or path, an fd open on one (entered by this thread
        for the moment it takes: no thread started), or None for this thread's own.
        `timeout`: how long a receive waits for the kernel's answer (TimeoutError)."""
        if isinstance(netns, int):
            sock = socket_in_netns_fd(netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        elif netns is None:
            check_thread_home()
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        else:
            sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_CAP_ACK, 1)
            sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_EXT_ACK, 1)
            sock.bind((0, 0))
            seconds = int(timeout)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_RCVTIMEO,
                struct.pack("ll", seconds, int((timeout - seconds) * 1e6)),
            )
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._timeout = timeout
        self._seq = itertools.count(1)

    def __enter__(self) -> BlockingRtnl:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _recv(self) -> bytes:
        try:
            return self._sock.recv(_RECV_SIZE)
        except BlockingIOError:  # the receive timeout ran out (EAGAIN)
            raise TimeoutError(f"no answer from the kernel within {self._timeout:g} s") from None

    def request(self, msg: bytes) -> tuple[int, str]:
        """Send one request packed with sequence number 0; (errno, text) of its answer, 0 if applied."""
        seq = next(self._seq)
        length, kind, flags, _seq, pid = nl.HDR.unpack_from(msg, 0)
        self._sock.send(nl.HDR.pack(length, kind, flags | nl.NLM_F_ACK, seq, pid) + msg[nl.HDR.size :])
        while True:
            data = self._recv()
            for mtype, mflags, mseq, start, end in nl.messages(data):
                if mseq == seq and mtype == nl.NLMSG_ERROR:
                    code = -nl.I32.unpack_from(data, start)[0]
                    return code, nl.extack_msg(data, start - nl.HDR.size, end, mflags)

    def requests(self, msgs: list[bytes]) -> list[tuple[int, str]]:
        """Send `msgs` in one datagram, each with NLM_F_ACK; their (errno, text) answers in order.

        One system call for several changes: the kernel applies them one after the other,
        and a failed one does not stop the rest (the caller decides what a failure undoes).
        """
        first = next(self._seq)
        for _ in msgs[1:]:
            next(self._seq)
        out = bytearray()
        for i, msg in enumerate(msgs):
            length, kind, flags, _seq, pid = nl.HDR.unpack_from(msg, 0)
            out += nl.HDR.pack(length, kind, flags | nl.NLM_F_ACK, first + i, pid) + msg[nl.HDR.size :]
            out += bytes(-len(out) % 4)  # each message starts aligned
        self._sock.send(bytes(out))
        answers: dict[int, tuple[int, str]] = {}
        while len(answers) < len(msgs):
            data = self._recv()
            for mtype, mflags, mseq, start, end in nl.messages(data):
                if mtype == nl.NLMSG_ERROR and first <= mseq < first + len(msgs):
                    code = -nl.I32.unpack_from(data, start)[0]
                    answers[mseq] = (code, nl.extack_msg(data, start - nl.HDR.size, end, mflags))
        return [answers[first + i] for i in range(len(msgs))]

    def get_link(self, ifname: str) -> nl.LinkInfo | None:
        """One link by name, or None."""
        seq = next(self._seq)
        body = nl.get_link_request(ifname)
        self._sock.send(nl.HDR.pack(nl.HDR.size + len(body), nl.RTM_GETLINK, nl.NLM_F_REQUEST, seq, 0) + body)
        while True:
            data = self._recv()
            for mtype, _mflags, mseq, start, end in nl.messages(data):
                if mseq != seq:
                    continue
                if mtype == nl.NLMSG_ERROR:
                    return None
                return nl.parse_link(data, start, end)
