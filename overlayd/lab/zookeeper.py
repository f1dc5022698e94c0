"""A real standalone ZooKeeper server for tests and the lab.

Runs Debian's `zookeeper` (3.8, `/usr/share/java/zookeeper.jar`, whose
manifest names its dependencies) — or the jars of another release unpacked
in `jar_dir` (Debian 13's 3.9, see scripts/fetch-zookeeper.sh), which then
come first on the class path — with a generated `zoo.cfg` and a data
directory of its own, on a given address and a free (or given) port,
optionally inside a network namespace. Stopping goes by PID: SIGTERM, a
bounded wait, then SIGKILL. `restart()` keeps the data; `cleanup()` stops the
server and removes its directory.

With `tls=(cert, key)` it also serves TLS on a second port (`secure_port`,
what `url` then names) through the Netty connection factory, reading PEM
files directly; `client_ca` makes it require client certificates signed by
that CA. `srvr` keeps using the plain port.

Ready means `srvr` reports `Mode:`: `ruok` answers `imok` before the server
accepts sessions. Sized for tests: a 128 MiB heap with the serial collector
(about 125 MiB resident), a short tick so session timeouts down to 1 s are
allowed and expiry is noticed promptly, and no admin HTTP server.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from overlayd.lab.netns import exec_argv, free_port, socket_in_netns
from overlayd.lab.proc import Proc
from overlayd.lab.server import ServerProcess

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
# A logging backend for slf4j: without one ZooKeeper logs nothing at all.
SLF4J_BINDING = Path("/usr/share/java/slf4j-simple.jar")
NETTY_DIR = Path("/usr/share/java")
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
TICK_MS = 500


class ZooKeeperError(RuntimeError):
    """ZooKeeper could not be started or stopped; the message has the tail of its log."""


def find_java() -> str:
    found = shutil.which("java")
    if found is None:
        raise ZooKeeperError("java not found: install it with `apt-get install default-jre-headless`")
    return found


def find_zookeeper(jar_dir: Path | None = None) -> list[Path]:
    """The server's jars, to go first on the class path (their manifests name the rest)."""
    if jar_dir is None:
        if not ZOOKEEPER_JAR.is_file():
            raise ZooKeeperError(f"{ZOOKEEPER_JAR} not found: install it with `apt-get install zookeeper`")
        return [ZOOKEEPER_JAR]
    jars = [jar_dir / "zookeeper-jute.jar", jar_dir / "zookeeper.jar"]
    missing = [str(jar) for jar in jars if not jar.is_file()]
    if missing:
        raise ZooKeeperError(f"{', '.join(missing)} not found (scripts/fetch-zookeeper.sh fetches them)")
    return jars


