"""bench/gossip_scale.py, built to another contract (`run(quick) -> dict`), in the suite's table."""

from __future__ import annotations

from typing import Any

import pytest

from bench.adapters import gossip_scale_figures, takes_context
from bench.context import Context
from bench.report import BenchResult, Run, validate


def results() -> dict[str, Any]:
    """The shape `bench.gossip_scale.run()` returns (infinities already None)."""
    spread = {
        "loss": 0.01,
        "trials": 3,
        "receivers": 999,
        "t100": [0.0011, 0.0013, None],
        "delivery": {"p50": 0.0006, "p99": 0.0009, "p99.99": 0.0012, "max": 0.5},
        "within": 0.99995,
        "missed_by_push": 2,
        "datagrams_per_change": 3000.0,
        "bytes_per_member_per_change": 700.0,
    }
    docker = {"t100": {"p50": 0.6, "p99": 0.9, "max": 1.0}, "delivery": {"p99.99": 0.8}, "within": 0.02}
    return {
        "settings": {"members": 1000},
        "spread": [spread],
        "traffic": [
            {
                "loss": 0.0,
                "changes_per_second": 0.0,
                "bytes_per_member_per_second": 250.0,
                "datagrams_per_member_per_second": 2.4,
            },
            {
                "loss": 0.0,
                "changes_per_second": 4.94,
                "bytes_per_member_per_second": 10000.0,
                "datagrams_per_member_per_second": 50.0,
            },
        ],
        "baselines": {
            "ideal_push_s": 0.001,
            "docker_spread": {"0.01": docker},
            "docker_full_sync_bytes_per_member_per_second": 3000.0,
        },
    }


def test_gossip_scale_results_become_figures_beside_their_baselines() -> None:
    r = gossip_scale_figures(results())
    by_name = {f.name: f for f in r.figures}
    within = by_name["1000 members, 1% loss: deliveries within 100 ms"]
    assert within.value == pytest.approx(99.995) and within.baseline == pytest.approx(2.0)
    assert within.higher_is_better and within.target == ">= 99.99%"
    p9999 = by_name["1000 members, 1% loss: delivery p99.99"]
    assert p9999.value == pytest.approx(1.2) and p9999.baseline == pytest.approx(800.0) and p9999.unit == "ms"
    # A change that never reached everyone makes the p99 "did not complete", with a reason.
    t100 = by_name["1000 members, 1% loss: until every member holds it, p99 of 3 changes"]
    assert t100.value is None and "never reached" in t100.note and t100.baseline == pytest.approx(1.0)
    rest = by_name["1000 members, 0% loss, at rest: traffic per member"]
    assert rest.unit == "B/s" and not rest.higher_is_better and rest.ratio == pytest.approx(250 / 3000)
    assert "1000 members, 0% loss, 4.9 changes/s: traffic per member" in by_name
    assert validate(Run("t", False, 1.0, {}, [r]).to_json()) == []


def test_a_different_shape_is_an_error_not_a_wrong_figure() -> None:
    broken = results()
    del broken["baselines"]["docker_spread"]
    with pytest.raises(KeyError):
        gossip_scale_figures(broken)


def test_the_suite_contract_is_run_ctx() -> None:
    def suite(ctx: Context) -> BenchResult:
        return BenchResult("x")

    def script(quick: bool = False) -> dict[str, Any]:
        return {}

    assert takes_context(suite)
    assert not takes_context(script)
