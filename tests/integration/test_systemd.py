"""The systemd unit: checked by systemd-analyze, a daemon speaking sd_notify to a listener, and
the unit as shipped run by a real systemd (PID 1 of a systemd-nspawn container) on two lab hosts."""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import new_prefix
from debian_rootfs import CACHE, debian_rootfs, mark_used_and_prune

from overlayd.api.client import AdminClient, ClientError
from overlayd.core import config as config_mod
from overlayd.lab import Lab, netns
from overlayd.lab.lab import LabError, wait_for
from overlayd.lab.proc import Proc
from overlayd.lab.server import log_tail

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


# --- the unit as shipped, under a real systemd ----------------------------------------------
#
# Each lab host boots a Debian rootfs with systemd as PID 1 in a container
# (systemd-nspawn) that joins the host's network namespace, so the daemon
# under systemd sees exactly what a lab daemon sees: `ul0` on the underlay.
#
# The rootfs comes from scripts/fetch-rootfs.sh (debootstrap through this
# machine's apt source, cached). nspawn boots it with --volatile=overlay: the
# cached tree stays read-only and shared, every boot writes to a tmpfs.
#
# overlayd inside: a venv built on this machine with Debian's /usr/bin/python3
# at a cached path, bind-mounted read-only at the same path, with the working
# tree's `overlayd/` bound over the copy pip installed into it. Why not pip
# inside the container: it has no route to a package index (only the lab's
# underlay), and one venv serves both machines and every later run (built
# once per pyproject.toml, ~30 s). A venv is not relocatable (its scripts name
# its Python by absolute path), hence the same path inside; its `python3` is a
# link to /usr/bin/python3, which inside is the rootfs's own Python: the rootfs
# is this machine's Debian release, so it is the same Python. The path is under
# /var/cache, not /tmp: the unit's PrivateTmp=yes hides /tmp and /var/tmp from
# the daemon.
#
# Then the README's install steps run inside (symlinks in /usr/local/bin, the
# config in /etc/overlayd, the unit copied unchanged to /etc/systemd/system).
# Commands run inside with nsenter into the container's namespaces; the host
# has no systemd, so nspawn runs with --register=no --keep-unit.

HOST_PYTHON = "/usr/bin/python3"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STAGE = "/mnt/overlayd"  # where the unit, config and conflist are bound read-only inside
SCRIPTS = ("overlayd", "overlayctl", "overlayd-cni")
# Capability numbers (linux/capability.h) of the ones the unit names.
CAP_NUMBERS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21}
CONFLIST = REPO / "deploy" / "cni" / "overlayd.conflist"
NETWORK = "demo"  # the network the shipped conflist names
SUBNET = "10.100.0.0/24"
GATEWAY = "10.100.0.1"
# The test's own drop-in: 30 s (the unit's WatchdogSec) is too long to wait for.
WATCHDOG_DROPIN = "[Service]\nWatchdogSec=5s\n"


