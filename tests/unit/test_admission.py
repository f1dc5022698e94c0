"""The admission rule (overlayd.core.admission), as transcripts: facts in, view changes out.

Each step feeds one source's facts and states exactly how the view changed,
written compactly: `+ key ip@owner` (appeared), `- key` (went away),
`~ key ip@owner` (changed), `+net name` / `-net name`, `+node name` /
`-node name`, and `! key: why` for a conflict of this host's own.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlayd.core.admission import (
    EARLY_RELEASES,
    Admission,
    EndpointClaimed,
    EndpointReleased,
    MemberAdmissible,
    NetworkClaimed,
    NetworkReleased,
    NetworkRemovedMark,
    NodeGone,
    NodeHeard,
    Outcome,
)
from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import (
    EndpointChanged,
    EndpointDeleted,
    EndpointPut,
    NetworkChanged,
    NetworkDeleted,
    NetworkPut,
    NodeChanged,
    NodeDeleted,
    NodePut,
)

ME = "me"
BLUE = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24"))


def ep(name: str, ip: str, owner: str, at: float, mac: int | None = None, network: str = "blue") -> Endpoint:
    n = mac if mac is not None else int(ip.rsplit(".", 1)[1])
    return Endpoint(
        network=network,
        name=name,
        ip=IPv4Address(ip),
        mac=f"02:00:00:00:{n // 256:02x}:{n % 256:02x}",
        owner=owner,
        created_at=at,
    )


def node(name: str, last: int) -> Node:
    return Node(name=name, vtep=IPv4Address(f"198.18.0.{last}"), started_at=0.0)


def lines(out: Outcome) -> list[str]:
    text: list[str] = []
    for d in out.deltas:
        match d:
            case EndpointChanged(old, new):
                if new is None:
                    text.append(f"- {d.key}")
                else:
                    sign = "+" if old is None else "~"
                    text.append(f"{sign} {d.key} {new.ip}@{new.owner}")
            case NetworkChanged(old, new):
                text.append(f"{'-' if new is None else '+' if old is None else '~'}net {d.name}")
            case NodeChanged(old, new):
                text.append(f"{'-' if new is None else '+' if old is None else '~'}node {d.name}")
    text += [f"! {c.key}: {c.why}" for c in out.conflicts]
    return text


def kv() -> Admission:
    return Admission(node=ME, authority=True)


def gossip_only() -> Admission:
    return Admission(node=ME, authority=False)


# --- beside a KV store -------------------------------------------------------------------------


def test_store_facts_enter_the_view() -> None:
    a = kv()
    b1 = ep("b1", "10.1.0.11", "hb", 1)
    assert lines(a.from_store([NetworkPut(BLUE), NodePut(node("hb", 2)), EndpointPut(b1)])) == [
        "+node hb",
        "+ blue/b1 10.1.0.11@hb",
        "+net blue",
    ]
    assert lines(a.from_store([EndpointPut(b1)])) == []
    assert lines(a.from_store([EndpointDeleted("blue/b1"), NodeDeleted("hb"), NetworkDeleted("blue")])) == [
        "- blue/b1",
        "-node hb",
        "-net blue",
    ]


def test_store_records_of_this_node_enter_only_through_own_claims() -> None:
    a = kv()
    stale = ep("x", "10.1.0.5", ME, 1)
    assert lines(a.from_store([EndpointPut(stale), NodePut(node(ME, 1))])) == []
    mine = ep("x", "10.1.0.5", ME, 2)
    assert lines(a.from_own([EndpointPut(mine), NodePut(node(ME, 1))])) == [
        "+ blue/x 10.1.0.5@me",
        "+node me",
    ]
    # The store forgetting it (lease lapsed) changes nothing: the registry is the authority.
    assert lines(a.from_store([EndpointDeleted("blue/x"), NodeDeleted(ME)])) == []
    assert lines(a.from_own([EndpointDeleted("blue/x")])) == ["- blue/x"]


def test_ip_reuse_the_newer_store_record_wins_while_the_release_is_in_flight() -> None:
    a = kv()
    a.from_store([EndpointPut(ep("old", "10.1.0.7", "hb", 100.0))])
    # The reuse arrives before the release (one watch batch can hold both in either order).
    assert lines(a.from_store([EndpointPut(ep("new", "10.1.0.7", "hc", 200.0, mac=77))])) == [
        "- blue/old",
        "+ blue/new 10.1.0.7@hc",
    ]
    assert lines(a.from_store([EndpointDeleted("blue/old")])) == []


def test_own_confirmed_claim_beats_a_stale_store_record_on_its_address() -> None:
    a = kv()
    a.from_store([EndpointPut(ep("old", "10.1.0.7", "hb", 300.0))])
    # Our compare-and-set succeeded, so the store released "old" before: ours wins even
    # though the watch has not said so yet (and even with a skewed clock).
    assert lines(a.from_own([EndpointPut(ep("mine", "10.1.0.7", ME, 200.0, mac=99))])) == [
        "- blue/old",
        "+ blue/mine 10.1.0.7@me",
    ]
    assert lines(a.from_store([EndpointDeleted("blue/old")])) == []


def test_newer_record_whose_owner_is_unknown_still_takes_the_address() -> None:
    # No node record for "ghost" yet: it holds the IP in the view (desired state programs
    # nothing for it until the node arrives), so the old holder's neighbour goes away.
    a = kv()
    a.from_store([EndpointPut(ep("old", "10.1.0.7", "hb", 100.0))])
    assert lines(a.from_store([EndpointPut(ep("new", "10.1.0.7", "ghost", 200.0, mac=8))])) == [
        "- blue/old",
        "+ blue/new 10.1.0.7@ghost",
    ]


def test_gossip_runs_ahead_of_the_store_only_for_live_owners() -> None:
    a = kv()
    fresh = ep("g1", "10.1.0.20", "hb", 5)
    # hb is unknown to SWIM: nothing from it enters (a dead host's records circulate).
    assert lines(a.from_gossip([EndpointClaimed(fresh), NodeHeard(node("hb", 2))])) == []
    assert lines(a.from_gossip([MemberAdmissible("hb", True)])) == [
        "+ blue/g1 10.1.0.20@hb",
        "+node hb",
    ]
    # The store confirms it: same record, no change.
    assert lines(a.from_store([EndpointPut(fresh), NodePut(node("hb", 2))])) == []


def test_the_store_confirming_a_gossip_record_makes_it_a_store_claim() -> None:
    a = kv()
    b1 = ep("b1", "10.1.0.11", "hb", 300.0)
    a.from_gossip([MemberAdmissible("hb", True), MemberAdmissible("hc", True), EndpointClaimed(b1)])
    assert lines(a.from_store([EndpointPut(b1)])) == []
    # Now it stands on the store's word: an older gossip claim of its address cannot take it.
    assert lines(a.from_gossip([EndpointClaimed(ep("stale", "10.1.0.11", "hc", 100.0, mac=8))])) == []
    # Without the store's word, the first gossip claim of the address wins.
    assert lines(a.from_store([EndpointDeleted("blue/b1")])) == [
        "- blue/b1",
        "+ blue/stale 10.1.0.11@hc",
    ]


def test_a_host_cut_off_from_the_store_keeps_its_endpoints_while_gossip_hears_it() -> None:
    a = kv()
    b1 = ep("b1", "10.1.0.11", "hb", 1)
    a.from_gossip([MemberAdmissible("hb", True), EndpointClaimed(b1), NodeHeard(node("hb", 2))])
    a.from_store([EndpointPut(b1), NodePut(node("hb", 2))])
    # Its lease expired in the store, but it is alive and did not withdraw anything.
    assert lines(a.from_store([EndpointDeleted("blue/b1"), NodeDeleted("hb")])) == []
    # SWIM declares it dead: now the records go.
    assert lines(a.from_gossip([MemberAdmissible("hb", False)])) == ["- blue/b1", "-node hb"]


def test_an_expired_host_never_comes_back_from_peers_gossip_tables() -> None:
    a = kv()
    b1 = ep("b1", "10.1.0.11", "hb", 1)
    a.from_gossip([EndpointClaimed(b1)])  # peers still hold it; hb is dead (unknown to SWIM)
    a.from_store([EndpointPut(b1)])
    assert lines(a.from_store([EndpointDeleted("blue/b1")])) == ["- blue/b1"]
    # A snapshot after a reconnect does not bring it back either.
    assert lines(a.store_snapshot([NetworkPut(BLUE)])) == ["+net blue"]


def test_owner_tombstone_removes_a_gossip_record_ahead_of_the_store() -> None:
    a = kv()
    a.from_gossip([MemberAdmissible("hb", True), EndpointClaimed(ep("b1", "10.1.0.11", "hb", 1))])
    assert lines(a.from_gossip([EndpointReleased("hb", "blue/b1")])) == ["- blue/b1"]
    # Another owner's tombstone for that key is not a release of hb's claim.
    a.from_gossip([EndpointClaimed(ep("b1", "10.1.0.11", "hb", 2))])
    assert lines(a.from_gossip([EndpointReleased("hc", "blue/b1")])) == []


def test_owner_tombstone_removes_a_record_the_store_still_lists_during_an_outage() -> None:
    a = kv()
    b1 = ep("b1", "10.1.0.11", "hb", 10.0)
    a.from_gossip([MemberAdmissible("hb", True), EndpointClaimed(b1)])
    a.from_store([EndpointPut(b1)])
    # The store is unreachable: hb removes b1, and only gossip carries the news.
    assert lines(a.from_gossip([EndpointReleased("hb", "blue/b1", 20.0)])) == ["- blue/b1"]
    # The store's watch, lagging, repeats the old record: still withdrawn.
    assert lines(a.from_store([EndpointPut(b1)])) == []
    # A re-creation after the tombstone is a new claim.
    again = ep("b1", "10.1.0.11", "hb", 30.0)
    assert lines(a.from_store([EndpointPut(again)])) == ["+ blue/b1 10.1.0.11@hb"]


def test_a_tombstone_from_another_owner_does_not_withdraw_the_store_record() -> None:
    a = kv()
    a.from_store([EndpointPut(ep("b1", "10.1.0.11", "hb", 10.0))])
    assert lines(a.from_gossip([EndpointReleased("hc", "blue/b1", 20.0)])) == []


def test_store_record_beats_a_gossip_claim_on_the_same_address() -> None:
    a = kv()
    a.from_gossip([MemberAdmissible("hc", True)])
    a.from_store([EndpointPut(ep("held", "10.1.0.7", "hb", 300.0))])
    # An older unconfirmed claim (a stale record from hc) must not displace it.
    assert lines(a.from_gossip([EndpointClaimed(ep("stale", "10.1.0.7", "hc", 100.0, mac=8))])) == []
    assert lines(a.from_store([EndpointDeleted("blue/held")])) == [
        "- blue/held",
        "+ blue/stale 10.1.0.7@hc",
    ]


def test_snapshot_replaces_the_store_claims() -> None:
    a = kv()
    a.from_store([NetworkPut(BLUE), EndpointPut(ep("b1", "10.1.0.11", "hb", 1))])
    out = a.store_snapshot([NetworkPut(BLUE), EndpointPut(ep("b2", "10.1.0.12", "hb", 2))])
    assert lines(out) == ["- blue/b1", "+ blue/b2 10.1.0.12@hb"]


def test_no_conflicts_are_reported_with_an_authority() -> None:
    a = kv()
    a.from_own([EndpointPut(ep("mine", "10.1.0.7", ME, 1))])
    out = a.from_store([EndpointPut(ep("other", "10.1.0.7", "hb", 5, mac=3))])
    assert out.conflicts == []


# --- gossip-only ------------------------------------------------------------------------------


def test_gossip_only_first_claim_of_an_address_wins_on_every_host() -> None:
    first = ep("x", "10.1.0.9", "hb", 100.0)
    second = ep("y", "10.1.0.9", "hc", 200.0, mac=10)
    for order in ((first, second), (second, first)):
        a = gossip_only()
        out = Outcome()
        for record in order:
            out.extend(a.from_gossip([EndpointClaimed(record)]))
        assert a.view.endpoints == {"blue/x": first}


def test_gossip_only_own_claim_that_loses_is_a_conflict_once() -> None:
    a = gossip_only()
    a.from_own([EndpointPut(ep("mine", "10.1.0.9", ME, 200.0))])
    out = a.from_gossip([EndpointClaimed(ep("theirs", "10.1.0.9", "hb", 100.0, mac=10))])
    assert lines(out) == [
        "- blue/mine",
        "+ blue/theirs 10.1.0.9@hb",
        "! blue/mine: IP 10.1.0.9 is already taken in network blue (by hb's blue/theirs)",
    ]
    assert a.lost("blue/mine") is not None
    # Hearing the same again says nothing new.
    assert lines(a.from_gossip([EndpointClaimed(ep("theirs", "10.1.0.9", "hb", 100.0, mac=10))])) == []
    # Withdrawing ours ends the conflict.
    assert lines(a.from_own([EndpointDeleted("blue/mine")])) == []
    assert a.lost("blue/mine") is None


def test_gossip_only_same_key_claimed_by_two_hosts() -> None:
    a = gossip_only()
    a.from_own([EndpointPut(ep("web", "10.1.0.9", ME, 200.0))])
    out = a.from_gossip([EndpointClaimed(ep("web", "10.1.0.8", "hb", 100.0))])
    assert lines(out) == [
        "~ blue/web 10.1.0.8@hb",
        "! blue/web: endpoint blue/web already exists (held by hb)",
    ]


def test_gossip_only_a_release_hands_the_address_to_the_next_claim() -> None:
    a = gossip_only()
    a.from_gossip([EndpointClaimed(ep("old", "10.1.0.7", "hb", 100.0))])
    # The reuse arrives before the release: the first claim holds until it is released.
    assert lines(a.from_gossip([EndpointClaimed(ep("new", "10.1.0.7", "hc", 200.0, mac=8))])) == []
    assert lines(a.from_gossip([EndpointReleased("hb", "blue/old")])) == [
        "- blue/old",
        "+ blue/new 10.1.0.7@hc",
    ]


def test_gossip_only_dead_past_grace_drops_records_and_their_return_restores_them() -> None:
    a = gossip_only()
    a.from_gossip([EndpointClaimed(ep("b1", "10.1.0.11", "hb", 1)), NodeHeard(node("hb", 2))])
    assert lines(a.from_gossip([MemberAdmissible("hb", False)])) == ["- blue/b1", "-node hb"]
    assert lines(a.from_gossip([MemberAdmissible("hb", True)])) == ["+ blue/b1 10.1.0.11@hb", "+node hb"]
    assert lines(a.from_gossip([NodeGone("hb")])) == ["-node hb"]


def test_gossip_only_an_excluded_holder_frees_its_address() -> None:
    a = gossip_only()
    a.from_gossip([EndpointClaimed(ep("old", "10.1.0.7", "hb", 100.0))])
    a.from_gossip([EndpointClaimed(ep("new", "10.1.0.7", "hc", 200.0, mac=8))])
    assert lines(a.from_gossip([MemberAdmissible("hb", False)])) == [
        "- blue/old",
        "+ blue/new 10.1.0.7@hc",
    ]


def test_gossip_only_mac_is_an_address_too() -> None:
    a = gossip_only()
    a.from_gossip([EndpointClaimed(ep("a", "10.1.0.7", "hb", 100.0, mac=5))])
    assert lines(a.from_gossip([EndpointClaimed(ep("b", "10.1.0.8", "hc", 200.0, mac=5))])) == []
    assert set(a.view.endpoints) == {"blue/a"}


# --- networks ------------------------------------------------------------------------------------


def test_networks_from_gossip_oldest_claim_per_name_and_vni() -> None:
    a = gossip_only()
    a.from_own([NetworkClaimed(ME, BLUE, 200.0)])
    out = a.from_gossip([NetworkClaimed("hb", Network(name="blue", vni=7, subnet=BLUE.subnet), 100.0)])
    assert lines(out) == ["~net blue", "! blue: network blue already exists"]
    lost = a.network_lost("blue")
    assert lost is not None and lost.why == "network blue already exists"
    red = Network(name="red", vni=7, subnet=IPv4Network("10.2.0.0/24"))
    out = a.from_gossip([NetworkClaimed("hc", red, 300.0)])
    assert lines(out) == []  # VNI 7 is blue's (hb's) already
    assert lines(a.from_gossip([NetworkReleased("hb", "blue")])) == ["~net blue", "+net red"]
    assert a.network_lost("blue") is None


def test_a_network_outlives_its_creator_going_dead() -> None:
    """Gossip-only: the host that created a network dies (or is cut off) past its grace;
    its endpoints go, the network stays for everyone else's (issue 9, scenario 9)."""
    a = gossip_only()
    a.from_gossip([MemberAdmissible("hb", True), NetworkClaimed("hb", BLUE, 100.0)])
    a.from_gossip([EndpointClaimed(ep("b1", "10.1.0.11", "hb", 1))])
    a.from_gossip([MemberAdmissible("hc", True), EndpointClaimed(ep("c1", "10.1.0.12", "hc", 2))])
    assert lines(a.from_gossip([MemberAdmissible("hb", False)])) == ["- blue/b1"]
    assert "blue" in a.view.networks and "blue/c1" in a.view.endpoints
    assert lines(a.from_gossip([MemberAdmissible("hb", True)])) == ["+ blue/b1 10.1.0.11@hb"]
    assert lines(a.from_gossip([NetworkReleased("hb", "blue")])) == ["-net blue"]  # only a release ends it


