"""systemd's readiness protocol (sd_notify), spoken directly over its socket.

The protocol is documented in sd_notify(3): the service manager passes a
unix datagram socket in `$NOTIFY_SOCKET`, either a path or, when it starts
with `@`, an abstract address (note that abstract addresses belong to a
network namespace: a process that moved to another netns cannot reach one).
Each datagram is newline-separated `KEY=VALUE` lines: `READY=1`,
`STATUS=...`, `WATCHDOG=1`, `STOPPING=1`.

`$WATCHDOG_USEC` (and `$WATCHDOG_PID`, when set, naming the process it is
meant for) asks for `WATCHDOG=1` at least that often; systemd recommends
half the interval. The standard library is enough; python3-systemd is not
importable from the project's venv and not needed.

A notification is a courtesy to the manager, never a reason to fail: send
errors are logged once per kind and otherwise ignored, and without
`$NOTIFY_SOCKET` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "parse_address", "watchdog_interval"]


def parse_address(value: str) -> str | bytes:
    """The connectable address for a `$NOTIFY_SOCKET` value (`@name` is abstract)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        # vsock addresses (vsock:CID:PORT) exist for VMs; a daemon on a host never gets one.
        raise ValueError(f"unsupported NOTIFY_SOCKET {value!r}: expected a path or @abstract name")
    return value


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None if not asked."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # meant for another process (the one that exec'd us, say)
    return int(usec) / 1e6 / 2


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address: str | bytes | None = None
        raw = env.get("NOTIFY_SOCKET", "")
        if raw:
            try:
                self.address = parse_address(raw)
            except ValueError as exc:
                log.warning("%s; not notifying the service manager", exc)
        self.watchdog_interval = watchdog_interval(env, os.getpid()) if self.address else None
        self._sock: socket.socket | None = None
        self._failed: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one datagram of KEY=VALUE lines; True if it went out (False also when disabled)."""
        if self.address is None or not fields:
            return False
        # A newline inside a value would start a new (bogus) assignment.
        payload = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload.encode(), self.address)
        except OSError as exc:
            kind = type(exc).__name__
            if kind not in self._failed:
                self._failed.add(kind)
                log.warning("cannot notify the service manager at %r: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING="1", **({"STATUS": status} if status else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
