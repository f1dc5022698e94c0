"""`Labelled`: a labelled metric's children looked up once, updating the same series."""

from __future__ import annotations

from overlayd.util.metrics import Metrics


def test_same_child_for_same_values_and_counts_in_the_registry() -> None:
    metrics = Metrics()
    ok = metrics.kernel_ops_by("fdb", "ok")
    assert metrics.kernel_ops_by("fdb", "ok") is ok
    assert metrics.kernel_ops_by("fdb", "error") is not ok
    ok.inc(3)
    metrics.kernel_ops_by("fdb", "error").inc()
    metrics.kernel_ops.labels(kind="fdb", result="ok").inc()  # the same series, however reached
    value = metrics.registry.get_sample_value
    assert value("overlayd_kernel_ops_total", {"kind": "fdb", "result": "ok"}) == 4
    assert value("overlayd_kernel_ops_total", {"kind": "fdb", "result": "error"}) == 1


def test_histogram_children() -> None:
    metrics = Metrics()
    metrics.reconcile_duration_of("incremental").observe(0.002)
    metrics.reconciles_by("change").inc()
    value = metrics.registry.get_sample_value
    assert value("overlayd_reconcile_duration_seconds_count", {"kind": "incremental"}) == 1
    assert value("overlayd_reconciles_total", {"trigger": "change"}) == 1
