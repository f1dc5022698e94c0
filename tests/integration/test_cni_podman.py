"""Real podman containers on two lab hosts, attached through overlayd-cni, pinging each other.

Each lab host gets its own podman: a private containers.conf and storage.conf
(graphroot, runroot, tmp_dir, file locks, the CNI backend with a private
network config dir and plugin dir holding `overlayd` -> overlayd-cni) under a
temporary directory, so runs never share state with each other or with the
machine's podman. Podman runs as `nsenter --net=/run/netns/<host> podman ...`:
the plugin runs in the caller's namespace, as on a real host. No image can be
pulled here, so the image is busybox-static imported as a rootfs.

Facts from podman 4.3 (Debian 12) on this machine: crun 1.8 refuses its
cgroup layout (runc works); the default ulimits need lowering; shared default
storage lets one run corrupt another. Podman also writes two caches at fixed
system paths it offers no setting for: /var/lib/cni/results (libcni's, an entry
per attachment, removed again by DEL) and /var/lib/containers/cache (a blob
info cache written by `podman import`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from overlayd.api.schema import EndpointInfo
from overlayd.clients.cni import endpoint_name
from overlayd.lab import Lab, netns
from overlayd.lab.lab import LabError, wait_for
from overlayd.lab.proc import Proc, stop_all

pytestmark = pytest.mark.root

NETWORK = "cnet"
SUBNET = "10.77.0.0/24"
GATEWAY = "10.77.0.1"
STATIC_IP = "10.77.0.50"
IMAGE = "localhost/ovl-busybox"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "sleep", "ping", "ip", "cat")


def plugin_path() -> str:
    """overlayd-cni beside this Python (the venv), else from PATH."""
    beside = Path(sys.executable).parent / "overlayd-cni"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("overlayd-cni")
    if found is None:
        pytest.fail("overlayd-cni not found beside this Python or on PATH (pip install -e .)")
    return found


def require_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "nsenter", "tar") if shutil.which(tool) is None]
    if not os.access(BUSYBOX, os.X_OK):
        missing.append("busybox (busybox-static)")
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: `make system-packages` installs podman, runc, busybox-static"
        )


@dataclass
class PodmanHost:
    """One lab host's podman: private config, storage and CNI dirs under `dir`."""

    name: str
    netns: str
    socket: str
    dir: Path
    daemon_pid: int | None
    containers: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.dir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.dir / "storage.conf"),
        }

    def setup(self, plugin: str) -> None:
        for sub in ("graph", "run", "tmp", "net", "plugins"):
            (self.dir / sub).mkdir(parents=True)
        (self.dir / "plugins" / "overlayd").symlink_to(plugin)
        d = self.dir
        (d / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{d}/tmp/events.log"\n'
            f'tmp_dir = "{d}/tmp"\n'
            'lock_type = "file"\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{d}/net"\n'
            f'cni_plugin_dirs = ["{d}/plugins"]\n'
        )
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{d}/graph"\nrunroot = "{d}/run"\n'
        )
        # Written from here on every run: `podman system reset` would delete it.
        conflist = {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [{"type": "overlayd", "network": NETWORK, "socket": self.socket}],
        }
        (d / "net" / f"{NETWORK}.conflist").write_text(json.dumps(conflist, indent=2) + "\n")

    def podman(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[bytes]:
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", "podman", *args]
        result = subprocess.run(
            argv,
            env=self.env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} on {self.name} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def run(self, name: str, *options: str) -> str:
        """Start `sleep` in a new container on the overlay network; its full id."""
        out = self.podman("run", "-d", "--name", name, "--network", NETWORK, *options, IMAGE, "sleep", "3600")
        container_id = out.stdout.decode().strip()
        self.containers.append(container_id)
        return container_id

    def exec(self, container: str, argv: Sequence[str], *, check: bool = False) -> bool:
        return self.podman("exec", container, *argv, check=check, timeout=30).returncode == 0

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.podman("inspect", container).stdout)
        return data[0]

    def remove(self, container_id: str) -> None:
        self.podman("rm", "-f", "-t", "0", container_id)
        self.containers.remove(container_id)

    def helpers(self) -> list[int]:
        """PIDs in the host's namespace other than its overlayd: podman's conmon and
        the `podman container cleanup` it runs when a container ends."""
        return [pid for pid in netns.netns_pids(self.netns) if pid != self.daemon_pid]

    def wait_helpers_gone(self) -> list[str]:
        """Wait (bounded) for podman's helpers to finish; stop stragglers by PID."""
        try:
            wait_for(lambda: not self.helpers(), 15, f"podman helpers on {self.name} to exit")
        except LabError as exc:
            left = [proc for proc in map(Proc.of_pid, self.helpers()) if proc is not None]
            stop_all(left, timeout=5.0)
            return [str(exc)]
        return []

    def cleanup(self) -> list[str]:
        """Remove every container (by id) and image of this private store, then the directory.

        The directory goes last, after podman's helpers have exited: they read
        this host's config and would recreate its run and tmp dirs.
        """
        errors: list[str] = []
        if (self.dir / "containers.conf").exists():
            # The store is private to this test: everything in it is ours.
            listed = self.podman("ps", "-aq", "--no-trunc", check=False)
            ids = set(listed.stdout.decode().split()) | set(self.containers)
            for container_id in sorted(ids):
                done = self.podman("rm", "-f", "-t", "0", container_id, check=False)
                if done.returncode != 0 and b"no such container" not in done.stderr:
                    errors.append(f"podman rm {container_id} on {self.name}: {done.stderr.decode().strip()}")
            gone = self.podman("rmi", "-a", "-f", check=False)
            if gone.returncode != 0:
                errors.append(f"podman rmi on {self.name}: {gone.stderr.decode().strip()}")
            errors += self.wait_helpers_gone()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            errors.append(f"could not remove {self.dir}")
        return errors


