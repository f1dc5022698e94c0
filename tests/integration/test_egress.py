"""NAT egress through the anycast gateway, on a real 2-host lab with an outside namespace.

One lab for the module (`overlayctl lab up --egress nat` as a fixture: demo
network with egress, the outside at 198.18.0.200 on the underlay). What the
outside sees is captured there with tcpdump; what crosses the underlay is
captured on the underlay bridge's ports.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from capture import Capture
from conftest import new_prefix

from overlayd.api.client import ClientError
from overlayd.clients.cli import main as overlayctl
from overlayd.dataplane import nft
from overlayd.lab import Lab
from overlayd.lab import netns as nsutil
from overlayd.lab.lab import DEMO_GATEWAY, DEMO_NETWORK, DEMO_SUBNET, OUTSIDE_ADDRESS, Endpoint, lab_status

pytestmark = pytest.mark.root

# Full verifies every 2 s: nftables tables and namespaces (no notifications) come back quickly.
VERIFY = 2.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=2, prefix=new_prefix(), store="gossip", egress="nat", reconcile_interval=VERIFY)
    try:
        lab.up()
        yield lab
    finally:
        errors = lab.down()
        assert not errors, errors
        # Nothing of the daemons' making is left either: their gateway namespaces went too.
        assert not [ns for ns in nsutil.list_netns() if ns.startswith(lab.prefix)]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def endpoint_of(lab: Lab, host: str, network: str = DEMO_NETWORK) -> Endpoint:
    return next(ep for ep in lab.endpoints if ep.host == host and ep.network == network)


def vni_of(lab: Lab, network: str) -> int:
    return lab.admin("h1").network_inspect(network).vni


def echo_sources(lines: list[str]) -> set[str]:
    """Source addresses of the ICMP echo requests a capture saw."""
    return {m.group(1) for line in lines if (m := re.search(r"IP (\S+) > \S+: ICMP echo request", line))}


def pings(ns: str, ip: str, count: int = 3) -> bool:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", ip]
    return nsutil.run_in(ns, argv, check=False).returncode == 0


def nft_json(ns: str, *args: str) -> dict[str, object]:
    out = nsutil.run_in(ns, ["nft", "-j", *args]).stdout
    data: dict[str, object] = json.loads(out)
    return data


def test_lab_status_names_the_outside(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert lab_status(lab.prefix, json_out=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outside"] == {"netns": lab.outside_ns, "ip": OUTSIDE_ADDRESS}
    assert (report["egress"], report["mode"]) == ("nat", "vxlan")
    (network,) = report["networks"]
    assert (network["egress"], network["gateway"]) == ("nat", DEMO_GATEWAY)


def test_endpoints_on_both_hosts_reach_the_outside_as_their_own_host(lab: Lab) -> None:
    for host in ("h1", "h2"):
        ep = endpoint_of(lab, host)
        lab.wait_ping(ep.netns, OUTSIDE_ADDRESS, timeout=15)
        with Capture(lab.outside_ns, "ul0", "icmp") as capture:
            assert pings(ep.netns, OUTSIDE_ADDRESS)
        # Masqueraded to the address of the endpoint's own host, never anything else.
        assert echo_sources(capture.stop()) == {lab.host(host).address}, capture.lines
    # The endpoint's default route is the gateway, in the CNI result and in its namespace.
    routes = nsutil.ip_json("route", "show", "default", netns=endpoint_of(lab, "h1").netns)
    assert [r["gateway"] for r in routes] == [DEMO_GATEWAY]


def test_a_network_without_egress_does_not_reach_the_outside(lab: Lab) -> None:
    lab.create_network("closed", "10.110.0.0/24", gateway="10.110.0.1")
    a = lab.add_endpoint("h1", "closed-a", network="closed")
    b = lab.add_endpoint("h2", "closed-b", network="closed")
    lab.wait_ping(a.netns, b.ip, timeout=15)  # the overlay itself works
    with Capture(lab.outside_ns, "ul0", "icmp") as capture:
        assert not pings(a.netns, OUTSIDE_ADDRESS, count=2)
        assert not pings(b.netns, OUTSIDE_ADDRESS, count=2)
    assert capture.stop() == []
    # No gateway namespace for it either: it asked for no egress.
    vni = vni_of(lab, "closed")
    assert not nsutil.netns_exists(lab.gateway_netns("h1", vni))


def test_two_networks_with_one_subnet_work_at_once_each_with_its_own_egress(lab: Lab) -> None:
    lab.create_network("tenant", DEMO_SUBNET, gateway=DEMO_GATEWAY, egress="nat")
    demo1, demo2 = endpoint_of(lab, "h1"), endpoint_of(lab, "h2")
    # The same addresses as the demo network's endpoints, on the same hosts.
    t1 = lab.add_endpoint("h1", "tenant-1", demo1.ip, network="tenant")
    t2 = lab.add_endpoint("h2", "tenant-2", demo2.ip, network="tenant")
    for src, dst in ((t1, t2), (demo1, demo2), (t2, t1), (demo2, demo1)):
        lab.wait_ping(src.netns, dst.ip, timeout=15)
        neighbours = {n["dst"]: n.get("lladdr") for n in nsutil.ip_json("neigh", "show", netns=src.netns)}
        assert neighbours[dst.ip] == dst.mac, (src.name, dst.name)  # its own network's endpoint
    demo_vni, tenant_vni = vni_of(lab, DEMO_NETWORK), vni_of(lab, "tenant")
    for host in ("h1", "h2"):
        for vni in (demo_vni, tenant_vni):
            assert nsutil.netns_exists(lab.gateway_netns(host, vni))
    # Both at once, each through its own gateway namespace, both leaving as h1.
    lab.wait_ping(t1.netns, OUTSIDE_ADDRESS, timeout=15)
    with Capture(lab.outside_ns, "ul0", "icmp") as capture:
        pingers = [lab.pinger(ep.netns, OUTSIDE_ADDRESS, interval=0.05) for ep in (demo1, t1)]
        time.sleep(1.5)
        stats = [p.stop() for p in pingers]
    assert all(s.received >= s.transmitted - 1 and s.transmitted >= 10 for s in stats), stats
    assert echo_sources(capture.stop()) == {lab.host("h1").address}


def test_the_gateway_mac_never_crosses_or_is_learnt_over_vxlan(lab: Lab) -> None:
    vni = vni_of(lab, DEMO_NETWORK)
    gw_ns = lab.gateway_netns("h1", vni)
    (link,) = nsutil.ip_json("link", "show", "gw0", netns=gw_ns)
    gateway_mac = link["address"]
    # Every host has the same gateway MAC (an anycast gateway).
    (other,) = nsutil.ip_json("link", "show", "gw0", netns=lab.gateway_netns("h2", vni))
    assert other["address"] == gateway_mac
    h1 = lab.host("h1")
    with Capture(lab.underlay_ns, "h1", "udp port 4789", link_level=True) as capture:
        # Broadcast and multicast from h1's gateway: flooded to every local port, never over VXLAN.
        nsutil.run_in(gw_ns, ["ping", "-b", "-c", "3", "-i", "0.2", "-W", "1", "10.100.0.255"], check=False)
        nsutil.run_in(
            gw_ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", "gw0", "224.0.0.1"], check=False
        )
        assert pings(endpoint_of(lab, "h1").netns, endpoint_of(lab, "h2").ip)  # the overlay is in use
    lines = capture.stop()
    assert lines, "no VXLAN at all on the underlay"
    assert not [line for line in lines if gateway_mac in line.lower()]
    for host in lab.hosts:
        entries = lab.fdb(host)
        on_vxlan = [
            e for e in entries if e.get("mac") == gateway_mac and e.get("ifname", "").startswith("ovvx")
        ]
        assert on_vxlan == [], host.name
        # Nor a neighbour entry for the gateway (IP or MAC) on overlayd's VXLAN device.
        for n in lab.neighbours(host):
            if n.get("dev", "").startswith("ovvx"):
                assert n["dst"] != DEMO_GATEWAY and n.get("lladdr") != gateway_mac
    assert h1.address in " ".join(lines)


def test_nat_tables_are_repaired_removed_with_the_network_and_foreign_rules_stay(lab: Lab) -> None:
    h1 = lab.host("h1")
    foreign = {
        "nftables": [
            {"add": {"table": {"family": "inet", "name": "foreign"}}},
            {
                "add": {
                    "chain": {
                        "family": "inet",
                        "table": "foreign",
                        "name": "c",
                        "type": "filter",
                        "hook": "postrouting",
                        "prio": 50,
                        "policy": "accept",
                    }
                }
            },
            {
                "add": {
                    "rule": {"family": "inet", "table": "foreign", "chain": "c", "expr": [{"counter": None}]}
                }
            },
        ]
    }
    nsutil.run_in(h1.netns, ["nft", "-j", "-f", "-"], input=json.dumps(foreign))

    def rules(ns: str, family: str = "ip") -> list[str]:
        listing = nft.parse_table("", family, nft_json(ns, "list", "table", family, "overlayd"))
        return [r.comment for c in listing.chains for r in c.rules]

    lab.create_network("temp", "10.111.0.0/24", gateway="10.111.0.1", egress="nat")
    temp = lab.add_endpoint("h1", "temp-1", network="temp")
    vni = vni_of(lab, "temp")
    gw_ns = lab.gateway_netns("h1", vni)
    lab.wait_ping(temp.netns, OUTSIDE_ADDRESS, timeout=15)
    host_rules, inside_rules = rules(h1.netns), rules(gw_ns)

    # Deleted behind overlayd's back: back at the next full verify (no notifications for nftables).
    nsutil.run_in(h1.netns, ["nft", "delete", "table", "ip", "overlayd"])
    nsutil.run_in(gw_ns, ["nft", "flush", "chain", "ip", "overlayd", "postrouting"])
    wait_until(
        lambda: (
            nsutil.run_in(h1.netns, ["nft", "list", "table", "ip", "overlayd"], check=False).returncode == 0
            and rules(h1.netns) == host_rules
            and rules(gw_ns) == inside_rules
        ),
        4 * VERIFY + 10,
        "the NAT tables to come back",
    )
    # A route inside the gateway namespace: back at once (a notification).
    nsutil.ip("route", "del", "default", netns=gw_ns)
    wait_until(lambda: bool(nsutil.ip_json("route", "show", "default", netns=gw_ns)), 5, "the default route")
    lab.wait_ping(temp.netns, OUTSIDE_ADDRESS, timeout=10)

    # Removed with the network: its namespace, its uplink route; the rest stays.
    lab.admin("h1").endpoint_remove(network="temp", name="temp-1")
    lab.forget_endpoint(temp)
    lab.admin("h1").network_remove("temp")
    wait_until(lambda: not nsutil.netns_exists(gw_ns), 10, f"{gw_ns} to go")
    ours = nsutil.ip_json("route", "show", "proto", "111", netns=h1.netns)
    assert not [r for r in ours if r.get("dev") == f"ovup{vni}"]
    assert f"ovup{vni}" not in nsutil.link_names(h1.netns)
    assert rules(h1.netns) == host_rules  # the demo network still needs the same host rules
    after = nsutil.run_in(h1.netns, ["nft", "-j", "list", "table", "inet", "foreign"]).stdout
    assert '"counter"' in after and '"foreign"' in after
    wait_until(lambda: lab.admin("h1").diff().changes == (), 10, "h1 converged")
    nsutil.run_in(h1.netns, ["nft", "delete", "table", "inet", "foreign"])


def test_bad_network_requests_get_one_error_and_change_nothing(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    client = lab.admin("h1")
    before = client.network_list()
    namespaces = {ns for ns in nsutil.list_netns() if ns.startswith(lab.prefix)}
    cases = [
        (dict(name="x1", subnet="10.112.0.0/24", egress="nat"), 400, "egress nat needs a gateway"),
        (dict(name="x2", subnet="10.112.0.0/24", mode="routed"), 400, "routed mode needs a gateway"),
        (
            dict(name="x3", subnet="10.112.0.0/24", gateway="10.112.0.1", egress="bogus"),
            400,
            "invalid egress",
        ),
        (dict(name="x4", subnet="10.112.0.0/24", gateway="10.112.0.1", mode="l3"), 400, "invalid mode"),
        (
            dict(name="x5", subnet="10.112.0.0/24", gateway="10.112.0.1", egress="nat", vni=5_000_000),
            400,
            "at most 4194303",
        ),
    ]
    for fields, status, message in cases:
        with pytest.raises(ClientError) as err:
            client.network_create(**fields)  # type: ignore[arg-type]
        assert err.value.status == status and message in err.value.message, fields
        assert "\n" not in err.value.message
    client.network_create(name="r1", subnet="10.113.0.0/24", gateway="10.113.0.1", mode="routed")
    with pytest.raises(ClientError) as err:
        client.network_create(name="r2", subnet="10.113.0.0/25", gateway="10.113.0.2", mode="routed")
    assert err.value.status == 409 and "overlaps routed network r1" in err.value.message
    client.network_remove("r1")
    socket = str(lab.host("h1").admin_socket)
    assert (
        overlayctl(
            ["--socket", socket, "network", "create", "x6", "--subnet", "10.112.0.0/24", "--egress", "all"]
        )
        == 2
    )
    capsys.readouterr()
    assert client.network_list() == before
    assert {ns for ns in nsutil.list_netns() if ns.startswith(lab.prefix)} == namespaces


def test_nftables_itself_takes_every_table_overlayd_writes(lab: Lab) -> None:
    """Every kind of table, through the real nft in a scratch namespace, reads back equal."""
    ns = f"{lab.prefix}-nft"
    nsutil.add_netns(ns)
    try:
        routed = [("ovbr7", IPv4Network("10.7.0.0/24"), False), ("ovbr8", IPv4Network("10.8.0.0/16"), True)]
        tables = [
            nft.host_ip_table(uplinks=True, routed=routed),
            nft.host_bridge_table(["02:aa:00:00:00:01", "02:aa:00:00:00:02"]),
            nft.gateway_ip_table(ns, uplink="up0", subnet=IPv4Network("10.7.0.0/24")),
        ]
        for table in tables:
            assert table is not None
            for _ in range(2):  # a replace of what is there already works the same
                nsutil.run_in(ns, ["nft", "-j", "-f", "-"], input=json.dumps(nft.replace_commands(table)))
            found = nft.parse_table(
                table.netns, table.family, nft_json(ns, "list", "table", table.family, "overlayd")
            )
            assert found == table
        assert nft.parse_tables(nft_json(ns, "list", "tables")) == {"ip", "bridge"}
        for family in ("ip", "bridge", "ip"):  # deleting what is gone is no error
            nsutil.run_in(ns, ["nft", "-j", "-f", "-"], input=json.dumps(nft.delete_commands(family)))
        assert nft.parse_tables(nft_json(ns, "list", "tables")) == set()
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def test_a_restart_adopts_the_gateway_side_and_egress_never_stops(lab: Lab) -> None:
    ep = endpoint_of(lab, "h1")
    gw_ns = lab.gateway_netns("h1", vni_of(lab, DEMO_NETWORK))
    pin = Path("/run/netns", gw_ns).stat().st_ino
    handles = nft_json(lab.host("h1").netns, "-a", "list", "table", "ip", "overlayd")
    lab.wait_ping(ep.netns, OUTSIDE_ADDRESS, timeout=10)
    pinger = lab.pinger(ep.netns, OUTSIDE_ADDRESS, interval=0.05)
    try:
        lab.stop_daemon("h1")
        lab.start_daemon("h1")
        wait_until(lambda: lab.admin("h1").status().view.complete, 30, "h1's view complete")
    finally:
        stats = pinger.stop()
    # ping ran through the restart (it takes under a second now: 19 sent at times), and only
    # its last request may still have been in flight when it was stopped.
    assert stats.transmitted >= 5 and set(stats.lost_seqs) <= {stats.transmitted}, stats
    # The same namespace and the same table (a replace would give new handles).
    assert Path("/run/netns", gw_ns).stat().st_ino == pin
    assert nft_json(lab.host("h1").netns, "-a", "list", "table", "ip", "overlayd") == handles
    assert lab.admin("h1").diff().changes == ()


def test_teardown_takes_the_gateway_side_away_too(lab: Lab) -> None:
    """Last in the module: h2 leaves the overlay."""
    h2 = lab.host("h2")
    vnis = [vni_of(lab, name) for name in (DEMO_NETWORK, "tenant")]
    socket = str(h2.admin_socket)
    assert overlayctl(["--socket", socket, "teardown", "--yes"]) == 0
    wait_until(lambda: not lab.daemon_alive("h2"), 15, "overlayd on h2 to exit")
    for vni in vnis:
        assert not nsutil.netns_exists(lab.gateway_netns("h2", vni))
    tables = nft_json(h2.netns, "list", "tables")
    assert nft.parse_tables(tables) == set()
    assert nsutil.ip_json("route", "show", "proto", "111", netns=h2.netns) == []
    assert not [name for name in nsutil.link_names(h2.netns) if name.startswith("ov")]
    # h1 goes on.
    lab.wait_ping(endpoint_of(lab, "h1").netns, OUTSIDE_ADDRESS, timeout=10)
