"""A real single-member etcd server for tests and the lab.

Runs Debian's `etcd` (3.4) with a data directory of its own, on a given
address and free (or given) ports, optionally inside a network namespace.
Stopping goes by PID: SIGTERM, a bounded wait, then SIGKILL. `restart()`
keeps the data; `cleanup()` stops the server and removes its directory.

Sized for tests: a small snapshot interval and backend quota, few kept
snapshot and WAL files, a short election timeout (one member, so it only
shortens a restart), and no automatic compaction, so a test decides when the
history is compacted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from http.client import HTTPConnection
from pathlib import Path

from overlayd.lab.netns import exec_argv, free_port, socket_in_netns
from overlayd.lab.nshttp import NetnsHTTPConnection, request
from overlayd.lab.proc import Proc
from overlayd.lab.server import ServerProcess

ETCD_CANDIDATES = ("/usr/bin/etcd",)


class EtcdError(RuntimeError):
    """etcd could not be started or stopped; the message has the tail of its log."""


def find_etcd() -> str:
    """`OVERLAYD_ETCD_BIN` if set (the fault suite's etcd 3.5), else Debian's etcd."""
    override = os.environ.get("OVERLAYD_ETCD_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise EtcdError(f"OVERLAYD_ETCD_BIN={override} is not an executable file")
        return override
    for path in ETCD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("etcd")
    if found is None:
        raise EtcdError("etcd not found: install it with `apt-get install etcd-server`")
    return found


class EtcdServer(ServerProcess):
    """One etcd process; `url` is what overlayd's config takes (etcd://host:port)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        netns: str | None = None,
        workdir: Path | None = None,
        name: str = "default",
        extra_args: Sequence[str] = (),
        on_start: Callable[[EtcdServer], None] | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        client_ca: Path | None = None,
        binary: str | None = None,
    ) -> None:
        """`workdir` holds `data/` and `etcd.log` (a new temporary directory when None).

        Ports left as None are picked free at each start until the first
        successful one, then kept, so a restart comes back on the same URL.
        `on_start` is called after every successful start (the lab records the PID).
        """
        self.host = host
        self.netns = netns
        self.name = name
        self.extra_args = list(extra_args)
        self.on_start = on_start
        self._given_ports = (client_port, peer_port)
        self._pick_ports = client_port is None or peer_port is None
        self.client_port = client_port or 0
        self.peer_port = peer_port or 0
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="etcd-"))
        self.proc: Proc | None = None
        # TLS on the client port (certificate and key), and client certificates
        # required and checked against `client_ca` when that is given.
        self.tls_cert, self.tls_key, self.client_ca = tls_cert, tls_key, client_ca
        self.binary = binary  # another etcd build (e.g. Debian 13's 3.5); None: the installed one

    # --- addresses ---

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls_cert is not None else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # --- life cycle ---

    def argv(self) -> list[str]:
        argv = [
            self.binary or find_etcd(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.name}={self.peer_url}",
            "--initial-cluster-state=new",
            # One member: a short election timeout only shortens the wait for
            # a leader after a restart (about 2 s with the default 1 s).
            "--heartbeat-interval=50",
            "--election-timeout=400",
            "--snapshot-count=5000",
            f"--quota-backend-bytes={256 * 1024 * 1024}",
            "--auto-compaction-retention=0",
            "--max-snapshots=2",
            "--max-wals=2",
            "--logger=zap",
            "--log-outputs=stderr",
            *self._tls_args(),
            *self.extra_args,
        ]
        return exec_argv(self.netns, argv) if self.netns is not None else argv

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until /health says it serves; EtcdError if it cannot."""
        if self.running():
            raise EtcdError(f"etcd {self.url} is already running (pid {self.pid})")
        attempts = 3 if self._pick_ports else 1
        for attempt in range(attempts):
            if self._pick_ports:
                self.client_port = self._given_ports[0] or free_port(self.host, netns=self.netns)
                self.peer_port = self._given_ports[1] or free_port(self.host, netns=self.netns)
            try:
                self._start_once(timeout)
            except EtcdError as exc:
                # A free port can be taken between picking and binding it: pick again.
                if attempt + 1 < attempts and "address already in use" in str(exc):
                    continue
                raise
            break
        self._pick_ports = False
        if self.on_start is not None:
            self.on_start(self)

    def _start_once(self, timeout: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.proc = Proc.spawn(
            self.argv(),
            log_path=self.log_path,
            env=env,
            banner=f"starting etcd {self.client_url} at {time.strftime('%H:%M:%S')}",
        )
        try:
            self.wait_ready(timeout)
        except EtcdError:
            self.proc.stop(timeout=5.0)
            raise

    def _tls_args(self) -> list[str]:
        if self.tls_cert is None or self.tls_key is None:
            return []
        args = [f"--cert-file={self.tls_cert}", f"--key-file={self.tls_key}"]
        if self.client_ca is not None:
            args += ["--client-cert-auth", f"--trusted-ca-file={self.client_ca}"]
        return args

    def healthy(self) -> bool:
        """True if the server answers /health with health "true" (TLS: accepts connections)."""
        if self.tls_cert is not None:
            return self._accepts_connections()
        conn: HTTPConnection
        if self.netns is not None:
            conn = NetnsHTTPConnection(self.netns, self.host, self.client_port, timeout=2.0)
        else:
            conn = HTTPConnection(self.host, self.client_port, timeout=2.0)
        try:
            status, body = request(conn, "GET", "/health")
        except OSError:
            return False
        if status != 200:
            return False
        try:
            return bool(json.loads(body).get("health") == "true")
        except ValueError:
            return False

    def _accepts_connections(self) -> bool:
        # The health endpoint would need the client certificate; a TLS server
        # that accepts TCP connections on its client port has finished starting.
        try:
            if self.netns is not None:
                sock = socket_in_netns(self.netns, socket.AF_INET, socket.SOCK_STREAM)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with sock:
                sock.settimeout(2.0)
                sock.connect((self.host, self.client_port))
            return True
        except OSError:
            return False

    error = EtcdError

    @property
    def label(self) -> str:
        return f"etcd {self.client_url}"

    def is_ready(self) -> bool:
        return self.healthy()