def busybox_rootfs_tar(workdir: Path) -> bytes:
    """A tar of a root filesystem holding only busybox-static and a few applet links."""
    root = workdir / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True).stdout


@pytest.fixture
def podman_lab(make_lab: Callable[..., Lab]) -> Iterator[tuple[Lab, list[PodmanHost]]]:
    require_tools()
    plugin = plugin_path()
    lab = make_lab(hosts=2, up=False).up(demo=False)
    lab.create_network(NETWORK, SUBNET, gateway=GATEWAY)
    workdir = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-podman-"))
    hosts: list[PodmanHost] = []
    try:
        hosts += [
            PodmanHost(h.name, h.netns, str(h.admin_socket), workdir / h.name, h.proc.pid if h.proc else None)
            for h in lab.hosts
        ]
        rootfs = busybox_rootfs_tar(workdir)
        for host in hosts:
            host.setup(plugin)
            host.podman("import", "-", IMAGE, input=rootfs)
        yield lab, hosts
    finally:
        # Containers go before the lab's daemons (make_lab's teardown), so DEL still
        # reaches them and nothing is left in the store or the kernel.
        errors = [err for host in hosts for err in host.cleanup()]
        shutil.rmtree(workdir, ignore_errors=True)
        if errors:
            pytest.fail("podman cleanup failed: " + "; ".join(errors))


def endpoints(lab: Lab, host: str) -> dict[str, EndpointInfo]:
    return {ep.name: ep for ep in lab.admin(host).endpoint_list(NETWORK) if ep.owner == host}


def cni(host: PodmanHost, command: str, container_id: str, netns: str) -> subprocess.CompletedProcess[str]:
    """Run the plugin itself, as a runtime would, in the host's namespace."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(host.dir / "plugins"),
    }
    conf = {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "overlayd",
        "network": NETWORK,
        "socket": host.socket,
    }
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{host.netns}", plugin_path()],
        env=env,
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_podman_containers_on_two_hosts_ping_over_the_overlay(
    podman_lab: tuple[Lab, list[PodmanHost]],
) -> None:
    lab, (h1, h2) = podman_lab
    c1 = h1.run("c1")
    c2 = h2.run("c2", "--ip", STATIC_IP)  # reaches the plugin as CNI_ARGS IP=...

    # Each daemon holds its container's endpoint, in the namespace podman made.
    ep1 = endpoints(lab, "h1")[endpoint_name(c1, "eth0")]
    ep2 = endpoints(lab, "h2")[endpoint_name(c2, "eth0")]
    assert str(ep2.ip) == STATIC_IP
    info1, info2 = h1.inspect("c1"), h2.inspect("c2")
    assert ep1.netns == info1["NetworkSettings"]["SandboxKey"]
    # Podman understood the plugin's result: address, prefix, gateway, MAC.
    net1 = info1["NetworkSettings"]["Networks"][NETWORK]
    net2 = info2["NetworkSettings"]["Networks"][NETWORK]
    assert (net1["IPAddress"], net1["IPPrefixLen"], net1["Gateway"]) == (str(ep1.ip), 24, GATEWAY)
    assert (net2["IPAddress"], net2["MacAddress"]) == (STATIC_IP, ep2.mac)

    # The ping: container on h1 -> container on h2 over VXLAN, and back.
    ping = ["ping", "-c", "1", "-W", "1"]
    lab.wait_for(lambda: h1.exec("c1", [*ping, STATIC_IP]), 20, f"c1 on h1 pinging c2 ({STATIC_IP})")
    lab.wait_for(lambda: h2.exec("c2", [*ping, str(ep1.ip)]), 20, f"c2 on h2 pinging c1 ({ep1.ip})")

    # CHECK, as a runtime would call it, passes for a live attachment (the daemon looks
    # into the container's namespace; the plugin only asks it), and fails for another one.
    check = cni(h1, "CHECK", c1, info1["NetworkSettings"]["SandboxKey"])
    assert check.returncode == 0, check.stdout
    wrong = cni(h1, "CHECK", c1, f"/run/netns/{h1.netns}")
    assert wrong.returncode == 1 and "is in netns" in json.loads(wrong.stdout)["msg"], wrong.stdout

    # Removing the container runs DEL: the endpoint leaves the daemon (and the others' view).
    h2.remove(c2)
    assert endpoint_name(c2, "eth0") not in endpoints(lab, "h2")
    lab.wait_for(
        lambda: all(str(ep.ip) != STATIC_IP for ep in lab.admin("h1").endpoint_list(NETWORK)),
        20,
        "c2's endpoint gone from h1's view",
    )
    assert not os.path.exists(info2["NetworkSettings"]["SandboxKey"])
    # DEL again, after the namespace is gone: still a success.
    again = cni(h2, "DEL", c2, "")
    assert (again.returncode, again.stdout) == (0, "")
    # c1 is untouched.
    assert h1.exec("c1", ["ip", "-4", "addr", "show", "eth0"], check=True)
    assert endpoint_name(c1, "eth0") in endpoints(lab, "h1")
