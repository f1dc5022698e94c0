"""sd_notify: datagrams to a real listening socket, at a path and at an abstract address."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.daemon.sdnotify import Notifier, parse_address, watchdog_interval


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5.0)
    return sock


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = _listener(path)
    yield path, sock
    sock.close()


def test_parse_address() -> None:
    assert parse_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_address("@sd-abc") == b"\0sd-abc"
    with pytest.raises(ValueError, match="unsupported NOTIFY_SOCKET"):
        parse_address("vsock:2:1234")


def test_watchdog_interval() -> None:
    pid = os.getpid()
    assert watchdog_interval({}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, pid) == 15.0
    # Meant for another process: not ours to answer.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}, pid) is None


def test_messages_reach_a_path_listener(path_listener: tuple[str, socket.socket]) -> None:
    path, sock = path_listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    try:
        assert notifier.enabled and notifier.watchdog_interval == 1.0
        assert notifier.ready("ready: 1 network")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ready: 1 network"
        assert notifier.status("line one\nline two")
        assert sock.recv(4096) == b"STATUS=line one line two"  # a newline would start a new field
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        notifier.close()


def test_messages_reach_an_abstract_listener() -> None:
    name = f"overlayd-test-{secrets.token_hex(6)}"
    sock = _listener(b"\0" + name.encode())
    notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
    try:
        assert notifier.watchdog_interval is None
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        notifier.close()
        sock.close()


def test_without_a_manager_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval is None


def test_a_vanished_manager_is_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    try:
        assert notifier.ready() is False
        assert notifier.status("x") is False
        # Logged once, not on every ping.
        assert sum("cannot notify" in r.getMessage() for r in caplog.records) == 1
    finally:
        notifier.close()
