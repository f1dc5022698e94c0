"""The plot of a run (matplotlib, `pip install -e '.[bench]'`): `draw(run, path)`.

Three panels: convergence p50 and p99 against the number of hosts per store,
with the floor of the same run; join time against the batch tools; and every
other figure as its ratio to its baseline (log scale, 1 = the baseline).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.report import BenchResult, Run
from bench.stats import quantile

COLORS = {"gossip": "tab:green", "etcd": "tab:blue", "consul": "tab:purple", "zookeeper": "tab:orange"}
_SERIES = re.compile(r"^(?P<store>\w+)/(?P<hosts>\d+)/(?P<what>add|floor)$")


def _bench(run: Run, name: str) -> BenchResult | None:
    return next((b for b in run.benches if b.name == name), None)


def _q(values: list[float | None], q: float) -> float | None:
    finite = [math.inf if v is None else v for v in values]
    if not finite:
        return None
    value = quantile(finite, q)
    return None if math.isinf(value) else value * 1e3


def _convergence(ax: Axes, run: Run) -> None:
    bench = _bench(run, "convergence")
    series: dict[tuple[str, str], dict[int, list[float | None]]] = {}
    if bench is not None:
        for key, values in bench.samples.items():
            m = _SERIES.match(key)
            if m:
                series.setdefault((m["store"], m["what"]), {})[int(m["hosts"])] = values
    if not series:
        ax.text(0.5, 0.5, "no convergence samples", ha="center", va="center", transform=ax.transAxes)
    for (store, what), by_hosts in sorted(series.items()):
        hosts = sorted(by_hosts)
        color = COLORS.get(store, "black")
        for q, style in ((0.99, "-"), (0.5, ":")):
            points = [(h, _q(by_hosts[h], q)) for h in hosts]
            xs = [h for h, v in points if v is not None]
            ys = [v for _h, v in points if v is not None]
            if what == "floor":
                if q == 0.99:
                    ax.plot(xs, ys, "--", marker="x", color=color, alpha=0.6, label=f"{store} floor p99")
                continue
            ax.plot(xs, ys, style, marker="o", color=color, label=f"{store} add p{int(q * 100)}")
    ax.set_xlabel("hosts")
    ax.set_ylabel("request -> every other kernel (ms)")
    ax.set_yscale("log")
    ax.set_title("convergence (one endpoint at a time)")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2)


def _join(ax: Axes, run: Run) -> None:
    bench = _bench(run, "join")
    figs = [f for f in (bench.figures if bench else []) if f.name.endswith("every kernel complete")]
    labels = [re.sub(r"^host with (\d+) endpoints.*$", r"\1", f.name) for f in figs]
    xs = range(len(figs))
    ax.bar([x - 0.2 for x in xs], [f.value or 0.0 for f in figs], 0.4, label="overlayd (3 daemons)")
    ax.bar([x + 0.2 for x in xs], [f.baseline or 0.0 for f in figs], 0.4, label="bridge/ip -batch")
    for x, f in zip(xs, figs, strict=True):
        if f.value is None:
            ax.text(x - 0.2, 0, "did not\ncomplete", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [f"{label} endpoints" for label in labels])
    ax.set_ylabel("until every kernel is complete (s)")
    ax.set_title("a host joins (etcd)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def _ratios(ax: Axes, run: Run) -> None:
    figs = [f for f in run.figures() if f.bench != "convergence" and f.times_worse is not None]
    if not figs:
        ax.text(0.5, 0.5, "no figure with a baseline", ha="center", va="center", transform=ax.transAxes)
        return
    names = [f"{f.bench}: {f.name}"[:80] for f in figs]
    costs = [f.times_worse or 1.0 for f in figs]
    ys = list(range(len(figs)))
    ax.barh(ys, costs, color=["tab:blue" if f.higher_is_better else "tab:gray" for f in figs])
    for y, cost in zip(ys, costs, strict=True):
        ax.text(cost, y, f" {cost:.3g}x", va="center", fontsize=6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ys, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("times the baseline's cost, same run (rates inverted: blue bars); 1 = the baseline")
    ax.set_title("every other figure against its baseline")
    ax.grid(True, axis="x", which="both", alpha=0.3)


def draw(run: Run, path: Path) -> Path:
    fig = plt.figure(figsize=(15, 11))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.3])
    _convergence(fig.add_subplot(grid[0, 0]), run)
    _join(fig.add_subplot(grid[0, 1]), run)
    _ratios(fig.add_subplot(grid[1, :]), run)
    kind = "quick" if run.quick else "full"
    fig.suptitle(f"overlayd benchmarks ({kind} run, {run.started}, {run.machine.get('cpus', '?')} CPUs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
