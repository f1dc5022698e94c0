"""Convergence: one endpoint at a time on a random host, created and then deleted.

For each store and lab size: an endpoint is created through its host's admin
API; the clock starts just before the request is sent and stops when the
listener has seen the endpoint's FDB entry (MAC -> VTEP) and neighbour entry
(IP -> MAC) in every other host's kernel; then it is deleted, timed the
same way until both are gone everywhere. One sample per endpoint: the time
until the last host had it. Labs are steady before sampling starts (every
host has every demo endpoint), and only one endpoint is in flight at a time.

KV stores run with gossip beside them, as `overlayctl lab up` builds them.

Baseline, per sample: the floor of the path the change must take, measured
in the same lab: the store's raw put -> watch round trip (or, gossip-only, one
UDP datagram between two hosts) plus one netlink write of an FDB and a
neighbour entry seen by the same listener in a scratch namespace.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.common import expected_view, network_vni, overrun_note, remote_entries, vxlan_device
from bench.context import Context, lab_key
from bench.floors import FloorError, Scratch, kv_floor, udp_floor
from bench.report import BenchResult, Figure
from bench.stats import Summary, paired_sums
from overlayd.api.client import ClientError
from overlayd.lab import DEMO_NETWORK, Lab, LabError
from overlayd.lab import netns as nsh
from overlayd.lab.kwatch import KernelWatch

NAME = "convergence"
LABEL = {
    "gossip": "gossip",
    "etcd": "etcd+gossip",
    "consul": "consul+gossip",
    "zookeeper": "zookeeper+gossip",
}
FLOOR_WHAT = {
    "gossip": "floor: one UDP datagram host->host over the underlay + one netlink FDB+neighbour write "
    "seen by the listener (per-sample sums)",
    "etcd": "floor: raw etcd put seen by a raw watch (aetcd, from a host namespace) + one netlink "
    "FDB+neighbour write seen by the listener (per-sample sums)",
    "consul": "floor: raw Consul KV put seen by a blocking query (aiohttp, from a host namespace) + one "
    "netlink FDB+neighbour write seen by the listener (per-sample sums)",
    "zookeeper": "floor: raw ZooKeeper set seen by a watch (kazoo, from a host namespace) + one netlink "
    "FDB+neighbour write seen by the listener (per-sample sums)",
}


def plan(stores: tuple[str, ...], hosts: tuple[int, ...]) -> list[tuple[str, int]]:
    """The order of the labs.

    The biggest gossip lab first (cold start hands it over) and the smallest
    last (drift, dataplane and churn take it over). In between, the labs with
    targets (etcd) before the rest, and the biggest Consul and ZooKeeper labs
    last: if the time budget runs short, those are the ones skipped.
    """
    small, big = min(hosts), max(hosts)
    order = [("gossip", n) for n in sorted(hosts, reverse=True) if n != small and "gossip" in stores]
    order += [("etcd", n) for n in sorted(hosts, reverse=True) if "etcd" in stores]
    others = [s for s in stores if s not in ("gossip", "etcd")]
    order += [(s, n) for n in sorted(hosts) if n != big or big == small for s in others]
    order += [(s, big) for s in others if big != small]
    if "gossip" in stores:
        order.append(("gossip", small))
    return order


def lab_cost(ctx: Context, hosts: int) -> float:
    """Seconds a lab of `hosts` takes here, roughly: build, settle, sample, remove."""
    return 5.0 + 1.2 * hosts + ctx.scale.conv_budget


def target(store: str, hosts: int) -> str:
    if store in ("gossip", "etcd"):
        return {10: "p99 <= 10 ms", 30: "p99 <= 25 ms"}.get(hosts, "")
    return "no slower than etcd+gossip"


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    end = time.monotonic() + ctx.scale.conv_total
    labs = plan(ctx.scale.conv_stores, ctx.scale.conv_hosts)
    for i, (store, hosts) in enumerate(labs):
        key = lab_key(store, hosts)
        label = f"{LABEL[store]}, {hosts} hosts"
        last = i == len(labs) - 1  # the small gossip lab: the next benchmarks need it anyway
        if not last and end - time.monotonic() < lab_cost(ctx, hosts):
            _unmeasured(result, store, hosts, f"skipped: convergence's {ctx.scale.conv_total:g} s were spent")
            continue
        try:
            lab = ctx.lab(key, hosts=hosts, store=store, gossip=store != "gossip")
        except LabError as exc:
            _unmeasured(result, store, hosts, f"lab did not form: {str(exc).splitlines()[0]}")
            continue
        try:
            measure(ctx, lab, store, hosts, result)
        except Exception as exc:
            ctx.discard(lab)
            _unmeasured(result, store, hosts, f"failed: {exc!r}"[:300])
            ctx.say(f"{label}: {exc!r}")
            continue
        ctx.release(lab, key)
    return result


def _unmeasured(result: BenchResult, store: str, hosts: int, why: str) -> None:
    for op in ("add", "delete"):
        for q in ("p50", "p99"):
            result.add(
                Figure(
                    NAME, f"{LABEL[store]}, {hosts} hosts: {op} {q}", None, "ms", None, FLOOR_WHAT[store], why
                )
            )


def measure(ctx: Context, lab: Lab, store: str, hosts: int, result: BenchResult) -> None:
    scale = ctx.scale
    label = f"{LABEL[store]}, {hosts} hosts"
    vni = network_vni(lab, DEMO_NETWORK)
    device = vxlan_device(vni)
    scratch = Scratch(lab, vni, name=f"x{len(lab.namespaces)}")
    watch = ctx.watch([h.netns for h in lab.hosts] + [scratch.ns])
    try:
        steady = watch.expect(expected_view(lab, lab.endpoints, device))
        if not steady.wait(scale.steady_timeout):
            result.notes.append(
                f"{label}: lab not steady before sampling ({steady.total - steady.remaining} of "
                f"{steady.total} demo entries)"
            )
        n_floor = scale.floor_samples
        kernel = scratch.write_floor(watch, n_floor, ctx.rng)
        try:
            path = udp_floor(lab, n_floor, ctx.rng) if store == "gossip" else kv_floor(lab, n_floor)
        except FloorError as exc:
            result.notes.append(f"{label}: store floor not measured ({exc}); kernel part only")
            path = [0.0] * len(kernel)
        floor = paired_sums(path, kernel)
        result.samples[f"{store}/{hosts}/floor"] = list(floor)
        result.samples[f"{store}/{hosts}/floor_kernel"] = list(kernel)
        result.samples[f"{store}/{hosts}/floor_path"] = list(path)
        begin = time.monotonic()
        got = _sample(ctx, lab, watch, device, result, f"{store}/{hosts}")
        withheld = overrun_note(watch, begin, time.monotonic())
    finally:
        ctx.unwatch(watch)
        scratch.close_socket()
    adds, deletes, api, failures = got.adds, got.deletes, got.api, got.failures
    ctx.say(f"{label}: {len(adds)} samples")
    result.samples[f"{store}/{hosts}/add"] = list(adds)
    result.samples[f"{store}/{hosts}/delete"] = list(deletes)
    if got.missed:
        where = ", ".join(f"{h} ({n}x)" for h, n in got.missed.most_common(5))
        result.notes.append(
            f"{label}: adds that never reached a host within {scale.sample_timeout:g} s: {where}"
        )
    base = Summary.of([v * 1e3 for v in floor]) if floor else None
    for op, values in (("add", adds), ("delete", deletes)):
        name = f"{label}: {op}"
        if not values:
            why = f"no sample completed ({failures} admin API failures)" if failures else "no sample"
            _unmeasured_op(result, store, name, why)
            continue
        s = Summary.of([v * 1e3 for v in values])
        extra = f"; {failures} admin API failures" if failures else ""
        late = (
            f"; {s.incomplete} of {s.n} did not complete in {scale.sample_timeout:g} s"
            if s.incomplete
            else ""
        )
        for q, value, floor_value in (
            ("p50", s.p50, base.p50 if base else None),
            ("p99", s.p99, base.p99 if base else None),
        ):
            note = withheld or ""
            shown: float | None = None if withheld or math.isinf(value) else value
            if not withheld:
                note = f"n={s.n}{late}{extra}"
                if q == "p50" and op == "add" and api:
                    note += f"; the add request was answered after p50 {Summary.of(api).p50 * 1e3:.1f} ms"
                if q == "p99":
                    worst = "did not complete" if math.isinf(s.max) else f"{s.max:.1f} ms"
                    floor_max = f"{base.max:.2f} ms" if base else "-"
                    note = f"max {worst} (floor max {floor_max}); {note}"
            result.add(
                Figure(
                    NAME,
                    f"{name} {q}",
                    shown,
                    "ms",
                    floor_value,
                    FLOOR_WHAT[store],
                    note,
                    target(store, hosts) if q == "p99" else "",
                )
            )


def _unmeasured_op(result: BenchResult, store: str, name: str, why: str) -> None:
    for q in ("p50", "p99"):
        result.add(Figure(NAME, f"{name} {q}", None, "ms", None, FLOOR_WHAT[store], why))


@dataclass
class Samples:
    adds: list[float] = field(default_factory=list)  # seconds until every other kernel had it
    deletes: list[float] = field(default_factory=list)  # ... until it was gone everywhere
    api: list[float] = field(default_factory=list)  # seconds until the add request was answered
    failures: int = 0  # requests the admin API refused
    missed: Counter[str] = field(default_factory=Counter)  # host -> adds it never got in time


def _sample(
    ctx: Context, lab: Lab, watch: KernelWatch, device: str, result: BenchResult, series: str
) -> Samples:
    """Add and delete endpoints one at a time, each on a random host."""
    scale = ctx.scale
    limit = scale.conv_samples_30 if len(lab.hosts) >= 30 else scale.conv_samples
    deadline = time.monotonic() + scale.conv_budget
    out = Samples()
    per_host: list[float | None] = []
    for i in range(limit):
        if i and time.monotonic() > deadline:
            break
        host = ctx.rng.choice(lab.hosts)
        others = [h for h in lab.hosts if h is not host]
        name = f"cv{i}"
        ns = f"{lab.prefix}-{name}"
        lab.add_namespaces([ns])
        client = lab.admin(host, timeout=scale.sample_timeout)
        start = time.monotonic()
        try:
            record = client.endpoint_add(network=DEMO_NETWORK, name=name, netns=ns)
        except ClientError as exc:
            out.failures += 1
            result.notes.append(f"{series}: add of {name} on {host.name} failed: {exc.message}")
            nsh.delete_netns(ns)
            if out.failures >= 3:
                break
            continue
        out.api.append(time.monotonic() - start)
        entries = remote_entries(device, host.address, str(record.ip), str(record.mac))
        wanted = {h.netns: entries for h in others}
        exp = watch.expect(wanted)
        done = exp.wait(max(0.0, scale.sample_timeout - (time.monotonic() - start)))
        out.adds.append(exp.done_at - start if done and exp.done_at is not None else math.inf)
        for h in others:
            at = exp.done_at_by_ns.get(h.netns)
            per_host.append(at - start if at is not None else None)
            if at is None:
                out.missed[h.name] += 1
        gone = watch.expect(wanted, present=False)
        start = time.monotonic()
        try:
            client.endpoint_remove(network=DEMO_NETWORK, name=name)
        except ClientError as exc:
            out.failures += 1
            result.notes.append(f"{series}: delete of {name} on {host.name} failed: {exc.message}")
            continue
        done = gone.wait(scale.sample_timeout)
        out.deletes.append(gone.done_at - start if done and gone.done_at is not None else math.inf)
        nsh.delete_netns(ns)
    result.samples[f"{series}/add_per_host"] = per_host
    result.samples[f"{series}/add_api"] = list(out.api)
    return out
