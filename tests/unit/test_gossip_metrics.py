"""The gossip counters bumped per datagram are plain numbers read at scrape time; a scrape
must show them as the prometheus Counters they were: names, labels, _total and _created."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.parser import text_string_to_metric_families

from overlayd.gossip import GossipMetrics


def _families(registry: CollectorRegistry) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        samples = out.setdefault(f"{family.name}:{family.type}", {})
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_show_as_prometheus_counters() -> None:
    registry = CollectorRegistry()
    m = GossipMetrics(registry)
    m.sent("push", 120, 3)
    m.sent("push-ack", 40)
    m.received("push")
    m.received("push")
    m.received_bytes(200)
    m.learned("push")
    value = registry.get_sample_value
    assert value("overlayd_gossip_messages_sent_total", {"type": "push"}) == 3
    assert value("overlayd_gossip_messages_sent_total", {"type": "push-ack"}) == 1
    assert value("overlayd_gossip_sent_bytes_total") == 3 * 120 + 40
    assert value("overlayd_gossip_messages_received_total", {"type": "push"}) == 2
    assert value("overlayd_gossip_received_bytes_total") == 200
    assert value("overlayd_gossip_records_learned_total", {"path": "push"}) == 1
    assert value("overlayd_gossip_records_learned_total", {"path": "anti_entropy"}) is None
    families = _families(registry)
    for name in (
        "overlayd_gossip_messages_sent",
        "overlayd_gossip_messages_received",
        "overlayd_gossip_sent_bytes",
        "overlayd_gossip_received_bytes",
        "overlayd_gossip_records_learned",
    ):
        assert f"{name}:counter" in families, name
        # The text format shows a Counter's creation times as a gauge family of their own.
        assert families.get(f"{name}_created:gauge"), f"{name} has no _created samples"


def test_unlabelled_counters_show_zero_before_the_first_datagram() -> None:
    registry = CollectorRegistry()
    GossipMetrics(registry)
    assert registry.get_sample_value("overlayd_gossip_sent_bytes_total") == 0
    assert registry.get_sample_value("overlayd_gossip_received_bytes_total") == 0
    assert registry.get_sample_value("overlayd_gossip_messages_sent_total", {"type": "ping"}) is None


def test_no_created_samples_when_prometheus_client_is_told_to_show_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What PROMETHEUS_DISABLE_CREATED_SERIES=true sets; the other gossip metrics obey it too.
    monkeypatch.setattr(prometheus_metrics, "_use_created", False)
    registry = CollectorRegistry()
    m = GossipMetrics(registry)
    m.sent("push", 120)
    m.received("push")
    m.learned("push")
    text = generate_latest(registry).decode()
    assert "_created" not in text
    assert registry.get_sample_value("overlayd_gossip_messages_sent_total", {"type": "push"}) == 1
