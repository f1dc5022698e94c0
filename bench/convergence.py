"""Convergence latency: gossip path vs KV-watch path, measured in one run.

    sudo .venv/bin/python bench/convergence.py [--hosts 5] [--endpoints 40]

Builds a lab per mode (etcd without gossip, gossip-only, etcd with gossip),
creates endpoints one after another on h1, and reads every other host's
`overlayd_convergence_latency_seconds` histogram: the time from an endpoint's
creation at its owner to its entries being programmed in that host's kernel.
Prints median and p99 per mode and the ratio against the KV-watch baseline.
Endpoints made while the lab forms (the demo ones) are left out: this is the
steady state, not the cold start.
Quantiles are interpolated inside histogram buckets, as Prometheus does.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from collections.abc import Callable

from overlayd.lab import Lab

_BUCKET = re.compile(
    r'^overlayd_convergence_latency_seconds_bucket\{le="([^"]+)",path="(\w+)"\} ([0-9.e+]+)$', re.M
)


def histogram(lab: Lab, hosts: list[str]) -> dict[str, list[tuple[float, float]]]:
    """path -> cumulative (upper bound, count) summed over `hosts`."""
    total: dict[str, dict[float, float]] = {}
    for host in hosts:
        _, body = lab.status_get(host, "/metrics")
        for le, path, count in _BUCKET.findall(body.decode()):
            bound = float("inf") if le == "+Inf" else float(le)
            total.setdefault(path, {}).setdefault(bound, 0.0)
            total[path][bound] += float(count)
    return {path: sorted(b.items()) for path, b in total.items()}


def _minus(
    now: dict[str, list[tuple[float, float]]], then: dict[str, list[tuple[float, float]]]
) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for path, buckets in now.items():
        earlier = dict(then.get(path, []))
        out[path] = [(bound, count - earlier.get(bound, 0.0)) for bound, count in buckets]
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    count = buckets[-1][1]
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower_bound
            inside = cumulative - lower_count
            share = (rank - lower_count) / inside if inside else 0.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def run_mode(name: str, make: Callable[[], Lab], endpoints: int) -> dict[str, tuple[float, float, float]]:
    lab = make()
    try:
        lab.up()
        others = [h.name for h in lab.hosts if h.name != "h1"]
        # Endpoints made while the lab was still forming (the demo ones) are not counted.
        before = histogram(lab, others)
        for i in range(endpoints):
            lab.add_endpoint("h1", f"b{i}")
        deadline = time.monotonic() + 30
        while True:
            hist = _minus(histogram(lab, others), before)
            seen = sum(b[-1][1] for b in hist.values())
            if seen >= endpoints * len(others) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return {path: (b[-1][1], quantile(b, 0.5), quantile(b, 0.99)) for path, b in hist.items() if b[-1][1]}
    finally:
        lab.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--endpoints", type=int, default=40)
    args = parser.parse_args()
    tag = "bc" + secrets.token_hex(2)
    modes: list[tuple[str, Callable[[], Lab]]] = [
        ("etcd, watch only", lambda: Lab(hosts=args.hosts, prefix=f"{tag}a", store="etcd")),
        ("gossip only", lambda: Lab(hosts=args.hosts, prefix=f"{tag}b", store="gossip")),
        ("etcd + gossip", lambda: Lab(hosts=args.hosts, prefix=f"{tag}c", store="etcd", gossip=True)),
    ]
    results = {name: run_mode(name, make, args.endpoints) for name, make in modes}
    baseline = results["etcd, watch only"].get("kv")
    print(f"convergence latency, {args.hosts} hosts, {args.endpoints} endpoints created on h1")
    print(f"{'mode':18} {'path':7} {'samples':>7} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs kv':>10}")
    for name, paths in results.items():
        for path, (count, p50, p99) in sorted(paths.items()):
            ratio = f"{p50 / baseline[1]:.2f}x" if baseline and baseline[1] else "-"
            print(f"{name:18} {path:7} {int(count):7d} {p50 * 1e3:8.1f} {p99 * 1e3:8.1f} {ratio:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
