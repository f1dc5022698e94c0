"""The daemon's systemd watchdog: pings while every task lives, silence once one died."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from overlayd.core.config import from_flat
from overlayd.daemon.main import Daemon
from overlayd.daemon.sdnotify import Notifier


def daemon(tmp_path: Path) -> Daemon:
    flat: dict[str, Any] = {
        "node.name": "h1",
        "underlay.address": "198.18.0.11",
        "store.url": "gossip",
        "gossip.insecure": True,
        "state.dir": str(tmp_path / "state"),
    }
    return Daemon(from_flat(flat))


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


async def test_watchdog_pings_stop_when_a_task_dies(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.setblocking(False)
    d = daemon(tmp_path)
    d.notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    watchdog = d.tasks.spawn(d._watchdog(0.02), name="sd-watchdog")
    try:
        async def until(check: Any, what: str) -> None:
            async with asyncio.timeout(5):
                while True:
                    if check():
                        return
                    await asyncio.sleep(0.01)

        pings: list[bytes] = []
        await until(lambda: pings.extend(drain(listener)) or len(pings) >= 3, "three pings")
        assert set(pings) == {b"WATCHDOG=1"}

        async def probe_loop() -> None:  # stands for any loop the daemon runs, gossip's included
            raise RuntimeError("socket gone")

        d.tasks.spawn(probe_loop(), name="gossip-probe-h1")
        await until(lambda: bool(d.tasks.failures), "the failure to be recorded")
        await asyncio.sleep(0.05)  # a ping may have been on its way
        drain(listener)
        await asyncio.sleep(0.1)  # five watchdog intervals
        assert drain(listener) == []
        assert [name for name, _ in d.tasks.failures] == ["gossip-probe-h1"]
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        d.notifier.close()
        listener.close()
