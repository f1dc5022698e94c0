"""Cold start: a gossip lab of N hosts forms, until every endpoint pair answers a ping.

What `overlayctl lab up --hosts 30` does: namespaces and underlay, a daemon
per host (until ready), network `demo` and one endpoint per host, then every
endpoint pings every other (all pairs at once, each retrying until answered).
Timed from the start of `Lab.up()` to the last pair's answer.

Baseline, same run: the same hosts without daemons (namespaces, veths,
underlay bridge) and the same all-pairs ping between the hosts themselves,
over the underlay: everything but the overlay.
"""

from __future__ import annotations

import time

from bench.context import Context, lab_key
from bench.report import BenchResult, Figure
from overlayd.lab import Endpoint, Lab, LabError, PingResult

NAME = "coldstart"
BASE_WHAT = (
    "the same hosts without daemons: namespaces and underlay built, then the same all-pairs ping "
    "between the hosts over the underlay"
)


def _host_endpoints(lab: Lab) -> list[Endpoint]:
    """The hosts themselves as ping targets (their underlay addresses)."""
    return [Endpoint(h.name, "underlay", h.name, h.netns, h.address, "") for h in lab.hosts]


def _all_answered(results: list[PingResult]) -> bool:
    return bool(results) and all(r.ok for r in results)


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    hosts = ctx.scale.coldstart_hosts
    timeout = ctx.scale.coldstart_timeout
    name = f"gossip lab, {hosts} hosts"

    start = time.monotonic()
    base = ctx.lab(f"u{hosts}", hosts=hosts, store="gossip", daemons=False)
    base_built = time.monotonic() - start
    pings = base.ping_all(_host_endpoints(base), timeout=timeout)
    base_total = time.monotonic() - start
    base_ping = base_total - base_built
    ctx.discard(base)
    if not _all_answered(pings):
        result.notes.append(f"underlay ping: {sum(not r.ok for r in pings)} of {len(pings)} pairs failed")

    start = time.monotonic()
    try:
        lab = ctx.lab(
            lab_key("gossip", hosts), hosts=hosts, store="gossip", ready_timeout=max(60.0, 3.0 * hosts)
        )
    except LabError as exc:
        why = f"lab did not form: {str(exc).splitlines()[0]}"
        result.add(Figure(NAME, f"{name}: all pairs answer", None, "s", base_total, BASE_WHAT, why))
        return result
    formed = time.monotonic() - start
    try:
        pings = lab.ping_all(timeout=timeout)
    except BaseException:
        ctx.discard(lab)  # else it holds the prefix convergence builds its 30-host lab under
        raise
    total = time.monotonic() - start
    ctx.release(lab, lab_key("gossip", hosts))
    answered = sum(r.ok for r in pings)
    complete = _all_answered(pings)
    note = (
        "" if complete else f"did not complete in {timeout:g} s of pinging ({answered} of {len(pings)} pairs)"
    )
    result.samples["ping_seconds"] = [r.seconds if r.ok else None for r in pings]
    result.add(
        Figure(
            NAME,
            f"{name}: all pairs answer",
            total if complete else None,
            "s",
            base_total,
            BASE_WHAT,
            note,
            f"`overlayctl lab up --hosts {hosts}` succeeds" if hosts >= 30 else "",
        )
    )
    result.add(
        Figure(
            NAME,
            f"{name}: Lab.up() returned",
            formed,
            "s",
            base_built,
            "the same hosts without daemons: namespaces and underlay built",
        )
    )
    result.add(
        Figure(
            NAME,
            f"{name}: all-pairs ping after up()",
            total - formed if complete else None,
            "s",
            base_ping,
            "the same all-pairs ping between the hosts over the underlay",
            note,
        )
    )
    return result
