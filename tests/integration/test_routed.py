"""Routed mode on a real 3-host lab: h1 and h2 on one underlay segment, h3 behind a router.

One lab for the module (`overlayctl lab up --mode routed --egress nat` as a
fixture). Between h1 and h2 endpoint traffic is routed without
encapsulation; h3 is reached over VXLAN, decided by each daemon from its
underlay. Captures on the underlay bridge's port of h1 show which is which.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import pytest
from capture import Capture
from conftest import new_prefix

from overlayd.lab import Lab
from overlayd.lab import netns as nsutil
from overlayd.lab.lab import DEMO_NETWORK, OUTSIDE_ADDRESS, Endpoint

pytestmark = pytest.mark.root

VERIFY = 2.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(
        hosts=3, prefix=new_prefix(), store="gossip", egress="nat", mode="routed", reconcile_interval=VERIFY
    )
    try:
        lab.up()
        yield lab
    finally:
        errors = lab.down()
        assert not errors, errors


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def endpoint_of(lab: Lab, host: str, network: str = DEMO_NETWORK) -> Endpoint:
    return next(ep for ep in lab.endpoints if ep.host == host and ep.network == network)


def pings(ns: str, ip: str, count: int = 3, size: int | None = None) -> bool:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", ip]
    if size is not None:
        argv[1:1] = ["-M", "do", "-s", str(size)]
    return nsutil.run_in(ns, argv, check=False).returncode == 0


def routes(lab: Lab, host: str) -> dict[str, str]:
    """overlayd's routes on `host`: destination -> next hop."""
    found = nsutil.ip_json("route", "show", "proto", "111", netns=lab.host(host).netns)
    return {r["dst"]: r.get("gateway", "") for r in found}


def vxlan_peers(lines: list[str]) -> set[frozenset[str]]:
    """The pairs of underlay addresses that exchanged VXLAN (UDP 4789) in a capture."""
    out = set()
    for line in lines:
        m = re.search(r"IP (\d+\.\d+\.\d+\.\d+)\.\d+ > (\d+\.\d+\.\d+\.\d+)\.4789:", line)
        if m:
            out.add(frozenset(m.groups()))
    return out


def test_all_pairs_ping_and_only_the_pair_across_the_router_uses_vxlan(lab: Lab) -> None:
    results = lab.ping_all()
    assert all(r.ok for r in results), [(r.src.name, r.dst.name) for r in results if not r.ok]
    e1, e2, e3 = (endpoint_of(lab, h) for h in ("h1", "h2", "h3"))
    h1, h2, h3 = (lab.host(h).address for h in ("h1", "h2", "h3"))
    assert h3.startswith("198.18.1.")  # behind the router
    with Capture(lab.underlay_ns, "h1", "udp port 4789 or icmp") as capture:
        assert pings(e1.netns, e2.ip) and pings(e2.netns, e1.ip)
        assert pings(e1.netns, e3.ip) and pings(e3.netns, e1.ip)
    lines = capture.stop()
    assert vxlan_peers(lines) == {frozenset({h1, h3})}, lines
    # Between h1 and h2 the endpoints' own packets cross the underlay, unencapsulated.
    direct = [line for line in lines if f"IP {e1.ip} > {e2.ip}: ICMP echo request" in line]
    assert len(direct) >= 3, lines
    # The routes behind it: a host route per endpoint on the segment, none across the router.
    assert routes(lab, "h1") == {e2.ip: h2}
    assert routes(lab, "h2") == {e1.ip: h1}
    assert routes(lab, "h3") == {}
    # h3 answers for nobody by proxy: its peers are all across the router, so VXLAN entries.
    fdb = {e["mac"]: e["dst"] for e in lab.fdb("h3") if e.get("ifname", "").startswith("ovvx") and "dst" in e}
    assert fdb.get(e1.mac) == h1 and fdb.get(e2.mac) == h2


def test_the_paths_are_shown_in_peers_and_network_inspect(lab: Lab) -> None:
    peers = {p.name: p.path for p in lab.admin("h1").peers()}
    assert peers == {"h1": None, "h2": "direct", "h3": "vxlan"}
    inspect = lab.admin("h1").network_inspect(DEMO_NETWORK)
    assert inspect.mode == "routed" and inspect.egress == "nat"
    assert inspect.paths is not None and {p.node: p.path for p in inspect.paths} == {
        "h2": "direct",
        "h3": "vxlan",
    }
    assert inspect.gateway_netns is None  # routed: the gateway is the bridge itself
    assert {p.name: p.path for p in lab.admin("h3").peers()} == {"h1": "vxlan", "h2": "vxlan", "h3": None}


