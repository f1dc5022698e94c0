"""Prometheus metrics of one daemon, in a registry of its own.

A registry per daemon (not the process-global default) keeps tests that run
several daemons' parts in one process from colliding.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

# Convergence is expected in milliseconds; the tail matters up to a lease TTL.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


# A pass with nothing to do takes microseconds; a full one at 10,000 endpoints ~0.1 s.
_PASS_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Labelled(Generic[M]):
    """The children of a labelled metric, each looked up once.

    `labels()` costs microseconds (it validates the values and takes a lock), and the
    paths every change takes (a reconcile pass, a kernel batch) update the same few
    children each time: a dict lookup instead is most of that saved.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reconcile_duration = Histogram(
            "overlayd_reconcile_duration_seconds",
            "Time of one reconcile pass: incremental (the dirty keys against the kernel mirror) "
            "or full (read the whole kernel and compare every key).",
            ["kind"],
            buckets=_PASS_BUCKETS,
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
        self.reconcile_duration_of = Labelled(self.reconcile_duration)
        self.reconciles_by = Labelled(self.reconciles)
        self.kernel_ops = Counter(
            "overlayd_kernel_ops_total",
            "Kernel operations by kind and result.",
            ["kind", "result"],
            registry=r,
        )
        self.kernel_ops_by = Labelled(self.kernel_ops)
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
        self.networks_known = Gauge("overlayd_networks_known", "Networks in the cluster view.", registry=r)
        self.convergence_latency = Histogram(
            "overlayd_convergence_latency_seconds",
            "From an endpoint record's creation at its owner to its entries programmed here.",
            ["path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
