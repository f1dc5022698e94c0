"""Churn: many endpoint adds on one host from concurrent clients (gossip-only, then etcd+gossip).

16 clients (threads, each with its own admin-API connection) add endpoints to
network `churn` on h1 as fast as the daemon answers, until the count is
reached or the time budget is spent (then "did not complete": N of M adds).
Figures: adds per second (completed adds over the time from the first
request to the last answer), the client-side p99 of one add, how far the
other hosts' kernels lag behind the answers (per endpoint: the listener's
time of its last entry on the last host minus the time its add was
answered; negative when the kernels were first), and whether the rate holds
as the host fills (the last 100 adds against the first 100).

At saturation every client always has an add in flight, so one add's latency
there is Little's law, clients / rate, whatever the daemon does. Then the
same clients offer adds at a fixed rate (200/s, the issue's target rate; one
add due every 5 ms, each sent by a free client), and one add's latency is
timed from when it was due, not when a client got to it (a late send counts
as waiting, as wrk2 does): the p99 an operator sees at that load.

Baselines, same run: iproute2 doing the kernel work of the same number of
adds in one `ip -batch` (veth pair, peer moved into each endpoint's
namespace, host side on a bridge and up; no addresses: a lower bound),
as a rate and as time per endpoint; and for the lag, the convergence floor
(store or UDP path plus one netlink write seen by the listener).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from bench.common import expected_view, overrun_note, remote_entries, vxlan_device
from bench.context import Context, lab_key
from bench.floors import FloorError, Scratch, kv_floor, udp_floor
from bench.procstat import sample
from bench.report import BenchResult, Figure
from bench.stats import Summary, paired_sums
from overlayd.api.client import ClientError
from overlayd.lab import Host, Lab, LabError
from overlayd.lab.kwatch import Entry, KernelWatch

NAME = "churn"
NETWORK, SUBNET = "churn", "10.201.0.0/16"
LABEL = {"gossip": "gossip", "etcd": "etcd+gossip"}
RATE_WHAT = (
    "iproute2 alone, one `ip -batch`: as many veth pairs, peer moved into each endpoint's namespace, "
    "host side on a bridge and up (no addresses)"
)
PER_ADD_WHAT = "the same iproute2 batch, time per endpoint"
LAG_WHAT = "convergence floor p99: store (or UDP) path + one netlink write seen by the listener"
FLAT_WHAT = "the rate of the first adds (as many as at the end), same run"
PACED_RATE = 200.0  # adds/s offered in the paced run: the target rate


@dataclass
class Add:
    sent: float
    answered: float
    ip: str
    mac: str


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    for store in ("gossip", "etcd"):
        key = lab_key(store, 3)
        try:
            lab = ctx.lab(key, hosts=3, store=store, gossip=store != "gossip")
        except LabError as exc:
            _unmeasured(result, store, f"lab did not form: {str(exc).splitlines()[0]}")
            continue
        try:
            measure(ctx, lab, store, result)
        except Exception as exc:
            ctx.discard(lab)
            _unmeasured(result, store, f"failed: {exc!r}"[:300])
            continue
        ctx.release(lab, key)
    return result


def _figure_names(store: str, adds: int, clients: int) -> list[tuple[str, str, str]]:
    head = f"{LABEL[store]}, {adds} adds, {clients} clients"
    paced = f"{LABEL[store]}, {PACED_RATE:g} adds/s offered, {clients} clients"
    return [
        (f"{head}: adds/s", "/s", RATE_WHAT),
        (f"{head}: add p99 (client)", "ms", PER_ADD_WHAT),
        (f"{head}: request -> every other kernel p99", "ms", LAG_WHAT),
        (f"{head}: adds/s at the end vs the start", "/s", FLAT_WHAT),
        (f"{paced}: add p99 (client)", "ms", PER_ADD_WHAT),
    ]


def _unmeasured(result: BenchResult, store: str, why: str) -> None:
    for name, unit, what in _figure_names(store, 0, 0):
        result.add(Figure(NAME, name, None, unit, None, what, why))


def _add_all(
    ctx: Context, lab: Lab, names: list[str], *, rate: float | None = None
) -> tuple[list[Add | None], list[str], float]:
    """Issue the adds from the clients; (results by index, errors, time of the first request).

    With `rate`, add i is due at `rate` adds/s from the start, and its `sent` is when it was
    due: a client that gets to it late (all busy) adds that wait to its latency.
    """
    scale = ctx.scale
    owner = lab.hosts[0]
    results: list[Add | None] = [None] * len(names)
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(len(names)))
    start = time.monotonic()
    deadline = start + scale.churn_budget

    def client() -> None:
        # Bounded: an add still in flight when the budget ends delays the figures by this much at most.
        admin = lab.admin(owner, timeout=15.0)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            sent = time.monotonic()
            if rate is not None:
                due = start + i / rate
                if due > sent:
                    time.sleep(due - sent)
                sent = due
            try:
                record = admin.endpoint_add(network=NETWORK, name=names[i], netns=f"{lab.prefix}-{names[i]}")
            except ClientError as exc:
                with lock:
                    errors.append(exc.message)
                continue
            results[i] = Add(sent, time.monotonic(), str(record.ip), str(record.mac))

    threads = [threading.Thread(target=client, name=f"churn-{k}") for k in range(scale.churn_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, start


def measure(ctx: Context, lab: Lab, store: str, result: BenchResult) -> None:
    scale = ctx.scale
    owner, others = lab.hosts[0], lab.hosts[1:]
    record = lab.create_network(NETWORK, SUBNET, via=owner)
    vni = int(record.vni)
    device = vxlan_device(vni)
    # A host programs a network only while it has an endpoint in it.
    anchors = [lab.add_endpoint(h, f"{h.name}-ca", network=NETWORK) for h in others]
    names = [f"ch{i}" for i in range(scale.churn_adds)]
    lab.add_namespaces([f"{lab.prefix}-{n}" for n in names])
    scratch = Scratch(lab, vni, name=f"x{len(lab.namespaces)}")
    watch = ctx.watch([h.netns for h in lab.hosts] + [scratch.ns])
    series = f"{store}/{scale.churn_adds}"
    try:
        watch.expect(expected_view(lab, anchors, device, others)).wait(15.0)
        ctx.say(f"churn {LABEL[store]}: {len(names)} adds from {scale.churn_clients} clients")
        cpu_before = _owner_cpu(owner)
        adds, errors, start = _add_all(ctx, lab, names)
        cpu_after = _owner_cpu(owner)
        done = [a for a in adds if a is not None]
        if cpu_before is not None and cpu_after is not None and done:
            per_add = (cpu_after - cpu_before) / len(done) * 1e3
            note = f"owner daemon CPU {per_add:.2f} ms per add (/proc, all threads)"
            result.notes.append(f"{LABEL[store]}: {note}")
        wanted: dict[str, list[Entry]] = {h.netns: [] for h in others}
        for a in done:
            for h in others:
                wanted[h.netns] += remote_entries(device, owner.address, a.ip, a.mac)
        remote = watch.expect(wanted)
        remote.wait(15.0 if not scale.quick else 10.0)
        arrived = [_arrived(watch, others, device, owner.address, a) for a in done]
        withheld = overrun_note(watch, start, time.monotonic())
        kernel = scratch.write_floor(watch, scale.floor_samples, ctx.rng)
        try:
            path = (
                udp_floor(lab, scale.floor_samples, ctx.rng)
                if store == "gossip"
                else kv_floor(lab, scale.floor_samples)
            )
        except FloorError as exc:
            result.notes.append(f"{store}: store floor not measured ({exc}); kernel part only")
            path = [0.0] * len(kernel)
        floor = Summary.of([v * 1e3 for v in paired_sums(path, kernel)])
    finally:
        ctx.unwatch(watch)
        scratch.close_socket()
    paced = _add_paced(ctx, lab, store, result)
    batch_seconds = _iproute2_floor(lab, scratch, names)
    result.samples[f"{series}/add_seconds"] = [a.answered - a.sent if a else None for a in adds]
    result.samples[f"{series}/remote_seconds"] = [t - a.sent for t, a in zip(arrived, done, strict=True)]
    if errors:
        result.notes.append(f"{LABEL[store]}: {len(errors)} adds failed, first: {errors[0]}")
    _figures(
        ctx,
        result,
        store,
        names,
        done,
        errors,
        start,
        arrived,
        remote.done_at,
        floor,
        batch_seconds,
        withheld,
        paced,
    )


def _add_paced(ctx: Context, lab: Lab, store: str, result: BenchResult) -> list[float]:
    """Latencies (s) of adds offered at `PACED_RATE`, after the saturating run (same host, so
    the host holds 500 to 900 endpoints meanwhile)."""
    scale = ctx.scale
    names = [f"cp{i}" for i in range(scale.churn_paced)]
    lab.add_namespaces([f"{lab.prefix}-{n}" for n in names])
    ctx.say(f"churn {LABEL[store]}: {len(names)} adds offered at {PACED_RATE:g}/s")
    adds, errors, _ = _add_all(ctx, lab, names, rate=PACED_RATE)
    if errors:
        result.notes.append(f"{LABEL[store]}, paced: {len(errors)} adds failed, first: {errors[0]}")
    latencies = [a.answered - a.sent if a else None for a in adds]
    result.samples[f"{store}/paced/add_seconds"] = latencies
    return [v for v in latencies if v is not None]


def _owner_cpu(owner: Host) -> float | None:
    """CPU seconds the owner's daemon has used so far (None if it is not running)."""
    if owner.proc is None:
        return None
    try:
        return sample(owner.proc.pid).cpu_seconds
    except OSError:
        return None


