"""Benchmark results: figures and ratios, the JSON document's shape, the printed table."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from bench.report import BenchResult, Figure, Run, format_ratio, format_value, table, validate

FLOOR = "floor: one UDP datagram + one netlink write"


def sample_run() -> Run:
    conv = BenchResult(
        "convergence",
        seconds=12.5,
        figures=[
            Figure("convergence", "gossip, 3 hosts: add p50", 4.2, "ms", 0.5, FLOOR, "n=25"),
            Figure(
                "convergence",
                "gossip, 3 hosts: add p99",
                math.inf,
                "ms",
                1.0,
                FLOOR,
                "did not complete",
                "p99 <= 10 ms",
            ),
            Figure("convergence", "gossip, 10 hosts: add p50", 8.4, "ms", 0.5, FLOOR),
        ],
        samples={"gossip/3/add": [0.004, math.inf, None]},
        notes=["lab not steady"],
    )
    join = BenchResult(
        "join",
        figures=[
            Figure(
                "join",
                "10000 endpoints: every kernel complete",
                None,
                "s",
                0.27,
                "batch tools",
                "did not complete in 60 s (812 of 20001 entries)",
            )
        ],
    )
    missing = BenchResult("gossip_scale", status="missing", error="not built yet (bench/gossip_scale.py)")
    return Run("2025-01-01T00:00:00Z", False, 600.0, {"cpus": 2, "kernel": "6.1"}, [conv, join, missing])


def test_ratio_is_value_over_baseline_and_absent_without_both() -> None:
    assert Figure("b", "n", 3.0, "ms", 1.5, "w").ratio == pytest.approx(2.0)
    assert Figure("b", "n", None, "ms", 1.5, "w", "why").ratio is None
    assert Figure("b", "n", 3.0, "ms", None, "w").ratio is None
    assert Figure("b", "n", 3.0, "ms", 0.0, "w").ratio is None
    assert Figure("b", "n", math.inf, "ms", 1.0, "w").ratio is None


def test_rates_are_better_high_and_their_cost_is_the_inverse_ratio() -> None:
    rate = Figure("b", "adds/s", 20.0, "/s", 200.0, "w")
    assert rate.higher_is_better and rate.times_worse == pytest.approx(10.0)
    took = Figure("b", "join", 3.0, "s", 0.3, "w")
    assert not took.higher_is_better and took.times_worse == pytest.approx(10.0)
    assert not Figure("b", "cpu", 1.0, "CPU s/min", 1.0, "w").higher_is_better
    assert rate.to_json()["better"] == "higher" and took.to_json()["better"] == "lower"


def test_document_round_trips_through_json_and_validates() -> None:
    doc = sample_run().to_json()
    text = json.dumps(doc, allow_nan=False)  # infinities became null: strict JSON
    assert validate(json.loads(text)) == []
    again = Run.from_json(json.loads(text))
    assert [b.name for b in again.benches] == ["convergence", "join", "gossip_scale"]
    first = again.benches[0].figures[0]
    assert (first.value, first.baseline, first.note) == (4.2, 0.5, "n=25")
    assert again.benches[0].figures[1].value is None
    assert again.benches[0].samples["gossip/3/add"] == [0.004, None, None]
    assert doc["benchmarks"][0]["figures"][0]["ratio"] == pytest.approx(8.4)


def _broken(change: Any) -> list[str]:
    doc = sample_run().to_json()
    change(doc)
    return validate(doc)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda d: d.pop("benchmarks"), "missing 'benchmarks'"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.update(quick="no"), "quick"),
        (lambda d: d["benchmarks"][0].update(status="great"), "status"),
        (lambda d: d["benchmarks"][0]["figures"][0].update(value="4.2"), "value: not a number"),
        (lambda d: d["benchmarks"][0]["figures"][0].pop("baseline_what"), "baseline_what"),
        (lambda d: d["benchmarks"][0]["figures"][0].update(better="more"), "better"),
        (lambda d: d["benchmarks"][0]["figures"][0].update(value=None, note=""), "no value and no note"),
        (lambda d: d["benchmarks"][0]["samples"].update(x=[1, "a"]), "samples['x']"),
        (lambda d: d["benchmarks"].append(3), "not an object"),
    ],
)
def test_validate_names_what_is_wrong(change: Any, complaint: str) -> None:
    problems = _broken(change)
    assert any(complaint in p for p in problems), problems


def test_validate_rejects_a_non_object() -> None:
    assert validate([]) == ["document: list is not an object"]


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (None, "ms", "-"),
        (math.inf, "ms", "-"),
        (0.0, "s", "0 s"),
        (1234.5, "ms", "1234 ms"),
        (42.26, "ms", "42.3 ms"),
        (4.2, "Gbit/s", "4.20 Gbit/s"),
        (0.27, "s", "0.270 s"),
        (0.00123, "ms", "0.0012 ms"),
        (5.0, "", "5.00"),
    ],
)
def test_format_value(value: float | None, unit: str, text: str) -> None:
    assert format_value(value, unit) == text


@pytest.mark.parametrize(
    ("ratio", "text"), [(None, "-"), (250.0, "250x"), (12.34, "12.3x"), (1.5, "1.50x"), (0.002, "0.002x")]
)
def test_format_ratio(ratio: float | None, text: str) -> None:
    assert format_ratio(ratio) == text


def test_table_puts_every_figure_beside_its_baseline_and_lists_each_baseline_once() -> None:
    text = table(sample_run())
    lines = text.splitlines()
    assert lines[0].startswith("overlayd benchmarks: full run started 2025-01-01T00:00:00Z, 10.0 min, 2 CPUs")
    header = next(line for line in lines if line.startswith("benchmark"))
    assert header.split() == ["benchmark", "figure", "value", "baseline", "ratio", "note"]
    row = next(line for line in lines if "gossip, 3 hosts: add p50" in line)
    assert "4.20 ms" in row and "0.500 ms [1]" in row and "8.40x" in row and "n=25" in row
    # A figure that did not complete shows no number, its baseline and why.
    row = next(line for line in lines if "gossip, 3 hosts: add p99" in line)
    assert " - " in row and "1.00 ms [1]" in row and "did not complete; target p99 <= 10 ms" in row
    row = next(line for line in lines if "every kernel complete" in line)
    assert "0.270 s [2]" in row and "812 of 20001" in row
    # The missing benchmark still has its row.
    row = next(line for line in lines if line.startswith("gossip_scale"))
    assert "(missing)" in row and "not built yet" in row
    legend = lines[lines.index("baselines (measured in this run):") + 1 :]
    assert legend[0] == f"  [1] {FLOOR}"
    assert legend[1] == "  [2] batch tools"
    assert text.count(FLOOR) == 1
    assert "  convergence: lab not steady" in lines


def test_table_columns_line_up() -> None:
    lines = table(sample_run()).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("benchmark"))
    rule = lines[header + 1]
    spans = [m.span() for m in re.finditer(r"-+", rule)]
    assert len(spans) == 6
    rows = [line for line in lines[header + 2 :] if line.startswith(("convergence", "join"))]
    assert len(rows) == 4
    for row in rows:
        # value, baseline and ratio are right-aligned: each ends where its rule ends.
        for start, end in spans[2:5]:
            cell = row[start:end]
            assert cell == cell.rstrip() and cell.strip(), (row, cell)
            assert row[end : end + 2] in ("  ", "")
