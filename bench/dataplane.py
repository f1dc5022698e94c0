"""Dataplane: TCP throughput between endpoints on two hosts: VXLAN, routed, same host, underlay.

In the same run, iperf3 between:

- h1's demo endpoint and h2's, over VXLAN (through both daemons' bridges and devices);
- two endpoints of a routed network (`--mode routed`) on h1 and h2, which share the
  underlay segment: routed by the hosts without encapsulation;
- two endpoints of that routed network on h1 (the same-host pair: one bridge, no routing);
- the two hosts themselves over the same veths and underlay bridge.

Each path is measured once per round, every other round in the reverse order,
and each figure is the median over the rounds: on a lab machine every path is
CPU-bound (no NIC limits it), so one round's figures move by tens of percent
with whatever else the machine does; interleaved rounds and medians keep one
slow moment from favouring a path. The note gives each path's spread. The
control plane should cost the dataplane nothing: the ratios are what VXLAN
encapsulation, and routing instead of it, cost here. Targets (issue 11): routed
at least 0.9 of the underlay, and within 5% of the same-host pair.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.context import Context, lab_key
from bench.report import BenchResult, Figure
from overlayd.api.client import ClientError
from overlayd.lab import Lab, LabError
from overlayd.lab import netns as nsh
from overlayd.lab.lab import Endpoint

NAME = "dataplane"
PORT = 5201
BASE_WHAT = "iperf3 between the two hosts over the underlay (same veths and bridge, no VXLAN)"
SAME_HOST_WHAT = "iperf3 between two endpoints of the routed network on h1 (one bridge, no routing)"
ROUTED_NETWORK = "bench-routed"
ROUTED_SUBNET = "10.120.0.0/24"
ROUTED_GATEWAY = "10.120.0.1"


def _listening(netns: str, port: int) -> bool:
    out = nsh.run_in(netns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def iperf(server_ns: str, client_ns: str, ip: str, seconds: int) -> float:
    """Gbit/s received by a one-off iperf3 server in `server_ns` from a client in `client_ns`.

    A fresh server per attempt, and the client only once it listens: a client
    that connects too early ends a one-off server with an error report.
    """
    last = ""
    for _attempt in range(3):
        server = subprocess.Popen(
            nsh.exec_argv(server_ns, ["iperf3", "-s", "-1", "-B", ip, "-p", str(PORT)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not _listening(server_ns, PORT) and time.monotonic() < deadline:
                time.sleep(0.05)
            done = subprocess.run(
                nsh.exec_argv(client_ns, ["iperf3", "-c", ip, "-p", str(PORT), "-t", str(seconds), "-J"]),
                capture_output=True,
                text=True,
                timeout=seconds + 30,
            )
            data: Any = None
            try:
                data = json.loads(done.stdout)
                return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
            except (ValueError, KeyError, TypeError):
                error = data.get("error") if isinstance(data, dict) else None
                last = str(error or (done.stdout[-300:] + done.stderr[-300:]).strip())
        finally:
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    raise RuntimeError(f"iperf3 failed 3 times, last: {last}")


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    name = "TCP endpoint h1 -> endpoint h2 over the overlay"
    if shutil.which("iperf3") is None:
        result.add(
            Figure(
                NAME,
                name,
                None,
                "Gbit/s",
                None,
                BASE_WHAT,
                "n/a: iperf3 not installed (make bench installs it)",
            )
        )
        return result
    hosts = min(ctx.scale.conv_hosts)
    key = lab_key("gossip", hosts)
    try:
        lab = ctx.lab(key, hosts=hosts, store="gossip")
    except LabError as exc:
        result.add(
            Figure(
                NAME, name, None, "Gbit/s", None, BASE_WHAT, f"lab did not form: {str(exc).splitlines()[0]}"
            )
        )
        return result
    try:
        rates = measure(ctx, lab)
    except Exception:
        ctx.discard(lab)
        raise
    ctx.release(lab, key)
    note = (
        f"{ctx.scale.iperf_seconds} s each, median of {ctx.scale.iperf_rounds} interleaved rounds; "
        f"spread (min-max Gbit/s): {rates.spread}"
    )
    result.add(Figure(NAME, name, rates.vxlan, "Gbit/s", rates.underlay, BASE_WHAT, note))
    result.add(
        Figure(
            NAME,
            "TCP endpoint h1 -> endpoint h2, routed (one segment, no VXLAN)",
            rates.routed,
            "Gbit/s",
            rates.underlay,
            BASE_WHAT,
            note,
            target=">= 0.9 x underlay",
        )
    )
    result.add(
        Figure(
            NAME,
            "TCP routed h1 -> h2 against a same-host pair",
            rates.routed,
            "Gbit/s",
            rates.same_host,
            SAME_HOST_WHAT,
            note,
            target=">= 0.95 x same-host pair",
        )
    )
    return result


@dataclass(frozen=True)
class Rates:
    """Gbit/s of each path, measured in the same run."""

    vxlan: float
    routed: float
    same_host: float
    underlay: float
    spread: str  # each path's min-max over the rounds


def measure(ctx: Context, lab: Lab) -> Rates:
    h1, h2 = lab.hosts[:2]
    src = next(ep for ep in lab.endpoints if ep.host == h1.name and ep.network == "demo")
    dst = next(ep for ep in lab.endpoints if ep.host == h2.name and ep.network == "demo")
    lab.wait_ping(src.netns, dst.ip, timeout=15.0)
    lab.create_network(ROUTED_NETWORK, ROUTED_SUBNET, gateway=ROUTED_GATEWAY, mode="routed")
    made: list[Endpoint] = []
    try:
        for host, name in ((h1, "brt-1"), (h2, "brt-2"), (h1, "brt-3")):
            made.append(lab.add_endpoint(host, name, network=ROUTED_NETWORK))
        r1, r2, r3 = made
        lab.wait_ping(r1.netns, r2.ip, timeout=15.0)
        lab.wait_ping(r1.netns, r3.ip, timeout=15.0)
        seconds = ctx.scale.iperf_seconds
        paths: dict[str, Callable[[], float]] = {
            "underlay": lambda: iperf(h2.netns, h1.netns, h2.address, seconds),
            "vxlan": lambda: iperf(dst.netns, src.netns, dst.ip, seconds),
            "routed": lambda: iperf(r2.netns, r1.netns, r2.ip, seconds),
            "same_host": lambda: iperf(r3.netns, r1.netns, r3.ip, seconds),
        }
        rounds = ctx.scale.iperf_rounds
        ctx.say(f"dataplane: iperf3 {seconds} s each over {', '.join(paths)}, {rounds} rounds")
        got: dict[str, list[float]] = {name: [] for name in paths}
        for k in range(rounds):
            order = list(paths) if k % 2 == 0 else list(reversed(paths))
            for name in order:
                got[name].append(paths[name]())
        mid = {name: statistics.median(values) for name, values in got.items()}
        spread = ", ".join(f"{name} {min(v):.1f}-{max(v):.1f}" for name, v in got.items())
        return Rates(mid["vxlan"], mid["routed"], mid["same_host"], mid["underlay"], spread)
    finally:
        # The lab goes on to the next benchmark as it came.
        for ep in made:
            try:
                lab.admin(ep.host).endpoint_remove(network=ROUTED_NETWORK, name=ep.name)
                lab.forget_endpoint(ep)
            except ClientError as exc:
                ctx.say(f"dataplane: removing {ep.name}: {exc}")
        try:
            lab.admin(h1).network_remove(ROUTED_NETWORK)
        except ClientError as exc:
            ctx.say(f"dataplane: removing network {ROUTED_NETWORK}: {exc}")
