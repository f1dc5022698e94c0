"""The daemon's metrics are plain numbers read at scrape time; /metrics must show exactly
what the prometheus_client metrics they replaced showed: the same families, names, help,
types, labels and samples, in the same order (the `_created` times aside: when a series
was made).

The reference below is the prometheus_client definition the daemon had, spelled out
here, not derived from `Metrics`: a renamed metric, a changed label or bucket fails."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics

from overlayd.util.metrics import Metrics

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PASS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class _Reference:
    """The metrics as prometheus_client objects, as `Metrics` defined them before."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.reconcile_duration = Histogram(
            "overlayd_reconcile_duration_seconds",
            "Time of one reconcile pass: incremental (the dirty keys against the kernel mirror) "
            "or full (read the whole kernel and compare every key).",
            ["kind"],
            buckets=_PASS,
            registry=r,
        )
        self.netlink_overruns = Counter(
            "overlayd_netlink_overruns_total",
            "Times the kernel dropped notifications (ENOBUFS); each one forces a full re-read.",
            registry=r,
        )
        self.reconciles = Counter(
            "overlayd_reconciles_total", "Reconcile passes by trigger.", ["trigger"], registry=r
        )
        self.kernel_ops = Counter(
            "overlayd_kernel_ops_total",
            "Kernel operations by kind and result.",
            ["kind", "result"],
            registry=r,
        )
        self.store_watch_events = Counter(
            "overlayd_store_watch_events_total",
            "Events received from the KV store watch, by record kind and action.",
            ["kind", "action"],
            registry=r,
        )
        self.store_errors = Counter(
            "overlayd_store_errors_total",
            "KV store operations that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.store_data_loss = Counter(
            "overlayd_store_data_loss",
            "Times the KV store turned out to have lost its data (or been restored from an older backup).",
            registry=r,
        )
        self.store_up = Gauge("overlayd_store_up", "1 while the KV store answers, else 0.", registry=r)
        self.invalid_records = Counter(
            "overlayd_store_invalid_records_total",
            "Values under the prefix that are not valid overlayd data (skipped).",
            registry=r,
        )
        self.endpoints_known = Gauge(
            "overlayd_endpoints_known",
            "Endpoints in the cluster view, by locality.",
            ["locality"],
            registry=r,
        )
        self.ipam_block_waits = Counter(
            "overlayd_ipam_block_waits_total",
            "Endpoint adds (gossip-only mode) that waited for the claim of the address block "
            "their address is in to settle: a burst of adds faster than the blocks claimed ahead.",
            registry=r,
        )
        self.networks_known = Gauge("overlayd_networks_known", "Networks in the cluster view.", registry=r)
        self.convergence_latency = Histogram(
            "overlayd_convergence_latency_seconds",
            "From an endpoint record's creation at its owner to its entries programmed here.",
            ["path"],
            buckets=_LATENCY,
            registry=r,
        )


def _updates(m: Metrics | _Reference) -> None:
    """What a daemon's life does to its metrics, through the calls its code makes."""
    for duration in (0.00005, 0.0001, 0.0003, 0.002, 0.0021, 0.5, 10.0, 11.0):
        m.reconcile_duration.labels("incremental").observe(duration)
    m.reconcile_duration.labels(kind="full").observe(0.124)
    for trigger in ("startup", "change", "change", "periodic", "overrun"):
        m.reconciles.labels(trigger).inc()
    m.netlink_overruns.inc()
    m.kernel_ops.labels("fdb", "ok").inc(2)
    m.kernel_ops.labels(kind="neigh", result="ok").inc(3)
    m.kernel_ops.labels("neigh", "error").inc()
    m.store_watch_events.labels(kind="endpoint", action="put").inc(7)
    m.store_watch_events.labels(kind="endpoint", action="delete").inc()
    m.store_errors.labels(operation="put").inc()
    m.store_data_loss.inc()
    m.store_up.set(1)
    m.store_up.set(0)
    m.invalid_records.inc()
    m.endpoints_known.labels(locality="local").set(3)
    m.endpoints_known.labels(locality="remote").set(27)
    m.ipam_block_waits.inc(4)
    m.networks_known.set(2)
    for latency in (0.0009, 0.001, 0.0049, 0.031, 29.0, 45.0):
        m.convergence_latency.labels(path="gossip").observe(latency)
    m.convergence_latency.labels(path="watch").observe(0.004)


