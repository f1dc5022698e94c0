"""A restarted daemon removes nothing from its kernel and costs no traffic, in every mode.

A daemon killed (SIGKILL, no goodbye) or stopped (SIGTERM) and started
again finds its kernel as it left it. Until its view is complete again (the
store's first read; in gossip-only mode, after hearing the live peers) it
may add but never delete, so entries for the other hosts' endpoints stay
in place throughout: monitors in its namespace see no entry change at all,
and pings through it every 10 ms lose nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from test_e2e import converged, endpoint_of, vxlan_fdb, vxlan_neigh, wait_until, watch_overlay_entries

from overlayd.lab import Lab

pytestmark = pytest.mark.root

CASES = [
    ("gossip", signal.SIGKILL),
    ("gossip", signal.SIGTERM),
    ("etcd", signal.SIGKILL),
    ("zookeeper", signal.SIGKILL),
    ("consul", signal.SIGKILL),
]


@pytest.mark.parametrize(("store", "sig"), CASES, ids=[f"{s}-{g.name}" for s, g in CASES])
def test_restart_removes_nothing_and_loses_no_ping(
    make_lab: Callable[..., Lab], store: str, sig: signal.Signals
) -> None:
    # Leases long enough that a slow start on a busy machine still finds its own.
    lab = make_lab(3, store=store, lease_ttl=15)
    assert all(r.ok for r in lab.ping_all())
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: converged(lab.admin(h)), 20, f"{host} converged")
    before = (vxlan_fdb(lab, "h1"), vxlan_neigh(lab, "h1"))
    h1, h2, h3 = (endpoint_of(lab, h) for h in ("h1", "h2", "h3"))

    # Into h1 from h2, and out of h1 to h3: both need h1's kernel entries.
    inbound = lab.pinger(h2.netns, h1.ip, interval=0.01)
    outbound = lab.pinger(h1.netns, h3.ip, interval=0.01)
    try:
        with watch_overlay_entries(lab, "h1") as changes:
            lab.stop_daemon("h1", sig=sig)
            lab.start_daemon("h1")  # waits until ready: the first reconcile is done
            wait_until(lambda: lab.admin("h1").status().view.complete, 60, "h1's view complete")
            wait_until(lambda: converged(lab.admin("h1")), 20, "h1 converged after the restart")
    finally:
        stats = [inbound.stop(), outbound.stop()]
    assert changes == [], changes
    if store == "gossip":
        # Complete because a live peer confirmed our tables match, not because time ran out.
        assert "caught up with the live peers" in lab.log_tail("h1", 400), lab.log_tail("h1", 40)
    assert (vxlan_fdb(lab, "h1"), vxlan_neigh(lab, "h1")) == before
    for s in stats:
        # The last echo may still be in flight when ping is stopped.
        assert set(s.lost_seqs) <= {s.transmitted}, s
