"""Idle: the join lab's daemons holding a big joiner's entries, with nothing happening.

Over a quiet window (three times in it the network record is written again
unchanged, a change every daemon sees that changes nothing): CPU seconds per
minute per daemon (/proc/PID/stat), RSS, and the daemons' own time of an
incremental no-op pass and of a full verify. Those two are internal by
nature, so they come from /metrics, `overlayd_reconcile_duration_seconds`
with `kind="incremental"` / `kind="full"` (the mean over the window; a full
verify that did not happen in the window is read from all the daemon's
passes so far). A daemon that does not label its passes gives "n/a".

Baselines, same run: the same daemons over a window before any joiner
(0 remote endpoints) for CPU, RSS and the incremental pass; for the full
verify, iproute2 reading the same tables (`bridge fdb show` + `ip neigh show`
of the device), the least a full verify must do.
"""

from __future__ import annotations

from bench import promtext
from bench.context import Context
from bench.joinlab import KEY, IdleStats, JoinLab, take
from bench.report import BenchResult, Figure
from overlayd.lab import LabError

NAME = "idle"
BASE_WHAT = "the same daemons idle before any joiner (0 remote endpoints)"
DUMP_WHAT = "iproute2 reading the same tables (bridge fdb show + ip neigh show of the device)"
NA_METRIC = 'n/a: the daemon exports no overlayd_reconcile_duration_seconds{{kind="{kind}"}}'


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    size = max(ctx.scale.join_sizes)
    try:
        lab = ctx.lab(KEY, hosts=3, store="etcd", gossip=False)
    except LabError as exc:
        why = f"lab did not form: {str(exc).splitlines()[0]}"
        for name, unit, what in _names(size):
            result.add(Figure(NAME, name, None, unit, None, what, why))
        return result
    try:
        joinlab = take(ctx, lab)
        if joinlab.idle_base is None:
            joinlab.idle_base = joinlab.idle(ctx.scale.idle_base_window)
        if joinlab.loaded is None or len(joinlab.loaded.entries) != size:
            _load(ctx, joinlab, size, result)
        busy = _settle(ctx, joinlab)
        ctx.say(f"idle: {ctx.scale.idle_window:g} s of quiet at {size} remote endpoints")
        stats = joinlab.idle(ctx.scale.idle_window)
        dump = joinlab.dump_seconds()
        _figures(result, size, joinlab.idle_base, stats, dump, busy)
        if joinlab.loaded is not None:
            joinlab.leave(joinlab.loaded, 5.0)
        joinlab.close()
    finally:
        ctx.handoff.pop(KEY, None)
        ctx.discard(lab)
    return result


def _load(ctx: Context, joinlab: JoinLab, size: int, result: BenchResult) -> None:
    """Run on its own: load the joiner first (untimed, bounded)."""
    if joinlab.loaded is not None:
        joinlab.leave(joinlab.loaded, ctx.scale.join_timeout)
    joiner = joinlab.joiner(size)
    exp = joinlab.expect(joiner)
    joinlab.write(joiner)
    joinlab.loaded = joiner
    if not exp.wait(ctx.scale.join_timeout):
        result.notes.append(
            f"the {size} endpoints were not all programmed after {ctx.scale.join_timeout:g} s "
            f"({exp.total - exp.remaining} of {exp.total} entries); idle measured anyway"
        )


def _settle(ctx: Context, joinlab: JoinLab) -> str:
    """Idle means done: give a join that has not finished programming some more time.

    A note for the figures if it still has not ("" if it has)."""
    if joinlab.loaded is None:
        return ""
    exp = joinlab.expect(joinlab.loaded)
    if not exp.done:
        ctx.say(f"idle: waiting up to {ctx.scale.idle_settle:g} s for the join to complete")
    if exp.wait(ctx.scale.idle_settle):
        return ""
    return (
        f"not idle: the daemons were still programming the join ({exp.total - exp.remaining} of "
        f"{exp.total} entries) after a further {ctx.scale.idle_settle:g} s"
    )


def _names(size: int) -> list[tuple[str, str, str]]:
    head = f"idle at {size} remote endpoints"
    return [
        (f"{head}: CPU per minute, busiest daemon", "CPU s/min", BASE_WHAT),
        (f"{head}: incremental no-op pass", "ms", BASE_WHAT),
        (f"{head}: full verify", "ms", DUMP_WHAT),
        (f"{head}: RSS, biggest daemon", "MB", BASE_WHAT),
    ]


def _worst_mean(passes: dict[str, promtext.Passes | None]) -> float | None:
    means = [p.mean for p in passes.values() if p is not None and p.mean is not None]
    return max(means) * 1e3 if means else None


def _figures(
    result: BenchResult, size: int, base: IdleStats, stats: IdleStats, dump: float, busy: str
) -> None:
    names = _names(size)
    window = f"{stats.window:g} s window" + (f"; {busy}" if busy else "")
    cpu_hosts = ", ".join(f"{n} {v:.2f}" for n, v in sorted(stats.cpu_per_min.items()))
    result.add(
        Figure(
            NAME,
            names[0][0],
            max(stats.cpu_per_min.values(), default=None),
            "CPU s/min",
            max(base.cpu_per_min.values(), default=None),
            BASE_WHAT,
            f"{window}; per daemon: {cpu_hosts}",
        )
    )
    incremental, incremental_base = _worst_mean(stats.incremental), _worst_mean(base.incremental)
    unlabelled = _worst_mean(stats.unlabelled)
    aside = f" (unlabelled passes meanwhile: mean {unlabelled:.1f} ms)" if unlabelled is not None else ""
    if all(p is None for p in stats.incremental.values()):
        note = NA_METRIC.format(kind="incremental") + aside
    elif incremental is None:
        note = f"n/a: no incremental pass in the {window}"
    else:
        note = f"mean over the {window}, slowest daemon"
    result.add(Figure(NAME, names[1][0], incremental, "ms", incremental_base, BASE_WHAT, note, "<= 5 ms"))
    full = _worst_mean(stats.full)
    if all(p is None for p in stats.full.values()):
        note = NA_METRIC.format(kind="full") + aside
    elif full is None:
        full = _worst_mean(stats.full_cumulative)
        note = (
            f"none in the {window}: mean of every full pass so far"
            if full is not None
            else "n/a: no full pass yet"
        )
    else:
        note = f"mean over the {window}, slowest daemon"
    result.add(Figure(NAME, names[2][0], full, "ms", dump * 1e3, DUMP_WHAT, note, "<= 100 ms"))
    result.add(
        Figure(
            NAME,
            names[3][0],
            max(stats.rss_mb.values(), default=None),
            "MB",
            max(base.rss_mb.values(), default=None),
            BASE_WHAT,
            "",
            "<= 100 MB",
        )
    )