def test_network_removed_mark_hides_claims_up_to_it() -> None:
    a = gossip_only()
    a.from_gossip([NetworkClaimed("hb", BLUE, 100.0)])
    assert lines(a.from_gossip([NetworkRemovedMark("blue", 150.0)])) == ["-net blue"]
    assert lines(a.from_gossip([NetworkClaimed("hc", BLUE, 120.0)])) == []
    assert lines(a.from_gossip([NetworkClaimed("hc", BLUE, 160.0)])) == ["+net blue"]


# --- properties --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_order_of_arrival_does_not_matter(seed: int) -> None:
    """Two hosts hearing the same gossip in any order end with the same view."""
    rng = random.Random(seed)
    owners = ["hb", "hc", "hd"]
    facts: list[EndpointClaimed | EndpointReleased | MemberAdmissible] = []
    for i in range(40):
        owner = rng.choice(owners)
        record = ep(f"e{rng.randrange(12)}", f"10.1.0.{rng.randrange(2, 10)}", owner, float(i), mac=i + 1)
        facts.append(EndpointClaimed(record))
    released = [EndpointReleased(f.endpoint.owner, f.endpoint.key) for f in rng.sample(facts, 10)]
    # A later claim by the same owner of the same key replaces the earlier one (as gossip's
    # per-record versions do): keep the last one per (owner, key).
    last: dict[tuple[str, str], EndpointClaimed] = {}
    for f in facts:
        last[(f.endpoint.owner, f.endpoint.key)] = f
    final = list(last.values())
    for r in released:
        last.pop((r.owner, r.key), None)
    expected = gossip_only()
    expected.from_gossip(list(last.values()))
    for trial in range(3):
        a = gossip_only()
        stream: list[EndpointClaimed | EndpointReleased] = [*final]
        rng.shuffle(stream)
        a.from_gossip(stream)
        a.from_gossip(released)
        assert a.view.endpoints == expected.view.endpoints, trial
        ips = [(e.network, e.ip) for e in a.view.endpoints.values()]
        assert len(ips) == len(set(ips))