_CREATED = re.compile(r"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def _scrape(registry: CollectorRegistry) -> str:
    """/metrics as the daemon serves it, the `_created` times replaced by a mark."""
    return _CREATED.sub(r"\1 <time>", generate_latest(registry).decode())


@pytest.mark.parametrize(
    "update",
    [lambda m: None, _updates],
    ids=["fresh", "after-updates"],
)
def test_scrape_is_what_prometheus_client_showed(update: Callable[[Metrics | _Reference], None]) -> None:
    ours, reference = Metrics(), _Reference()
    update(ours)
    update(reference)
    assert _scrape(ours.registry) == _scrape(reference.registry)


def test_without_created_series_the_scrape_is_what_prometheus_client_showed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PROMETHEUS_DISABLE_CREATED_SERIES=true, read by prometheus_client at import, sets this
    # switch; operators use it to keep `_created` series out of their Prometheus.
    monkeypatch.setattr(prometheus_metrics, "_use_created", False)
    ours, reference = Metrics(), _Reference()
    _updates(ours)
    _updates(reference)
    text = generate_latest(ours.registry).decode()
    assert "_created" not in text
    assert text == generate_latest(reference.registry).decode()


def test_the_series_a_pass_updates_are_the_labelled_ones() -> None:
    metrics = Metrics()
    metrics.reconcile_duration_of("incremental").observe(0.002)
    metrics.reconciles_by("change").inc()
    metrics.kernel_ops_by("fdb", "ok").inc(2)
    value = metrics.registry.get_sample_value
    assert value("overlayd_reconcile_duration_seconds_bucket", {"kind": "incremental", "le": "0.001"}) == 0
    assert value("overlayd_reconcile_duration_seconds_bucket", {"kind": "incremental", "le": "0.005"}) == 1
    assert value("overlayd_reconcile_duration_seconds_count", {"kind": "incremental"}) == 1
    assert value("overlayd_reconcile_duration_seconds_sum", {"kind": "incremental"}) == 0.002
    assert value("overlayd_reconciles_total", {"trigger": "change"}) == 1
    assert value("overlayd_kernel_ops_total", {"kind": "fdb", "result": "ok"}) == 2
    assert metrics.kernel_ops_by("fdb", "ok") is metrics.kernel_ops.labels(kind="fdb", result="ok")


def test_a_bound_is_counted_in_its_own_bucket() -> None:
    # prometheus buckets are `le`: an observation equal to a bound belongs to that bucket.
    metrics = Metrics()
    metrics.convergence_latency.labels("gossip").observe(0.005)
    value = metrics.registry.get_sample_value
    assert value("overlayd_convergence_latency_seconds_bucket", {"path": "gossip", "le": "0.0025"}) == 0
    assert value("overlayd_convergence_latency_seconds_bucket", {"path": "gossip", "le": "0.005"}) == 1


def test_observing_a_batch_at_once_counts_as_observing_each() -> None:
    amounts = [0.0, 0.005, 0.0031, 7.5, 1e9, 0.005, 0.2]
    one, batch = Metrics(), Metrics()
    for amount in amounts:
        one.convergence_latency.labels("kv").observe(amount)
    batch.convergence_latency.labels("kv").observe_all(amounts[:3])
    batch.convergence_latency.labels("kv").observe_all(iter(amounts[3:]))
    batch.convergence_latency.labels("kv").observe_all([])

    def latency(metrics: Metrics) -> list[bytes]:  # every line but the series' creation time
        return [line for line in generate_latest(metrics.registry).splitlines() if b"_created" not in line]

    assert latency(batch) == latency(one)
    assert batch.registry.get_sample_value("overlayd_convergence_latency_seconds_count", {"path": "kv"}) == 7


def test_misuse_fails_as_prometheus_client_does() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError):
        metrics.kernel_ops.labels("fdb")  # one label value of two
    with pytest.raises(ValueError):
        metrics.kernel_ops.labels(kind="fdb", outcome="ok")  # a label it does not have
    with pytest.raises(ValueError):
        metrics.reconciles.inc()  # a labelled metric has no series of its own
    with pytest.raises(ValueError):
        metrics.store_data_loss.labels("x")  # an unlabelled one has no labels
    with pytest.raises(ValueError):
        metrics.netlink_overruns.inc(-1)
