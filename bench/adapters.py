"""Benchmarks built to another contract, brought into the suite's table.

`bench/gossip_scale.py` (built on the gossip branch) runs as a script and
offers `run(quick: bool) -> dict`, printing its own report; its dict holds
each figure with its baselines (ideal push, Docker NetworkDB's strategy
simulated on the same link model, Docker's full sync). `gossip_scale()` runs
it with its printout on stderr and turns the dict into figures, so they stand
in the one table like the rest. If the dict does not have the shape read
here, the benchmark is reported as failed with what was missing.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from bench.context import Context
from bench.report import BenchResult, Figure
from bench.stats import quantile

NAME = "gossip_scale"
DOCKER_WHAT = (
    "Docker NetworkDB's strategy (events to 3 random peers every 200 ms, full sync every 30 s), "
    "simulated on the same link model"
)
IDEAL_WHAT = "ideal push: ceil(log_fanout N) hops x mean one-way latency"
SYNC_WHAT = "Docker's full-table sync every 30 s, bytes per member per second"


def takes_context(run: Callable[..., Any]) -> bool:
    """True if `run` follows the suite's contract, `run(ctx)`."""
    params = list(inspect.signature(run).parameters)
    return bool(params) and params[0] == "ctx"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isinf(seconds) else seconds * 1e3


def gossip_scale_figures(data: Mapping[str, Any]) -> BenchResult:
    """Figures from `bench.gossip_scale.run()`'s dict (pure; KeyError/TypeError if the shape differs)."""
    result = BenchResult(NAME)
    members = int(data["settings"]["members"])
    base = data["baselines"]
    for sp in data["spread"]:
        loss = float(sp["loss"])
        docker = base["docker_spread"][str(sp["loss"])]
        label = f"{members} members, {loss:.0%} loss"
        late = f"{sp['missed_by_push']} deliveries later than 1 s (anti-entropy)"
        result.add(
            Figure(
                NAME,
                f"{label}: deliveries within 100 ms",
                float(sp["within"]) * 100,
                "%",
                float(docker["within"]) * 100,
                DOCKER_WHAT,
                late,
                ">= 99.99%",
                higher=True,
            )
        )
        result.add(
            Figure(
                NAME,
                f"{label}: delivery p99.99",
                _ms(sp["delivery"]["p99.99"]),
                "ms",
                _ms(docker["delivery"]["p99.99"]),
                DOCKER_WHAT,
                "" if sp["delivery"]["p99.99"] is not None else "some deliveries never came",
                "<= 100 ms",
            )
        )
        t100 = [math.inf if t is None else float(t) for t in sp["t100"]]
        p99 = quantile(t100, 0.99) if t100 else math.inf
        result.add(
            Figure(
                NAME,
                f"{label}: until every member holds it, p99 of {len(t100)} changes",
                _ms(p99),
                "ms",
                _ms(float(base["ideal_push_s"])),
                IDEAL_WHAT,
                "" if not math.isinf(p99) else "some changes never reached every member",
            )
        )
        result.samples[f"{loss}/t100"] = [None if math.isinf(t) else t for t in t100]
    sync = float(base["docker_full_sync_bytes_per_member_per_second"])
    for t in data["traffic"]:
        rate = float(t["changes_per_second"])
        what = "at rest" if rate == 0 else f"{rate:.2g} changes/s"
        result.add(
            Figure(
                NAME,
                f"{members} members, {float(t['loss']):.0%} loss, {what}: traffic per member",
                float(t["bytes_per_member_per_second"]),
                "B/s",
                sync,
                SYNC_WHAT,
                f"{float(t['datagrams_per_member_per_second']):.2f} datagrams/s per member",
            )
        )
    return result


def gossip_scale(ctx: Context, module: ModuleType) -> BenchResult:
    """Run `bench.gossip_scale` through its own `run(quick=...)` and read its figures."""
    ctx.say(f"{NAME}: its own report follows on stderr")
    with contextlib.redirect_stdout(sys.stderr):
        data = module.run(quick=ctx.scale.quick)
    try:
        return gossip_scale_figures(data)
    except (KeyError, TypeError, ValueError) as exc:
        return BenchResult(
            NAME, status="failed", error=f"unexpected results from bench/gossip_scale.py: {exc!r}"
        )


# Benchmarks in SUITE whose module has another `run` than `run(ctx)`, by name.
ADAPTERS: dict[str, Callable[[Context, ModuleType], BenchResult]] = {NAME: gossip_scale}
