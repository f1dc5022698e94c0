"""Prometheus metrics of one daemon, in a registry of its own.

A registry per daemon (not the process-global default) keeps tests that run
several daemons' parts in one process from colliding.

The metrics are plain numbers, turned into prometheus families only when
/metrics is scraped (one registered collector), the way the gossip counters
are. prometheus_client's own `inc`, `set` and `observe` take a lock and check
their state each time, a microsecond or more (a histogram walks its buckets
in Python): several of them on every host for every change in the cluster (a
reconcile pass, its kernel batch, the view's gauges, the convergence latency).
A scrape shows the same names, labels and samples (`_total`, `_created`,
`_bucket`, `_count`, `_sum`) as the prometheus_client metrics did.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


class CounterSeries:
    """One label set of a counter: a plain number."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()  # the `_created` sample, as prometheus_client shows it

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeSeries:
    """One label set of a gauge: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)


class HistogramSeries:
    """One label set of a histogram: a count per bucket (not cumulative) and the sum.

    The bucket is found by a bisection at C speed; prometheus_client walks the bounds
    in Python and takes a lock per bucket, sum and count. Observations are durations
    (never NaN, which prometheus_client would count in no bucket).
    """

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # sorted, +Inf last
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, i.e. the bucket `le` counts it in first.
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount

    def observe_all(self, amounts: Iterable[float]) -> None:
        """`observe` each of `amounts`, in order (a batch's, in one call)."""
        counts, bounds, total = self.counts, self._bounds, self.sum
        for amount in amounts:
            counts[bisect_left(bounds, amount)] += 1
            total += amount
        self.sum = total


S = TypeVar("S", CounterSeries, GaugeSeries, HistogramSeries)


def created_shown() -> bool:
    """Whether a scrape shows `_created` samples: prometheus_client's own switch, which
    PROMETHEUS_DISABLE_CREATED_SERIES=true or `disable_created_metrics()` turns off, read
    at scrape time as its own metrics read it (its one public form is the setter)."""
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class _Family(ABC, Generic[S]):
    """A metric's series by label values (one series, under (), when it has no labels)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        self._only: S | None = None
        if not self.labelnames:
            self._only = self._series[()] = self._new()

    @abstractmethod
    def _new(self) -> S:
        """A fresh series of this kind of metric."""

    def labels(self, *values: str, **named: str) -> S:
        """The series of these label values (by position or by name), made the first time:
        from then on it shows on /metrics, as a prometheus_client child does."""
        if named:
            if values or set(named) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels are {self.labelnames}, got {values} {named}")
            values = tuple(named[n] for n in self.labelnames)
        series = self._series.get(values)
        if series is None:
            if not self.labelnames or len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels are {self.labelnames}, got {values}")
            series = self._series[values] = self._new()
        return series

    def only(self) -> S:
        """The one series of a metric without labels."""
        if self._only is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels()")
        return self._only

    def series(self) -> list[tuple[tuple[str, ...], S]]:
        """(label values, series), a copy: a scrape may run in another thread."""
        return list(self._series.items())

    @abstractmethod
    def family(self) -> Metric:
        """The metric as prometheus_client shows it, made now (at scrape time)."""


class CounterFamily(_Family[CounterSeries]):
    def _new(self) -> CounterSeries:
        return CounterSeries()

    def inc(self, amount: float = 1.0) -> None:
        self.only().inc(amount)

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        show_created = created_shown()
        for values, s in self.series():
            family.add_metric(values, s.value, created=s.created if show_created else None)
        return family


class GaugeFamily(_Family[GaugeSeries]):
    def _new(self) -> GaugeSeries:
        return GaugeSeries()

    def set(self, value: float) -> None:
        self.only().set(value)

    def family(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, s in self.series():
            family.add_metric(values, s.value)
        return family


class HistogramFamily(_Family[HistogramSeries]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        # The `le` label values exactly as prometheus_client writes them (untyped there).
        self._le: list[str] = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames)

    def _new(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def observe(self, amount: float) -> None:
        self.only().observe(amount)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        show_created = created_shown()
        for values, s in self.series():
            cumulative = list(accumulate(s.counts))
            family.add_metric(values, list(zip(self._le, cumulative, strict=True)), s.sum)
            if show_created:
                labels = dict(zip(self.labelnames, values, strict=True))
                family.samples.append(Sample(f"{self.name}_created", labels, s.created))
        return family


class _Families(Collector):
    """Plain-number metrics, turned into prometheus families when scraped."""

    def __init__(self) -> None:
        self.families: list[_Family[Any]] = []

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()


F = TypeVar("F", CounterFamily, GaugeFamily, HistogramFamily)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._families = _Families()
        self.reconcile_duration = self._add(
            HistogramFamily(
                "overlayd_reconcile_duration_seconds",
                "Time of one reconcile pass: incremental (the dirty keys against the kernel mirror) "
                "or full (read the whole kernel and compare every key).",
                ["kind"],
                buckets=_PASS_BUCKETS,
            )
        )
        self.netlink_overruns = self._add(
            CounterFamily(
                "overlayd_netlink_overruns_total",
                "Times the kernel dropped notifications (ENOBUFS); each one forces a full re-read.",
            )
        )
        self.reconciles = self._add(
            CounterFamily("overlayd_reconciles_total", "Reconcile passes by trigger.", ["trigger"])
        )
        # The series a change updates, looked up by position (no label names to match).
        self.reconcile_duration_of = self.reconcile_duration.labels
        self.reconciles_by = self.reconciles.labels
        self.kernel_ops = self._add(
            CounterFamily(
                "overlayd_kernel_ops_total", "Kernel operations by kind and result.", ["kind", "result"]
            )
        )
        self.kernel_ops_by = self.kernel_ops.labels
        self.store_watch_events = self._add(
            CounterFamily(
                "overlayd_store_watch_events_total",
                "Events received from the KV store watch, by record kind and action.",
                ["kind", "action"],
            )
        )
        self.store_errors = self._add(
            CounterFamily(
                "overlayd_store_errors_total", "KV store operations that failed, by operation.", ["operation"]
            )
        )
        self.store_data_loss = self._add(
            CounterFamily(
                "overlayd_store_data_loss",
                "Times the KV store turned out to have lost its data "
                "(or been restored from an older backup).",
            )
        )
        self.store_up = self._add(GaugeFamily("overlayd_store_up", "1 while the KV store answers, else 0."))
        self.invalid_records = self._add(
            CounterFamily(
                "overlayd_store_invalid_records_total",
                "Values under the prefix that are not valid overlayd data (skipped).",
            )
        )
        self.endpoints_known = self._add(
            GaugeFamily(
                "overlayd_endpoints_known", "Endpoints in the cluster view, by locality.", ["locality"]
            )
        )
        self.ipam_block_waits = self._add(
            CounterFamily(
                "overlayd_ipam_block_waits_total",
                "Endpoint adds (gossip-only mode) that waited for the claim of the address block "
                "their address is in to settle: a burst of adds faster than the blocks claimed ahead.",
            )
        )
        self.networks_known = self._add(
            GaugeFamily("overlayd_networks_known", "Networks in the cluster view.")
        )
        self.convergence_latency = self._add(
            HistogramFamily(
                "overlayd_convergence_latency_seconds",
                "From an endpoint record's creation at its owner to its entries programmed here.",
                ["path"],
                buckets=_LATENCY_BUCKETS,
            )
        )
        self.registry.register(self._families)

    def _add(self, family: F) -> F:
        self._families.families.append(family)
        return family