def python_version(python: str, root: Path | None = None) -> str:
    argv = [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
    if root is not None:
        argv = ["chroot", str(root), *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def host_venv(rootfs: Path) -> Path:
    """A venv of overlayd and its dependencies for the containers, built once per pyproject.toml.

    Built from a copy of the package files (as deploy/Dockerfile copies them),
    so pip's build leaves nothing in the working tree. A lock keeps two runs
    from building the same one; the marker is written last, so a half-built
    venv is rebuilt.
    """
    if not os.access(HOST_PYTHON, os.X_OK):
        pytest.fail(f"{HOST_PYTHON} not found: the containers run the venv on Debian's python3")
    version = python_version(HOST_PYTHON)
    inside = python_version("/usr/bin/python3", rootfs)
    assert version == inside, (
        f"{HOST_PYTHON} is Python {version} but the rootfs has {inside}: "
        f"the rootfs must be this machine's Debian release (scripts/fetch-rootfs.sh)"
    )
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + version.encode()).hexdigest()[:16]
    venv = CACHE / f"systemd-venv-{digest}"
    marker = venv / ".overlayd-venv"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".systemd-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            mark_used_and_prune(venv, marker.name)
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="overlayd-src-") as src:
            shutil.copy2(REPO / "pyproject.toml", src)
            shutil.copy2(REPO / "README.md", src)
            shutil.copytree(
                REPO / "overlayd", Path(src) / "overlayd", ignore=shutil.ignore_patterns("__pycache__")
            )
            subprocess.run([HOST_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
            result = subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--quiet", src],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.fail(f"pip install into {venv} failed:\n{result.stderr[-3000:]}")
        mark_used_and_prune(venv, marker.name)
    return venv


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def toml_text(data: dict[str, Any]) -> str:
    """TOML for a config of tables holding strings, numbers, booleans and lists of strings."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    return "".join(
        f"[{table}]\n" + "".join(f"{key} = {value(v)}\n" for key, v in entries.items())
        for table, entries in data.items()
    )


def host_config(lab: Lab, host: str) -> str:
    """The lab's config for `host`, with the admin socket and state directory left at the
    daemon's defaults (/run/overlayd, /var/lib/overlayd): the unit's RuntimeDirectory and
    StateDirectory, the only places ProtectSystem=strict lets it write."""
    data = tomllib.loads(lab.config_text(host))
    del data["admin"], data["state"]
    return toml_text(data)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^PPid:\s+(\d+)$", status, re.M)
            if match and int(match.group(1)) == pid:
                found.append(int(entry))
    return found


def is_pid_one(pid: int) -> bool:
    """True if `pid` is PID 1 of a PID namespace of its own (NSpid: <pid> 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    match = re.search(r"^NSpid:\s+(.*)$", status, re.M)
    return match is not None and match.group(1).split()[-1] == "1" and len(match.group(1).split()) > 1


class Machine:
    """One lab host's container: systemd-nspawn booting the rootfs in the host's netns."""

    def __init__(self, lab: Lab, host: str, rootfs: Path, venv: Path, stage: Path, workdir: Path) -> None:
        self.host = lab.host(host)
        self.name = f"{lab.prefix}-{self.host.name}"
        self.log_path = workdir / f"{self.host.name}-nspawn.log"
        self.leader: Proc | None = None
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            # The host has no systemd to register with or to make a scope in.
            "--register=no",
            "--keep-unit",
            f"--directory={rootfs}",
            "--volatile=overlay",
            f"--machine={self.name}",
            f"--network-namespace-path=/run/netns/{self.host.netns}",
            # nspawn keeps CAP_NET_ADMIN only for a network namespace it made
            # itself; in the lab host's it plays the host, and a host's
            # systemd has it to give.
            "--capability=CAP_NET_ADMIN",
            "--link-journal=no",
            "--console=pipe",
            f"--bind-ro={venv}",
            f"--bind-ro={REPO / 'overlayd'}:{site_packages(venv) / 'overlayd'}",
            f"--bind-ro={stage}:{STAGE}",
        ]
        self.nspawn = Proc.spawn(argv, log_path=self.log_path, banner=f"booting {self.name}")

    def find_leader(self, timeout: float = 30.0) -> Proc:
        def leader() -> Proc | None:
            if not self.nspawn.alive():
                raise LabError(f"systemd-nspawn for {self.name} exited:\n{log_tail(self.log_path)}")
            pid = next((pid for pid in children(self.nspawn.pid) if is_pid_one(pid)), None)
            return Proc.of_pid(pid) if pid is not None else None

        self.leader = wait_for(leader, timeout, f"PID 1 of {self.name}")
        return self.leader

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`argv` inside the container (all its namespaces), with a clean environment."""
        assert self.leader is not None
        full = ["nsenter", f"--target={self.leader.pid}", "--all", "--", *argv]
        result = subprocess.run(
            full,
            env={"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} in {self.name} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-euc", script, **kwargs)

    def wait_booted(self, timeout: float = 60.0) -> str:
        """Wait until systemd inside says the boot is done; its state (running or degraded)."""

        def state() -> str | None:
            if self.leader is None:
                self.find_leader()
            out = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
            return out if out in ("running", "degraded") else None

        return wait_for(state, timeout, f"{self.name} to boot", interval=0.2)

    def show(self, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "overlayd", *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-u", "overlayd", "-n", "40", check=False).stdout

    def daemon_status(self) -> dict[str, str]:
        """/proc/<MainPID>/status of the daemon, read inside (its PID is the container's)."""
        pid = int(self.show("MainPID")["MainPID"])
        assert pid != 0, f"overlayd is not running in {self.name}:\n{self.journal()}"
        out = self.run("cat", f"/proc/{pid}/status").stdout
        return {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}

    def daemon_mounts(self) -> dict[str, list[str]]:
        """Mount point -> mount options, as the daemon sees them (its mount namespace)."""
        pid = int(self.show("MainPID")["MainPID"])
        mounts: dict[str, list[str]] = {}
        for line in self.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines():
            fields = line.split()
            mounts[fields[4]] = fields[5].split(",")  # the last mount on a point wins, as in lookups
        return mounts

    def overlayctl(self, *args: str) -> Any:
        """overlayctl --json ARGS inside, decoded."""
        return json.loads(self.run("overlayctl", "--json", *args).stdout)

    def ping(self, netns_name: str, ip: str) -> bool:
        argv = ["ip", "netns", "exec", netns_name, "ping", "-n", "-q", "-c", "1", "-W", "1", ip]
        return self.run(*argv, check=False, timeout=15).returncode == 0

    def stop(self) -> list[str]:
        """Power the machine off through its PID 1 (SIGRTMIN+4 is systemd's poweroff);
        SIGKILL to PID 1 ends its PID namespace if that takes too long."""
        errors: list[str] = []
        leader = self.leader
        if leader is None and self.nspawn.alive():
            pid = next((pid for pid in children(self.nspawn.pid) if is_pid_one(pid)), None)
            leader = Proc.of_pid(pid) if pid is not None else None
        powered_off = (
            leader is not None and leader.send_signal(signal.SIGRTMIN + 4) and self.nspawn.wait(30.0)
        )
        if not powered_off and leader is not None and leader.send_signal(signal.SIGKILL):
            self.nspawn.wait(10.0)
            errors.append(f"{self.name} did not power off in 30 s; killed its PID 1")
        if self.nspawn.alive():
            self.nspawn.stop(timeout=10.0)
            errors.append(f"systemd-nspawn for {self.name} outlived its container")
        # nspawn refuses to remove this on a /run that is no tmpfs (it is none here).
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)
        return errors


class NotYet(Exception):
    """A condition polled for does not hold yet; the message says how it looks."""


@dataclass
class Cluster:
    """Two lab hosts, each a booted machine with overlayd installed as the README says."""

    lab: Lab
    machines: list[Machine]
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # endpoint name -> record

    def machine(self, host: str) -> Machine:
        return next(m for m in self.machines if m.host.name == host)

    def ensure_started(self) -> None:
        for m in self.machines:
            if m.show("ActiveState")["ActiveState"] != "active":
                m.run("systemctl", "start", "overlayd", timeout=120)

    def ensure_network(self) -> None:
        self.ensure_started()
        m = self.machines[0]
        if not any(net["name"] == NETWORK for net in m.overlayctl("network", "ls")):
            m.overlayctl("network", "create", NETWORK, "--subnet", SUBNET, "--gateway", GATEWAY)

    def ensure_endpoints(self) -> None:
        """One endpoint per host, each in a namespace made inside that host's container
        (as a container runtime on the host would make it), through `overlayctl endpoint add`."""
        self.ensure_network()
        for m in self.machines:
            name = f"ep-{m.host.name}"
            if name in self.endpoints:
                continue
            m.run("ip", "netns", "add", name)

            def add(m: Machine = m, name: str = name) -> dict[str, Any]:
                argv = ["overlayctl", "--json", "endpoint", "add", NETWORK, name, "--netns", name]
                result = m.run(*argv, check=False)
                if result.returncode != 0 and f"network {NETWORK} not found" in result.stderr:
                    raise NotYet(result.stderr.strip())  # the network has not reached this host yet
                assert result.returncode == 0, f"endpoint add on {m.name}: {result.stderr}"
                record: dict[str, Any] = json.loads(result.stdout)
                return record

            record = wait_for(add, 20, f"endpoint {name} on {m.name}", ignore=(NotYet,))
            self.endpoints[name] = {**record, "host": m.host.name}

    def ensure_cni(self) -> dict[str, Any]:
        """A CNI ADD on the second host, as a runtime runs it: the plugin under its type name
        in CNI_PATH, the shipped conflist's plugin config (name and cniVersion added) on stdin."""
        self.ensure_network()
        if "cni" in self.endpoints:
            return self.endpoints["cni"]
        m = self.machines[1]
        conflist = json.loads(CONFLIST.read_text())
        assert conflist["name"] == NETWORK  # the network the test makes is the one it names
        plugin = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
        m.sh(
            f"install -d /etc/cni/net.d /usr/lib/cni && cp {STAGE}/overlayd.conflist /etc/cni/net.d/ "
            f"&& ln -sf /usr/local/bin/overlayd-cni /usr/lib/cni/{plugin['type']} && ip netns add cni-c1"
        )
        env = (
            "CNI_COMMAND=ADD CNI_CONTAINERID=c1 CNI_NETNS=/run/netns/cni-c1 CNI_IFNAME=eth0 "
            f"CNI_PATH=/usr/lib/cni exec /usr/lib/cni/{plugin['type']}"
        )
        result = m.sh(env, input=json.dumps(plugin), check=False)
        assert result.returncode == 0, (result.stdout, result.stderr, m.journal())
        answer: dict[str, Any] = json.loads(result.stdout)
        ip = answer["ips"][0]["address"].split("/")[0]
        self.endpoints["cni"] = {
            "ip": ip,
            "mac": answer["interfaces"][0]["mac"],
            "host": m.host.name,
            "netns": "cni-c1",
            "result": answer,
        }
        return self.endpoints["cni"]

    def pings(self) -> None:
        """Every endpoint pings every endpoint on the other host (all over VXLAN)."""
        for src_name, src in self.endpoints.items():
            m = self.machine(src["host"])
            netns_name = src.get("netns", src_name) if src_name == "cni" else src_name
            for dst_name, dst in self.endpoints.items():
                if dst["host"] != src["host"]:
                    wait_for(
                        partial(m.ping, netns_name, dst["ip"]),
                        20,
                        f"{src_name} on {src['host']} pinging {dst_name} ({dst['ip']})",
                        interval=0,
                    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [tool for tool in ("systemd-nspawn", "nsenter", "chroot") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: `make system-packages` installs systemd-container")
    rootfs = debian_rootfs()
    venv = host_venv(rootfs)
    workdir = tmp_path_factory.mktemp("systemd")
    lab = Lab(hosts=2, prefix=new_prefix(), store="gossip")
    machines: list[Machine] = []
    try:
        lab.up(daemons=False, demo=False)
        for h in lab.hosts:
            stage = workdir / h.name
            stage.mkdir()
            shutil.copy2(UNIT, stage / "overlayd.service")
            shutil.copy2(CONFLIST, stage / "overlayd.conflist")
            (stage / "overlayd.toml").write_text(host_config(lab, h.name))
            machines.append(Machine(lab, h.name, rootfs, venv, stage, workdir))
        for m in machines:
            m.wait_booted()
        links = " ".join(f"{venv}/bin/{script}" for script in SCRIPTS)
        for m in machines:
            # The README's steps, with the package already in the venv.
            m.sh(
                f"ln -s {links} /usr/local/bin/ && install -d /etc/overlayd "
                f"&& install -m 0600 {STAGE}/overlayd.toml /etc/overlayd/overlayd.toml "
                f"&& cp {STAGE}/overlayd.service /etc/systemd/system/ && systemctl daemon-reload"
            )
        yield Cluster(lab, machines)
    finally:
        errors: list[str] = []
        for m in machines:
            try:
                errors += m.stop()
            except Exception as exc:
                errors.append(f"stopping {m.name}: {exc}")
        # Then the namespaces, and any process of a machine that outlived it in them.
        errors += lab.down()
        if errors:
            pytest.fail("systemd cleanup: " + "; ".join(errors))


@pytest.mark.root
# The first test sets the machines up: the venv is built here the first time (~30 s).
@pytest.mark.timeout(600)
def test_systemctl_start_returns_once_ready_and_status_shows_the_status_line(cluster: Cluster) -> None:
    for m in cluster.machines:
        assert m.show("ActiveState")["ActiveState"] == "inactive"
        m.run("systemctl", "start", "overlayd", timeout=120)
        # Type=notify: start returned, so READY=1 came, which the daemon sends after its
        # first reconcile: the admin API, asked right away, says so too.
        assert m.show("ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}
        assert m.overlayctl("status")["ready"] is True
        status = m.run("systemctl", "status", "--no-pager", "overlayd").stdout
        assert re.search(r'^\s+Status: "ready: .*store healthy(, [^"]*)?"$', status, re.M), status
        assert m.show("StatusText")["StatusText"].startswith("ready: ")


@pytest.mark.root
def test_hardened_daemon_makes_a_network_an_endpoint_and_a_cni_attachment(cluster: Cluster) -> None:
    cluster.ensure_started()
    mask = sum(1 << CAP_NUMBERS[cap] for cap in _unit_service()["CapabilityBoundingSet"].split())
    for m in cluster.machines:
        # The hardening is in force, not silently dropped by the container.
        status = m.daemon_status()
        for key in ("CapBnd", "CapEff", "CapPrm", "CapAmb"):
            assert int(status[key], 16) == mask, (key, status[key])
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # RestrictNamespaces, RestrictAddressFamilies, ...
        mounts = m.daemon_mounts()
        assert "ro" in mounts["/"], mounts  # ProtectSystem=strict
        for writable in ("/run/overlayd", "/var/lib/overlayd"):
            assert "rw" in mounts[writable], (writable, mounts.get(writable))
        assert "ro" in mounts["/proc/sys"]  # ProtectKernelTunables
        assert "/tmp" in mounts  # PrivateTmp
    cluster.ensure_endpoints()
    for name in ("ep-h1", "ep-h2"):
        ep = cluster.endpoints[name]
        m = cluster.machine(ep["host"])
        addresses = json.loads(m.run("ip", "-n", name, "-j", "addr", "show", "eth0").stdout)
        assert [a["local"] for a in addresses[0]["addr_info"] if a["family"] == "inet"] == [ep["ip"]]
    cni = cluster.ensure_cni()
    m = cluster.machine(cni["host"])
    assert cni["result"]["interfaces"][0]["sandbox"] == "/run/netns/cni-c1"
    addresses = json.loads(m.run("ip", "-n", "cni-c1", "-j", "addr", "show", "eth0").stdout)
    assert [a["local"] for a in addresses[0]["addr_info"] if a["family"] == "inet"] == [cni["ip"]]
    listed = m.overlayctl("endpoint", "ls", "--network", NETWORK)
    assert cni["ip"] in [ep["ip"] for ep in listed]


@pytest.mark.root
def test_endpoints_on_two_hosts_ping_each_other(cluster: Cluster) -> None:
    cluster.ensure_endpoints()
    cluster.ensure_cni()
    cluster.pings()


@pytest.mark.root
def test_watchdog_restarts_a_stopped_daemon(cluster: Cluster) -> None:
    cluster.ensure_endpoints()
    m = cluster.machines[0]
    # systemd takes WatchdogSec at start: the drop-in, then a restart. It stays for later tests.
    m.sh(
        "mkdir -p /etc/systemd/system/overlayd.service.d && cat > /etc/systemd/system/overlayd.service.d/"
        "test-watchdog.conf && systemctl daemon-reload && systemctl restart overlayd",
        input=WATCHDOG_DROPIN,
    )
    before = m.show("MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "5s"
    m.run("systemctl", "kill", "--kill-who=main", "--signal=SIGSTOP", "overlayd")

    def restarted() -> dict[str, str] | None:
        now = m.show("MainPID", "NRestarts", "ActiveState", "SubState")
        done = (
            int(now["NRestarts"]) == int(before["NRestarts"]) + 1
            and now["MainPID"] not in ("0", before["MainPID"])
            and (now["ActiveState"], now["SubState"]) == ("active", "running")
        )
        return now if done else None

    wait_for(restarted, 30, f"the watchdog to restart overlayd in {m.name}", interval=0.2)
    journal = m.journal()
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal, journal
    assert m.overlayctl("status")["ready"] is True
    cluster.pings()


@pytest.mark.root
def test_systemctl_stop_leaves_the_dataplane(cluster: Cluster) -> None:
    cluster.ensure_endpoints()
    cluster.ensure_started()
    m = cluster.machines[0]
    remote = cluster.endpoints["ep-h2"]
    vni = next(net["vni"] for net in m.overlayctl("network", "ls") if net["name"] == NETWORK)

    def dataplane() -> tuple[str, str, list[dict[str, Any]]]:
        links = netns.ip_json("-d", "link", "show", netns=m.host.netns)
        vxlan = [
            link
            for link in links
            if link.get("linkinfo", {}).get("info_kind") == "vxlan"
            and link["linkinfo"]["info_data"].get("id") == vni
        ]
        assert len(vxlan) == 1, links
        bridge = vxlan[0].get("master", "")
        fdb = json.loads(
            netns.run_in(m.host.netns, ["bridge", "-j", "fdb", "show", "dev", vxlan[0]["ifname"]]).stdout
        )
        return vxlan[0]["ifname"], bridge, fdb

    cluster.pings()
    vxlan, bridge, fdb = dataplane()
    entry = {"mac": remote["mac"], "dst": cluster.lab.host(remote["host"]).address}
    assert any(e.get("mac") == entry["mac"] and e.get("dst") == entry["dst"] for e in fdb), fdb
    m.run("systemctl", "stop", "overlayd")
    assert m.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    after = dataplane()
    assert after[:2] == (vxlan, bridge) and bridge
    assert any(e.get("mac") == entry["mac"] and e.get("dst") == entry["dst"] for e in after[2]), after[2]
    # And it carries traffic with no daemon at all.
    cluster.pings()
    m.run("systemctl", "start", "overlayd", timeout=120)