def test_a_deleted_route_comes_back_and_an_ip_moving_hosts_takes_its_route_along(lab: Lab) -> None:
    e1, e2 = endpoint_of(lab, "h1"), endpoint_of(lab, "h2")
    h1ns = lab.host("h1").netns
    nsutil.ip("route", "del", f"{e2.ip}/32", netns=h1ns)
    wait_until(lambda: routes(lab, "h1").get(e2.ip) == lab.host("h2").address, 5, "the route to come back")
    # The address moves to h3 (behind the router): h1 drops the route, tunnels to h3.
    lab.admin("h2").endpoint_remove(network=DEMO_NETWORK, name=e2.name)
    lab.forget_endpoint(e2)
    moved = lab.add_endpoint("h3", "moved", e2.ip)
    wait_until(lambda: e2.ip not in routes(lab, "h1"), 10, "the route to go")
    lab.wait_ping(e1.netns, moved.ip, timeout=10)
    neighbours = {n["dst"]: n.get("lladdr") for n in nsutil.ip_json("neigh", "show", netns=e1.netns)}
    assert neighbours[moved.ip] == moved.mac
    # And back to h2: a host route again; the endpoint's cached MAC is the gateway's.
    lab.admin("h3").endpoint_remove(network=DEMO_NETWORK, name="moved")
    lab.forget_endpoint(moved)
    back = lab.add_endpoint("h2", "back", e2.ip)
    wait_until(lambda: routes(lab, "h1").get(back.ip) == lab.host("h2").address, 10, "the route to return")
    # h1-ep cached the moved endpoint's own MAC; it is told at once that the gateway answers now.
    vni = lab.admin("h1").network_inspect(DEMO_NETWORK).vni
    (bridge,) = nsutil.ip_json("link", "show", f"ovbr{vni}", netns=h1ns)

    def cached() -> str | None:
        found = {n["dst"]: n.get("lladdr") for n in nsutil.ip_json("neigh", "show", netns=e1.netns)}
        return found.get(back.ip)

    wait_until(lambda: cached() == bridge["address"], 5, "h1-ep to learn that the gateway answers")
    lab.wait_ping(e1.netns, back.ip, timeout=10)
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: lab.admin(h).diff().changes == (), 10, f"{host} converged")


def test_routed_egress_leaves_as_its_host_and_a_network_without_egress_stays_in(lab: Lab) -> None:
    for host in ("h1", "h3"):
        ep = endpoint_of(lab, host)
        lab.wait_ping(ep.netns, OUTSIDE_ADDRESS, timeout=15)
        with Capture(lab.outside_ns, "ul0", "icmp") as capture:
            assert pings(ep.netns, OUTSIDE_ADDRESS)
        sources = {
            m.group(1)
            for line in capture.stop()
            if (m := re.search(r"IP (\S+) > \S+: ICMP echo request", line))
        }
        assert sources == {lab.host(host).address}
    lab.create_network("rclosed", "10.130.0.0/24", gateway="10.130.0.1", mode="routed")
    a = lab.add_endpoint("h1", "rclosed-a", network="rclosed")
    b = lab.add_endpoint("h2", "rclosed-b", network="rclosed")
    lab.wait_ping(a.netns, b.ip, timeout=15)
    with Capture(lab.outside_ns, "ul0", "icmp") as capture:
        assert not pings(a.netns, OUTSIDE_ADDRESS, count=2)
    assert capture.stop() == []
    # Nor does it reach the other routed network's endpoints: tenants stay apart.
    assert not pings(a.netns, endpoint_of(lab, "h2").ip, count=2)


def test_the_endpoint_mtu_fits_the_tunnel_on_every_path(lab: Lab) -> None:
    e1, e2, e3 = (endpoint_of(lab, h) for h in ("h1", "h2", "h3"))
    (link,) = nsutil.ip_json("link", "show", "eth0", netns=e1.netns)
    assert link["mtu"] == 1450  # the underlay's 1500 minus VXLAN: the fallback pair must fit
    for dst in (e2, e3):
        assert pings(e1.netns, dst.ip, count=2, size=1450 - 28), dst.name


def test_an_address_reused_on_one_host_is_reached_through_its_gateway_at_once(lab: Lab) -> None:
    # The gateway (h1's bridge) cached the first endpoint's MAC; the second one announces itself.
    h1ns = lab.host("h1").netns
    first = lab.add_endpoint("h1", "reuse-a", "10.100.0.170")
    assert pings(h1ns, first.ip, count=1)  # the gateway resolves it
    lab.admin("h1").endpoint_remove(network=DEMO_NETWORK, name=first.name)
    lab.forget_endpoint(first)
    second = lab.add_endpoint("h1", "reuse-b", "10.100.0.170")
    assert second.mac != first.mac
    assert pings(h1ns, second.ip, count=1)  # no re-probing of the stale entry first
    assert pings(endpoint_of(lab, "h2").netns, second.ip, count=1)  # routed in from h2