@pytest.mark.parametrize("seed", range(20))
def test_view_never_holds_two_endpoints_on_one_address(seed: int) -> None:
    rng = random.Random(seed)
    for authority in (True, False):
        a = Admission(node=ME, authority=authority)
        a.from_gossip([MemberAdmissible(o, True) for o in ("hb", "hc")])
        for i in range(200):
            owner = rng.choice(["hb", "hc", ME])
            record = ep(f"e{rng.randrange(15)}", f"10.1.0.{rng.randrange(2, 8)}", owner, rng.random(), mac=i)
            choice = rng.randrange(5)
            if owner == ME:
                a.from_own([EndpointPut(record) if choice else EndpointDeleted(record.key)])
            elif choice == 0:
                a.from_store([EndpointDeleted(record.key)])
            elif choice == 1:
                a.from_store([EndpointPut(record)])
            elif choice == 2:
                a.from_gossip([EndpointReleased(owner, record.key)])
            else:
                a.from_gossip([EndpointClaimed(record)])
            ips = [(e.network, e.ip) for e in a.view.endpoints.values()]
            macs = [(e.network, e.mac) for e in a.view.endpoints.values()]
            assert len(ips) == len(set(ips))
            assert len(macs) == len(set(macs))


def test_a_store_record_that_comes_after_its_owner_withdrew_it_comes_in_withdrawn() -> None:
    """The store's watch lags gossip (a paced one by up to its pace): the owner's tombstone
    can come before the store's record of the endpoint. That record must not put the
    entries back until the store's delete follows."""
    a = kv()
    b1 = ep("b1", "10.1.0.11", "hb", 10.0)
    a.from_gossip([MemberAdmissible("hb", True)])
    assert lines(a.from_gossip([EndpointClaimed(b1)])) == ["+ blue/b1 10.1.0.11@hb"]
    assert lines(a.from_gossip([EndpointReleased("hb", "blue/b1", 20.0)])) == ["- blue/b1"]
    assert lines(a.from_store([EndpointPut(b1)])) == []
    assert lines(a.from_store([EndpointDeleted("blue/b1")])) == []
    # A re-creation after the tombstone is a new claim, by either source.
    again = ep("b1", "10.1.0.11", "hb", 30.0)
    assert lines(a.from_store([EndpointPut(again)])) == ["+ blue/b1 10.1.0.11@hb"]


