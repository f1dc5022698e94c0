"""The kernel watch's pure parts: decoding netlink messages, and the state and expectations they feed.

Messages are packed here as the kernel sends them (linux/rtnetlink.h,
neighbour.h, if_link.h); the listener against a real kernel is tested in
tests/integration/test_kwatch.py.
"""

from __future__ import annotations

import socket
import struct

import pytest

from overlayd.lab.kwatch import (
    FLOOD_MAC,
    Change,
    Decoder,
    Expectation,
    Fdb,
    Link,
    Neigh,
    WatchState,
)

RTM_NEWLINK, RTM_DELLINK, RTM_NEWNEIGH, RTM_DELNEIGH = 16, 17, 28, 29
NLMSG_DONE = 3
AF_UNSPEC, AF_INET, AF_BRIDGE = 0, 2, 7
NUD_INCOMPLETE, NUD_PERMANENT = 0x01, 0x80
NTF_SELF, NTF_MASTER, NTF_PROXY = 0x02, 0x04, 0x08
VX = "ovvx42"
MAC = "02:00:00:00:00:01"


def nla(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def msg(kind: int, body: bytes, *, seq: int = 0, pid: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, pid) + body


def link(kind: int, index: int, name: str, family: int = AF_UNSPEC) -> bytes:
    body = struct.pack("=BxHiII", family, 1, index, 0, 0) + nla(3, name.encode() + b"\0")
    return msg(kind, body)


def neigh(
    kind: int,
    index: int,
    family: int,
    *,
    mac: str | None = MAC,
    dst: str | None = None,
    state: int = NUD_PERMANENT,
    flags: int = 0,
) -> bytes:
    body = struct.pack("=BxxxiHBB", family, index, state, flags, 0)
    if mac is not None:
        body += nla(2, bytes.fromhex(mac.replace(":", "")))
    if dst is not None:
        body += nla(1, socket.inet_aton(dst))
    return msg(kind, body)


def decoder_with_devices() -> Decoder:
    d = Decoder()
    d.feed(link(RTM_NEWLINK, 7, VX) + link(RTM_NEWLINK, 8, "ovbr42") + link(RTM_NEWLINK, 2, "eth0"))
    return d


def test_links_are_watched_by_name_prefix() -> None:
    d = Decoder()
    changes, ends = d.feed(link(RTM_NEWLINK, 7, VX) + link(RTM_NEWLINK, 8, "ovbr42"))
    assert changes == [Change(Link(VX), True)]
    assert ends == []
    assert d.names == {7: VX, 8: "ovbr42"}
    assert d.feed(link(RTM_DELLINK, 7, VX))[0] == [Change(Link(VX), False)]


def test_a_port_leaving_its_bridge_is_not_a_deleted_device() -> None:
    d = decoder_with_devices()
    # The bridge's AF_BRIDGE RTM_DELLINK when the VXLAN device leaves it (e.g. nomaster).
    assert d.feed(link(RTM_DELLINK, 7, VX, family=AF_BRIDGE))[0] == []


def test_rename_away_from_the_prefix_is_a_removal() -> None:
    d = decoder_with_devices()
    assert d.feed(link(RTM_NEWLINK, 7, "renamed"))[0] == [Change(Link(VX), False)]


def test_fdb_entries_on_watched_devices_with_a_destination() -> None:
    d = decoder_with_devices()
    new = neigh(RTM_NEWNEIGH, 7, AF_BRIDGE, dst="198.18.0.12", flags=NTF_SELF)
    assert d.feed(new)[0] == [Change(Fdb(VX, MAC, "198.18.0.12"), True)]
    gone = neigh(RTM_DELNEIGH, 7, AF_BRIDGE, dst="198.18.0.12", flags=NTF_SELF)
    assert d.feed(gone)[0] == [Change(Fdb(VX, MAC, "198.18.0.12"), False)]
    # The bridge's own entry for the port (no destination) is not a VXLAN entry...
    assert d.feed(neigh(RTM_NEWNEIGH, 7, AF_BRIDGE, flags=NTF_MASTER))[0] == []
    # ...and entries on other devices are not watched at all.
    assert d.feed(neigh(RTM_NEWNEIGH, 2, AF_BRIDGE, dst="198.18.0.12", flags=NTF_SELF))[0] == []
    assert d.feed(neigh(RTM_NEWNEIGH, 99, AF_BRIDGE, dst="198.18.0.12", flags=NTF_SELF))[0] == []


def test_neighbour_entries_and_their_deletions() -> None:
    d = decoder_with_devices()
    assert d.feed(neigh(RTM_NEWNEIGH, 7, AF_INET, dst="10.100.0.3"))[0] == [
        Change(Neigh(VX, "10.100.0.3", MAC), True)
    ]
    # A deletion may come without the MAC: every entry of that IP goes.
    assert d.feed(neigh(RTM_DELNEIGH, 7, AF_INET, mac=None, dst="10.100.0.3"))[0] == [
        Change(Neigh(VX, "10.100.0.3", ""), False, partial=True)
    ]
    # Unresolved is absent; proxy entries are not neighbour entries.
    unresolved = neigh(RTM_NEWNEIGH, 7, AF_INET, mac=None, dst="10.100.0.4", state=NUD_INCOMPLETE)
    assert d.feed(unresolved)[0] == [Change(Neigh(VX, "10.100.0.4", ""), False, partial=True)]
    assert d.feed(neigh(RTM_NEWNEIGH, 7, AF_INET, dst="10.100.0.5", flags=NTF_PROXY))[0] == []


def test_several_messages_in_one_datagram_and_the_end_of_a_dump() -> None:
    d = decoder_with_devices()
    data = (
        neigh(RTM_NEWNEIGH, 7, AF_BRIDGE, dst="198.18.0.12", flags=NTF_SELF)
        + neigh(RTM_NEWNEIGH, 7, AF_INET, dst="10.100.0.3")
        + msg(NLMSG_DONE, struct.pack("=i", 0), seq=5, pid=1234)
    )
    changes, ends = d.feed(data)
    assert [c.entry for c in changes] == [Fdb(VX, MAC, "198.18.0.12"), Neigh(VX, "10.100.0.3", MAC)]
    assert ends == [(NLMSG_DONE, 5, 1234)]
    # A truncated trailing message is ignored, not misread.
    assert d.feed(data[:-3])[0] == changes


# --- state ---


def state() -> WatchState:
    return WatchState(["a", "b"])


def test_state_keeps_when_each_entry_appeared_and_vanished() -> None:
    st = state()
    e = Fdb(VX, MAC, "198.18.0.12")
    st.apply("a", Change(e, True), 1.0)
    st.apply("a", Change(e, True), 2.0)  # a repeat notification changes nothing
    assert st.ns["a"].present == {e: 1.0}
    st.apply("a", Change(e, False), 3.0)
    assert st.ns["a"].present == {}
    assert st.ns["a"].gone == {e: 3.0}
    assert [(ev.t, ev.present) for ev in st.events] == [(1.0, True), (3.0, False)]
    assert st.ns["b"].present == {}


def test_a_unicast_fdb_entry_replaces_the_mac_s_destination_a_flood_entry_adds_one() -> None:
    st = state()
    st.apply("a", Change(Fdb(VX, MAC, "198.18.0.12"), True), 1.0)
    st.apply("a", Change(Fdb(VX, MAC, "198.18.0.13"), True), 2.0)
    assert set(st.ns["a"].present) == {Fdb(VX, MAC, "198.18.0.13")}
    st.apply("a", Change(Fdb(VX, FLOOD_MAC, "198.18.0.12"), True), 3.0)
    st.apply("a", Change(Fdb(VX, FLOOD_MAC, "198.18.0.13"), True), 4.0)
    assert len(st.ns["a"].present) == 3
    st.apply("a", Change(Fdb(VX, FLOOD_MAC, ""), False, partial=True), 5.0)
    assert set(st.ns["a"].present) == {Fdb(VX, MAC, "198.18.0.13")}


def test_a_neighbour_entry_replaces_the_ip_s_mac() -> None:
    st = state()
    st.apply("a", Change(Neigh(VX, "10.0.0.1", MAC), True), 1.0)
    st.apply("a", Change(Neigh(VX, "10.0.0.1", "02:00:00:00:00:02"), True), 2.0)
    assert set(st.ns["a"].present) == {Neigh(VX, "10.0.0.1", "02:00:00:00:00:02")}
    assert st.ns["a"].gone == {Neigh(VX, "10.0.0.1", MAC): 2.0}


def test_a_deleted_device_takes_its_entries() -> None:
    st = state()
    for change in (
        Change(Link(VX), True),
        Change(Fdb(VX, MAC, "198.18.0.12"), True),
        Change(Neigh(VX, "10.0.0.1", MAC), True),
        Change(Fdb("ovvx7", MAC, "198.18.0.12"), True),
    ):
        st.apply("a", change, 1.0)
    st.apply("a", Change(Link(VX), False), 2.0)
    assert set(st.ns["a"].present) == {Fdb("ovvx7", MAC, "198.18.0.12")}


def test_a_full_read_removes_what_it_no_longer_shows() -> None:
    st = state()
    kept, lost = Fdb(VX, MAC, "198.18.0.12"), Neigh(VX, "10.0.0.1", MAC)
    st.apply("a", Change(kept, True), 1.0)
    st.apply("a", Change(lost, True), 1.0)
    st.overrun("a", 2.0)
    st.sync_start("a")
    st.apply("a", Change(kept, True), 3.0, exact=False)
    st.sync_end("a", 4.0)
    assert set(st.ns["a"].present) == {kept}
    assert st.events[-1].entry == lost and st.events[-1].t == 4.0 and not st.events[-1].exact
    assert st.overruns == [("a", 2.0)]


# --- expectations ---


def test_expectation_completes_at_the_event_that_satisfies_it_across_namespaces() -> None:
    st = state()
    e1, e2 = Fdb(VX, MAC, "198.18.0.12"), Neigh(VX, "10.0.0.1", MAC)
    exp = Expectation({"a": [e1, e2], "b": [e1]}, present=True)
    st.register(exp)
    assert (exp.total, exp.remaining, exp.done) == (3, 3, False)
    st.apply("a", Change(e1, True), 1.0)
    st.apply("b", Change(e1, True), 1.5)
    assert exp.remaining == 1 and exp.done_at_by_ns == {"b": 1.5}
    st.apply("a", Change(e2, True), 2.0)
    assert exp.done_at == 2.0
    assert exp.done_at_by_ns == {"a": 2.0, "b": 1.5}
    assert st.expectations == []  # done ones are no longer tracked


def test_expectation_counts_what_is_already_there_from_when_it_got_there() -> None:
    st = state()
    e = Fdb(VX, MAC, "198.18.0.12")
    st.apply("a", Change(e, True), 1.0)
    exp = Expectation({"a": [e]}, present=True)
    st.register(exp)
    assert exp.done_at == 1.0


def test_expectation_must_hold_all_at_once() -> None:
    st = state()
    e1, e2 = Fdb(VX, MAC, "198.18.0.12"), Neigh(VX, "10.0.0.1", MAC)
    exp = Expectation({"a": [e1, e2]}, present=True)
    st.register(exp)
    st.apply("a", Change(e1, True), 1.0)
    st.apply("a", Change(e1, False), 2.0)
    st.apply("a", Change(e2, True), 3.0)
    assert not exp.done and exp.remaining == 1
    st.apply("a", Change(e1, True), 4.0)
    assert exp.done_at == 4.0


def test_absence_expectation() -> None:
    st = state()
    e, never = Fdb(VX, MAC, "198.18.0.12"), Neigh(VX, "10.0.0.9", MAC)
    st.apply("a", Change(e, True), 1.0)
    exp = Expectation({"a": [e, never]}, present=False)
    st.register(exp)
    assert exp.remaining == 1  # never seen counts as gone already
    st.apply("a", Change(e, False), 2.5)
    assert exp.done_at == 2.5
    empty = Expectation({"a": []}, present=True)
    st.register(empty)
    assert empty.done


def test_expectation_on_an_unwatched_namespace_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not watched"):
        state().register(Expectation({"zz": [Link(VX)]}, present=True))
