"""The benchmark suite's pure parts: quantiles, summaries, /proc and /metrics parsing."""

from __future__ import annotations

import math

import pytest

from bench import procstat, promtext
from bench.stats import Summary, paired_sums, quantile, rate


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 0.5, 5.0),
        ([5.0], 0.99, 5.0),
        ([1.0, 2.0], 0.5, 1.5),
        ([3.0, 1.0, 2.0], 0.5, 2.0),  # order does not matter
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0.0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 1.0, 4.0),
        # numpy's default ("linear"): rank q * (n - 1) = 0.99 * 9 = 8.91
        ([float(v) for v in range(1, 11)], 0.99, 9.91),
        ([float(v) for v in range(1, 101)], 0.99, 99.01),
    ],
)
def test_quantile_interpolates_between_closest_ranks(values: list[float], q: float, expected: float) -> None:
    assert quantile(values, q) == pytest.approx(expected)


def test_quantile_of_a_sample_that_never_completed_is_infinite_not_a_number() -> None:
    values = [1.0, 2.0, 3.0, math.inf]
    assert quantile(values, 0.5) == pytest.approx(2.5)
    assert quantile(values, 0.99) == math.inf
    assert quantile([math.inf, math.inf], 0.5) == math.inf
    # Exactly on a finite rank, an infinite neighbour does not leak in.
    assert quantile([1.0, 2.0, math.inf], 0.5) == 2.0


@pytest.mark.parametrize("q", [-0.1, 1.5])
def test_quantile_rejects_q_outside_unit_interval(q: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        quantile([1.0], q)


def test_quantile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        quantile([], 0.5)


def test_summary_counts_incomplete_samples_and_scales() -> None:
    s = Summary.of([0.001, 0.002, 0.003, math.inf])
    assert (s.n, s.incomplete) == (4, 1)
    assert s.p50 == pytest.approx(0.0025)
    assert s.max == math.inf
    ms = Summary.of([0.001, 0.003]).scaled(1000)
    assert ms.p50 == pytest.approx(2.0)
    assert ms.max == pytest.approx(3.0)
    with pytest.raises(ValueError):
        Summary.of([])


def test_paired_sums_and_rate() -> None:
    assert paired_sums([1.0, 2.0, 3.0], [0.5, 0.5]) == [1.5, 2.5]
    assert rate(10, 2.0) == 5.0
    assert rate(10, 0.0) is None


def test_cpu_ticks_from_proc_stat_with_spaces_in_the_name() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    stat = "1234 (over lay d) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 70 0 0 20 0 3 0 12345 0 0"
    assert procstat.parse_cpu_ticks(stat) == 320


def test_rss_from_proc_status() -> None:
    status = "Name:\toverlayd\nVmPeak:\t  200000 kB\nVmRSS:\t   96256 kB\nThreads:\t3\n"
    assert procstat.parse_rss_kib(status) == 96256
    assert procstat.parse_rss_kib("Name:\tkworker\n") is None


METRICS = """\
# HELP overlayd_reconcile_duration_seconds Time of one reconcile pass.
# TYPE overlayd_reconcile_duration_seconds histogram
overlayd_reconcile_duration_seconds_bucket{kind="incremental",le="0.005"} 9.0
overlayd_reconcile_duration_seconds_sum{kind="incremental"} 0.012
overlayd_reconcile_duration_seconds_count{kind="incremental"} 10.0
overlayd_reconcile_duration_seconds_sum{kind="full"} 0.4
overlayd_reconcile_duration_seconds_count{kind="full"} 5.0
overlayd_reconciles_total{trigger="event"} 3.0
"""


def test_reconcile_passes_by_kind() -> None:
    inc = promtext.reconcile_passes(METRICS, "incremental")
    assert inc == promtext.Passes(0.012, 10.0)
    assert inc.mean == pytest.approx(0.0012)
    full = promtext.reconcile_passes(METRICS, "full")
    assert full is not None and full.mean == pytest.approx(0.08)
    assert promtext.reconcile_passes(METRICS, "other") is None
    assert promtext.unlabelled_passes(METRICS) is None


def test_unlabelled_histogram_is_not_taken_for_a_kind() -> None:
    today = "overlayd_reconcile_duration_seconds_sum 1.5\noverlayd_reconcile_duration_seconds_count 3.0\n"
    assert promtext.reconcile_passes(today, "incremental") is None
    passes = promtext.unlabelled_passes(today)
    assert passes is not None
    assert passes.minus(promtext.Passes(0.5, 1.0)) == promtext.Passes(1.0, 2.0)
    assert promtext.Passes(0.0, 0.0).mean is None