def test_an_early_withdrawal_holds_only_its_owners_older_record_and_also_in_a_snapshot() -> None:
    a = kv()
    a.from_gossip([MemberAdmissible("hb", True), MemberAdmissible("hc", True)])
    a.from_gossip([EndpointReleased("hb", "blue/b1", 20.0), EndpointReleased("hb", "blue/b2", 20.0)])
    # Another owner's record under the key is not what hb withdrew.
    assert lines(a.from_store([EndpointPut(ep("b1", "10.1.0.11", "hc", 10.0))])) == ["+ blue/b1 10.1.0.11@hc"]
    # A snapshot (after a reconnect) carrying hb's old record of b2: withdrawn as well.
    b2 = ep("b2", "10.1.0.12", "hb", 10.0)
    assert lines(a.store_snapshot([EndpointPut(ep("b1", "10.1.0.11", "hc", 10.0)), EndpointPut(b2)])) == []


def test_early_withdrawals_are_bounded_the_oldest_forgotten_first() -> None:
    a = kv()
    a.from_gossip([MemberAdmissible("hb", True)])
    a.from_gossip([EndpointReleased("hb", f"blue/e{i}", 20.0) for i in range(EARLY_RELEASES + 1)])
    # e0 was forgotten: its late record is taken as it is; e1 is still withdrawn.
    assert lines(a.from_store([EndpointPut(ep("e0", "10.1.0.20", "hb", 10.0))])) == ["+ blue/e0 10.1.0.20@hb"]
    assert lines(a.from_store([EndpointPut(ep("e1", "10.1.0.21", "hb", 10.0))])) == []


def test_without_a_store_a_withdrawal_is_not_kept_for_a_record_to_come() -> None:
    a = Admission(node=ME, authority=False)
    a.from_gossip([EndpointReleased("hb", "blue/b1", 20.0)])
    assert a._released_early == {}  # gossip-only: no store record will ever come
