"""docker-compose.yml: checked as a file, then run for real against podman's Docker API.

The checks: `docker-compose config` (Debian's docker-compose, see .ci/run)
validates the file and prints it normalised (paths absolute, anchors merged);
the checks read that output. docker-compose's own YAML library (python3-yaml,
a dependency of the package) turns it into JSON, since the project's venv has
no YAML parser.

The run: see the section below.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from conftest import new_prefix
from debian_rootfs import CACHE, debian_rootfs, mark_used_and_prune

from overlayd.core import config as config_mod
from overlayd.lab import netns
from overlayd.lab.lab import LabError, wait_for
from overlayd.lab.nshttp import NetnsHTTPConnection, request
from overlayd.lab.proc import Proc, stop_all
from overlayd.lab.server import log_tail

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
LAB_SPACE = IPv4Network("198.18.0.0/15")
NODES = ("node1", "node2", "node3")
T = TypeVar("T")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose not found: install Debian's `docker-compose` package (see .ci/run)")
    result = subprocess.run(
        [tool, "--project-directory", str(REPO), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    to_json = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=result.stdout,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(to_json.stdout)
    return data


def test_services_and_pinned_public_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"etcd", "consul", "zookeeper", *NODES}
    for name in ("etcd", "consul", "zookeeper"):
        image = services[name]["image"]
        assert re.fullmatch(r"[a-z0-9./-]+:v?[0-9][\w.-]*", image), (
            f"{name}: pin a version tag, not {image!r}"
        )
        assert "build" not in services[name]


def test_nodes_build_from_the_repo(compose: dict[str, Any]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in NODES:
        node = compose["services"][name]
        context = Path(node["build"]["context"])
        dockerfile = context / node["build"]["dockerfile"]
        assert context == REPO and dockerfile == REPO / "deploy" / "Dockerfile"
        assert node.get("privileged") is True or "NET_ADMIN" in node.get("cap_add", [])
        # The command is a console script the image installs.
        assert node["command"][0] in scripts, node["command"]
        assert node["command"][1:] == ["--config", config_mod.DEFAULT_PATH]
    # Everything the Dockerfile copies exists; what it runs is installed by it.
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
    assert re.search(r'^CMD \["overlayd", "--config", "/etc/overlayd/overlayd.toml"\]$', text, re.M)
    assert "ln -s /opt/overlayd/bin/overlayd /opt/overlayd/bin/overlayctl /usr/local/bin/" in text


def test_node_configs_exist_load_and_point_at_etcd(compose: dict[str, Any]) -> None:
    services = compose["services"]
    underlay = IPv4Network(compose["networks"]["underlay"]["ipam"]["config"][0]["subnet"])
    assert underlay.subnet_of(LAB_SPACE)
    etcd_flags = dict(flag.split("=", 1) for flag in services["etcd"]["command"][1:])
    etcd_port = int(etcd_flags["--listen-client-urls"].rsplit(":", 1)[1])
    for name in NODES:
        node = services[name]
        # docker-compose 1.x prints short syntax: SOURCE:TARGET:MODE, SOURCE made absolute.
        mounts = [v.split(":") for v in node["volumes"] if v.split(":")[1] == config_mod.DEFAULT_PATH]
        assert len(mounts) == 1 and mounts[0][2] == "ro", node["volumes"]
        source = Path(mounts[0][0])
        assert source.parent == REPO / "deploy" / "compose" and source.is_file(), source
        cfg = config_mod.load(str(source), env={})
        address = IPv4Address(node["networks"]["underlay"]["ipv4_address"])
        assert address in underlay
        assert cfg.node_name == name and cfg.vtep_address == address
        assert cfg.store is not None and cfg.store.scheme == "etcd"
        assert [(e.host, e.port) for e in cfg.store.endpoints] == [("etcd", etcd_port)]
        assert "etcd" in node["depends_on"]


# --- the file run for real ---------------------------------------------------------------
#
# No Docker engine runs on this machine, so docker-compose (Debian's 1.29) talks
# to podman's Docker-compatible API: `podman system service` on a unix socket,
# with a private containers.conf and storage (graph root, run root, CNI network
# configs) under a temporary directory, started inside a network namespace this
# test makes (nsenter --net). The compose network's bridge, veths, iptables
# rules and DNS server (dnsmasq, run by the dnsname CNI plugin, which is what
# resolves `etcd` in the nodes' configs) all live in that namespace: nothing is
# added to the machine's own.
#
# No registry is needed. deploy/Dockerfile's base (`debian:bookworm-slim`) is
# the rootfs of scripts/fetch-rootfs.sh imported under that name. An override
# file that only this test writes gives the store services local build
# contexts (the etcd and Consul binaries the fetch scripts cache, ZooKeeper from
# Debian's packages), so docker-compose builds them under the public image
# names the file keeps, and gives every build the settings below.
#
# Builds that install packages (deploy/Dockerfile's apt-get and pip,
# ZooKeeper's apt-get) run their RUN steps in the service's namespace (build
# network "host"), which has no route out. A small HTTP server that this test
# runs in a thread, listening in that namespace, stands in for the outside:
#   - for apt, an HTTP proxy (the builds get http_proxy) to this machine's apt
#     source and nowhere else; every .deb it passes is kept in the cache, so a
#     later run downloads only apt's indexes;
#   - for pip, a package index (the build arg PIP_INDEX_URL, which
#     deploy/Dockerfile declares for mirrors) serving wheels of overlayd's
#     dependencies that this machine's pip built once into the cache. pip in
#     the image cannot reach PyPI itself here: this machine's HTTPS egress is
#     intercepted by a CA that only the machine trusts.

APT_CACHE = CACHE / "apt"  # what the proxy keeps; files unused for APT_CACHE_DAYS go
APT_CACHE_DAYS = 14
HOST_PYTHON = "/usr/bin/python3"  # the image's Python is Debian's, the same release
ETCD_BIN = CACHE / "etcd-3.5" / "usr" / "bin" / "etcd"  # scripts/fetch-etcd.sh
CONSUL_BIN = CACHE / "consul" / "usr" / "bin" / "consul"  # scripts/fetch-consul.sh
# Hop-by-hop headers (RFC 9110 7.6.1): never forwarded by a proxy.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}

# Stand-ins for the public store images, on the same Debian base. Each runs the
# command docker-compose.yml gives its public image unchanged.
STORE_CONTEXTS: dict[str, dict[str, str]] = {
    "etcd": {
        "Dockerfile": (
            "# Stands in for quay.io/coreos/etcd: the same etcd release (Debian 13's), binary on PATH.\n"
            "FROM debian:bookworm-slim\n"
            "COPY etcd /usr/local/bin/etcd\n"
        ),
    },
    "consul": {
        "Dockerfile": (
            "# Stands in for hashicorp/consul, whose entrypoint runs `consul` with the command's\n"
            "# arguments (agent -dev ...); Consul is Debian 11's 1.8, the one the tests use.\n"
            "FROM debian:bookworm-slim\n"
            "COPY consul /usr/local/bin/consul\n"
            'ENTRYPOINT ["consul"]\n'
        ),
    },
    "zookeeper": {
        "Dockerfile": (
            "# Stands in for zookeeper:3.8: Debian 12's ZooKeeper 3.8, standalone on 2181, data in /data.\n"
            "FROM debian:bookworm-slim\n"
            "RUN apt-get update \\\n"
            "    && apt-get install -y --no-install-recommends default-jre-headless libzookeeper-java"
            " libslf4j-java \\\n"
            "    && rm -rf /var/lib/apt/lists/*\n"
            "COPY zoo.cfg /conf/zoo.cfg\n"
            'CMD ["java", "-Xmx128m", "-XX:+UseSerialGC", '
            '"-cp", "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar", '
            '"org.apache.zookeeper.server.quorum.QuorumPeerMain", "/conf/zoo.cfg"]\n'
        ),
        "zoo.cfg": (
            "tickTime=2000\ndataDir=/data\nclientPort=2181\n"
            "admin.enableServer=false\n4lw.commands.whitelist=srvr,ruok\n"
        ),
    },
}


def apt_source_host() -> str:
    """The host of this machine's Debian archive, as apt itself would fetch from it."""
    result = subprocess.run(
        ["apt-get", "--print-uris", "download", "base-files"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"'(\w+://[^']+)'", result.stdout)
    host = urlsplit(match.group(1)).hostname if match else None
    if not host:
        pytest.fail(f"apt names no Debian source here (apt-get update first?): {result.stderr}")
    return host


def project_name(filename: str) -> str:
    """PEP 503's normalised project name of a wheel or sdist file name."""
    return re.sub(r"[-_.]+", "-", filename.split("-", 1)[0]).lower()


def wheelhouse() -> Path:
    """Wheels of everything `pip install .` of overlayd needs (its dependencies and its build
    backend), made once per pyproject.toml by this machine's pip with Debian's Python."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    wheels = CACHE / f"wheels-{digest}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".wheels.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (wheels / ".complete").exists():
            mark_used_and_prune(wheels, ".complete")
            return wheels
        shutil.rmtree(wheels, ignore_errors=True)
        requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
        with tempfile.TemporaryDirectory(prefix="overlayd-src-") as src:
            # A copy, so pip's build leaves nothing in the working tree.
            for name in ("pyproject.toml", "README.md"):
                shutil.copy2(REPO / name, src)
            shutil.copytree(
                REPO / "overlayd", Path(src) / "overlayd", ignore=shutil.ignore_patterns("__pycache__")
            )
            for argv in (
                ["wheel", "--wheel-dir", str(wheels), src],
                ["download", "--dest", str(wheels), *requires],
            ):
                done = subprocess.run(
                    [HOST_PYTHON, "-m", "pip", "--disable-pip-version-check", "-q", *argv],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                if done.returncode != 0:
                    shutil.rmtree(wheels, ignore_errors=True)
                    pytest.fail(f"pip {argv[0]} for the wheelhouse failed:\n{done.stderr[-3000:]}")
        # The image builds overlayd itself, from the source it copies.
        for own in wheels.glob("overlayd-*"):
            own.unlink()
        mark_used_and_prune(wheels, ".complete")
    return wheels


def cache_key(target: str) -> str | None:
    """The name to keep a response under, for URLs whose content never changes: pool files
    (named by package, version and architecture) and apt's by-hash index files."""
    path = urlsplit(target).path
    name = path.rsplit("/", 1)[-1]
    if "/pool/" in path and name.endswith(".deb"):
        return name
    if "/by-hash/" in path:
        return "by-hash-" + path.split("/by-hash/", 1)[1].replace("/", "-")
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    apt_host: str
    wheels: Path
    log: list[str]


class _Handler(BaseHTTPRequestHandler):
    """GET only: `http://<apt host>/...` is proxied; `/simple/...` and `/files/...` (asked
    directly, or through the proxy with this server's own address) are the local index."""

    server: _Server
    # One request per connection: a response ends when the connection does, so
    # nothing is re-framed. apt and pip reconnect as needed.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.append(format % args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        own = f"127.0.0.1:{self.server.server_address[1]}"
        if not url.netloc or url.netloc == own:
            self.index(url.path)
        elif url.scheme == "http" and url.hostname == self.server.apt_host:
            self.proxy(url.hostname, url.port or 80, url.path + (f"?{url.query}" if url.query else ""))
        else:
            self.send_error(403, f"{self.path}: this proxy goes only to {self.server.apt_host}")

    def send_file(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as f:
            shutil.copyfileobj(f, self.wfile)

    def index(self, path: str) -> None:
        """PEP 503's simple repository API over the wheelhouse."""
        files = sorted(p.name for p in self.server.wheels.iterdir() if not p.name.startswith("."))
        if path.startswith("/files/") and path.removeprefix("/files/") in files:
            self.send_file(self.server.wheels / path.removeprefix("/files/"))
            return
        match = re.fullmatch(r"/simple/([a-z0-9-]+)/?", path)
        links = [f for f in files if match is not None and project_name(f) == match.group(1)]
        if not links:
            self.send_error(404)
            return
        body = "".join(f'<a href="/files/{f}">{f}</a><br>\n' for f in links).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def proxy(self, host: str, port: int, target: str) -> None:
        key = cache_key(target)
        cached = APT_CACHE / key if key is not None else None
        if cached is not None and cached.is_file():
            os.utime(cached)  # used: kept from pruning
            self.send_file(cached)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.end_headers()
            keep = cached is not None and response.status == 200
            tmp = APT_CACHE / f".{key}.{threading.get_ident()}" if keep else None
            with tmp.open("wb") if tmp is not None else contextlib.nullcontext() as copy:
                while chunk := response.read(65536):
                    self.wfile.write(chunk)
                    if copy is not None:
                        copy.write(chunk)
            if tmp is not None and cached is not None:
                tmp.replace(cached)  # whole: the loop ends at the body's end, errors skip this
        except OSError as exc:
            self.server.log.append(f"GET {self.path}: {exc}")
        finally:
            conn.close()


class PackageServer:
    """The apt proxy and pip index, listening on 127.0.0.1 inside `netns`; it connects out
    from this process's own namespace."""

    def __init__(self, netns_name: str, apt_host: str, wheels: Path) -> None:
        APT_CACHE.mkdir(parents=True, exist_ok=True)
        stale = time.time() - APT_CACHE_DAYS * 86400
        for old in APT_CACHE.iterdir():
            if old.stat().st_mtime < stale:
                old.unlink(missing_ok=True)
        self.server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = netns.socket_in_netns(netns_name)
        self.server.apt_host = apt_host
        self.server.wheels = wheels
        self.server.log = []
        self.server.server_bind()
        self.server.server_activate()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="package-server", daemon=True)
        self.thread.start()

    @property
    def build_args(self) -> dict[str, str]:
        return {"http_proxy": self.url, "PIP_INDEX_URL": f"{self.url}/simple/"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@dataclass
class Podman:
    """A podman API service with private config and storage, in namespace `netns`."""

    dir: Path
    netns: str
    service: Proc | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "podman.sock"

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.dir),
            "CONTAINERS_CONF": str(self.dir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.dir / "storage.conf"),
        }

    def setup(self) -> None:
        d = self.dir
        for sub in ("graph", "run", "tmp", "net"):
            (d / sub).mkdir(parents=True)
        # runc, cgroupfs and lowered ulimits: what podman 4.3 needs on this machine
        # (see test_cni_podman.py); file locks and events so nothing is shared.
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
        )
        # overlay: the six containers share their image layers instead of copying them.
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{d}/graph"\nrunroot = "{d}/run"\n'
        )

    def start(self, timeout: float = 30.0) -> None:
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", "podman", "system", "service", "--time=0"]
        self.service = Proc.spawn(
            [*argv, f"unix://{self.socket}"], log_path=self.dir / "service.log", env=self.env
        )

        def answers() -> bool:
            if self.service is None or not self.service.alive():
                raise LabError(f"podman system service exited:\n{log_tail(self.dir / 'service.log')}")
            return self.ping()

        wait_for(answers, timeout, "podman's API to answer", interval=0.1)

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
                return sock.recv(1024).split(b"\r\n", 1)[0].endswith(b" 200 OK")
        except OSError:
            return False

    def cli(
        self, *args: str, stdin: int | None = None, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", "podman", *args]
        result = subprocess.run(
            argv, env=self.env, stdin=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def cleanup(self) -> list[str]:
        """Everything in the private store (containers, images, volumes, networks), then the
        service, then what is left in the namespace (the dnsname plugin's dnsmasq, conmon)."""
        errors: list[str] = []
        if self.service is not None and self.service.alive():
            try:
                done = self.cli("system", "reset", "--force", check=False)
                if done.returncode != 0:
                    errors.append(f"podman system reset: {done.stderr.strip()}")
            except subprocess.TimeoutExpired as exc:
                errors.append(f"podman system reset: {exc}")
            self.service.stop(timeout=10)
        left = [proc for proc in map(Proc.of_pid, netns.netns_pids(self.netns)) if proc is not None]
        stop_all(left, timeout=5)
        # A run killed half way leaves container root filesystems mounted under the store.
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(f"{self.dir}/")
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30, check=False)
        return errors


@dataclass
class ComposeRun:
    podman: Podman
    project: str
    override: Path
    proxy: PackageServer

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.podman.dir),
            "DOCKER_HOST": f"unix://{self.podman.socket}",
            # `exec` through the API, not through a `docker` CLI that may be on PATH.
            "COMPOSE_INTERACTIVE_NO_CLI": "1",
            # Builds through the API too (docker-py), with the build settings of the files.
            "COMPOSE_DOCKER_CLI_BUILD": "0",
        }

    def compose(
        self, *args: str, check: bool = True, timeout: float = 600.0
    ) -> subprocess.CompletedProcess[str]:
        tool = shutil.which("docker-compose")
        assert tool is not None
        argv = [tool, "-p", self.project, "-f", str(COMPOSE), "-f", str(self.override), *args]
        result = subprocess.run(
            argv, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def exec(self, service: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *argv, check=check, timeout=60)

    def diagnostics(self) -> str:
        """Every container of the project with its state and the end of its log."""
        ps = self.podman.cli("ps", "-a", "--format", "{{.Names}} {{.Status}}", check=False).stdout
        logs = []
        for line in ps.splitlines():
            name = line.split(" ", 1)[0]
            out = self.podman.cli("logs", "--tail", "15", name, check=False)
            logs.append(f"--- {line}\n{out.stdout}{out.stderr}")
        return "\n".join(logs) or "(no containers)"

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """wait_for, failing with the containers' states and logs."""
        try:
            return wait_for(predicate, timeout, what, interval=0.5)
        except LabError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


def base_image_name() -> str:
    """deploy/Dockerfile's FROM, fully qualified as a pull would name it."""
    match = re.search(r"^FROM\s+(\S+)", (REPO / "deploy" / "Dockerfile").read_text(), re.M)
    assert match, "deploy/Dockerfile has no FROM"
    name = match.group(1)
    return name if "/" in name else f"docker.io/library/{name}"


def write_override(path: Path, contexts: Path, proxy: PackageServer) -> None:
    """The test's compose override: local build contexts for the stores, and for every build
    the host network (the service's namespace, where the proxy listens) and the proxy."""
    build = {"network": "host", "args": proxy.build_args}
    services: dict[str, Any] = {
        name: {"build": {"context": str(contexts / name), **build}} for name in STORE_CONTEXTS
    }
    services.update({name: {"build": build} for name in NODES})
    # JSON is YAML; the project's venv has no YAML writer.
    path.write_text(json.dumps({"services": services}, indent=2) + "\n")


def require_compose_tools() -> None:
    missing = [
        t for t in ("podman", "runc", "docker-compose", "nsenter", "tar", "dnsmasq") if not shutil.which(t)
    ]
    if not Path("/usr/lib/cni/dnsname").exists():
        missing.append("the dnsname CNI plugin (golang-github-containernetworking-plugin-dnsname)")
    for binary, script in ((ETCD_BIN, "fetch-etcd.sh"), (CONSUL_BIN, "fetch-consul.sh")):
        if not os.access(binary, os.X_OK):
            missing.append(f"{binary} (scripts/{script})")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: `make system-packages test-deps` installs them")


@pytest.fixture
def compose_run(tmp_path: Path) -> Iterator[ComposeRun]:
    require_compose_tools()
    rootfs = debian_rootfs()
    prefix = new_prefix()
    ns = f"{prefix}-dk"
    podman = Podman(tmp_path / "podman", ns)
    proxy: PackageServer | None = None
    errors: list[str] = []
    run: ComposeRun | None = None
    try:
        netns.add_netns(ns)
        # The namespace has no way out, and says so at once: a packet for the outside is
        # refused (ICMP "prohibited", a hard error for the sender) rather than dropped,
        # with no rate limit. The containers' resolv.conf names this machine's DNS
        # server after the compose network's; gRPC's resolver (the nodes' etcd client)
        # asks it for etcd's AAAA record and would wait out its timeout, where on a
        # Docker host an upstream server answers at once.
        netns.run(["ip", "-n", ns, "route", "add", "prohibit", "default"])
        netns.run_in(ns, ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])
        podman.setup()
        podman.start()
        proxy = PackageServer(ns, apt_source_host(), wheelhouse())
        contexts = tmp_path / "contexts"
        for name, files in STORE_CONTEXTS.items():
            (contexts / name).mkdir(parents=True)
            for filename, text in files.items():
                (contexts / name / filename).write_text(text)
        shutil.copy2(ETCD_BIN, contexts / "etcd" / "etcd")
        shutil.copy2(CONSUL_BIN, contexts / "consul" / "consul")
        override = tmp_path / "compose.test.yml"
        write_override(override, contexts, proxy)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            assert tar.stdout is not None
            podman.cli("import", "-", base_image_name(), stdin=tar.stdout.fileno())
        finally:
            tar.wait(timeout=60)
        run = ComposeRun(podman, prefix, override, proxy)
        yield run
    finally:
        # The test ends with the header's `down -v`; whatever a failure left (containers,
        # networks, volumes) and every image go with the private store.
        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        if proxy is not None:
            attempt("package server", proxy.close)
        attempt("podman", lambda: errors.extend(podman.cleanup()))
        attempt(f"namespace {ns}", partial(netns.delete_netns, ns))
        # host-local IPAM keeps a directory per network name under this fixed path.
        shutil.rmtree(Path("/var/lib/cni/networks") / f"{prefix}_underlay", ignore_errors=True)
        shutil.rmtree(tmp_path / "podman", ignore_errors=True)
        if errors:
            pytest.fail("compose cleanup: " + "; ".join(errors))


