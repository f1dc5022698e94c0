"""Join: a host with N endpoints appears, its records written into etcd at once.

On the 3-host etcd lab of `bench.joinlab`: the joiner's node record and N
endpoint records (with their address claims) go into etcd in transactions
of 128, from one client, as fast as etcd takes them. The clock starts just
before the first transaction is sent and stops when the listener has seen
every entry for the joiner (N FDB + N neighbour + 1 flood) in every host's
kernel; a second row times the same end from when the last transaction was
answered (etcd takes most of the join to store the records: what is left is
how far the kernels were behind the store). CPU seconds per daemon (/proc/PID/stat) over that time plus one
second, and RSS after. The joiner then leaves (its lease is revoked) before
the next, bigger one; the last stays for the idle benchmark.

Baselines, same run: `bridge -batch` + `ip -batch` loading the same entries
into a scratch namespace with the same devices, timed by the same listener,
and the CPU those two tools used; RSS of the same daemons before the join.
"""

from __future__ import annotations

import time

from bench.context import Context
from bench.joinlab import KEY, JoinLab, take
from bench.report import BenchResult, Figure
from overlayd.lab import LabError

NAME = "join"
TIME_WHAT = "bridge -batch + ip -batch loading the same entries into a namespace with the same devices"
CPU_WHAT = "CPU of those bridge -batch + ip -batch runs, per endpoint"
RSS_WHAT = "RSS of the same daemons before the join"


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    try:
        lab = ctx.lab(KEY, hosts=3, store="etcd", gossip=False)
    except LabError as exc:
        why = f"lab did not form: {str(exc).splitlines()[0]}"
        for size in ctx.scale.join_sizes:
            _unmeasured(result, size, why)
        return result
    try:
        joinlab = take(ctx, lab)
        if joinlab.idle_base is None:
            ctx.say(
                f"join: daemons idle for {ctx.scale.idle_base_window:g} s before any joiner (idle baseline)"
            )
            joinlab.idle_base = joinlab.idle(ctx.scale.idle_base_window)
        sizes = ctx.scale.join_sizes
        for size in sizes:
            if joinlab.loaded is not None:
                if not joinlab.leave(joinlab.loaded, ctx.scale.join_timeout / 2):
                    result.notes.append("the previous joiner's entries were not all removed before this join")
                joinlab.scratch.reset()
            measure(ctx, joinlab, size, result)
    except Exception:
        ctx.handoff.pop(KEY, None)
        ctx.discard(lab)
        raise
    ctx.release(lab, KEY)
    return result


def _unmeasured(result: BenchResult, size: int, why: str) -> None:
    for name, unit, what in _names(size):
        result.add(Figure(NAME, name, None, unit, None, what, why))


def _names(size: int) -> list[tuple[str, str, str]]:
    head = f"host with {size} endpoints joins (etcd, 3 hosts)"
    return [
        (f"{head}: every kernel complete", "s", TIME_WHAT),
        (f"{head}: every kernel complete, after the last record was written", "s", TIME_WHAT),
        (f"{head}: CPU per endpoint, busiest daemon", "ms", CPU_WHAT),
        (f"{head}: RSS, biggest daemon", "MB", RSS_WHAT),
    ]


def measure(ctx: Context, joinlab: JoinLab, size: int, result: BenchResult) -> None:
    """One joiner of `size` endpoints; it stays loaded (the next join, or idle, deals with it)."""
    scale = ctx.scale
    joiner = joinlab.joiner(size)
    rss_before = joinlab.rss()
    exp = joinlab.expect(joiner)
    cpu_before = joinlab.cpu()
    ctx.say(f"join: {size} endpoints into etcd")
    start, write_seconds, txns = joinlab.write(joiner)
    joinlab.loaded = joiner
    complete = exp.wait(max(0.0, scale.join_timeout - (time.monotonic() - start)))
    took = exp.done_at - start if complete and exp.done_at is not None else None
    waited = time.monotonic() - start
    time.sleep(1.0)  # work the daemons finish just after the last entry is theirs too
    cpu_after = joinlab.cpu()
    rss_after = joinlab.rss()
    overruns = joinlab.watch.overruns(since=start)
    ctx.say(f"join {size}: " + (f"complete in {took:.2f} s" if took is not None else "incomplete"))

    base_seconds, base_cpu = joinlab.scratch.load_batch(joinlab.watch, joiner.fdb(), joiner.neigh(), 30.0)
    cpu = {name: cpu_after[name] - cpu_before.get(name, cpu_after[name]) for name in cpu_after}
    busiest = max(cpu.values(), default=0.0)
    written = f"records written in {write_seconds:.2f} s ({txns} transactions)"
    short = (
        ""
        if complete
        else f"did not complete in {waited:.0f} s ({exp.total - exp.remaining} of {exp.total} entries)"
    )
    if overruns:
        short = f"withheld: listener overran (ENOBUFS) {len(overruns)}x"
        took = None
    per_host = ", ".join(f"{n} {s:.2f} s" for n, s in sorted(cpu.items()))
    names = _names(size)
    result.samples[f"{size}/cpu_seconds"] = [cpu[n] for n in sorted(cpu)]
    result.add(
        Figure(
            NAME,
            names[0][0],
            took,
            "s",
            base_seconds,
            TIME_WHAT,
            short or written,
            "<= 3x the batch tools" if size >= 10000 else "",
        )
    )
    # etcd takes most of the join to store the records (one client, transactions of 128):
    # how far the kernels were behind the store is the part that is overlayd's.
    lag = max(took - write_seconds, 0.0) if took is not None else None
    result.add(Figure(NAME, names[1][0], lag, "s", base_seconds, TIME_WHAT, short or written))
    result.add(
        Figure(
            NAME,
            names[2][0],
            busiest / size * 1e3,
            "ms",
            base_cpu / size * 1e3,
            CPU_WHAT,
            f"CPU s per daemon: {per_host}" + ("" if complete else f" (over the {waited:.0f} s given)"),
            "<= 0.05 ms" if size >= 10000 else "",
        )
    )
    result.add(
        Figure(
            NAME,
            names[3][0],
            max(rss_after.values(), default=None),
            "MB",
            max(rss_before.values(), default=None),
            RSS_WHAT,
            "",
            "<= 100 MB" if size >= 10000 else "",
        )
    )
