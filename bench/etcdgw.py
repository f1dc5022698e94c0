"""Writing straight into the lab's etcd, through its JSON gateway (/v3/...).

The join benchmark makes a host "appear" by writing its node record and all
its endpoint records at once, in overlayd's own key layout and bytes
(`overlayd.store.keys`), bound to one lease the way a daemon's are. The
gateway is plain HTTP, so a socket in the KV server's namespace is all it
takes; transactions carry up to 128 operations (etcd's default limit).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from overlayd.lab.nshttp import NetnsHTTPConnection, request

MAX_TXN_OPS = 128


class GatewayError(RuntimeError):
    """etcd answered with an error, or not at all."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdGateway:
    def __init__(self, netns: str, host: str, port: int) -> None:
        self.netns, self.host, self.port = netns, host, port

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = NetnsHTTPConnection(self.netns, self.host, self.port, timeout=30.0)
        try:
            status, raw = request(conn, "POST", path, body)
        except OSError as exc:
            raise GatewayError(f"etcd {path}: {exc}") from exc
        if status != 200:
            raise GatewayError(f"etcd {path}: HTTP {status}: {raw[:200].decode(errors='replace')}")
        data: dict[str, Any] = json.loads(raw) if raw else {}
        return data

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def revoke(self, lease: int) -> None:
        """Drop the lease: etcd deletes every key bound to it, as when a host dies."""
        self.call("/v3/lease/revoke", {"ID": lease})

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> None:
        self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": lease})

    def put_many(self, items: Sequence[tuple[bytes, bytes]], *, lease: int = 0, parallel: int = 4) -> int:
        """Write `items` in transactions of up to 128 puts, `parallel` at a time; the number of
        transactions. Concurrent requests let etcd commit several per disk sync."""
        bodies = [
            {
                "success": [
                    {"request_put": {"key": _b64(k), "value": _b64(v), "lease": lease}}
                    for k, v in items[start : start + MAX_TXN_OPS]
                ]
            }
            for start in range(0, len(items), MAX_TXN_OPS)
        ]
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="etcd-put") as pool:
            for _answer in pool.map(lambda body: self.call("/v3/kv/txn", body), bodies):
                pass
        return len(bodies)
