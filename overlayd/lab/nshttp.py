"""HTTP to servers inside namespaces this process is not in.

The lab's etcd and each daemon's status server listen on TCP ports inside
their own namespaces; `NetnsHTTPConnection` is a plain `http.client`
connection whose socket is made in the right one.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from overlayd.lab.netns import socket_in_netns


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