class ZooKeeperServer(ServerProcess):
    """One ZooKeeper process; `url` is what overlayd's config takes (zookeeper://host:port)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        netns: str | None = None,
        workdir: Path | None = None,
        min_session_timeout_ms: int = 2 * TICK_MS,
        max_session_timeout_ms: int = 60_000,
        jar_dir: Path | None = None,
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        on_start: Callable[[ZooKeeperServer], None] | None = None,
    ) -> None:
        """`workdir` holds `data/`, `zoo.cfg` and `zookeeper.log` (a new temporary directory when None).

        A port left as None is picked free at each start until the first
        successful one, then kept, so a restart comes back on the same URL.
        `on_start` is called after every successful start (the lab records the PID).
        """
        self.host = host
        self.netns = netns
        self.min_session_timeout_ms = min_session_timeout_ms
        self.max_session_timeout_ms = max_session_timeout_ms
        self.jar_dir = jar_dir
        self.tls = tls
        self.client_ca = client_ca
        self.secure_port = 0
        self.on_start = on_start
        self._given_port = client_port
        self._pick_port = client_port is None
        self.client_port = client_port or 0
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="zookeeper-"))
        self.proc: Proc | None = None

    # --- addresses ---

    @property
    def url(self) -> str:
        port = self.secure_port if self.tls is not None else self.client_port
        return f"zookeeper://{self.host}:{port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "zoo.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "zookeeper.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # --- life cycle ---

    @property
    def keystore_path(self) -> Path:
        return self.workdir / "server.pem"

    def config_text(self) -> str:
        return "\n".join(
            [
                *self._tls_lines(),
                f"tickTime={TICK_MS}",
                f"dataDir={self.data_dir}",
                f"clientPort={self.client_port}",
                f"clientPortAddress={self.host}",
                f"minSessionTimeout={self.min_session_timeout_ms}",
                f"maxSessionTimeout={self.max_session_timeout_ms}",
                "admin.enableServer=false",
                "4lw.commands.whitelist=srvr,ruok",
                # Keep few snapshots and logs: tests restart servers with their data.
                "autopurge.snapRetainCount=3",
                "autopurge.purgeInterval=0",
                "",
            ]
        )

    def _tls_lines(self) -> list[str]:
        if self.tls is None:
            return []
        lines = [
            f"secureClientPort={self.secure_port}",
            f"secureClientPortAddress={self.host}",
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            f"ssl.keyStore.location={self.keystore_path}",
            "ssl.keyStore.type=PEM",
        ]
        if self.client_ca is None:
            return [*lines, "ssl.clientAuth=none"]
        return [
            *lines,
            f"ssl.trustStore.location={self.client_ca}",
            "ssl.trustStore.type=PEM",
            "ssl.clientAuth=need",
        ]

    def argv(self) -> list[str]:
        classpath = [str(jar) for jar in find_zookeeper(self.jar_dir)]
        if self.tls is not None:
            # Netty's TLS needs its codec and resolver, which the jar's manifest leaves out.
            classpath += [str(NETTY_DIR / "netty-codec.jar"), str(NETTY_DIR / "netty-resolver.jar")]
        if SLF4J_BINDING.is_file():
            classpath.append(str(SLF4J_BINDING))
        argv = [
            find_java(),
            "-Xmx128m",
            "-XX:+UseSerialGC",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            ":".join(classpath),
            MAIN_CLASS,
            str(self.config_path),
        ]
        return exec_argv(self.netns, argv) if self.netns is not None else argv

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until `srvr` reports a mode; ZooKeeperError if it cannot."""
        if self.running():
            raise ZooKeeperError(f"zookeeper {self.url} is already running (pid {self.pid})")
        attempts = 3 if self._pick_port else 1
        for attempt in range(attempts):
            if self._pick_port:
                self.client_port = self._given_port or free_port(self.host, netns=self.netns)
            if self.tls is not None and (self._pick_port or not self.secure_port):
                self.secure_port = free_port(self.host, netns=self.netns)
            try:
                self._start_once(timeout)
            except ZooKeeperError as exc:
                # A free port can be taken between picking and binding it: pick again.
                if attempt + 1 < attempts and "Address already in use" in str(exc):
                    continue
                raise
            break
        self._pick_port = False
        if self.on_start is not None:
            self.on_start(self)

    def _start_once(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.tls is not None:
            # One PEM file with the key and the certificate chain: ZooKeeper's PEM keystore.
            cert, key = self.tls
            self.keystore_path.write_bytes(key.read_bytes() + cert.read_bytes())
            self.keystore_path.chmod(0o600)
        self.config_path.write_text(self.config_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ZOO", "JVMFLAGS", "CLASSPATH"))}
        self.proc = Proc.spawn(
            self.argv(),
            log_path=self.log_path,
            env=env,
            banner=f"starting zookeeper {self.host}:{self.client_port} at {time.strftime('%H:%M:%S')}",
        )
        try:
            self.wait_ready(timeout)
        except ZooKeeperError:
            self.proc.stop(timeout=5.0)
            raise

    def four_letter(self, command: str, timeout: float = 2.0) -> str:
        """Send a four-letter command and return the answer ("" if the server does not answer)."""
        sock = (
            socket_in_netns(self.netns, socket.AF_INET, socket.SOCK_STREAM)
            if self.netns is not None
            else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        )
        chunks: list[bytes] = []
        try:
            with sock:
                sock.settimeout(timeout)
                sock.connect((self.host, self.client_port))
                sock.sendall(command.encode())
                while chunk := sock.recv(4096):
                    chunks.append(chunk)
        except OSError:
            return ""
        return b"".join(chunks).decode(errors="replace")

    def ready(self) -> bool:
        return "Mode:" in self.four_letter("srvr")

    def version(self) -> str:
        """The running server's version ("3.8.0"), or "" if it does not answer."""
        for line in self.four_letter("srvr").splitlines():
            if line.startswith("Zookeeper version:"):
                return line.split(":", 1)[1].strip().split("-")[0].split(",")[0]
        return ""

    error = ZooKeeperError

    @property
    def label(self) -> str:
        return f"zookeeper {self.host}:{self.client_port}"

    def is_ready(self) -> bool:
        return self.ready()
