"""The merged cluster view (overlayd.core.view): facts in, "changed?" out."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import (
    ClusterView,
    EndpointChanged,
    EndpointDeleted,
    EndpointPut,
    Fact,
    NetworkDeleted,
    NetworkPut,
    NodeDeleted,
    NodePut,
    endpoint_changed,
    endpoint_put,
)

A = IPv4Address

BLUE = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24"), gateway=A("10.1.0.1"))
RED = Network(name="red", vni=200, subnet=IPv4Network("10.2.0.0/24"))
HOST_A = Node(name="host-a", vtep=A("198.18.0.1"), started_at=1.0)
HOST_B = Node(name="host-b", vtep=A("198.18.0.2"), started_at=2.0)


def ep(name: str, ip: str, owner: str = "host-a", network: str = "blue", **kw: object) -> Endpoint:
    mac = f"02:00:00:00:{len(name) % 256:02x}:{int(ip.rsplit('.', 1)[1]):02x}"
    return Endpoint(network=network, name=name, ip=A(ip), mac=mac, owner=owner, **kw)  # type: ignore[arg-type]


W1 = ep("w1", "10.1.0.2")
W2 = ep("w2", "10.1.0.3", owner="host-b")
R1 = ep("r1", "10.2.0.2", network="red", owner="host-b")


def play(view: ClusterView, script: list[tuple[Fact, bool]]) -> None:
    """Transcript: each fact in, the expected "changed?" out."""
    for i, (fact, changed) in enumerate(script):
        assert view.apply(fact) is changed, f"step {i}: {fact!r}"


# --- apply, per fact type ---------------------------------------------------------------------


def test_network_put_and_delete() -> None:
    v = ClusterView()
    play(
        v,
        [
            (NetworkPut(BLUE), True),
            (NetworkPut(BLUE), False),  # idempotent
            (NetworkPut(replace(BLUE)), False),  # equal copy
            (NetworkPut(replace(BLUE, mtu=1400)), True),
            (NetworkPut(replace(BLUE, mtu=1400)), False),
            (NetworkPut(RED), True),
            (NetworkDeleted("blue"), True),
            (NetworkDeleted("blue"), False),
            (NetworkDeleted("nope"), False),
        ],
    )
    assert v.networks == {"red": RED}


def test_network_put_stores_latest_value() -> None:
    v = ClusterView()
    v.apply(NetworkPut(BLUE))
    v.apply(NetworkPut(replace(BLUE, mtu=1400)))
    assert v.networks["blue"].mtu == 1400


def test_node_put_and_delete() -> None:
    v = ClusterView()
    moved = replace(HOST_A, vtep=A("198.18.0.9"))
    play(
        v,
        [
            (NodePut(HOST_A), True),
            (NodePut(HOST_A), False),
            (NodePut(moved), True),
            (NodePut(replace(moved, started_at=5.0)), True),  # a restart is a change
            (NodePut(HOST_B), True),
            (NodeDeleted("host-a"), True),
            (NodeDeleted("host-a"), False),
            (NodeDeleted("ghost"), False),
        ],
    )
    assert v.nodes == {"host-b": HOST_B}


def test_endpoint_put_and_delete() -> None:
    v = ClusterView()
    play(
        v,
        [
            (EndpointPut(W1), True),
            (EndpointPut(W1), False),
            (EndpointPut(replace(W1, version=2)), True),
            (EndpointPut(replace(W1, version=2)), False),
            (EndpointPut(replace(W1, version=2, mac="02:00:00:00:99:99")), True),
            (EndpointPut(W2), True),
            (EndpointDeleted("blue/w1"), True),
            (EndpointDeleted("blue/w1"), False),
            (EndpointDeleted("red/w2"), False),  # same name, other network: not ours
            (EndpointDeleted("nope/nope"), False),
        ],
    )
    assert v.endpoints == {"blue/w2": W2}


def test_endpoint_keyed_by_network_and_name() -> None:
    v = ClusterView()
    same_name_red = ep("w1", "10.2.0.2", network="red")
    play(v, [(EndpointPut(W1), True), (EndpointPut(same_name_red), True)])
    assert set(v.endpoints) == {"blue/w1", "red/w1"}


def test_delete_does_not_touch_other_tables() -> None:
    v = ClusterView()
    v.apply(NetworkPut(BLUE))
    v.apply(NodePut(Node(name="blue", vtep=A("198.18.0.5"), started_at=0.0)))
    assert v.apply(NodeDeleted("blue")) is True
    assert v.networks == {"blue": BLUE}
    assert v.nodes == {}


def test_unknown_fact_raises() -> None:
    with pytest.raises(TypeError, match="unknown fact"):
        ClusterView().apply("NetworkPut")  # type: ignore[arg-type]


# --- replace_all ------------------------------------------------------------------------------


def full_facts() -> list[Fact]:
    return [
        NetworkPut(BLUE),
        NetworkPut(RED),
        NodePut(HOST_A),
        NodePut(HOST_B),
        EndpointPut(W1),
        EndpointPut(W2),
        EndpointPut(R1),
    ]


def test_replace_all_on_empty_view_changes() -> None:
    v = ClusterView()
    assert v.replace_all(full_facts()) is True
    assert v.networks == {"blue": BLUE, "red": RED}
    assert v.nodes == {"host-a": HOST_A, "host-b": HOST_B}
    assert v.endpoints == {"blue/w1": W1, "blue/w2": W2, "red/r1": R1}


def test_replace_all_same_content_is_unchanged() -> None:
    v = ClusterView()
    v.replace_all(full_facts())
    assert v.replace_all(list(reversed(full_facts()))) is False
    assert len(v.endpoints) == 3


def test_replace_all_drops_absent_records() -> None:
    v = ClusterView()
    v.replace_all(full_facts())
    assert v.replace_all([NetworkPut(BLUE), NodePut(HOST_A), EndpointPut(W1)]) is True
    assert v.networks == {"blue": BLUE}
    assert v.nodes == {"host-a": HOST_A}
    assert v.endpoints == {"blue/w1": W1}


@pytest.mark.parametrize("dropped", range(7))
def test_replace_all_any_single_drop_is_a_change(dropped: int) -> None:
    v = ClusterView()
    v.replace_all(full_facts())
    facts = full_facts()
    del facts[dropped]
    assert v.replace_all(facts) is True
    assert len(v.networks) + len(v.nodes) + len(v.endpoints) == 6


def test_replace_all_value_change_is_a_change() -> None:
    v = ClusterView()
    v.replace_all(full_facts())
    facts = [f for f in full_facts() if f != EndpointPut(W1)] + [EndpointPut(replace(W1, version=2))]
    assert v.replace_all(facts) is True
    assert v.endpoints["blue/w1"].version == 2


def test_replace_all_with_nothing_empties_the_view() -> None:
    v = ClusterView()
    v.replace_all(full_facts())
    assert v.replace_all([]) is True
    assert (v.networks, v.nodes, v.endpoints) == ({}, {}, {})
    assert v.replace_all([]) is False


def test_replace_all_applies_deletes_in_order() -> None:
    v = ClusterView()
    assert v.replace_all([EndpointPut(W1), EndpointDeleted("blue/w1"), NodePut(HOST_A)]) is True
    assert v.endpoints == {}
    assert v.nodes == {"host-a": HOST_A}


def test_replace_all_then_apply_keeps_working() -> None:
    v = ClusterView()
    v.replace_all([EndpointPut(W1)])
    assert v.apply(EndpointPut(W1)) is False
    assert v.apply(EndpointDeleted("blue/w1")) is True


# --- queries ----------------------------------------------------------------------------------


def loaded() -> ClusterView:
    v = ClusterView()
    v.replace_all(full_facts())
    return v


def test_endpoints_in() -> None:
    v = loaded()
    assert sorted(e.name for e in v.endpoints_in("blue")) == ["w1", "w2"]
    assert v.endpoints_in("red") == [R1]
    assert v.endpoints_in("green") == []


def test_taken_ips() -> None:
    v = loaded()
    assert v.taken_ips("blue") == {A("10.1.0.2"), A("10.1.0.3")}
    assert v.taken_ips("red") == {A("10.2.0.2")}
    assert v.taken_ips("green") == set()


def test_owned_by() -> None:
    v = loaded()
    assert v.owned_by("host-a") == [W1]
    assert sorted(e.key for e in v.owned_by("host-b")) == ["blue/w2", "red/r1"]
    assert v.owned_by("ghost") == []


def test_queries_follow_deletes() -> None:
    v = loaded()
    v.apply(EndpointDeleted("blue/w2"))
    assert v.taken_ips("blue") == {A("10.1.0.2")}
    assert v.owned_by("host-b") == [R1]


def test_the_fast_makers_make_the_frozen_records_the_constructors_make() -> None:
    put = endpoint_put(W1)
    changes = [endpoint_changed(None, W1), endpoint_changed(W1, W2), endpoint_changed(W2, None)]
    assert type(put) is EndpointPut and put == EndpointPut(W1) and hash(put) == hash(EndpointPut(W1))
    built = [EndpointChanged(None, W1), EndpointChanged(W1, W2), EndpointChanged(W2, None)]
    assert all(type(c) is EndpointChanged for c in changes)
    assert changes == built and [hash(c) for c in changes] == [hash(b) for b in built]
    assert [c.key for c in changes] == ["blue/w1", "blue/w2", "blue/w2"]
    with pytest.raises(AttributeError):
        put.endpoint = W2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        changes[0].new = W2  # type: ignore[misc]
    # What the view hands out is made so too.
    view = ClusterView()
    assert view.put_endpoint(W1) == EndpointChanged(None, W1)
    assert view.remove_endpoint(W1.key) == EndpointChanged(W1, None)