def _arrived(watch: KernelWatch, others: list[Host], device: str, vtep: str, add: Add) -> float:
    """When the add's last entry reached the last other host (monotonic; inf: never)."""
    latest = -math.inf
    for h in others:
        for entry in remote_entries(device, vtep, add.ip, add.mac):
            since = watch.present(h.netns, entry)
            if since is None:
                return math.inf
            latest = max(latest, since)
    return latest


def _iproute2_floor(lab: Lab, scratch: Scratch, names: list[str]) -> float:
    """Seconds iproute2 takes for the adds' kernel work, in one batch into the same namespaces."""
    lines: list[str] = []
    for i, name in enumerate(names):
        lines.append(f"link add blv{i} type veth peer name bl0 netns {lab.prefix}-{name}")
        lines.append(f"link set blv{i} master {scratch.bridge} up")
    start = time.monotonic()
    scratch.ip_batch(lines)
    return time.monotonic() - start


def _figures(
    ctx: Context,
    result: BenchResult,
    store: str,
    names: list[str],
    done: list[Add],
    errors: list[str],
    start: float,
    arrived: list[float],
    remote_done: float | None,
    floor: Summary,
    batch_seconds: float,
    withheld: str | None,
    paced: list[float],
) -> None:
    scale = ctx.scale
    total = len(names)
    spec = _figure_names(store, total, scale.churn_clients)
    if not done:
        for name, unit, what in spec:
            result.add(Figure(NAME, name, None, unit, None, what, f"no add completed ({len(errors)} failed)"))
        return
    answered = sorted(a.answered for a in done)
    elapsed = answered[-1] - start
    rate = len(done) / elapsed if elapsed > 0 else None
    short = (
        ""
        if len(done) == total
        else f"did not complete in {scale.churn_budget:g} s ({len(done)} of {total} adds)"
    )
    floor_rate = total / batch_seconds if batch_seconds > 0 else None
    latencies = [(a.answered - a.sent) * 1e3 for a in done]
    lat = Summary.of(latencies)
    e2e = Summary.of([(t - a.sent) * 1e3 for t, a in zip(arrived, done, strict=True)])
    behind = Summary.of([(t - a.answered) * 1e3 for t, a in zip(arrived, done, strict=True)])
    last_remote = (
        f"the last remote entry {remote_done - answered[-1]:+.2f} s after the last answer"
        if remote_done is not None
        else "remote kernels did not complete"
    )
    lag_note = withheld or (
        f"p50 {e2e.p50:.1f} ms; behind the client's answer: p50 {behind.p50:+.1f} ms, "
        f"p99 {behind.p99:+.1f} ms (negative: kernels ahead of the answer); {last_remote}"
    )
    rows: list[tuple[float | None, float | None, str, str]] = [
        (rate, floor_rate, short, ">= 200/s"),
        # No target here: with every client always waiting, p99 is clients / rate (the paced run's is).
        (lat.p99, batch_seconds / total * 1e3, f"p50 {lat.p50:.1f} ms, n={lat.n}", ""),
        (None if withheld or math.isinf(e2e.p99) else e2e.p99, floor.p99, lag_note, ""),
    ]
    k = 100 if len(done) >= 200 else len(done) // 2
    if k >= 2:
        first = (k - 1) / (answered[k - 1] - answered[0]) if answered[k - 1] > answered[0] else None
        last = (k - 1) / (answered[-1] - answered[-k]) if answered[-1] > answered[-k] else None
        rows.append((last, first, f"last {k} adds vs first {k}" + (f"; {short}" if short else ""), "flat"))
    else:
        rows.append((None, None, "too few adds completed", "flat"))
    offered = len(result.samples.get(f"{store}/paced/add_seconds", []))
    if paced:
        p = Summary.of([v * 1e3 for v in paced])
        missing = f"; {offered - p.n} of {offered} failed or did not complete" if p.n < offered else ""
        paced_note = (
            f"p50 {p.p50:.1f} ms, max {p.max:.1f} ms, n={p.n}{missing}; timed from when each add was due; "
            f"at saturation above, p99 is about {scale.churn_clients} clients / the rate"
        )
        rows.append((p.p99, batch_seconds / total * 1e3, paced_note, "<= 20 ms"))
    else:
        rows.append((None, None, f"no paced add completed ({offered} offered)", "<= 20 ms"))
    for (name, unit, what), (value, base, note, goal) in zip(spec, rows, strict=True):
        result.add(Figure(NAME, name, value, unit, base, what, note, goal))
