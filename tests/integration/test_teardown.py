"""`overlayctl teardown --yes` on one lab host, in gossip-only, ZooKeeper and Consul mode.

(etcd mode is in test_operator.py.) The host leaves for good: its endpoints
vanish from every other host's view and kernel, at once rather than when its
lease or grace would have run out; its own links are gone; its daemon exits 0.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from overlayd.lab import Lab, netns

pytestmark = pytest.mark.root

OVERLAYCTL = str(Path(sys.executable).parent / "overlayctl")
# Long leases and grace: whatever the others forget within FORGOTTEN_WITHIN was
# released by the teardown, not left to expire. (Consul takes up to 2 TTLs.)
LEASE_TTL = 30
FORGOTTEN_WITHIN = 10.0


def overlay_macs(lab: Lab, host: str) -> set[str]:
    """MACs of the FDB entries overlayd programmed on `host` (they carry a remote VTEP)."""
    return {e["mac"] for e in lab.fdb(host) if "dst" in e and e.get("ifname", "").startswith("ovvx")}


@pytest.mark.parametrize("store", ["gossip", "zookeeper", "consul"])
def test_teardown_takes_the_host_out_everywhere(make_lab: Callable[..., Lab], store: str) -> None:
    lab = make_lab(3, store=store, lease_ttl=LEASE_TTL, gossip=True)
    h1 = lab.host("h1")
    gone = next(ep for ep in lab.endpoints if ep.host == "h1")
    others = [h.name for h in lab.hosts if h.name != "h1"]
    lab.wait_for(
        lambda: all(gone.mac in overlay_macs(lab, h) for h in others), 20, "h1's endpoint on every host"
    )
    proc = h1.proc
    assert proc is not None

    argv = [OVERLAYCTL, "--socket", str(h1.admin_socket), "teardown", "--yes"]
    result = lab.exec(h1.netns, argv, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tore down node h1: 1 endpoint(s), "), result.stdout
    assert "lease released; overlayd is stopping" in result.stdout
    started = time.monotonic()

    # Its daemon exits by itself, with status 0.
    assert proc.wait(15), "overlayd on h1 did not exit after the teardown"
    assert proc.returncode() == 0
    h1.proc = None
    # Its links are gone, the endpoint's veth with them.
    assert not [n for n in netns.link_names(h1.netns) if n.startswith("ov")]
    assert "eth0" not in netns.link_names(gone.netns)

    # Every other host drops its endpoint from the view and the kernel, without waiting for a TTL.
    def forgotten(host: str) -> bool:
        listed = {e.name for e in lab.admin(host).endpoint_list()}
        return gone.name not in listed and gone.mac not in overlay_macs(lab, host)

    for host in others:
        lab.wait_for(lambda h=host: forgotten(h), FORGOTTEN_WITHIN, f"{host} to forget h1's endpoint")
    assert time.monotonic() - started < FORGOTTEN_WITHIN + 1
    # What is left still works: h2 and h3 reach each other.
    h2_ep, h3_ep = (next(ep for ep in lab.endpoints if ep.host == h) for h in others)
    lab.wait_ping(h2_ep.netns, h3_ep.ip, timeout=10)
    # h1 is no node of theirs any more: its record went with its lease, or (gossip only)
    # it is listed as having left. (Beside a KV store its gossip member lingers: next test.)
    for host in others:
        h1_peer = [p for p in lab.admin(host).peers() if p.name == "h1"]
        assert all(p.endpoints == 0 and (p.started_at is None or p.state == "left") for p in h1_peer), h1_peer


def test_teardown_beside_a_kv_store_leaves_the_gossip_at_once(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(2, store="zookeeper", lease_ttl=LEASE_TTL, gossip=True)
    lab.admin("h1").teardown("h1")

    def h1_state() -> str | None:
        return {p.name: p.state for p in lab.admin("h2").peers()}.get("h1")

    # Gossip-only mode announces the leave: peers show "left" within a probe or two.
    lab.wait_for(lambda: h1_state() in (None, "left"), 3, "h2 to see h1 leave the gossip")
