"""Daemon answers shaped exactly like `Daemon.status()` and friends build them, for the client-side tests."""

from __future__ import annotations

from typing import Any

from overlayd.api import schema


def status_json(**overrides: Any) -> dict[str, Any]:
    """A ready gossip-beside-etcd daemon's /v1/status, key for key and in the daemon's order."""
    answer: dict[str, Any] = {
        "node": "h1",
        "vtep": "198.18.0.11",
        "underlay": {"interface": "ul0", "mtu": 1500},
        "ready": True,
        "started_at": 1_700_000_000.25,
        "pid": 4242,
        "summary": "ready: 1 network, 1 local / 2 remote endpoints, store healthy",
        "store": {
            "url": "etcd://198.18.0.1:2379",
            "healthy": True,
            "synced": True,
            "latency_ms": 1.234,
            "invalid_records": ["/ovl/v1/networks/x: not JSON"],
            "pending_writes": 0,
        },
        "view": {"complete": True, "complete_at": 1_700_000_001.5},
        "gossip": {"port": 7946, "members": {"alive": 2}, "insecure": False},
        "networks": ["demo"],
        "nodes": 3,
        "endpoints": {"local": 1, "remote": 2},
        "last_reconcile": {
            "trigger": "change",
            "kind": "incremental",
            "started_at": 1_700_000_010.5,
            "duration_ms": 0.812,
            "applied": 3,
            "failed": 0,
            "held_deletions": 0,
        },
        "last_full_reconcile": {
            "trigger": "startup",
            "kind": "full",
            "started_at": 1_700_000_001.5,
            "duration_ms": 12.5,
            "applied": 0,
            "failed": 0,
            "held_deletions": 0,
        },
        "errors": [],
    }
    answer.update(overrides)
    return answer


def status(**overrides: Any) -> schema.Status:
    return schema.Status.from_json(status_json(**overrides))


def store_json(**overrides: Any) -> dict[str, Any]:
    store = dict(status_json()["store"])
    store.update(overrides)
    return store


def peer(name: str, *, me: bool = False, started_at: float | None = 1000.0, **extra: Any) -> schema.Peer:
    """A peer as /v1/peers lists it without gossip (`extra`: state, rtt_ms, clock_offset)."""
    answer: dict[str, Any] = {
        "name": name,
        "vtep": "198.18.0.11",
        "started_at": started_at,
        "endpoints": 0,
        "self": me,
        **extra,
    }
    return schema.Peer.from_json(answer)


def network(name: str, mtu: int | None = None, endpoints: int = 0) -> schema.NetworkListItem:
    answer = {"name": name, "vni": 42, "subnet": "10.1.0.0/24", "gateway": None, "mtu": mtu,
              "mode": "vxlan", "egress": "none"}
    return schema.NetworkListItem.from_json({**answer, "endpoints": endpoints})


def probe(ok: bool = True, latency_ms: float | None = 2.5, error: str | None = None) -> schema.StoreProbe:
    return schema.StoreProbe(url="etcd://198.18.0.1:2379", ok=ok, latency_ms=latency_ms, error=error)
