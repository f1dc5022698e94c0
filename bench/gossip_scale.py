"""Gossip at scale: 1,000 GossipNodes in one process over a simulated LAN, in simulated time.

    .venv/bin/python bench/gossip_scale.py [--quick] [--members N] [--trials T] [--json PATH]

What runs for real: every member's `GossipNode` — SWIM probes, pushes,
anti-entropy, AES-GCM framing, the strict schema. What is simulated: the wire
(`overlayd.gossip.simnet`: one-way latency uniform in 0.1-0.5 ms, random loss,
one CPU per host that spends `cpu` seconds on each datagram it handles) and time
(`overlayd.gossip.virtualtime`: the loop jumps to the next timer when nothing is
runnable, so 1,000 members' timers cost no wall time). Timings are simulated
LAN time, not this machine's.

Figures, each printed beside a baseline from the same run:

- spread: a record published at a random member; time until 99.99% and 100%
  of the others hold it (p50/p99/max over the trials), and the share of all
  (member, record) deliveries within 100 ms — the target is 99.99%.
  Baselines: the ideal push, ceil(log_f N) hops of mean one-way latency; and
  Docker's NetworkDB strategy (each member sends pending events to 3 random
  peers every 200 ms, a bounded number of times, plus a full-table sync with
  one peer every 30 s), simulated here on the same link model.
- traffic: bytes sent per member per second at rest and under churn (a steady
  rate of changes spread over the members), against Docker's full-table sync.
- all of it at 0%, 1% and 5% loss.

Tables start converged: every member's own node record is put into every
table directly (as after a full sync) rather than gossiped N times, which would
only make the run longer; every change after that travels over the network.

For the bench runner: `run(quick) -> dict` (quick: 150 members, for
development) or `main()`; both write `bench/results/gossip_scale.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from overlayd.gossip import GossipMetrics, GossipNode, Keyring, Record, framing, schema
from overlayd.gossip.clock import LoopClock
from overlayd.gossip.schema import MemberState, MemberUpdate, Push
from overlayd.gossip.simnet import LinkModel, SimNetwork
from overlayd.gossip.virtualtime import VirtualTimeLoop

RESULTS = Path(__file__).resolve().parent / "results" / "gossip_scale.json"
TARGET_SHARE = 0.9999
TARGET_WITHIN = 0.100  # seconds
KEY = bytes(range(32))  # a fixed key: the bench is reproducible with --seed
# What a member publishes: an endpoint record of the size the daemon's are.
ENDPOINT = {
    "network": "demo",
    "name": "cni-0123456789ab-eth0-4f2a",
    "ip": "10.100.3.17",
    "mac": "02:42:0a:64:03:11",
    "vtep": "198.18.0.11",
    "created_at": 1_700_000_000.123,
}
NODE = {"name": "", "vtep": "198.18.0.11", "gossip": "198.18.0.11:7946", "started_at": 1_700_000_000.0}


# One-way latency of a switched LAN, and the CPU a host spends on one datagram (this code's
# cost on a server core: framing, schema, merge; measured here it is higher, see the output).
LAN = LinkModel(latency=(0.0001, 0.0005), cpu=0.00005)


@dataclass(frozen=True)
class Settings:
    members: int = 1000
    trials: int = 30  # publishes per loss level: 30 x 999 deliveries, enough to tell 99.99%
    spacing: float = 0.25  # simulated seconds between publishes
    rest: float = 20.0  # simulated seconds of traffic measured at rest
    churn: float = 10.0  # ... and under churn
    churn_rate: float = 5.0  # changes per second, cluster-wide, from random members
    losses: tuple[float, ...] = (0.0, 0.01, 0.05)
    # Churn costs N x fanout datagrams per change, which is most of the run's CPU: it is
    # measured at these loss levels only (the spread trials give the cost per change at all).
    churn_losses: tuple[float, ...] = (0.0,)
    link: LinkModel = LAN
    seed: int = 1
    join: bool = False  # form membership by joins (slow here; see form) or start from full tables

    @classmethod
    def quick(cls) -> Settings:
        return cls(members=150, trials=20, rest=10.0, churn=10.0, churn_rate=5.0)


# --- the simulated cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    net: SimNetwork
    nodes: list[GossipNode]
    registry: CollectorRegistry
    learned: list[dict[tuple[str, str, str], float]]  # per member: ident -> when it arrived
    formed_in: float = 0.0
    drained_in: float = 0.0

    def sent(self, kind: str) -> float:
        return self.registry.get_sample_value("overlayd_gossip_messages_sent_total", {"type": kind}) or 0.0


def address(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


async def form(s: Settings, rng: random.Random) -> Cluster:
    """Start the members and wait until every one sees every other alive.

    With `s.join` they join through the first three (like a config's peer list), all within
    two seconds: SWIM's join storm, O(N^2) datagrams and minutes of piggybacked news at a
    thousand members, which costs this machine more than everything measured after it.
    Without, each starts knowing the others (as after a full sync), as tables do.
    """
    loop = asyncio.get_running_loop()
    net = SimNetwork(s.link, rng=random.Random(rng.random()))
    registry = CollectorRegistry()
    metrics = GossipMetrics(registry)  # shared: the counters are the cluster's totals
    clock = LoopClock(loop)
    learned: list[dict[tuple[str, str, str], float]] = [{} for _ in range(s.members)]
    seeds = [(address(i), 7946) for i in range(min(3, s.members))] if s.join else []
    nodes = []
    for i in range(s.members):

        def on_change(rec: Record, box: dict[tuple[str, str, str], float] = learned[i]) -> None:
            box.setdefault(rec.ident, loop.time())

        nodes.append(
            GossipNode(
                f"m{i:04}",
                keyring=Keyring([KEY]),
                bind=address(i),
                port=7946,
                seeds=seeds,
                on_change=on_change,
                metrics=metrics,
                network=net,
                clock=clock,
                incarnation=1,
            )
        )
    c = Cluster(net, nodes, registry, learned)
    if not s.join:
        everyone = [MemberUpdate(n.name, address(i), 7946, MemberState.ALIVE, 1) for i, n in enumerate(nodes)]
        for n in nodes:
            for u in everyone:
                if u.name != n.name:
                    n._ms.apply(u, snapshot=True)  # the table's own merge; nothing to announce
    start = loop.time()
    # Hosts come up over a couple of seconds, as they would after a rack power-on.
    for node in nodes:
        await node.start()
        await asyncio.sleep(2.0 / s.members if s.join else 0.0)
    while not formed(nodes):
        if loop.time() - start > 600:
            raise RuntimeError("membership did not converge within 600 s of simulated time")
        await asyncio.sleep(1.0)
    c.formed_in = loop.time() - start
    preload(c)
    # SWIM spreads the news of each join on later pings (a bounded number of times per
    # member); after a thousand joins at once that takes minutes. Rest is measured after it.
    start = loop.time()
    while any(n._ms.pending_news() for n in nodes) and loop.time() - start < 600:  # noqa: ASYNC110
        await asyncio.sleep(5.0)
    c.drained_in = loop.time() - start
    return c


def formed(nodes: list[GossipNode]) -> bool:
    """Every member sees every other alive. Cheaply: their membership trees (see sumtree) hold
    every member and agree, so each holds each member as the member holds itself: alive."""
    trees = [n._ms.tree for n in nodes]
    return all(len(t) == len(nodes) for t in trees) and len({t.root for t in trees}) == 1


def progress(what: str) -> None:
    print(f"[gossip_scale {time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def preload(c: Cluster) -> None:
    """Every member's node record in every table, as after a full sync (see the module doc)."""
    real_cut, c.net.cut = c.net.cut, lambda src, dst: True  # the owners' pushes go nowhere
    try:
        recs = [n.publish("node", n.name, {**NODE, "name": n.name}) for n in c.nodes]
    finally:
        c.net.cut = real_cut
    for n in c.nodes:
        for r in recs:
            if r.owner != n.name:
                n._table.apply(r)  # the table's own merge, without the callbacks
                n._table.advance(r.owner, (0, 0), r.stamp)  # and complete up to it, as a sync says


# --- spread -----------------------------------------------------------------------------------------


@dataclass
class Spread:
    loss: float
    trials: int
    receivers: int
    t100: list[float]  # per trial: seconds until every other member held the record
    delivery: dict[str, float]  # quantiles of all (member, record) delivery times, pooled
    within: float  # share of those deliveries within TARGET_WITHIN
    missed_by_push: int  # deliveries that came later than 1 s (by anti-entropy)
    datagrams_per_change: float
    bytes_per_member_per_change: float


async def spread(c: Cluster, s: Settings, rng: random.Random, loss: float) -> Spread:
    loop = asyncio.get_running_loop()
    c.net.model = replace(s.link, loss=loss)
    await asyncio.sleep(2.0)  # let the loss settle in (suspicions and refutations)
    published: list[tuple[int, Record, float]] = []
    before_pushes = c.sent("push")
    for t in range(s.trials):
        i = rng.randrange(len(c.nodes))
        rec = c.nodes[i].publish("endpoint", f"demo/spread-{loss}-{t}", {**ENDPOINT, "name": f"t{t}"})
        published.append((i, rec, loop.time()))
        await asyncio.sleep(s.spacing)
    pushes = c.sent("push") - before_pushes
    # What one push of such a record weighs on the wire (the counters do not split bytes by type).
    push_bytes = pushes * (framing.overhead(len("m0000")) + len(schema.encode(Push(8, (published[0][1],)))))

    def missing() -> int:
        return sum(
            1 for i, rec, _ in published for j, box in enumerate(c.learned) if j != i and rec.ident not in box
        )

    # Stragglers arrive by anti-entropy; wait for them (bounded) so the tail is measured, not guessed.
    deadline = loop.time() + 120
    while missing() and loop.time() < deadline:  # noqa: ASYNC110 (simulated time: polling is free)
        await asyncio.sleep(1.0)
    t100, pooled = [], []
    for i, rec, t0 in published:
        times = [box.get(rec.ident, math.inf) - t0 for j, box in enumerate(c.learned) if j != i]
        pooled += times
        t100.append(max(times))
    return Spread(
        loss=loss,
        trials=s.trials,
        receivers=len(c.nodes) - 1,
        t100=t100,
        delivery=delivery_quantiles(pooled),
        within=sum(t <= TARGET_WITHIN for t in pooled) / len(pooled),
        missed_by_push=sum(t > 1.0 for t in pooled),
        datagrams_per_change=pushes / s.trials,
        bytes_per_member_per_change=push_bytes / s.trials / len(c.nodes),
    )


# --- traffic ----------------------------------------------------------------------------------------


@dataclass
class Traffic:
    loss: float
    seconds: float
    changes_per_second: float
    bytes_per_member_per_second: float
    datagrams_per_member_per_second: float
    by_type: dict[str, float]  # datagrams per member per second, by message type


_TYPES = (
    "ping",
    "ack",
    "ping-req",
    "push",
    "digest",
    "request",
    "records",
    "members",
    "sums",
    "watermarks",
    "member-entries",
)


async def traffic(c: Cluster, s: Settings, rng: random.Random, seconds: float, rate: float) -> Traffic:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(2.0)
    before = c.net.total()
    types = {t: c.sent(t) for t in _TYPES}
    start = loop.time()
    n = 0
    while loop.time() - start < seconds:
        if rate > 0:
            node = rng.choice(c.nodes)
            node.publish("endpoint", f"demo/{node.name}-churn", {**ENDPOINT, "name": f"c{n}"})
            n += 1
            await asyncio.sleep(rng.expovariate(rate))
        else:
            await asyncio.sleep(seconds)
    took = loop.time() - start
    after = c.net.total()
    per = len(c.nodes) * took
    return Traffic(
        loss=c.net.model.loss,
        seconds=took,
        changes_per_second=n / took,
        bytes_per_member_per_second=(after.bytes - before.bytes) / per,
        datagrams_per_member_per_second=(after.datagrams - before.datagrams) / per,
        by_type={t: round((c.sent(t) - types[t]) / per, 3) for t in _TYPES if c.sent(t) > types[t]},
    )


# --- the baseline: Docker's NetworkDB strategy on the same link model ------------------------------


@dataclass
class DockerModel:
    interval: float = 0.2  # gossip round
    peers: int = 3  # random peers per round
    retransmit_mult: int = 4  # memberlist's: each event goes out mult * ceil(log10(N + 1)) times
    full_sync: float = 30.0  # seconds between full-table syncs with one random peer


DOCKER = DockerModel()


def docker_spread(
    n: int, link: LinkModel, rng: random.Random, trials: int, model: DockerModel = DOCKER
) -> tuple[list[float], list[float]]:
    """Event simulation of one change spreading the NetworkDB way: per-trial times until all
    hold it, and every delivery time. Its full sync repairs what the rounds miss."""
    limit = model.retransmit_mult * math.ceil(math.log10(n + 1))
    t100: list[float] = []
    pooled: list[float] = []
    for _ in range(trials):
        phase = [rng.uniform(0, model.interval) for _ in range(n)]  # each member's round clock
        sync_phase = [rng.uniform(0, model.full_sync) for _ in range(n)]
        has = [math.inf] * n
        left = [0] * n
        origin = rng.randrange(n)
        has[origin], left[origin] = 0.0, limit
        events: list[tuple[float, int, int]] = [(phase[origin], 0, origin)]  # (time, kind, member)
        for i in range(n):
            heapq.heappush(events, (sync_phase[i], 2, i))
        lo, hi = link.latency
        while events:
            now, kind, i = heapq.heappop(events)
            if all(t < math.inf for t in has) and now > max(has):
                break
            if kind == 0 and left[i] > 0:  # a gossip round of member i
                for j in rng.sample(range(n), model.peers):
                    if j != i and rng.random() >= link.loss:
                        heapq.heappush(events, (now + rng.uniform(lo, hi), 1, j))
                left[i] -= model.peers
                if left[i] > 0:
                    heapq.heappush(events, (now + model.interval, 0, i))
            elif kind == 1 and has[i] == math.inf:  # an event arrives: news, re-broadcast it
                has[i], left[i] = now, limit
                heapq.heappush(events, (now + (phase[i] - now) % model.interval, 0, i))
            elif kind == 2:  # full sync with a random peer: both end with the union
                j = rng.randrange(n)
                if rng.random() >= link.loss:
                    t = now + rng.uniform(lo, hi)
                    if has[i] < now and has[j] == math.inf:
                        heapq.heappush(events, (t, 1, j))
                    elif has[j] < now and has[i] == math.inf:
                        heapq.heappush(events, (t + rng.uniform(lo, hi), 1, i))
                heapq.heappush(events, (now + model.full_sync, 2, i))
        times = [t for k, t in enumerate(has) if k != origin]
        pooled += times
        t100.append(max(times))
    return t100, pooled


# --- running and reporting --------------------------------------------------------------------------


def quantiles(xs: Sequence[float]) -> dict[str, float]:
    ys = sorted(xs)
    return {
        "p50": statistics.median(ys),
        "p99": ys[min(len(ys) - 1, math.ceil(0.99 * len(ys)) - 1)],
        "max": ys[-1],
    }


def delivery_quantiles(times: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.99 and max of delivery times (the target is about p99.99)."""
    ys = sorted(times)

    def at(q: float) -> float:
        return ys[min(len(ys) - 1, math.ceil(q * len(ys)) - 1)]

    return {"p50": at(0.5), "p99": at(0.99), "p99.99": at(TARGET_SHARE), "max": ys[-1]}


def ms(q: dict[str, float]) -> str:
    return " / ".join(f"{v * 1e3:.2f}" if v < math.inf else "inf" for v in q.values()) + " ms"


@dataclass
class Results:
    settings: dict[str, Any]
    formed_in: float = 0.0
    drained_in: float = 0.0
    wall_formed: float = 0.0
    fanout: int = 0
    wall_seconds: float = 0.0
    wall_per_datagram_us: float = 0.0
    record_bytes: int = 0
    spread: list[dict[str, Any]] = field(default_factory=list)
    traffic: list[dict[str, Any]] = field(default_factory=list)
    baselines: dict[str, Any] = field(default_factory=dict)
    target_met: bool = False


async def _simulate(s: Settings) -> Results:
    # A thousand members hold millions of objects; full collections would scan them all
    # again and again (nothing here makes cycles worth chasing that often).
    gc.set_threshold(100_000, 50, 1000)
    rng = random.Random(s.seed)
    wall = time.perf_counter()
    out = Results(settings=_plain(asdict(s)))
    progress(f"forming {s.members} members")
    c = await form(s, rng)
    progress(
        f"formed in {c.formed_in:.0f} s simulated, join news drained in {c.drained_in:.0f} s more"
        if s.join
        else "started from full tables"
    )
    out.formed_in = c.formed_in
    out.drained_in = c.drained_in
    out.wall_formed = time.perf_counter() - wall
    out.fanout = c.nodes[0]._fanout()
    out.record_bytes = len(json.dumps(ENDPOINT))
    for loss in s.losses:
        progress(f"loss {loss:.0%}: spread, {s.trials} trials")
        sp = await spread(c, s, rng, loss)
        progress(f"loss {loss:.0%}: traffic")
        out.spread.append(_plain(asdict(sp)))
        out.traffic.append(_plain(asdict(await traffic(c, s, rng, s.rest, 0.0))))
        if loss in s.churn_losses:
            out.traffic.append(_plain(asdict(await traffic(c, s, rng, s.churn, s.churn_rate))))
    out.wall_seconds = time.perf_counter() - wall
    out.wall_per_datagram_us = out.wall_seconds / max(1, c.net.total().datagrams) * 1e6
    for n in c.nodes:
        await n.stop(leave=False)
    return out


def _plain(v: Any) -> Any:
    """JSON-safe: infinities become None."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, LinkModel):
        return _plain(asdict(v))
    return v


def _baselines(s: Settings, out: Results, rng: random.Random) -> None:
    lo, hi = s.link.latency
    hops = math.ceil(math.log(s.members) / math.log(out.fanout))
    out.baselines["ideal_push_s"] = hops * ((lo + hi) / 2 + s.link.cpu)
    out.baselines["ideal_hops"] = hops
    docker: dict[str, Any] = {}
    for loss in s.losses:
        t100, pooled = docker_spread(s.members, replace(s.link, loss=loss), rng, max(5, s.trials // 4))
        docker[str(loss)] = {
            "t100": quantiles(t100),
            "delivery": delivery_quantiles(pooled),
            "within": sum(t <= TARGET_WITHIN for t in pooled) / len(pooled),
        }
    out.baselines["docker_spread"] = docker
    # Docker's full sync: every member sends its whole table to one peer and gets the peer's
    # back every 30 s; here the table is one node record per member plus one endpoint each.
    table = s.members * (out.record_bytes + len(json.dumps(NODE)) + 60)
    out.baselines["docker_full_sync_bytes_per_member_per_second"] = 2 * table / DockerModel.full_sync


def _print(s: Settings, r: Results) -> None:
    p = print
    p(
        f"gossip at scale: {s.members} members, simulated LAN (one-way {s.link.latency[0] * 1e3:.1f}-"
        f"{s.link.latency[1] * 1e3:.1f} ms, {s.link.cpu * 1e6:.0f} us CPU per datagram), fanout {r.fanout}"
    )
    p(
        (
            f"membership formed by joins in {r.formed_in:.1f} s simulated, join news drained "
            f"{r.drained_in:.0f} s later ({r.wall_formed:.0f} s wall)"
            if s.join
            else f"membership and tables start full, as after a sync ({r.wall_formed:.0f} s wall)"
        )
        + f"; run took {r.wall_seconds:.0f} s wall, {r.wall_per_datagram_us:.0f} us per datagram"
    )
    p(
        f"ideal push: {r.baselines['ideal_hops']} hops x mean one-way latency = "
        f"{r.baselines['ideal_push_s'] * 1e3:.2f} ms"
    )
    p(f"{'spread of one change':<48}{'overlayd':>36}   {'Docker NetworkDB model':>36}")
    for sp in r.spread:
        loss = sp["loss"]
        d = r.baselines["docker_spread"][str(loss)]
        t100 = quantiles([x if x is not None else math.inf for x in sp["t100"]])
        deliv = {k: v if v is not None else math.inf for k, v in sp["delivery"].items()}
        p(f"  loss {loss:4.0%}  delivery p50/p99/p99.99/max  {ms(deliv):>36}   {ms(d['delivery']):>36}")
        p(f"             until all hold it (per trial)  {ms(t100):>28}   {ms(d['t100']):>28}")
        p(
            f"             deliveries <= 100 ms    {sp['within']:>27.4%}    {d['within']:>27.4%}"
            f"   (target {TARGET_SHARE:.2%}); {sp['missed_by_push']} late (> 1 s, by anti-entropy)"
        )
        p(
            f"             per change: {sp['datagrams_per_change']:.0f} push datagrams, "
            f"{sp['bytes_per_member_per_change']:.0f} B per member"
        )
    full = r.baselines["docker_full_sync_bytes_per_member_per_second"]
    p(f"traffic, bytes per member per second (baseline: Docker's full sync every 30 s = {full:.0f} B/s)")
    for t in r.traffic:
        what = "at rest" if t["changes_per_second"] == 0 else f"{t['changes_per_second']:.0f} changes/s"
        types = ", ".join(f"{k} {v:.2f}" for k, v in sorted(t["by_type"].items()))
        p(
            f"  loss {t['loss']:4.0%}  {what:>15}: {t['bytes_per_member_per_second']:8.0f} B/s, "
            f"{t['datagrams_per_member_per_second']:.2f} datagrams/s ({types})"
        )
    p(
        f"target (99.99% of deliveries within 100 ms at every loss level): "
        f"{'met' if r.target_met else 'MISSED'}"
    )


def run(quick: bool = False, settings: Settings | None = None, out: Path | None = RESULTS) -> dict[str, Any]:
    """Run the benchmark (in simulated time); the results as a dict, also written to `out`."""
    s = settings or (Settings.quick() if quick else Settings())

    def simulate() -> Results:
        thresholds = gc.get_threshold()
        try:
            with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
                return runner.run(_simulate(s))
        finally:
            gc.set_threshold(*thresholds)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        r = simulate()
    else:  # called from async code: the simulation needs a loop of its own
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            r = pool.submit(simulate).result()
    _baselines(s, r, random.Random(s.seed + 1))
    r.target_met = all(sp["within"] >= TARGET_SHARE for sp in r.spread)
    _print(s, r)
    data = _plain(asdict(r))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    return dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="150 members, fewer trials (development)")
    ap.add_argument("--members", type=int)
    ap.add_argument("--trials", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--join", action="store_true", help="form membership by joins (slow at 1,000)")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"where to write results ({RESULTS})")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    changes: dict[str, Any] = {
        k: getattr(args, k) for k in ("members", "trials", "seed", "join") if getattr(args, k)
    }
    s = replace(s, **changes)
    r = run(settings=s, out=args.json)
    print(f"results: {args.json}")
    return 0 if r["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
