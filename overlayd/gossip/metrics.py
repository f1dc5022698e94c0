"""Prometheus metrics of the gossip layer, registered in a registry the caller gives.

Kept apart from `overlayd.util.metrics` so the gossip package stands alone; the
daemon passes its own registry and the figures appear on its /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from overlayd.gossip.schema import MemberState


class _Tally:
    """One counter as plain numbers, by label value ("" when unlabelled), with the time each
    label value was first counted (the `_created` sample a prometheus Counter shows)."""

    __slots__ = ("counts", "created", "doc", "label", "name")

    def __init__(self, name: str, doc: str, label: str | None) -> None:
        self.name = name
        self.doc = doc
        self.label = label
        self.counts: dict[str, float] = {}
        self.created: dict[str, float] = {}
        if label is None:
            self.add("", 0)

    def add(self, value: str, amount: float) -> None:
        counts = self.counts
        if value in counts:
            counts[value] += amount
        else:
            counts[value] = amount
            self.created[value] = time.time()

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label] if self.label else None)
        # prometheus_client's switch for `_created` samples (PROMETHEUS_DISABLE_CREATED_SERIES),
        # read at scrape time as its own counters read it.
        created = self.created if getattr(_prometheus_metrics, "_use_created", True) else {}
        for value, count in dict(self.counts).items():  # a copy: a scrape from another thread
            family.add_metric([value] if self.label else [], count, created=created.get(value))
        return family


class _Tallies(Collector):
    """The counters bumped once or more per datagram, as `_Tally`s read at scrape time.

    A prometheus `Counter.inc` takes a lock and checks its state, about a microsecond
    each: several per datagram, on every member, for every change. What a scrape shows
    is the same: the same names, labels, `_total` and `_created` samples."""

    def __init__(self) -> None:
        self.sent = _Tally("overlayd_gossip_messages_sent", "Gossip datagrams sent, by message type.", "type")
        self.received = _Tally(
            "overlayd_gossip_messages_received", "Gossip datagrams accepted, by message type.", "type"
        )
        self.bytes_sent = _Tally("overlayd_gossip_sent_bytes", "Gossip bytes sent.", None)
        self.bytes_received = _Tally(
            "overlayd_gossip_received_bytes", "Gossip bytes received (accepted or not).", None
        )
        self.learned = _Tally(
            "overlayd_gossip_records_learned",
            "Records that changed this node's table, by path (push, anti_entropy).",
            "path",
        )

    def collect(self) -> Iterator[CounterMetricFamily]:
        for tally in (self.sent, self.received, self.bytes_sent, self.bytes_received, self.learned):
            yield tally.family()


class GossipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self._tallies = _Tallies()
        r.register(self._tallies)
        self.messages_rejected = Counter(
            "overlayd_gossip_messages_rejected_total",
            "Gossip datagrams dropped, by reason (auth, unknown_key, stale, future, replay, "
            "malformed, schema, oversized, ...).",
            ["reason"],
            registry=r,
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
        for state in MemberState:
            self.peers.labels(state.value).set(0)
        tallies = self._tallies
        self._sent = tallies.sent.add
        self._sent_bytes = tallies.bytes_sent.add
        self._received = tallies.received.add
        self._received_bytes = tallies.bytes_received.add
        self._learned = tallies.learned.add

    def sent(self, kind: str, size: int, count: int = 1) -> None:
        """`count` datagrams of `size` bytes each (one message sent to several peers)."""
        self._sent(kind, count)
        self._sent_bytes("", size * count)

    def received(self, kind: str) -> None:
        self._received(kind, 1)

    def received_bytes(self, size: int) -> None:
        """A datagram of `size` bytes arrived (counted before any check)."""
        self._received_bytes("", size)

    def learned(self, path: str) -> None:
        """A record that changed this node's table, by `path`."""
        self._learned(path, 1)

    def set_peers(self, counts: dict[MemberState, int]) -> None:
        for state in MemberState:
            self.peers.labels(state.value).set(counts.get(state, 0))
