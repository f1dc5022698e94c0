"""HTTP from the lab to its servers: daemon admin sockets and ports inside namespaces.

The daemons' admin API listens on a unix socket, their status server and
the lab's etcd on TCP ports inside namespaces this process is not in. Both
are plain `http.client` connections whose `connect` makes the right socket;
replies are JSON.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from overlayd.lab.netns import socket_in_netns


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the unix socket at `path`."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class NetnsHTTPConnection(http.client.HTTPConnection):
    """HTTP to host:port as seen from inside namespace `netns`."""

    def __init__(self, netns: str, host: str, port: int, *, timeout: float = 10.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        sock = socket_in_netns(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
) -> tuple[int, bytes]:
    """One request on `conn` (closed afterwards): (status, body bytes). Raises OSError."""
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class AdminError(Exception):
    """The admin API answered with an error status; `message` is its {"error": ...}."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


class AdminClient:
    """A blocking client of one daemon's admin API on its unix socket.

    `get`/`post`/`delete` return the decoded JSON reply and raise
    `AdminError` for an HTTP error status, OSError when nobody listens.
    """

    def __init__(self, socket_path: str, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        conn = UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        status, raw = request(conn, method, path, body)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise AdminError(method, path, status, str(message or raw.decode(errors="replace")))
        if data is None and raw:
            raise AdminError(method, path, status, f"reply is not JSON: {raw[:200]!r}")
        return data

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.get("/v1/status")
        return data

    def create_network(
        self,
        name: str,
        subnet: str,
        *,
        vni: int | None = None,
        gateway: str | None = None,
        mtu: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "subnet": subnet}
        for key, value in (("vni", vni), ("gateway", gateway), ("mtu", mtu)):
            if value is not None:
                body[key] = value
        data: dict[str, Any] = self.post("/v1/networks", body)
        return data

    def create_endpoint(
        self,
        network: str,
        name: str,
        netns: str,
        *,
        ip: str | None = None,
        ifname: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"network": network, "name": name, "netns": netns}
        if ip is not None:
            body["ip"] = ip
        if ifname is not None:
            body["ifname"] = ifname
        data: dict[str, Any] = self.post("/v1/endpoints", body)
        return data
