"""Drift repair: an FDB entry and a VXLAN device deleted behind the daemons' backs.

In a steady 3-host gossip lab, at the same moment: on h2, `bridge fdb del`
of the entry for h1's endpoint; on h3, `ip link del` of the VXLAN device.
Each is timed from the listener's record of the deletion to its record of
the repair: the entry back on h2; the device back on h3 with every entry it
held before. Entries the daemons remove meanwhile elsewhere (flaps) are
counted. Waits are bounded (a daemon that repairs only at its periodic pass
takes up to that interval).

Baselines, same run, in a scratch namespace timed by the same listener: one
netlink write of an entry (a repair cannot cost less), and iproute2
re-creating the device with the same entries (`ip` + `bridge -batch` +
`ip -batch`).
"""

from __future__ import annotations

import time

from bench.common import expected_view, network_vni, vxlan_device
from bench.context import Context, lab_key
from bench.floors import Scratch
from bench.report import BenchResult, Figure
from bench.stats import Summary
from overlayd.lab import DEMO_NETWORK, Lab, LabError
from overlayd.lab import netns as nsh
from overlayd.lab.kwatch import Entry, Fdb, Link, Neigh

NAME = "drift"
ENTRY_WHAT = "one netlink write of an FDB+neighbour entry seen by the listener (p50)"
DEVICE_WHAT = "iproute2 re-creating the device with the same entries, timed by the listener"


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    hosts = min(ctx.scale.conv_hosts)
    key = lab_key("gossip", hosts)
    try:
        lab = ctx.lab(key, hosts=hosts, store="gossip")
    except LabError as exc:
        why = f"lab did not form: {str(exc).splitlines()[0]}"
        result.add(Figure(NAME, "deleted FDB entry: back", None, "ms", None, ENTRY_WHAT, why))
        result.add(
            Figure(NAME, "deleted VXLAN device: back with its entries", None, "ms", None, DEVICE_WHAT, why)
        )
        return result
    try:
        measure(ctx, lab, result)
    except Exception:
        ctx.discard(lab)
        raise
    ctx.release(lab, key)
    return result


def measure(ctx: Context, lab: Lab, result: BenchResult) -> None:
    timeout = ctx.scale.drift_timeout
    h1, h2, h3 = lab.hosts[:3]
    vni = network_vni(lab, DEMO_NETWORK)
    device = vxlan_device(vni)
    scratch = Scratch(lab, vni, name=f"x{len(lab.namespaces)}")
    watch = ctx.watch([h.netns for h in lab.hosts] + [scratch.ns])
    try:
        watch.expect(expected_view(lab, lab.endpoints, device)).wait(15.0)
        ep1 = next(ep for ep in lab.endpoints if ep.host == h1.name)
        entry = Fdb(device, ep1.mac, h1.address)
        held: list[Entry] = [
            e
            for e in watch.entries(h3.netns)
            if e == Link(device) or (not isinstance(e, Link) and e.device == device)
        ]
        entry_gone = watch.expect({h2.netns: [entry]}, present=False)
        device_gone = watch.expect({h3.netns: [Link(device)]}, present=False)
        begin = time.monotonic()
        nsh.run(["bridge", "-n", h2.netns, "fdb", "del", ep1.mac, "dev", device, "dst", h1.address, "self"])
        nsh.ip("link", "del", device, netns=h3.netns)
        if not (entry_gone.wait(5.0) and device_gone.wait(5.0)):
            raise RuntimeError("the listener did not see the deletions")
        assert entry_gone.done_at is not None and device_gone.done_at is not None
        entry_back = watch.expect({h2.netns: [entry]})
        device_back = watch.expect({h3.netns: held})
        ctx.say(
            f"drift: deleted an entry on {h2.name} and {device} on {h3.name}; waiting up to {timeout:g} s"
        )
        deadline = begin + timeout
        entry_back.wait(max(0.0, deadline - time.monotonic()))
        device_back.wait(max(0.0, deadline - time.monotonic()))
        end = time.monotonic()
        flaps = [
            e
            for e in watch.events(since=begin)
            if not e.present
            and not (e.netns == h2.netns and e.entry == entry)
            and not (e.netns == h3.netns and e.entry in held)
            and e.netns != scratch.ns
        ]
        overruns = watch.overruns(since=begin, until=end)
        floor = Summary.of([v * 1e3 for v in scratch.write_floor(watch, ctx.scale.floor_samples, ctx.rng)])
        fdb = [(e.mac, e.dst) for e in held if isinstance(e, Fdb)]
        neigh = [(e.ip, e.mac) for e in held if isinstance(e, Neigh)]
        rebuilt = scratch.rebuild(watch, fdb, neigh)
    finally:
        ctx.unwatch(watch)
        scratch.close_socket()
    if flaps:
        shown = ", ".join(f"{e.entry} in {e.netns}" for e in flaps[:3])
        result.notes.append(f"{len(flaps)} correct entries removed meanwhile (flaps), e.g. {shown}")
    withheld = f"withheld: listener overran (ENOBUFS) {len(overruns)}x" if overruns else ""
    for exp, gone_at, name, base, what in (
        (entry_back, entry_gone.done_at, f"deleted FDB entry on {h2.name}: back", floor.p50, ENTRY_WHAT),
        (
            device_back,
            device_gone.done_at,
            f"deleted VXLAN device on {h3.name}: back with its {len(held) - 1} entries",
            rebuilt * 1e3 if rebuilt is not None else None,
            DEVICE_WHAT,
        ),
    ):
        value = (exp.done_at - gone_at) * 1e3 if exp.done_at is not None and not withheld else None
        note = withheld or (
            ""
            if exp.done_at is not None
            else f"did not complete in {timeout:g} s ({exp.total - exp.remaining} of {exp.total})"
        )
        result.add(Figure(NAME, name, value, "ms", base, what, note, "<= 1 s"))
