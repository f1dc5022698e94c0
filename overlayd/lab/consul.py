"""A real single-server Consul agent for tests and the lab.

Runs Consul 1.8.7 from Debian 11 (fetched by `scripts/fetch-consul.sh`, since
Debian 12 has no consul package), bound to one address, on free (or given)
ports, optionally inside a network namespace. DNS, serf WAN and gRPC are off
unless a port is given (-1 disables a listener). Stopping goes by PID:
SIGTERM, a bounded wait, then SIGKILL. `cleanup()` stops the agent and
removes its directory.

Two modes:

- `dev=True` (default): `consul agent -dev`, in memory, ready in ~0.1 s.
  `restart()` comes back on the same ports with NO data and no sessions —
  what a backend must survive as "the server lost its state".
- `dev=False`: `-server -bootstrap-expect=1` with a data directory, ready in
  ~1.7 s (its own election); `restart()` keeps keys, sessions and the index,
  like a production server.

With `acl_master_token` the agent enforces ACLs (default deny) and that token
is the only one allowed in, so tests can check what a wrong token does. With
`tls_cert`/`tls_key` it also serves HTTPS on a port of its own, and `url` is
then `consuls://host:https_port` (plain HTTP stays on for the readiness check).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from http.client import HTTPConnection
from pathlib import Path

from overlayd.lab.netns import exec_argv, free_port
from overlayd.lab.nshttp import NetnsHTTPConnection
from overlayd.lab.proc import Proc
from overlayd.lab.server import ServerProcess

# Where scripts/fetch-consul.sh unpacks the package; OVERLAYD_CONSUL_BIN overrides.
CONSUL_CACHE = Path("/var/cache/overlayd-test/consul")
CONSUL_CANDIDATES = (str(CONSUL_CACHE / "usr/bin/consul"), "/usr/bin/consul")


class ConsulError(RuntimeError):
    """Consul could not be started or stopped; the message has the tail of its log."""


def find_consul() -> str:
    override = os.environ.get("OVERLAYD_CONSUL_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise ConsulError(f"OVERLAYD_CONSUL_BIN={override} is not an executable file")
        return override
    for path in CONSUL_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("consul")
    if found is None:
        raise ConsulError("consul not found: run scripts/fetch-consul.sh (or set OVERLAYD_CONSUL_BIN)")
    return found


class ConsulServer(ServerProcess):
    """One dev-mode Consul agent; `url` is what overlayd's config takes (consul://host:port)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        dns_port: int = -1,
        serf_lan_port: int | None = None,
        server_port: int | None = None,
        grpc_port: int = -1,
        netns: str | None = None,
        workdir: Path | None = None,
        node: str = "overlayd-kv",
        dev: bool = True,
        acl_master_token: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        extra_args: Sequence[str] = (),
        on_start: Callable[[ConsulServer], None] | None = None,
    ) -> None:
        """`workdir` holds `data/`, `consul.log` and the config (a new temporary directory when None).

        Ports left as None are picked free at each start until the first
        successful one, then kept, so a restart comes back on the same URL.
        `on_start` is called after every successful start (the lab records the PID).
        """
        self.host = host
        self.netns = netns
        self.node = node
        self.dev = dev
        self.acl_master_token = acl_master_token
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.https_port = -1
        self.extra_args = list(extra_args)
        self.on_start = on_start
        self.dns_port = dns_port
        self.grpc_port = grpc_port
        self._given_ports = (http_port, serf_lan_port, server_port)
        self._pick_ports = None in self._given_ports
        self.http_port = http_port or 0
        self.serf_lan_port = serf_lan_port or 0
        self.server_port = server_port or 0
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="consul-"))
        self.proc: Proc | None = None

    # --- addresses ---

    @property
    def url(self) -> str:
        if self.tls_cert is not None:
            return f"consuls://{self.host}:{self.https_port}"
        return f"consul://{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "consul.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "consul.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # --- life cycle ---

    def argv(self) -> list[str]:
        argv = [
            find_consul(),
            "agent",
            *(["-dev"] if self.dev else ["-server", "-bootstrap-expect=1", "-ui=false"]),
            f"-node={self.node}",
            # Random node IDs: several agents on one machine must not collide.
            "-disable-host-node-id",
            f"-bind={self.host}",
            f"-client={self.host}",
            f"-data-dir={self.data_dir}",
            f"-config-file={self.config_path}",
            f"-http-port={self.http_port}",
            f"-dns-port={self.dns_port}",
            f"-serf-lan-port={self.serf_lan_port}",
            "-serf-wan-port=-1",
            f"-server-port={self.server_port}",
            f"-grpc-port={self.grpc_port}",
            f"-https-port={self.https_port}",
            "-log-level=info",
            *self.extra_args,
        ]
        return exec_argv(self.netns, argv) if self.netns is not None else argv

    def _config(self) -> dict[str, object]:
        config: dict[str, object] = {"disable_update_check": True}
        if not self.dev:
            # Raft timing as in dev mode: one server, so this only shortens its election.
            config["performance"] = {"raft_multiplier": 1}
        if self.tls_cert is not None and self.tls_key is not None:
            config.update(cert_file=str(self.tls_cert), key_file=str(self.tls_key))
        if self.acl_master_token is not None:
            config["acl"] = {
                "enabled": True,
                "default_policy": "deny",
                "tokens": {"master": self.acl_master_token, "agent": self.acl_master_token},
            }
        return config

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start the agent and wait until it has a leader and knows its node; ConsulError if not."""
        if self.running():
            raise ConsulError(f"consul {self.url} is already running (pid {self.pid})")
        attempts = 3 if self._pick_ports else 1
        for attempt in range(attempts):
            if self._pick_ports:
                http, serf, server = self._given_ports
                self.http_port = http or free_port(self.host, netns=self.netns)
                self.serf_lan_port = serf or free_port(self.host, netns=self.netns)
                self.server_port = server or free_port(self.host, netns=self.netns)
            if self.tls_cert is not None and (self._pick_ports or self.https_port < 0):
                self.https_port = free_port(self.host, netns=self.netns)
            try:
                self._start_once(timeout)
            except ConsulError as exc:
                # A free port can be taken between picking and binding it: pick again.
                if attempt + 1 < attempts and "address already in use" in str(exc):
                    continue
                raise
            break
        self._pick_ports = False
        if self.on_start is not None:
            self.on_start(self)

    def _start_once(self, timeout: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The config may hold the ACL master token: readable by us only.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self._config(), out)
        self.proc = Proc.spawn(
            self.argv(),
            log_path=self.log_path,
            env=env,
            banner=f"starting consul {self.http_url} at {time.strftime('%H:%M:%S')}",
        )
        try:
            self.wait_ready(timeout)
        except ConsulError:
            self.proc.stop(timeout=5.0)
            raise

    def _get(self, path: str) -> tuple[int, bytes]:
        conn: HTTPConnection
        if self.netns is not None:
            conn = NetnsHTTPConnection(self.netns, self.host, self.http_port, timeout=2.0)
        else:
            conn = HTTPConnection(self.host, self.http_port, timeout=2.0)
        headers = {"X-Consul-Token": self.acl_master_token} if self.acl_master_token else {}
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def healthy(self) -> bool:
        """True once the agent has a leader and its own node is in the catalog.

        A leader alone is not enough: creating a session needs the node
        registered, which happens a moment after the election.
        """
        try:
            status, body = self._get("/v1/status/leader")
            if status != 200 or not json.loads(body):
                return False
            status, body = self._get(f"/v1/catalog/node/{self.node}")
            return status == 200 and json.loads(body) is not None
        except (OSError, ValueError):
            return False

    error = ConsulError

    @property
    def label(self) -> str:
        return f"consul {self.http_url}"

    def is_ready(self) -> bool:
        return self.healthy()
