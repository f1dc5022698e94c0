"""The multi-host lab once per KV backend: real daemons, real server, real kernel, real pings.

The thorough end-to-end tests (test_e2e.py) run on etcd; this one proves the
same lab works on every backend: all pairs ping, a deletion reaches every
host, and a SIGKILLed host's endpoint expires with its lease/session.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from overlayd.lab import Lab
from overlayd.lab.lab import STORES, Endpoint

pytestmark = pytest.mark.root

# Seconds: a killed host's records go within a few seconds, so CI stays quick.
# (Consul refuses session TTLs under 10 s.)
LEASE_TTLS = {"consul": 10}
DEFAULT_TTL = 6  # a restart on a loaded 2-core machine takes a few seconds


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def programmed(lab: Lab, host: str, ep: Endpoint) -> bool:
    """`host` has the permanent FDB entry for `ep` pointing at its owner's VTEP."""
    owner = lab.host(ep.host).address
    return any(
        entry.get("mac") == ep.mac
        and entry.get("dst") == owner
        and entry.get("ifname", "").startswith("ovvx")
        for entry in lab.fdb(host)
    )


@pytest.mark.parametrize("store", STORES)
def test_lab_on_each_backend(make_lab: Callable[..., Lab], store: str) -> None:
    ttl = LEASE_TTLS.get(store, DEFAULT_TTL)
    lab = make_lab(3, store=store, lease_ttl=ttl)
    assert lab.describe(live=False)["store"]["kind"] == store
    results = lab.ping_all()
    assert all(r.ok for r in results), [(r.src.name, r.dst.name) for r in results if not r.ok]

    # A deletion on h1 reaches the other hosts.
    extra = lab.add_endpoint("h1", "extra")
    for host in ("h2", "h3"):
        wait_until(lambda h=host: programmed(lab, h, extra), 10, f"extra endpoint on {host}")
    lab.admin("h1").endpoint_remove(network="demo", name=extra.name)
    lab.forget_endpoint(extra)
    for host in ("h2", "h3"):
        wait_until(lambda h=host: not programmed(lab, h, extra), 10, f"extra endpoint gone from {host}")

    # A daemon restarted (SIGTERM, start) resumes its lease/session: its endpoint
    # never blinks out on the others, also after the old lease would have expired.
    h3 = next(ep for ep in lab.endpoints if ep.host == "h3")
    blinks: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if not programmed(lab, "h1", h3):
                blinks.append(time.monotonic())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        lab.stop_daemon("h3")
        lab.start_daemon("h3")
        deadline = time.monotonic() + 1.5 * ttl
        while time.monotonic() < deadline and not blinks:
            time.sleep(0.1)
    finally:
        stop.set()
        sampler.join()
    assert not blinks, f"h3's endpoint vanished from h1 {len(blinks)} time(s) during the restart"

    # A host that dies without a word: its endpoint expires everywhere else.
    h2 = next(ep for ep in lab.endpoints if ep.host == "h2")
    lab.kill_daemon("h2")
    killed = time.monotonic()
    for host in ("h1", "h3"):
        wait_until(lambda h=host: not programmed(lab, h, h2), 4 * ttl, f"h2's endpoint to expire on {host}")
    assert time.monotonic() - killed > 1.0  # expired by the lease/session, not at once
    h1 = next(ep for ep in lab.endpoints if ep.host == "h1")
    lab.wait_ping(h1.netns, h3.ip, timeout=10)
