"""Several overlayd hosts on one machine, each in a network namespace of its own.

Topology of a lab with prefix P (every name carries the prefix, so labs with
different prefixes live side by side):

    P-ul          underlay: bridge br0 (MTU 1500), one veth port per host and one for P-kv
    P-kv          the KV server: etcd on 198.18.0.1:2379, ZooKeeper on 198.18.0.1:2181
                  or Consul on 198.18.0.1:8500, reached over `ul0`
    P-h1..P-hN    hosts: `ul0` = 198.18.0.(10+k)/24, one overlayd each
    P-<name>      endpoint namespaces (the demo's are P-h1-ep ... P-hN-ep)
    P-hK-gw<VNI>  gateway namespaces the daemons make (VXLAN networks with egress)
    P-out         with `egress="nat"`: the outside, 198.18.0.200 on the underlay, reachable
                  from every host and from no endpoint without NAT
    P-rt          with `mode="routed"`: a router between the underlay (br0, 198.18.0.254)
                  and a second segment (br1, 198.18.1.0/24, router 198.18.1.254) that the
                  last host sits on (198.18.1.(10+N)), so one pair of hosts needs VXLAN

Everything lives in those namespaces: nothing is added to the machine's own
namespace. The lab directory `/run/overlayd-lab/P/` holds `lab.json`, which
records each namespace before it is made and each process as it starts, so
`overlayctl lab down` (another process, maybe after a failed `up`) removes
exactly what was made; per host it holds the daemon's config, log, admin
socket and state.

`Lab` is what the end-to-end tests use; `lab_up`, `lab_status` and `lab_down`
are `overlayctl lab up|status|down`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from overlayd.api import schema
from overlayd.api.client import AdminClient, ClientError
from overlayd.lab import neightable, netns
from overlayd.lab.consul import ConsulError, ConsulServer, find_consul
from overlayd.lab.etcd import EtcdError, EtcdServer, find_etcd
from overlayd.lab.nshttp import NetnsHTTPConnection, request
from overlayd.lab.proc import Proc, stop_all
from overlayd.lab.server import log_tail
from overlayd.lab.zookeeper import ZooKeeperError, ZooKeeperServer, find_java, find_zookeeper

T = TypeVar("T")

DEFAULT_PREFIX = "ovl"
LAB_ROOT = Path("/run/overlayd-lab")
STORES = ("gossip", "etcd", "zookeeper", "consul")
GOSSIP_PORT = 7946
MAX_HOSTS = 200

UNDERLAY_SUBNET = IPv4Network("198.18.0.0/24")
UNDERLAY_MTU = 1500
UNDERLAY_BRIDGE = "br0"
UNDERLAY_IFNAME = "ul0"
KV_ADDRESS = "198.18.0.1"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ZOOKEEPER_CLIENT_PORT = 2181
CONSUL_HTTP_PORT, CONSUL_SERF_LAN_PORT, CONSUL_SERVER_PORT = 8500, 8301, 8300
STATUS_LISTEN = "127.0.0.1:9480"

DEMO_NETWORK = "demo"
DEMO_SUBNET = "10.100.0.0/24"
DEMO_GATEWAY = "10.100.0.1"
OUTSIDE_ADDRESS = "198.18.0.200"
ROUTER_ADDRESS = "198.18.0.254"
FAR_SUBNET = IPv4Network("198.18.1.0/24")  # the segment behind the router (routed mode)
FAR_ROUTER_ADDRESS = "198.18.1.254"
FAR_BRIDGE = "br1"
MODES = ("vxlan", "routed")
EGRESSES = ("none", "nat")

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")


class LabError(RuntimeError):
    """The lab could not be built, used or removed; the message says what and why."""


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise LabError(
            f"invalid lab prefix {prefix!r}: 1-16 lower-case letters and digits, starting with a letter"
        )
    return prefix


def host_address(k: int, *, far: bool = False) -> str:
    """Underlay (VTEP) address of host number k (1-based); `far`: behind the router."""
    return str((FAR_SUBNET if far else UNDERLAY_SUBNET).network_address + 10 + k)


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy, and return that.

    Exceptions of the types in `ignore` count as "not yet"; others propagate.
    Raises LabError naming `what` (and the last ignored error) on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error is not None else ""
            raise LabError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    dir: Path
    proc: Proc | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "overlayd.toml"

    @property
    def admin_socket(self) -> Path:
        return self.dir / "overlayd.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "overlayd.log"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def status_url(self) -> str:
        return f"http://{STATUS_LISTEN}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "netns": self.netns,
            "address": self.address,
            "dir": str(self.dir),
            "process": self.proc.to_json() if self.proc is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Host:
        process = data.get("process")
        return cls(
            name=data["name"],
            netns=data["netns"],
            address=data["address"],
            dir=Path(data["dir"]),
            proc=Proc.from_json(process) if process else None,
        )


@dataclass(frozen=True)
class Endpoint:
    host: str
    network: str
    name: str
    netns: str
    ip: str
    mac: str


@dataclass(frozen=True)
class PingResult:
    src: Endpoint
    dst: Endpoint
    ok: bool
    seconds: float  # until the first answer, or until giving up
    attempts: int


@dataclass
class PingStats:
    transmitted: int
    received: int
    lost_seqs: list[int] = field(default_factory=list)


class Pinger:
    """`ping -i INTERVAL` running in a namespace until `stop()`, for "traffic never stops"."""

    def __init__(self, from_ns: str, ip: str, *, interval: float = 0.1) -> None:
        argv = ["ping", "-n", "-i", f"{interval:g}", "-W", "1", ip]
        self._popen = subprocess.Popen(
            netns.exec_argv(from_ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # ping prints its "PING ..." header once its signal handlers are set:
        # a SIGINT before that would kill it without the summary `stop` reads.
        # Read it byte by byte from the pipe itself: a buffered readline would
        # swallow what follows, which `communicate` (reading the pipe) never sees.
        assert self._popen.stdout is not None
        fd, head = self._popen.stdout.fileno(), b""
        while not head.endswith(b"\n"):
            byte = os.read(fd, 1)
            if not byte:
                break
            head += byte
        self._head = head.decode(errors="replace")

    def stop(self) -> PingStats:
        """SIGINT (ping prints its summary), then the count of sent, received and lost."""
        self._popen.send_signal(signal.SIGINT)
        try:
            out, _ = self._popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            out, _ = self._popen.communicate()
        out = self._head + out
        summary = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if summary is None:
            raise LabError(f"ping printed no summary:\n{out[-2000:]}")
        transmitted, received = int(summary.group(1)), int(summary.group(2))
        answered = {int(m.group(1)) for m in re.finditer(r"icmp_seq=(\d+) ttl=", out)}
        lost = [seq for seq in range(1, transmitted + 1) if seq not in answered]
        return PingStats(transmitted, received, lost)


def overlayd_argv() -> list[str]:
    """How to run the daemon: the `overlayd` script beside this Python, else from PATH."""
    beside = Path(sys.executable).parent / "overlayd"
    if os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("overlayd")
    if found is None:
        raise LabError("overlayd executable not found beside this Python or on PATH")
    return [found]


class KvServer(Protocol):
    """What the lab needs of its KV server (EtcdServer, ZooKeeperServer)."""

    proc: Proc | None

    @property
    def url(self) -> str: ...
    @property
    def workdir(self) -> Path: ...
    @property
    def log_path(self) -> Path: ...
    @property
    def pid(self) -> int | None: ...
    def start(self, timeout: float = 30.0) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def running(self) -> bool: ...


class Lab:
    """A lab: build it with `up()`, remove it with `down()` (or use it as a context manager)."""

    def __init__(
        self,
        *,
        hosts: int = 3,
        prefix: str = DEFAULT_PREFIX,
        store: str = "etcd",
        lease_ttl: int = 10,
        reconcile_interval: float = 30.0,
        log_level: str = "info",
        root: Path = LAB_ROOT,
        ready_timeout: float = 30.0,
        progress: Callable[[str], None] | None = None,
        daemon_env: Mapping[str, str] | None = None,
        gossip: bool | None = None,
        egress: str = "none",
        mode: str = "vxlan",
    ) -> None:
        """`gossip`: run gossip beside a KV store too (always on in gossip-only mode).

        `egress="nat"`: the demo network gets egress, and the lab an outside namespace.
        `mode="routed"`: the demo network is routed, and the last host (of two or more)
        sits behind a router namespace on a segment of its own.
        """
        self.prefix = check_prefix(prefix)
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"invalid number of hosts {hosts}: must be 1..{MAX_HOSTS}")
        if store not in STORES:
            raise LabError(f"unsupported store {store!r}: supported: {', '.join(STORES)}")
        if egress not in EGRESSES:
            raise LabError(f"unsupported egress {egress!r}: supported: {', '.join(EGRESSES)}")
        if mode not in MODES:
            raise LabError(f"unsupported mode {mode!r}: supported: {', '.join(MODES)}")
        self.egress = egress
        self.mode = mode
        self.outside_ns = f"{prefix}-out"
        self.router_ns = f"{prefix}-rt"
        # The last host sits behind the router (with two hosts or more).
        self.far = hosts if mode == "routed" and hosts >= 2 else 0
        self.store = store
        self.store_prefix = f"/{prefix}/v1/"
        self.lease_ttl = lease_ttl
        self.reconcile_interval = reconcile_interval
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.dir = root / prefix
        self.progress = progress
        self.daemon_env = dict(daemon_env or {})
        self.underlay_ns = f"{prefix}-ul"
        self.kv_ns = f"{prefix}-kv"
        self.hosts = [
            Host(f"h{k}", f"{prefix}-h{k}", host_address(k, far=k == self.far), self.dir / f"h{k}")
            for k in range(1, hosts + 1)
        ]
        self.kv: KvServer | None = None if store == "gossip" else self._kv_server()
        self.gossip = store == "gossip" or bool(gossip)
        # The lab's daemons share one cluster key, kept in the lab record (root-only /run).
        self.gossip_key = base64.b64encode(os.urandom(32)).decode() if self.gossip else ""
        self.namespaces: list[str] = []  # in the order they were made
        self.networks: list[dict[str, Any]] = []
        self.endpoints: list[Endpoint] = []
        self._lock = threading.RLock()

    def _kv_server(self) -> KvServer:
        if self.store == "consul":
            # A persistent server, not a dev agent: restarting it keeps the cluster's data.
            return ConsulServer(
                host=KV_ADDRESS,
                http_port=CONSUL_HTTP_PORT,
                serf_lan_port=CONSUL_SERF_LAN_PORT,
                server_port=CONSUL_SERVER_PORT,
                netns=self.kv_ns,
                workdir=self.dir / "kv",
                node=self.prefix,
                dev=False,
                on_start=lambda _server: self._save(),
            )
        if self.store == "zookeeper":
            return ZooKeeperServer(
                host=KV_ADDRESS,
                client_port=ZOOKEEPER_CLIENT_PORT,
                netns=self.kv_ns,
                workdir=self.dir / "kv",
                on_start=lambda _server: self._save(),
            )
        return EtcdServer(
            host=KV_ADDRESS,
            client_port=ETCD_CLIENT_PORT,
            peer_port=ETCD_PEER_PORT,
            netns=self.kv_ns,
            workdir=self.dir / "kv",
            name=self.prefix,
            on_start=lambda _server: self._save(),
        )

    @property
    def etcd(self) -> KvServer:
        """The KV server, whichever kind (its name from when there was only etcd)."""
        if self.kv is None:
            raise LabError(f"lab {self.prefix} runs gossip-only: it has no KV server")
        return self.kv

    @property
    def store_url(self) -> str:
        return self.kv.url if self.kv is not None else "gossip"

    # --- the record in lab.json ---

    @property
    def record_path(self) -> Path:
        return self.dir / "lab.json"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "prefix": self.prefix,
            "dir": str(self.dir),
            "store": self.store,
            "store_url": self.store_url,
            "gossip": self.gossip,
            "gossip_key": self.gossip_key,
            "store_prefix": self.store_prefix,
            "egress": self.egress,
            "mode": self.mode,
            "lease_ttl": self.lease_ttl,
            "reconcile_interval": self.reconcile_interval,
            "underlay": {
                "netns": self.underlay_ns,
                "bridge": UNDERLAY_BRIDGE,
                "subnet": str(UNDERLAY_SUBNET),
                "mtu": UNDERLAY_MTU,
            },
            "kv": None
            if self.kv is None
            else {
                "netns": self.kv_ns,
                "address": KV_ADDRESS,
                "dir": str(self.kv.workdir),
                "process": self.kv.proc.to_json() if self.kv.proc is not None else None,
            },
            "namespaces": list(self.namespaces),
            "hosts": [host.to_json() for host in self.hosts],
            "networks": list(self.networks),
            "endpoints": [asdict(ep) for ep in self.endpoints],
        }

    def _save(self) -> None:
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.record_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
            tmp.replace(self.record_path)

    @classmethod
    def load(cls, prefix: str, *, root: Path = LAB_ROOT) -> Lab | None:
        """The lab recorded under `root/prefix`, or None if there is no record."""
        path = root / check_prefix(prefix) / "lab.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise LabError(f"{path}: unreadable lab record: {exc}") from None
        lab = cls(
            hosts=max(1, len(data["hosts"])),
            prefix=prefix,
            store=data["store"],
            gossip=data.get("gossip", False),
            lease_ttl=data["lease_ttl"],
            reconcile_interval=data["reconcile_interval"],
            root=root,
            egress=data.get("egress", "none"),
            mode=data.get("mode", "vxlan"),
        )
        lab.hosts = [Host.from_json(h) for h in data["hosts"]]
        lab.gossip_key = data.get("gossip_key", "")
        if lab.kv is not None and data.get("kv"):
            process = data["kv"]["process"]
            lab.kv.proc = Proc.from_json(process) if process else None
        lab.namespaces = list(data["namespaces"])
        lab.networks = list(data["networks"])
        lab.endpoints = [Endpoint(**ep) for ep in data["endpoints"]]
        return lab

    # --- building ---

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def _add_netns(self, name: str) -> None:
        with self._lock:
            self.namespaces.append(name)
            self._save()
        netns.add_netns(name)

    def add_namespaces(self, names: Sequence[str]) -> None:
        """Make extra namespaces that belong to the lab (`down()` removes them), in one
        `ip -batch`; their loopback stays down. For benchmarks that need hundreds of
        endpoint namespaces or a scratch namespace beside the hosts."""
        with self._lock:
            self.namespaces.extend(names)
            self._save()
        netns.run(["ip", "-batch", "-"], input="".join(f"netns add {name}\n" for name in names))

    def _preflight(self, daemons: bool) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root: it makes network namespaces")
        for tool in ("ip", "ping"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install iproute2 and iputils-ping")
        try:
            if self.store == "zookeeper":
                find_java()
                find_zookeeper()
            elif self.store == "consul":
                find_consul()
            elif self.store == "etcd":
                find_etcd()
        except (EtcdError, ZooKeeperError, ConsulError) as exc:
            raise LabError(str(exc)) from None
        if daemons:
            overlayd_argv()
        present = [
            ns
            for ns in (
                self.underlay_ns,
                self.kv_ns,
                self.outside_ns,
                self.router_ns,
                *(h.netns for h in self.hosts),
            )
            if netns.netns_exists(ns)
        ]
        if self.record_path.exists() or present:
            what = f"{self.record_path}" if self.record_path.exists() else ", ".join(present)
            raise LabError(
                f"a lab with prefix {self.prefix!r} already exists ({what}); "
                f"remove it first with `overlayctl lab down --prefix {self.prefix}`"
            )

    def up(self, *, daemons: bool = True, demo: bool = True) -> Lab:
        """Build the lab; on any failure remove what was made and raise LabError.

        `daemons=False` builds only the namespaces, the underlay and the KV server;
        `demo=False` skips network `demo` and its endpoints.
        """
        self._preflight(daemons)
        try:
            self._save()
            raised = neightable.ensure_room(len(self.hosts), self._neigh_saved)
            if raised is not None:
                self._say(raised)
            self._build_underlay()
            if self.kv is not None:
                self._say(f"starting {self.store} on {self.kv.url} in {self.kv_ns}")
                self.kv.start()
            if daemons:
                for host in self.hosts:
                    self.start_daemon(host, wait=False)
                self._say(f"waiting for {len(self.hosts)} daemon(s) to be ready")
                self.wait_ready(*self.hosts)
                if demo:
                    self._make_demo()
        except BaseException as exc:
            self._say("lab up failed; removing what was made")
            errors = self.down()
            if not isinstance(exc, Exception):
                raise
            cleanup = "".join(f"\n  cleanup: {err}" for err in errors)
            if isinstance(exc, LabError):
                raise LabError(f"{exc}{cleanup}") from exc
            raise LabError(f"{type(exc).__name__}: {exc}{cleanup}") from exc
        return self

    def _build_underlay(self) -> None:
        self._say(f"creating underlay {self.underlay_ns} ({UNDERLAY_SUBNET}, MTU {UNDERLAY_MTU})")
        self._add_netns(self.underlay_ns)
        netns.add_bridge(self.underlay_ns, UNDERLAY_BRIDGE, mtu=UNDERLAY_MTU)
        if self.far:
            self._build_router()
        if self.kv is not None:
            self._say(f"creating {self.kv_ns} ({KV_ADDRESS})")
            self._attach(self.kv_ns, "kv", KV_ADDRESS)
        if self.egress == "nat":
            self._say(f"creating the outside {self.outside_ns} ({OUTSIDE_ADDRESS})")
            self._attach(self.outside_ns, "out", OUTSIDE_ADDRESS)
        for host in self.hosts:
            self._say(f"creating host {host.name}: {host.netns} ({host.address})")
            self._attach(host.netns, host.name, host.address)

    def _build_router(self) -> None:
        """A second segment behind a router: the last host lives there (routed mode's fallback)."""
        self._say(f"creating router {self.router_ns} ({ROUTER_ADDRESS} / {FAR_ROUTER_ADDRESS}, {FAR_SUBNET})")
        netns.add_bridge(self.underlay_ns, FAR_BRIDGE, mtu=UNDERLAY_MTU)
        self._attach(self.router_ns, "rt0", ROUTER_ADDRESS)
        netns.add_veth(self.underlay_ns, "rt1", self.router_ns, "ul1", mtu=UNDERLAY_MTU)
        netns.set_master(self.underlay_ns, "rt1", FAR_BRIDGE)
        netns.set_up(self.underlay_ns, "rt1")
        netns.add_address(self.router_ns, "ul1", f"{FAR_ROUTER_ADDRESS}/{FAR_SUBNET.prefixlen}")
        netns.set_up(self.router_ns, "ul1")
        netns.run_in(self.router_ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def _attach(self, ns: str, port: str, address: str) -> None:
        """Make namespace `ns` and join it to its underlay segment with `address` on ul0."""
        far = IPv4Address(address) in FAR_SUBNET
        subnet = FAR_SUBNET if far else UNDERLAY_SUBNET
        self._add_netns(ns)
        netns.add_veth(self.underlay_ns, port, ns, UNDERLAY_IFNAME, mtu=UNDERLAY_MTU)
        netns.set_master(self.underlay_ns, port, FAR_BRIDGE if far else UNDERLAY_BRIDGE)
        netns.set_up(self.underlay_ns, port)
        netns.add_address(ns, UNDERLAY_IFNAME, f"{address}/{subnet.prefixlen}")
        netns.set_up(ns, UNDERLAY_IFNAME)
        if self.far and ns != self.router_ns:
            # Each segment reaches the other through the router.
            other, via = (UNDERLAY_SUBNET, FAR_ROUTER_ADDRESS) if far else (FAR_SUBNET, ROUTER_ADDRESS)
            netns.ip("route", "add", str(other), "via", via, netns=ns)

    def _make_demo(self) -> None:
        self._say(f"creating network {DEMO_NETWORK} ({DEMO_SUBNET}, mode {self.mode}, egress {self.egress})")
        first = self.hosts[0]
        plain = self.mode == "vxlan" and self.egress == "none"
        try:
            self.create_network(
                DEMO_NETWORK,
                DEMO_SUBNET,
                via=first,
                gateway=None if plain else DEMO_GATEWAY,
                mode=None if self.mode == "vxlan" else self.mode,
                egress=None if self.egress == "none" else self.egress,
            )
        except ClientError as exc:
            raise self._daemon_error(first, f"creating network {DEMO_NETWORK}", exc) from exc
        # All at once: a host's first endpoint in a network waits for its first address block
        # to settle (gossip-only mode, 0.3 s), so one after another took 10 s on 30 hosts.
        with ThreadPoolExecutor(max_workers=min(16, len(self.hosts))) as pool:
            adds = [pool.submit(self.add_endpoint, host, f"{host.name}-ep") for host in self.hosts]
        for host, add in zip(self.hosts, adds, strict=True):
            try:
                ep = add.result()
            except ClientError as exc:
                raise self._daemon_error(host, f"creating endpoint {host.name}-ep", exc) from exc
            self._say(f"endpoint {ep.name} on {host.name}: {ep.ip} ({ep.mac}) in {ep.netns}")
        order = {host.name: i for i, host in enumerate(self.hosts)}
        with self._lock:  # listed in host order, as they were made before
            self.endpoints.sort(key=lambda ep: order.get(ep.host, len(order)))
            self._save()

    def _daemon_error(self, host: Host, what: str, exc: Exception) -> LabError:
        """A failed admin call, with the end of that daemon's log (removed by the cleanup)."""
        return LabError(
            f"{what} on {host.name} failed: {exc}; last lines of {host.log_path}:\n{log_tail(host.log_path)}"
        )

    # --- hosts and daemons ---

    def host(self, host: str | Host) -> Host:
        if isinstance(host, Host):
            return host
        for candidate in self.hosts:
            if candidate.name == host:
                return candidate
        raise LabError(f"no host {host!r} in lab {self.prefix} (hosts: {self.host_names})")

    @property
    def host_names(self) -> list[str]:
        return [host.name for host in self.hosts]

    def config_text(self, host: str | Host) -> str:
        h = self.host(host)

        def q(value: str) -> str:
            return json.dumps(value)  # a JSON string is a valid TOML basic string

        return (
            f"[node]\nname = {q(h.name)}\n"
            f"[underlay]\ninterface = {q(UNDERLAY_IFNAME)}\naddress = {q(h.address)}\n"
            + self._store_config(q)
            + f"[admin]\nsocket = {q(str(h.admin_socket))}\n"
            f"[status]\nlisten = {q(STATUS_LISTEN)}\n"
            f"[state]\ndir = {q(str(h.state_dir))}\n"
            f"[reconcile]\ninterval = {float(self.reconcile_interval)!r}\n"
            f"[log]\nlevel = {q(self.log_level)}\n"
            # /run/netns is shared by every lab host: each daemon's gateway namespaces carry its name.
            f"[egress]\nnetns_prefix = {q(self.gateway_netns_prefix(h))}\n"
        )

    def gateway_netns_prefix(self, host: str | Host) -> str:
        return f"{self.prefix}-{self.host(host).name}-gw"

    def gateway_netns(self, host: str | Host, vni: int) -> str:
        """The name of `host`'s gateway namespace for a VXLAN network with egress."""
        return f"{self.gateway_netns_prefix(host)}{vni}"

    def _store_config(self, q: Callable[[str], str]) -> str:
        if self.kv is not None:
            text = (
                f"[store]\nurl = {q(self.kv.url)}\nprefix = {q(self.store_prefix)}\n"
                f"lease_ttl = {int(self.lease_ttl)}\n"
            )
        else:
            text = '[store]\nurl = "gossip"\n'
        if not self.gossip:
            return text
        # Every host knows every other as a seed; in gossip-only mode the lease
        # TTL becomes the grace a dead host's endpoints get.
        peers = ", ".join(q(f"{h.address}:{GOSSIP_PORT}") for h in self.hosts)
        return text + (
            f"[gossip]\nport = {GOSSIP_PORT}\nkeys = [{q(self.gossip_key)}]\npeers = [{peers}]\n"
            f"dead_grace = {float(self.lease_ttl)!r}\nprobe_interval = 0.5\nanti_entropy_interval = 2.0\n"
        )

    def start_daemon(self, host: str | Host, *, wait: bool = True, rewrite_config: bool = True) -> Proc:
        """Start overlayd in the host's namespace (config rewritten first, unless
        `rewrite_config` is False: a test that changed the file itself); wait until ready."""
        h = self.host(host)
        if h.proc is not None and h.proc.alive():
            raise LabError(f"overlayd on {h.name} is already running (pid {h.proc.pid})")
        h.state_dir.mkdir(parents=True, exist_ok=True)
        if rewrite_config or not h.config_path.exists():
            # 0600: it holds the gossip key, and the daemon (and doctor) warn about a
            # config with secrets that others may read.
            fd = os.open(h.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
            with os.fdopen(fd, "w") as out:
                out.write(self.config_text(h))
        # In the host's network namespace only, sharing the machine's mounts as a daemon
        # started by the system does: its gateway namespaces' pins are seen by everyone.
        argv = netns.enter_argv(h.netns, [*overlayd_argv(), "--config", str(h.config_path)])
        h.proc = Proc.spawn(
            argv,
            log_path=h.log_path,
            env={**os.environ, **self.daemon_env},
            banner=f"starting overlayd on {h.name} at {time.strftime('%H:%M:%S')}",
        )
        self._save()
        self._say(f"started overlayd on {h.name} (pid {h.proc.pid}), log {h.log_path}")
        if wait:
            self.wait_ready(h)
        return h.proc

    def stop_daemon(self, host: str | Host, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send `sig` by PID, wait up to `timeout`, then SIGKILL; the exit status if known."""
        h = self.host(host)
        if h.proc is None:
            return None
        proc = h.proc
        proc.stop(timeout=timeout, sig=sig)
        h.proc = None
        self._save()
        return proc.returncode()

    def kill_daemon(self, host: str | Host) -> int | None:
        """SIGKILL the host's overlayd, as a crash would."""
        return self.stop_daemon(host, sig=signal.SIGKILL)

    def daemon_alive(self, host: str | Host) -> bool:
        proc = self.host(host).proc
        return proc is not None and proc.alive()

    def admin(self, host: str | Host, *, timeout: float = 60.0) -> AdminClient:
        """A client of the host's admin socket (`overlayd.api.client`, as overlayctl uses)."""
        return AdminClient(str(self.host(host).admin_socket), timeout=timeout)

    def is_ready(self, host: str | Host) -> bool:
        """True if the host's overlayd answers /v1/status with "ready": true."""
        try:
            return self.admin(host, timeout=2.0).status().ready
        except ClientError:
            return False

    def wait_ready(self, *hosts: str | Host, timeout: float | None = None) -> None:
        """Wait until every given host's overlayd is ready; LabError with its log if it
        exits or is not ready in time."""
        pending = [self.host(h) for h in hosts]
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while pending:
            for h in list(pending):
                if h.proc is None or not h.proc.alive():
                    code = h.proc.returncode() if h.proc is not None else None
                    raise LabError(
                        f"overlayd on {h.name} exited (status {code}) before it was ready; "
                        f"last lines of {h.log_path}:\n{log_tail(h.log_path)}"
                    )
                if self.is_ready(h):
                    pending.remove(h)
            if pending and time.monotonic() >= deadline:
                h = pending[0]
                raise LabError(
                    f"overlayd on {h.name} not ready after {timeout:g}s; "
                    f"last lines of {h.log_path}:\n{log_tail(h.log_path)}"
                )
            if pending:
                time.sleep(0.05)

    def status_get(self, host: str | Host, path: str = "/status") -> tuple[int, bytes]:
        """GET `path` from the host's status server (inside its namespace)."""
        h = self.host(host)
        address, port = STATUS_LISTEN.rsplit(":", 1)
        return request(NetnsHTTPConnection(h.netns, address, int(port)), "GET", path)

    def log_tail(self, host: str | Host, lines: int = 40) -> str:
        return log_tail(self.host(host).log_path, lines)

    # --- networks and endpoints ---

    def create_network(
        self,
        name: str,
        subnet: str,
        *,
        via: str | Host | None = None,
        vni: int | None = None,
        gateway: str | None = None,
        mtu: int | None = None,
        mode: str | None = None,
        egress: str | None = None,
    ) -> schema.NetworkInfo:
        """Create a network through the admin API of `via` (the first host by default)."""
        client = self.admin(via if via is not None else self.hosts[0])
        record = client.network_create(
            name=name, subnet=subnet, vni=vni, gateway=gateway, mtu=mtu, mode=mode, egress=egress
        )
        with self._lock:
            self.networks.append(record.to_json())
            self._save()
        return record

    def add_endpoint(
        self,
        host: str | Host,
        name: str,
        ip: str | None = None,
        *,
        network: str = DEMO_NETWORK,
        timeout: float = 15.0,
    ) -> Endpoint:
        """Make namespace `<prefix>-<name>` and an endpoint `name` in it on `host`.

        Retries while the host's daemon answers 404 or 503, i.e. has not yet
        learnt of a network created through another host (503: its view is
        still completing).
        """
        h = self.host(host)
        ns = f"{self.prefix}-{name}"
        self._add_netns(ns)

        def create() -> schema.EndpointInfo | None:
            try:
                return self.admin(h).endpoint_add(network=network, name=name, netns=ns, ip=ip)
            except ClientError as exc:
                if exc.status in (404, 503):
                    return None
                raise

        record = wait_for(create, timeout, f"endpoint {name} on {h.name} (network {network})")
        ep = Endpoint(h.name, network, name, ns, str(record.ip), record.mac)
        with self._lock:
            self.endpoints.append(ep)
            self._save()
        return ep

    def forget_endpoint(self, ep: Endpoint) -> None:
        """Drop `ep` from the record after a test removed it (its namespace stays recorded)."""
        with self._lock:
            self.endpoints.remove(ep)
            self._save()

    # --- commands and traffic ---

    @staticmethod
    def wait_for(
        predicate: Callable[[], T | None],
        timeout: float,
        what: str,
        *,
        interval: float = 0.05,
        ignore: tuple[type[BaseException], ...] = (),
    ) -> T:
        """The module's `wait_for`, at hand on the lab."""
        return wait_for(predicate, timeout, what, interval=interval, ignore=ignore)

    def exec(
        self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside namespace `ns` (CommandError if it fails and `check`)."""
        return netns.run_in(ns, argv, check=check, timeout=timeout)

    def ping(self, from_ns: str, ip: str, *, wait: int = 1) -> bool:
        """One echo request from `from_ns` to `ip`; True if answered within `wait` seconds."""
        argv = ["ping", "-n", "-q", "-c", "1", "-W", str(wait), ip]
        try:
            return self.exec(from_ns, argv, check=False, timeout=wait + 10).returncode == 0
        except netns.CommandError as exc:
            if exc.returncode == netns.PROCESS_TIMED_OUT:
                # The machine was too busy to even run ping in time (30 hosts forming on
                # 2 cores once held one `ip netns exec ping` for 11 s): not answered, try again.
                return False
            raise

    def wait_ping(self, from_ns: str, ip: str, timeout: float = 20.0) -> float:
        """Ping until answered; the seconds it took. LabError on timeout."""
        start = time.monotonic()
        wait_for(lambda: self.ping(from_ns, ip), timeout, f"ping {from_ns} -> {ip}", interval=0)
        return time.monotonic() - start

    def pinger(self, from_ns: str, ip: str, *, interval: float = 0.1) -> Pinger:
        """Start pinging `ip` from `from_ns` every `interval` seconds until `.stop()`."""
        return Pinger(from_ns, ip, interval=interval)

    def ping_all(
        self, endpoints: Sequence[Endpoint] | None = None, timeout: float = 30.0
    ) -> list[PingResult]:
        """Every endpoint pings every other, all pairs at once, each retrying until
        answered or `timeout` (programming is asynchronous)."""
        eps = list(self.endpoints if endpoints is None else endpoints)
        pairs = [(src, dst) for src in eps for dst in eps if src is not dst]
        deadline = time.monotonic() + timeout

        def one(pair: tuple[Endpoint, Endpoint]) -> PingResult:
            src, dst = pair
            start = time.monotonic()
            attempts = 0
            while True:
                attempts += 1
                if self.ping(src.netns, dst.ip):
                    return PingResult(src, dst, True, time.monotonic() - start, attempts)
                if time.monotonic() >= deadline:
                    return PingResult(src, dst, False, time.monotonic() - start, attempts)

        if not pairs:
            return []
        with ThreadPoolExecutor(max_workers=min(32, len(pairs))) as pool:
            return list(pool.map(one, pairs))

    def ping_outside(
        self, endpoints: Sequence[Endpoint] | None = None, timeout: float = 20.0
    ) -> list[tuple[Endpoint, bool]]:
        """Each endpoint pings the outside (retrying until `timeout`): (endpoint, answered)."""
        eps = list(self.endpoints if endpoints is None else endpoints)
        deadline = time.monotonic() + timeout

        def one(ep: Endpoint) -> tuple[Endpoint, bool]:
            while True:
                if self.ping(ep.netns, OUTSIDE_ADDRESS):
                    return ep, True
                if time.monotonic() >= deadline:
                    return ep, False

        if not eps:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(eps))) as pool:
            return list(pool.map(one, eps))

    def fdb(self, host: str | Host) -> list[dict[str, Any]]:
        """`bridge -j fdb show` in the host's namespace."""
        out = self.exec(self.host(host).netns, ["bridge", "-j", "fdb", "show"]).stdout
        data: list[dict[str, Any]] = json.loads(out) if out.strip() else []
        return data

    def neighbours(self, host: str | Host) -> list[dict[str, Any]]:
        """`ip -j neigh show` in the host's namespace."""
        return netns.ip_json("neigh", "show", netns=self.host(host).netns)

    # --- teardown ---

    def _owned_namespaces(self) -> list[str]:
        """Recorded namespaces plus any present with the names `up` gives (for a lost record)."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(ul|kv|out|rt|h\d+(-ep|-gw\d+)?)$")
        found = [ns for ns in netns.list_netns() if pattern.match(ns)]
        return list(dict.fromkeys([*self.namespaces, *found]))

    def down(self) -> list[str]:
        """Remove everything the lab made; the errors met (empty when all went well).

        Order: daemons, the KV server, any other process left in the lab's namespaces,
        the namespaces (their interfaces go with them), the lab directory.
        Safe to call again and after a failed `up`.
        """
        errors: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        daemons = [h.proc for h in self.hosts if h.proc is not None]
        attempt("stop daemons", lambda: stop_all(daemons, timeout=10.0))
        for h in self.hosts:
            h.proc = None
        if self.kv is not None:
            attempt(f"stop {self.store}", self.kv.stop)
        namespaces = self._owned_namespaces()
        # The daemons' gateway namespaces (a stopped daemon leaves its dataplane in place).
        namespaces += [
            ns
            for ns in netns.list_netns()
            if ns not in namespaces and any(ns.startswith(self.gateway_netns_prefix(h)) for h in self.hosts)
        ]

        def stop_leftovers() -> None:
            found = (Proc.of_pid(pid) for ns in namespaces for pid in netns.netns_pids(ns))
            stop_all([proc for proc in found if proc is not None], timeout=5.0)

        attempt("stop processes in the lab's namespaces", stop_leftovers)
        for ns in reversed(namespaces):
            attempt(f"delete namespace {ns}", partial(netns.delete_netns, ns))
        attempt(f"remove {self.dir}", self._remove_dir)
        attempt("restore the neighbour-table limits", self._restore_neigh_limits)
        self.namespaces = []
        self.endpoints = []
        self.networks = []
        return errors

    def _remove_dir(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)

    @property
    def _neigh_saved(self) -> Path:
        # Beside the labs' directories: shared by every lab on this machine.
        return self.dir.parent / "neigh-limits.json"

    def _restore_neigh_limits(self) -> None:
        """The last lab to go down puts back the limits a lab raised."""
        if any(self.dir.parent.glob("*/lab.json")):
            return
        restored = neightable.restore(self._neigh_saved)
        if restored is not None:
            self._say(restored)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors = self.down()
        if errors and exc is None:
            raise LabError("lab down: " + "; ".join(errors))

    # --- reports ---

    def describe(self, *, live: bool = True) -> dict[str, Any]:
        """What `lab status --json` prints; `live` adds liveness and readiness."""
        daemons = []
        for h in self.hosts:
            alive = h.proc is not None and h.proc.alive()
            daemons.append(
                {
                    "host": h.name,
                    "pid": h.proc.pid if h.proc is not None else None,
                    "alive": alive,
                    "ready": (alive and self.is_ready(h)) if live else None,
                    "netns": h.netns,
                    "admin_socket": str(h.admin_socket),
                    "status_url": h.status_url,
                    "config": str(h.config_path),
                    "log": str(h.log_path),
                }
            )
        return {
            "prefix": self.prefix,
            "dir": str(self.dir),
            "underlay": {
                "netns": self.underlay_ns,
                "bridge": UNDERLAY_BRIDGE,
                "subnet": str(UNDERLAY_SUBNET),
                "mtu": UNDERLAY_MTU,
            },
            "store": {"kind": "gossip", "url": "gossip"}
            if self.kv is None
            else {
                "kind": self.store,
                "url": self.kv.url,
                "prefix": self.store_prefix,
                "netns": self.kv_ns,
                "pid": self.kv.pid,
                "alive": self.kv.running(),
                "log": str(self.kv.log_path),
            },
            "hosts": [
                {"name": h.name, "netns": h.netns, "vtep": h.address, "interface": UNDERLAY_IFNAME}
                for h in self.hosts
            ],
            "egress": self.egress,
            "mode": self.mode,
            **(
                {"outside": {"netns": self.outside_ns, "ip": OUTSIDE_ADDRESS}} if self.egress == "nat" else {}
            ),
            **(
                {
                    "router": {
                        "netns": self.router_ns,
                        "addresses": [ROUTER_ADDRESS, FAR_ROUTER_ADDRESS],
                        "behind": [h.name for h in self.hosts if IPv4Address(h.address) in FAR_SUBNET],
                    }
                }
                if self.far
                else {}
            ),
            "daemons": daemons,
            "networks": self.networks,
            "endpoints": [asdict(ep) for ep in self.endpoints],
        }


# --- overlayctl lab up | status | down ---------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _ping_matrix(lab: Lab, results: Sequence[PingResult]) -> str:
    names = [ep.name for ep in lab.endpoints]
    by_pair = {(r.src.name, r.dst.name): r for r in results}
    rows = []
    for src in names:
        row: list[object] = [src]
        for dst in names:
            r = by_pair.get((src, dst))
            row.append("-" if r is None else f"ok {r.seconds * 1000:.0f}ms" if r.ok else "FAIL")
        rows.append(row)
    return _table(["from \\ to", *names], rows)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lab_up(
    hosts: int, store: str, prefix: str, json_out: bool, egress: str = "none", mode: str = "vxlan"
) -> int:
    """`overlayctl lab up`: build the lab, show hosts and endpoints, ping all pairs (and the
    outside, with egress)."""
    try:
        # KV-backed labs gossip too: changes reach peers without waiting for the watch.
        lab = Lab(
            hosts=hosts,
            prefix=prefix,
            store=store,
            gossip=True,
            progress=None if json_out else _stderr,
            egress=egress,
            mode=mode,
        )
        lab.up()
    except LabError as exc:
        _stderr(f"overlayctl lab up: {exc}")
        return 1
    if not json_out:
        _stderr(f"pinging all {len(lab.endpoints) * (len(lab.endpoints) - 1)} endpoint pairs")
    results = lab.ping_all()
    outside = lab.ping_outside() if egress == "nat" else []
    failed = [r for r in results if not r.ok]
    unreached = [ep.name for ep, ok in outside if not ok]
    if json_out:
        report = lab.describe(live=False)
        report["ping"] = [
            {"from": r.src.name, "to": r.dst.name, "ok": r.ok, "seconds": round(r.seconds, 3)}
            for r in results
        ]
        if outside:
            report["ping_outside"] = [{"from": ep.name, "ok": ok} for ep, ok in outside]
        print(json.dumps(report, indent=2))
    else:
        addresses = {h.name: h.address for h in lab.hosts}
        rows = [(ep.host, addresses[ep.host], ep.name, ep.netns, ep.ip) for ep in lab.endpoints]
        print(_table(["HOST", "VTEP", "ENDPOINT", "NETNS", "IP"], rows))
        print()
        print(_ping_matrix(lab, results))
        print()
        if failed:
            print(f"{len(failed)} of {len(results)} pairs did not answer")
        else:
            print(f"all {len(results)} pairs answered")
        if outside:
            reached = [ep.name for ep, ok in outside if ok]
            print(
                f"the outside ({lab.outside_ns}, {OUTSIDE_ADDRESS}) answered "
                f"{', '.join(reached) or 'no endpoint'}"
                + (f"; NOT {', '.join(unreached)}" if unreached else "")
            )
        print(
            f"lab {lab.prefix} is up: `overlayctl lab status --prefix {lab.prefix}`, "
            f"`overlayctl lab down --prefix {lab.prefix}`"
        )
    if failed or unreached:
        what = f"{len(failed)} of {len(results)} endpoint pairs did not answer" if failed else ""
        if unreached:
            what += ("; " if what else "") + f"the outside did not answer {', '.join(unreached)}"
        _stderr(
            f"overlayctl lab up: {what}; "
            f"the lab is left up for inspection (logs in {lab.dir}/h*/overlayd.log)"
        )
        return 1
    return 0


def lab_status(prefix: str, json_out: bool) -> int:
    """`overlayctl lab status`: what the lab is made of and whether its processes live."""
    try:
        lab = Lab.load(prefix)
    except LabError as exc:
        _stderr(f"overlayctl lab status: {exc}")
        return 1
    if lab is None:
        _stderr(f"overlayctl lab status: no lab with prefix {prefix!r} (no {LAB_ROOT / prefix})")
        return 1
    report = lab.describe()
    if json_out:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"lab {lab.prefix}: {len(lab.hosts)} host(s), underlay {UNDERLAY_SUBNET} "
        f"in {lab.underlay_ns}, dir {lab.dir}"
    )
    print(_store_line(lab))
    print()
    vteps = {h.name: h.address for h in lab.hosts}
    print(
        _table(
            ["HOST", "NETNS", "VTEP", "PID", "STATE", "ADMIN SOCKET"],
            [
                (
                    d["host"],
                    d["netns"],
                    vteps[d["host"]],
                    d["pid"] or "-",
                    "ready" if d["ready"] else "alive" if d["alive"] else "down",
                    d["admin_socket"],
                )
                for d in report["daemons"]
            ],
        )
    )
    if lab.endpoints:
        print()
        print(
            _table(
                ["ENDPOINT", "HOST", "NETWORK", "NETNS", "IP", "MAC"],
                [(ep.name, ep.host, ep.network, ep.netns, ep.ip, ep.mac) for ep in lab.endpoints],
            )
        )
    return 0


def _store_line(lab: Lab) -> str:
    """What holds the lab's cluster view: a KV server in its own namespace, or gossip alone."""
    if lab.kv is None:
        return f"store: gossip only (no KV server; the daemons gossip on UDP {GOSSIP_PORT})"
    state = "alive" if lab.kv.running() else "NOT RUNNING"
    return f"store: {lab.store} {lab.kv.url} in {lab.kv_ns}, pid {lab.kv.pid}, {state}"


def lab_down(prefix: str) -> int:
    """`overlayctl lab down`: remove the lab; 0 also when there was nothing to remove."""
    try:
        lab = Lab.load(prefix) or Lab(prefix=prefix)
    except LabError as exc:
        # An unreadable record: remove what carries the lab's names.
        _stderr(f"overlayctl lab down: {exc}")
        lab = Lab(prefix=prefix)
    errors = lab.down()
    for err in errors:
        _stderr(f"overlayctl lab down: {err}")
    return 1 if errors else 0
