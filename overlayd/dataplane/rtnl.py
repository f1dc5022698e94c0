"""A raw NETLINK_ROUTE socket driven by the event loop: dumps, queries and write batches.

Messages come packed from `dataplane.netlink`; this module only holds the
conversation: sequence numbers, reading replies and error acks, and telling
which request of a batch an error belongs to.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from overlayd.dataplane import netlink as nl
from overlayd.dataplane.nsock import socket_in_netns

T = TypeVar("T")

_SO_RCVBUFFORCE: Final = 33
_SO_SNDBUFFORCE: Final = 32
# Messages per sendmsg. Failed requests come back as error acks that wait in
# the receive buffer until the batch is sent; 512 of them stay far below it.
_CHUNK: Final = 512
_RCVBUF: Final = 8 * 1024 * 1024
_SNDBUF: Final = 1024 * 1024
_RECV_SIZE: Final = 128 * 1024  # > the 32 KiB the kernel puts in one dump skb
# Only reached if the kernel lost acknowledgements (receive buffer overrun).
_ACK_TIMEOUT: Final = 10.0

# Result code of a batch entry whose outcome is unknown (its answer was lost).
LOST: Final = -1


class KernelError(Exception):
    """The kernel refused or could not do what overlayd needs (with the reason)."""


class Rtnl:
    """A raw NETLINK_ROUTE socket for dumps and batches, driven by the event loop.

    Requests in a batch go without NLM_F_ACK, so the kernel answers only the
    ones that fail; a trailing NLMSG_NOOP with NLM_F_ACK marks the end. The
    kernel handles one sendmsg synchronously and in order, so once the NOOP's
    ack is read, every error ack of that batch has been read before it, each
    carrying the sequence number of the request it answers.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0  # the last sequence number given out
        # One conversation at a time: replies are matched by sequence number,
        # but a dump and a batch interleaved on one socket would each have to
        # skip the other's messages.
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls, netns: str | None) -> Rtnl:
        if netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        else:
            sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            for force, plain, size in (
                (_SO_RCVBUFFORCE, socket.SO_RCVBUF, _RCVBUF),
                (_SO_SNDBUFFORCE, socket.SO_SNDBUF, _SNDBUF),
            ):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, size)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, size)
            # Error acks echo only the failed request's header, not its body,
            # and carry the kernel's explanation ("FDB entry not found" ...).
            sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_CAP_ACK, 1)
            sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_EXT_ACK, 1)
            sock.bind((0, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    @property
    def port(self) -> int:
        """This socket's netlink port id: what the notifications of its writes carry as nlmsg_pid."""
        return int(self._sock.getsockname()[0])

    def _next_seq(self) -> int:
        return self._seqs(1).start

    def _seqs(self, count: int) -> range:
        """`count` sequence numbers in a row, never 0 (the kernel's own messages carry 0):
        a batch's are stamped in one loop, without a call per message. Past 2**32 - 1
        they start again at 1."""
        first = self._seq + 1
        if first + count > 1 << 32:
            first = 1
        self._seq = first + count - 1
        return range(first, first + count)

    async def _recv(self) -> bytes:
        # The kernel answers within sendmsg/recvmsg itself, so data is almost
        # always there already; only fall back to the loop when it is not.
        try:
            return self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return await asyncio.get_running_loop().sock_recv(self._sock, _RECV_SIZE)

    async def query(
        self,
        msg_type: int,
        body: bytes,
        parse: Callable[[bytes, int, int], T | None],
        *,
        dump: bool = True,
    ) -> list[T]:
        """Send one request; `parse(data, payload_start, end)` each reply message.

        A dump that the kernel marks as interrupted (the table changed while
        it was read) is read again, a few times at most.
        """
        return await self._whole(msg_type, lambda: self._query_once(msg_type, body, parse, dump))

    async def _whole(self, msg_type: int, once: Callable[[], Awaitable[tuple[list[T], bool]]]) -> list[T]:
        """Run one conversation (`once`) under the lock until the kernel does not mark it
        interrupted (the table changed while it was read), a few times at most."""
        for _attempt in range(5):
            try:
                async with self._lock:
                    result, interrupted = await once()
            except OSError as exc:
                raise KernelError(f"netlink request (type {msg_type}) failed: {exc}") from exc
            if not interrupted:
                return result
        raise KernelError(f"netlink dump (type {msg_type}) kept being interrupted by changes")

    async def _query_once(
        self,
        msg_type: int,
        body: bytes,
        parse: Callable[[bytes, int, int], T | None],
        dump: bool,
    ) -> tuple[list[T], bool]:
        seq = self._next_seq()
        flags = nl.NLM_F_REQUEST | (nl.NLM_F_DUMP if dump else 0)
        self._sock.send(nl.HDR.pack(nl.HDR.size + len(body), msg_type, flags, seq, 0) + body)
        out: list[T] = []
        interrupted = False
        while True:
            data = await self._recv()
            offset = 0
            while offset + nl.HDR.size <= len(data):
                length, kind, mflags, mseq, _pid = nl.HDR.unpack_from(data, offset)
                if length < nl.HDR.size:
                    break
                end = offset + length
                if mseq == seq:
                    if mflags & nl.NLM_F_DUMP_INTR:
                        interrupted = True
                    if kind == nl.NLMSG_DONE:
                        return out, interrupted
                    if kind == nl.NLMSG_ERROR:
                        code = -nl.I32.unpack_from(data, offset + nl.HDR.size)[0]
                        if code == 0:
                            return out, interrupted
                        raise NetlinkError(code, nl.extack_msg(data, offset, end, mflags))
                    item = parse(data, offset + nl.HDR.size, end)
                    if item is not None:
                        out.append(item)
                    if not dump and not mflags & nl.NLM_F_MULTI:
                        return out, interrupted
                # Anything with another sequence number is a late answer to a
                # conversation that was abandoned (cancelled); skip it.
                offset = (end + 3) & ~3

    async def dump_rows(
        self, msg_type: int, body: bytes, read: Callable[[bytes, int, list[T]], nl.DumpPart]
    ) -> list[T]:
        """A dump read a datagram at a time: `read(data, seq, rows)` walks one datagram
        itself and appends what it keeps to `rows` (a big table's loop, without a call per
        message). A dump the kernel marks as interrupted is read again, a few times at most.
        """
        return await self._whole(msg_type, lambda: self._dump_rows_once(msg_type, body, read))

    async def _dump_rows_once(
        self, msg_type: int, body: bytes, read: Callable[[bytes, int, list[T]], nl.DumpPart]
    ) -> tuple[list[T], bool]:
        seq = self._next_seq()
        self._sock.send(
            nl.HDR.pack(nl.HDR.size + len(body), msg_type, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, 0) + body
        )
        rows: list[T] = []
        interrupted = False
        while True:
            part = read(await self._recv(), seq, rows)
            interrupted = interrupted or part.interrupted
            if part.done:
                if part.error:
                    raise NetlinkError(part.error, part.text)
                return rows, interrupted

    async def batch(self, msgs: Sequence[bytes]) -> list[tuple[int, str]]:
        """Send write requests (packed with seq 0) in chunks; (errno, text) per message.

        errno 0 means applied. `LOST` means the outcome is unknown because
        the kernel's answer never arrived.
        """
        results: list[tuple[int, str]] = [(0, "")] * len(msgs)
        for start in range(0, len(msgs), _CHUNK):
            if start:
                # Give the rest of the daemon (gossip, API) a turn between chunks (not after
                # the last: a one-chunk batch, every remote change, costs no loop iteration).
                await asyncio.sleep(0)
            chunk = msgs[start : start + _CHUNK]
            async with self._lock:
                await self._batch_chunk(chunk, results, start)
        return results

    async def _batch_chunk(self, chunk: Sequence[bytes], results: list[tuple[int, str]], base: int) -> None:
        buf = bytearray(b"".join(chunk))
        numbers = self._seqs(len(chunk) + 1)  # one per message, then the fence's
        # sequence number -> index in results
        seqs: dict[int, int] = dict(zip(numbers, range(base, base + len(chunk)), strict=False))
        offset = 0
        stamp = nl.U32.pack_into
        for msg, seq in zip(chunk, numbers, strict=False):  # the fence's is not stamped
            stamp(buf, offset + 8, seq)
            offset += len(msg)
        fence = numbers[-1]
        buf += nl.HDR.pack(nl.HDR.size, nl.NLMSG_NOOP, nl.NLM_F_REQUEST | nl.NLM_F_ACK, fence, 0)
        answered: set[int] = set()
        sock = self._sock
        try:
            sock.send(buf)
        except OSError as exc:
            # The kernel did not take the datagram: nothing in it was applied.
            for index in seqs.values():
                results[index] = (exc.errno or errno.EIO, f"sending to the kernel failed: {exc}")
            return
        try:
            # The kernel handles the batch within send() and queues its answers there and
            # then: read them at once, with no timer to arm, while they are there.
            while True:
                try:
                    data = sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    break
                if _acks(data, fence, seqs, results, answered):
                    return
            async with asyncio.timeout(_ACK_TIMEOUT):
                while True:
                    if _acks(await self._recv(), fence, seqs, results, answered):
                        return
        except (TimeoutError, OSError) as exc:
            # ENOBUFS (receive buffer overrun) or no fence: some error acks
            # may be lost, so nothing unanswered in this chunk is known to be
            # applied. Say so; the next reconcile reads the kernel again.
            reason = f"kernel acknowledgement lost ({exc!r}); outcome unknown"
            for index in seqs.values():
                if index not in answered:
                    results[index] = (LOST, reason)


def _acks(
    data: bytes, fence: int, seqs: dict[int, int], results: list[tuple[int, str]], answered: set[int]
) -> bool:
    """The error acks in one datagram of a batch's answers into `results` (and their
    positions into `answered`); True once the fence's ack came: the batch is answered."""
    offset = 0
    while offset + nl.HDR.size <= len(data):
        length, kind, mflags, mseq, _pid = nl.HDR.unpack_from(data, offset)
        if length < nl.HDR.size:
            break
        end = offset + length
        if kind == nl.NLMSG_ERROR:
            if mseq == fence:
                return True
            pos = seqs.get(mseq)
            if pos is not None:
                code = -nl.I32.unpack_from(data, offset + nl.HDR.size)[0]
                results[pos] = (code, nl.extack_msg(data, offset, end, mflags))
                answered.add(pos)
        offset = (end + 3) & ~3
    return False
