"""The kernel ops metric as `execute` tallies it: a remote change's few results, a join's many."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overlayd.dataplane.commands import ReplaceFdb, ReplaceNeigh
from overlayd.dataplane.kernel import OpResult, _count
from overlayd.dataplane.kstate import FdbEntry, NeighEntry
from overlayd.util.metrics import Metrics


@pytest.mark.parametrize("size", [2, 3, 100])
def test_results_are_counted_by_kind_and_outcome_at_any_batch_size(size: int) -> None:
    done: list[OpResult] = []
    for i in range(size):
        fdb = ReplaceFdb(FdbEntry("ovvx1", f"02:00:00:00:00:{i % 256:02x}", IPv4Address("198.18.0.2")))
        done.append(OpResult(fdb, "refused" if i % 3 == 1 else None))
        done.append(
            OpResult(ReplaceNeigh(NeighEntry("ovvx1", IPv4Address(f"10.0.0.{i % 250}"), "02:00::")), None)
        )
    metrics = Metrics()
    _count(metrics, done)
    _count(metrics, done)

    def value(kind: str, result: str) -> float | None:
        return metrics.registry.get_sample_value(
            "overlayd_kernel_ops_total", {"kind": kind, "result": result}
        )

    failed = sum(1 for i in range(size) if i % 3 == 1)
    assert value("replace_fdb", "ok") == 2 * (size - failed)
    assert value("replace_fdb", "error") == (2 * failed if failed else None)
    assert value("replace_neigh", "ok") == 2 * size
    assert value("replace_neigh", "error") is None
