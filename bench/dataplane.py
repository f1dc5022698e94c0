"""Dataplane: TCP throughput between endpoints on two hosts, over the overlay and over the underlay.

iperf3 from h1's demo endpoint to h2's (over VXLAN, through both daemons'
bridges and devices), then between the two hosts themselves over the same
veths and underlay bridge, in the same run. The control plane should cost
the dataplane nothing: the ratio is what VXLAN encapsulation costs here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

from bench.context import Context, lab_key
from bench.report import BenchResult, Figure
from overlayd.lab import Lab, LabError
from overlayd.lab import netns as nsh

NAME = "dataplane"
PORT = 5201
BASE_WHAT = "iperf3 between the two hosts over the underlay (same veths and bridge, no VXLAN)"


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
        overlay, underlay = measure(ctx, lab)
    except Exception:
        ctx.discard(lab)
        raise
    ctx.release(lab, key)
    result.add(
        Figure(NAME, name, overlay, "Gbit/s", underlay, BASE_WHAT, f"{ctx.scale.iperf_seconds} s each")
    )
    return result


def measure(ctx: Context, lab: Lab) -> tuple[float, float]:
    h1, h2 = lab.hosts[:2]
    src = next(ep for ep in lab.endpoints if ep.host == h1.name)
    dst = next(ep for ep in lab.endpoints if ep.host == h2.name)
    lab.wait_ping(src.netns, dst.ip, timeout=15.0)
    seconds = ctx.scale.iperf_seconds
    ctx.say(f"dataplane: iperf3 {seconds} s over the overlay, then over the underlay")
    overlay = iperf(dst.netns, src.netns, dst.ip, seconds)
    underlay = iperf(h2.netns, h1.netns, h2.address, seconds)
    return overlay, underlay