def header_commands() -> list[list[str]]:
    """The commands docker-compose.yml's header tells a reader to run, in order."""
    commands = []
    for line in COMPOSE.read_text().splitlines():
        match = re.match(r"^#\s+docker-compose (.+)$", line)
        if match:
            commands.append(shlex.split(match.group(1)))
    assert commands and commands[0][:1] == ["up"] and commands[-1][:1] == ["down"], commands
    return commands


def store_answers(ns: str, service: str, address: str) -> bool:
    """The store service answers its own protocol on its compose address."""
    try:
        if service == "zookeeper":
            with netns.socket_in_netns(ns) as sock:
                sock.settimeout(5)
                sock.connect((address, 2181))
                sock.sendall(b"srvr")
                return b"Mode: standalone" in sock.recv(4096)
        port, path = {"etcd": (2379, "/health"), "consul": (8500, "/v1/status/leader")}[service]
        status, body = request(NetnsHTTPConnection(ns, address, port, timeout=5), "GET", path)
    except OSError:
        return False
    if service == "etcd":
        return status == 200 and json.loads(body).get("health") == "true"
    return status == 200 and body.strip() not in (b"", b'""')  # a leader is elected


@pytest.mark.root
# Image builds on 2 busy cores, plus the wheelhouse the first time: more than the default 300 s.
@pytest.mark.timeout(900)
def test_compose_lab_runs_on_podman_and_endpoints_on_two_nodes_ping(
    compose: dict[str, Any], compose_run: ComposeRun
) -> None:
    run = compose_run
    ns = run.podman.netns
    services = compose["services"]
    commands = header_commands()
    started = time.monotonic()
    # The builds first, side by side (ZooKeeper's and overlayd's both spend most of
    # their time installing packages), one node of three: the nodes share one image,
    # and three builds of it at once would share no layers. Then `up -d --build` as
    # the header says, which finds every layer built. Nothing is pulled: the
    # namespace has no way out.
    run.compose("build", "--parallel", "etcd", "consul", "zookeeper", NODES[0], timeout=900)
    built = time.monotonic()
    assert commands[0] == ["up", "-d", "--build"], commands[0]
    run.compose(*commands[0], timeout=900)
    up = time.monotonic()
    images = run.podman.cli("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    for name in ("etcd", "consul", "zookeeper", *NODES):
        image = services[name]["image"]  # the public name, fully qualified by podman
        assert any(i == image or i.endswith(f"/{image}") for i in images), (image, images)

    # All six services come up: running containers, stores answering, daemons ready.
    def states() -> dict[str, str] | None:
        out = run.podman.cli(
            "ps", "-a", "--filter", f"label=com.docker.compose.project={run.project}", "--format", "json"
        ).stdout
        found = {c["Labels"]["com.docker.compose.service"]: c["State"] for c in json.loads(out or "[]")}
        return found if found == {name: "running" for name in services} else None

    run.wait(states, 60, "all compose services running")
    running = time.monotonic()
    for name in ("etcd", "consul", "zookeeper"):
        address = services[name]["networks"]["underlay"]["ipv4_address"]
        run.wait(partial(store_answers, ns, name, address), 60, f"{name} answering on {address}")

    def ready(node: str) -> bool:
        result = run.exec(node, "overlayctl", "--json", "status", check=False)
        return result.returncode == 0 and json.loads(result.stdout).get("ready") is True

    for node in NODES:
        run.wait(partial(ready, node), 60, f"overlayd on {node} ready")
    ready_at = time.monotonic()

    def succeeds(argv: list[str]) -> bool:
        return run.compose(*argv, check=False).returncode == 0

    # The header's walk-through, command by command (exec without a TTY here).
    for argv in commands[1:-1]:
        assert argv[0] == "exec", argv
        full = ["exec", "-T", *argv[1:]]
        if "ping" in argv or argv[3:5] == ["endpoint", "add"]:
            # Programming is asynchronous, and a node learns the network from etcd's watch.
            run.wait(partial(succeeds, full), 30, " ".join(argv))
        else:
            run.compose(*full, timeout=60)
    # And back: ep1 on node1 pings ep2 on node2.
    eps = json.loads(run.exec("node2", "overlayctl", "--json", "endpoint", "ls").stdout)
    ep2 = next(ep for ep in eps if ep["name"] == "ep2")
    assert ep2["owner"] == "node2"
    ping = ["ip", "netns", "exec", "ep1", "ping", "-c", "1", "-W", "1", ep2["ip"]]
    run.wait(lambda: run.exec("node1", *ping, check=False).returncode == 0, 30, f"ep1 pinging {ep2['ip']}")
    walked = time.monotonic()

    # The header's last command takes it all down: containers, the network, the volume.
    run.compose(*commands[-1], timeout=120)
    assert (
        states() is None and json.loads(run.podman.cli("ps", "-a", "--format", "json").stdout or "[]") == []
    )
    assert not any(run.project in v for v in run.podman.cli("volume", "ls", "-q").stdout.split())
    assert not any(run.project in n for n in run.podman.cli("network", "ls", "-q").stdout.split())
    print(
        f"compose: builds {built - started:.0f} s, up {up - built:.0f} s, running {running - up:.0f} s, "
        f"all ready {ready_at - running:.0f} s, walk-through {walked - ready_at:.0f} s, "
        f"down {time.monotonic() - walked:.0f} s"
    )
