"""Sockets inside another network namespace, without forking: the one setns helper.

Low level and neutral: the dataplane opens its netlink sockets with it, the
lab its TCP and UDP sockets. It imports nothing of overlayd.

pyroute2 enters a namespace by forking a helper process that hands the socket
back. In the daemon that fork happens in a process that also runs gRPC's
threads (the etcd client), and the child dies with SIGSEGV in gRPC's fork
handlers. A socket belongs to the namespace of the thread that creates it,
and setns(2) switches only the calling thread, so we create the socket in a
short-lived thread that enters the namespace and then exits.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> str:
    """A namespace name means /run/netns/<name>; anything with a slash is a path."""
    return netns if "/" in netns else os.path.join("/run/netns", netns)


def socket_in_netns(netns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket that lives in namespace `netns` (name or path). Raises OSError."""
    result: list[socket.socket | OSError] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result.append(exc)
            return
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result.append(OSError(err, f"setns({netns}): {os.strerror(err)}"))
                return
            result.append(socket.socket(family, kind, proto))
        except OSError as exc:
            result.append(exc)
        finally:
            os.close(fd)
        # The thread ends here, and its namespace switch with it.

    thread = threading.Thread(target=enter_and_create, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, OSError):
        raise outcome
    return outcome


class _Home(threading.local):
    fd: int | None = None  # this thread's own namespace, opened on first use
    lost: bool = False  # it could not return there: the thread must not be used again


_home = _Home()


def socket_in_netns_fd(netns_fd: int, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket in the namespace open at `netns_fd`, made by this very thread.

    For worker threads that open one socket per job (`socket_in_netns` would start a
    thread each time, some 150 µs of CPU): the thread enters the namespace, makes the
    socket and goes back at once. Should it ever fail to go back, the thread is marked,
    and every later call from it (and `check_thread_home`) raises instead of making
    sockets in the wrong place. Raises OSError.
    """
    check_thread_home()
    if _home.fd is None:
        _home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")
    try:
        return socket.socket(family, kind, proto)
    finally:
        if _libc.setns(_home.fd, _CLONE_NEWNET) != 0:
            _home.lost = True
            err = ctypes.get_errno()
            raise OSError(err, f"setns back to this thread's namespace: {os.strerror(err)}")


def check_thread_home() -> None:
    """Raise OSError if this thread is stranded in another namespace (see `socket_in_netns_fd`)."""
    if _home.lost:
        raise OSError(f"thread {threading.current_thread().name} lost its network namespace")
