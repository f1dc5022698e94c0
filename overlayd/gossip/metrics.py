"""Prometheus metrics of the gossip layer, registered in a registry the caller gives.

Kept apart from `overlayd.util.metrics` so the gossip package stands alone; the
daemon passes its own registry and the figures appear on its /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from overlayd.gossip.schema import MemberState


class GossipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.messages_sent = Counter(
            "overlayd_gossip_messages_sent_total",
            "Gossip datagrams sent, by message type.",
            ["type"],
            registry=r,
        )
        self.messages_received = Counter(
            "overlayd_gossip_messages_received_total",
            "Gossip datagrams accepted, by message type.",
            ["type"],
            registry=r,
        )
        self.messages_rejected = Counter(
            "overlayd_gossip_messages_rejected_total",
            "Gossip datagrams dropped, by reason (auth, unknown_key, stale, future, replay, "
            "malformed, schema, oversized, ...).",
            ["reason"],
            registry=r,
        )
        self.bytes_sent = Counter("overlayd_gossip_sent_bytes_total", "Gossip bytes sent.", registry=r)
        self.bytes_received = Counter(
            "overlayd_gossip_received_bytes_total", "Gossip bytes received (accepted or not).", registry=r
        )
        self.peers = Gauge(
            "overlayd_gossip_peers", "Known gossip peers, by SWIM state.", ["state"], registry=r
        )
        self.suspicions = Counter(
            "overlayd_gossip_suspicions_total", "Peers this node started to suspect.", registry=r
        )
        self.refutations = Counter(
            "overlayd_gossip_refutations_total", "Suspicions of this node that it refuted.", registry=r
        )
        self.anti_entropy = Counter(
            "overlayd_gossip_anti_entropy_exchanges_total",
            "Anti-entropy digests sent (initiated) and answered.",
            ["role"],
            registry=r,
        )
        self.records_repaired = Counter(
            "overlayd_gossip_records_repaired_total",
            "Records that changed this node's table through anti-entropy (missed by dissemination).",
            registry=r,
        )
        self.records_learned = Counter(
            "overlayd_gossip_records_learned_total",
            "Records that changed this node's table, by path (push, anti_entropy).",
            ["path"],
            registry=r,
        )
        for state in MemberState:
            self.peers.labels(state.value).set(0)
        # Labelled children, looked up once: `labels()` per datagram costs more than the send.
        self._sent: dict[str, Counter] = {}
        self._received: dict[str, Counter] = {}
        self._learned: dict[str, Counter] = {}

    def sent(self, kind: str, size: int, count: int = 1) -> None:
        """`count` datagrams of `size` bytes each (one message sent to several peers)."""
        child = self._sent.get(kind)
        if child is None:
            child = self._sent[kind] = self.messages_sent.labels(kind)
        child.inc(count)
        self.bytes_sent.inc(size * count)

    def received(self, kind: str) -> None:
        child = self._received.get(kind)
        if child is None:
            child = self._received[kind] = self.messages_received.labels(kind)
        child.inc()

    def learned(self, path: str) -> None:
        """A record that changed this node's table, by `path` (per record pushed: cached child)."""
        child = self._learned.get(path)
        if child is None:
            child = self._learned[path] = self.records_learned.labels(path)
        child.inc()

    def set_peers(self, counts: dict[MemberState, int]) -> None:
        for state in MemberState:
            self.peers.labels(state.value).set(counts.get(state, 0))
