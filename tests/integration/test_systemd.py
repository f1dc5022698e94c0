"""The systemd unit (checked by systemd-analyze) and a real daemon speaking sd_notify to a listener."""

from __future__ import annotations

import configparser
import itertools
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from overlayd.api.client import AdminClient, ClientError
from overlayd.core import config as config_mod
from overlayd.lab import Lab, netns

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "overlayd.service"
INSTALLED_EXEC = "/usr/local/bin/overlayd"


def _unit_service() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT)
    return dict(parser["Service"])


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found: install the `systemd` package (see .ci/run)")
    # verify insists that ExecStart's binary exists: point it at this venv's overlayd.
    overlayd = Path(sys.executable).parent / "overlayd"
    assert overlayd.exists(), overlayd
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text
    unit = tmp_path / "overlayd.service"
    unit.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={overlayd} "))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # It exits 0 on some parse warnings (an unknown key, say): any output is a failure.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", (
        result.returncode,
        result.stdout,
        result.stderr,
    )


def test_unit_hardening_matches_what_the_daemon_needs() -> None:
    service = _unit_service()
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["WatchdogSec"]
    assert service["ExecStart"] == f"{INSTALLED_EXEC} --config {config_mod.DEFAULT_PATH}"
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"}
    assert set(service["CapabilityBoundingSet"].split()) == caps
    assert set(service["AmbientCapabilities"].split()) == caps
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectHome"] == "yes"
    assert service["RestrictNamespaces"] == "net"  # setns into endpoint namespaces, nothing else
    # ProtectSystem=strict leaves only these writable: the daemon's defaults must lie inside.
    defaults = config_mod.Config.__dataclass_fields__
    state_dir = defaults["state_dir"].default
    admin_socket = defaults["admin_socket"].default
    assert isinstance(state_dir, str) and isinstance(admin_socket, str)
    assert Path(state_dir) == Path("/var/lib") / service["StateDirectory"]
    assert Path(admin_socket).parent == Path("/run") / service["RuntimeDirectory"]


# --- a real daemon and a real NOTIFY_SOCKET listener --------------------------------------


@dataclass
class Message:
    at: float
    fields: dict[str, str]
    ready_per_admin: bool | None = None  # the admin API's "ready" when READY=1 arrived


@dataclass
class NotifyListener:
    """Collects datagrams on a unix socket in a thread, as systemd's notify socket would."""

    path: Path
    admin_socket: Path
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            message = Message(time.monotonic(), fields)
            if fields.get("READY") == "1":
                try:
                    message.ready_per_admin = AdminClient(str(self.admin_socket), timeout=5).status().ready
                except ClientError:
                    message.ready_per_admin = None
            with self._lock:
                self.messages.append(message)

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def wait(self, predicate: Callable[[list[Message]], bool], timeout: float, what: str) -> list[Message]:
        deadline = time.monotonic() + timeout
        while True:
            messages = self.snapshot()
            if predicate(messages):
                return messages
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out waiting for {what}; got {[m.fields for m in messages]}")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def notify_lab(make_lab: Callable[..., Lab], tmp_path: Path) -> Iterator[tuple[Lab, NotifyListener]]:
    sock_path = tmp_path / "notify.sock"
    # WATCHDOG_USEC=0.4 s: pings every 0.2 s.
    lab = make_lab(1, up=False, daemon_env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    listener = NotifyListener(sock_path, lab.host("h1").admin_socket)
    try:
        lab.up()
        yield lab, listener
    finally:
        listener.close()


def _statuses(messages: list[Message]) -> list[str]:
    return [m.fields["STATUS"] for m in messages if "STATUS" in m.fields]


@pytest.mark.root
def test_daemon_notifies_ready_status_watchdog_and_stopping(notify_lab: tuple[Lab, NotifyListener]) -> None:
    lab, listener = notify_lab
    messages = listener.wait(lambda ms: any(m.fields.get("READY") == "1" for m in ms), 10, "READY=1")
    ready_index = next(i for i, m in enumerate(messages) if m.fields.get("READY") == "1")
    ready = messages[ready_index]
    # READY=1 only after the first reconcile, which is what the admin API's "ready" means.
    assert ready.ready_per_admin is True
    assert ready.fields["STATUS"].startswith("ready: "), ready.fields
    before = _statuses(messages[:ready_index])
    assert before and all(s.startswith("starting: ") for s in before), before
    assert sum(m.fields.get("READY") == "1" for m in messages) == 1

    # The lab's demo network and endpoint show up in the summary (rate-limited, but soon).
    expected = "ready: 1 network, 1 local / 0 remote endpoints, store healthy"
    listener.wait(lambda ms: expected in _statuses(ms), 10, f"STATUS={expected}")

    # Pings at half of WATCHDOG_USEC while the daemon is healthy.
    start = len([m for m in listener.snapshot() if "WATCHDOG" in m.fields])
    pings = listener.wait(
        lambda ms: len([m for m in ms if "WATCHDOG" in m.fields]) >= start + 5, 10, "5 more WATCHDOG=1"
    )
    times = [m.at for m in pings if m.fields.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps[-4:]) < 0.4, gaps  # well inside the watchdog timeout

    # SIGTERM: STOPPING=1, exit status 0, and the dataplane stays.
    assert lab.stop_daemon("h1") == 0
    listener.wait(lambda ms: any(m.fields.get("STOPPING") == "1" for m in ms), 5, "STOPPING=1")
    names = netns.link_names(lab.host("h1").netns)
    assert any(name.startswith("ovbr") for name in names), names
    assert any(name.startswith("ovvx") for name in names), names
