"""The engine (overlayd.daemon.engine): outcomes followed into gauges, desired state and the latency clock."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network

from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import EndpointDeleted, EndpointPut, NetworkDeleted, NetworkPut, NodePut
from overlayd.daemon.engine import Engine
from overlayd.dataplane.commands import AppendFlood, Command, ReplaceFdb, ReplaceNeigh
from overlayd.dataplane.desired import DesiredState
from overlayd.dataplane.kstate import FdbEntry, FloodEntry, NeighEntry, vxlan_name
from overlayd.util.metrics import Metrics

A = IPv4Address
BLUE = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/16"))
HERE, THERE = "host-a", "host-b"
VTEP_HERE, VTEP_THERE = A("198.18.0.1"), A("198.18.0.2")
DEVICE = vxlan_name(BLUE.vni)


def ep(n: int, owner: str = THERE, *, created_at: float = 0.0, mac_byte: int = 0) -> Endpoint:
    return Endpoint(
        network="blue",
        name=f"e{n}",
        ip=A(f"10.1.{n // 250}.{n % 250 + 2}"),
        mac=f"02:00:{mac_byte:02x}:00:{n // 256:02x}:{n % 256:02x}",
        owner=owner,
        created_at=created_at,
    )


def engine() -> tuple[Engine, Metrics]:
    metrics = Metrics()
    eng = Engine(node=HERE, authority=True, metrics=metrics)
    eng.from_store([NetworkPut(BLUE), NodePut(Node(THERE, VTEP_THERE, 0.0))])
    eng.from_own([NodePut(Node(HERE, VTEP_HERE, 0.0)), EndpointPut(ep(0, HERE))])
    eng.desired = DesiredState(eng.view, local_node=HERE, local_vtep=VTEP_HERE, underlay_mtu=1500)
    return eng, metrics


def gauge(metrics: Metrics, locality: str) -> float | None:
    return metrics.registry.get_sample_value("overlayd_endpoints_known", {"locality": locality})


def observed(metrics: Metrics, path: str) -> float | None:
    return metrics.registry.get_sample_value("overlayd_convergence_latency_seconds_count", {"path": path})


def test_counts_follow_every_outcome() -> None:
    eng, metrics = engine()
    assert (eng.local, eng.remote) == (1, 0)
    eng.from_store([EndpointPut(ep(n)) for n in range(1, 6)])
    assert (eng.local, eng.remote) == (1, 5)
    eng.from_store([EndpointDeleted("blue/e1"), EndpointDeleted("blue/e2"), EndpointPut(ep(3, mac_byte=1))])
    assert (eng.local, eng.remote) == (1, 3)
    eng.from_own([EndpointPut(ep(9, HERE)), EndpointDeleted("blue/e0")])
    assert (eng.local, eng.remote) == (1, 3)
    assert (gauge(metrics, "local"), gauge(metrics, "remote")) == (1, 3)


def test_a_network_new_in_the_view_is_told_once_and_once_gone_not_when_it_changes() -> None:
    eng, _ = engine()
    told: list[Network] = []
    gone: list[str] = []
    eng.on_network = told.append
    eng.on_network_gone = gone.append
    red = Network(name="red", vni=200, subnet=IPv4Network("10.2.0.0/24"))
    eng.from_store([NetworkPut(red)])
    eng.from_store([NetworkPut(Network(name="red", vni=200, subnet=IPv4Network("10.2.0.0/24"), mtu=1400))])
    eng.from_store([NetworkDeleted("blue")])
    assert told == [red]
    assert gone == ["blue"]


async def test_network_soon_waits_for_a_network_the_view_has_not_heard_of_yet() -> None:
    eng, _ = engine()
    red = Network(name="red", vni=200, subnet=IPv4Network("10.2.0.0/24"))
    assert await eng.network_soon("blue", timeout=0.0) == BLUE  # known: at once
    asyncio.get_running_loop().call_soon(eng.from_store, [NetworkPut(red)])
    async with asyncio.timeout(5.0):
        got = await asyncio.gather(eng.network_soon("red", 10.0), eng.network_soon("red", 10.0))
    assert got == [red, red]
    assert await eng.network_soon("green", timeout=0.01) is None  # never heard of: not found
    assert eng._network_waiters == {}


def programmed(eng: Engine) -> list[Command]:
    """What the reconciler would write for the desired entries (every one succeeding)."""
    assert eng.desired is not None
    t = eng.desired.tables
    cmds: list[Command] = [ReplaceFdb(FdbEntry(d, m, vtep)) for (d, m), vtep in t.fdb.items()]
    cmds += [AppendFlood(FloodEntry(d, vtep)) for d, vtep in t.flood]
    cmds += [ReplaceNeigh(NeighEntry(d, ip, m)) for (d, ip), m in t.neigh.items()]
    return cmds


def test_remote_endpoints_are_timed_once_from_creation_to_programmed() -> None:
    eng, metrics = engine()
    made = time.time() - 0.5
    eng.from_store([EndpointPut(ep(n, created_at=made)) for n in range(1, 4)])
    eng.from_store([EndpointPut(ep(4))])  # no creation time: not timed
    assert set(eng._unprogrammed) == {"blue/e1", "blue/e2", "blue/e3", "blue/e4"}
    eng.applied(programmed(eng))
    assert observed(metrics, "kv") == 3
    assert eng._unprogrammed == {}
    total = metrics.registry.get_sample_value("overlayd_convergence_latency_seconds_sum", {"path": "kv"})
    assert total is not None and total >= 1.5
    eng.applied(programmed(eng))  # the same entries again: nothing more to time
    assert observed(metrics, "kv") == 3


def test_a_new_version_on_the_same_host_and_mac_is_not_timed_again() -> None:
    eng, metrics = engine()
    made = time.time()
    eng.from_store([EndpointPut(ep(1, created_at=made))])
    eng.applied(programmed(eng))
    again = Endpoint(**{**ep(1, created_at=made + 1).to_dict(), "version": 2})
    eng.from_store([EndpointPut(again)])
    assert eng._unprogrammed == {}
    moved = ep(1, created_at=made + 2, mac_byte=7)
    eng.from_store([EndpointPut(moved)])
    assert set(eng._unprogrammed) == {"blue/e1"}
    eng.from_store([EndpointDeleted("blue/e1")])
    assert eng._unprogrammed == {}
    assert observed(metrics, "kv") == 1


def test_each_path_is_timed_on_its_own() -> None:
    eng, metrics = engine()
    made = time.time()
    eng.from_store([EndpointPut(ep(1, created_at=made))])
    eng._unprogrammed["blue/e2"] = (made, "gossip")  # as a gossip fact would leave it
    eng.from_store([EndpointPut(ep(2, created_at=made))])
    eng._unprogrammed["blue/e2"] = (made, "gossip")
    eng.applied(programmed(eng))
    assert (observed(metrics, "kv"), observed(metrics, "gossip")) == (1, 1)
