"""Address choice (overlayd.core.ipam): the cursor, reservations, blocks and who holds them."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from overlayd.core.ipam import AddressBook, BlockTable, SubnetFull, block_of, block_prefixlen, blocks_of
from overlayd.core.model import Endpoint, Network
from overlayd.core.view import ClusterView, EndpointDeleted, EndpointPut

A = IPv4Address
NET = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/24"), gateway=A("10.1.0.1"))
WIDER = Network(name="blue", vni=100, subnet=IPv4Network("10.1.0.0/22"))  # 64 blocks of 16


def put(view: ClusterView, name: str, ip: str) -> None:
    view.apply(EndpointPut(Endpoint(network="blue", name=name, ip=A(ip), mac="02:00:00:00:00:01", owner="h")))


def test_takes_addresses_in_order_skipping_gateway_and_held_ones() -> None:
    view = ClusterView()
    put(view, "x", "10.1.0.3")
    book = AddressBook(view)
    assert [book.take(NET) for _ in range(3)] == [A("10.1.0.2"), A("10.1.0.4"), A("10.1.0.5")]


def test_reserved_addresses_are_not_handed_out_twice_until_released() -> None:
    book = AddressBook(ClusterView())
    first = book.take(NET)
    assert book.take(NET) != first
    book.release("blue", first)
    assert book.is_free(NET, first)


def test_cursor_wraps_to_find_released_holes() -> None:
    view = ClusterView()
    book = AddressBook(view)
    small = Network(name="blue", vni=1, subnet=IPv4Network("10.1.0.0/29"))  # .1 .. .6
    taken = [book.take(small) for _ in range(6)]
    for ip in taken:
        book.release("blue", ip)
        put(view, f"e{ip}", str(ip))
    with pytest.raises(SubnetFull, match="no free address"):
        book.take(small)
    view.apply(EndpointDeleted("blue/e10.1.0.3"))
    assert book.take(small) == A("10.1.0.3")


def test_network_and_broadcast_addresses_are_never_taken() -> None:
    book = AddressBook(ClusterView())
    tiny = Network(name="blue", vni=1, subnet=IPv4Network("10.1.0.0/30"))
    assert {book.take(tiny), book.take(tiny)} == {A("10.1.0.1"), A("10.1.0.2")}
    with pytest.raises(SubnetFull):
        book.take(tiny)


def test_take_within_blocks_stays_inside_them() -> None:
    book = AddressBook(ClusterView())
    block = IPv4Network("10.1.0.32/28")
    got = [book.take(NET, within=[block]) for _ in range(16)]
    assert all(ip in block for ip in got)
    assert len(set(got)) == 16
    with pytest.raises(SubnetFull, match=r"10\.1\.0\.32/28"):
        book.take(NET, within=[block])


@pytest.mark.parametrize(
    ("subnet", "prefix"),
    [
        ("10.0.0.0/16", 26),
        ("10.0.0.0/20", 26),
        ("10.0.0.0/22", 28),
        ("10.0.0.0/23", 29),
        ("10.0.0.0/24", 30),
        ("10.0.0.0/28", 30),
    ],
)
def test_block_size(subnet: str, prefix: int) -> None:
    net = IPv4Network(subnet)
    assert block_prefixlen(net) == prefix
    # Blocks for 64 hosts where blocks of 4 allow it (a /24: a 30-host cluster all hold one).
    assert len(blocks_of(net)) >= min(64, net.num_addresses // 4)
    assert block_of(net, net.network_address + 5).prefixlen == prefix


def test_first_claim_of_a_block_holds_it() -> None:
    for me in ("h1", "h2"):
        table = BlockTable(me)
        block = IPv4Network("10.1.0.16/28")
        table.claim("h2", "blue", block, 200.0)
        table.claim("h1", "blue", block, 100.0)
        assert table.holder("blue", block) == "h1"
        assert table.mine("blue") == ([block] if me == "h1" else [])
        table.release("h1", "blue", block)
        assert table.holder("blue", block) == "h2"


def test_excluded_owner_frees_its_blocks_until_it_returns() -> None:
    table = BlockTable("h1")
    block = blocks_of(NET.subnet)[1]
    table.claim("h2", "blue", block, 100.0)
    table.set_admissible("h2", False)
    assert table.holder("blue", block) is None
    assert table.free_block(NET, start=1) == block
    table.set_admissible("h2", True)
    assert table.holder("blue", block) == "h2"


def test_free_block_search_starts_where_asked_and_wraps() -> None:
    table = BlockTable("h1")
    blocks = list(blocks_of(NET.subnet))
    for b in blocks[3:]:
        table.claim("h9", "blue", b, 1.0)
    assert table.free_block(NET, start=5) == blocks[0]
    table.claim("h9", "blue", blocks[0], 1.0)
    assert table.free_block(NET, start=0) == blocks[1]


def test_room_counts_what_take_has_not_passed_and_stops_at_enough() -> None:
    book = AddressBook(ClusterView())
    blocks = list(blocks_of(WIDER.subnet))[4:8]  # 10.1.0.64/28 .. 10.1.0.112/28
    assert book.room(WIDER, [], 10) == 0
    assert book.room(WIDER, blocks, 1000) == 64
    for _ in range(5):
        book.take(WIDER, within=blocks)
    assert book.room(WIDER, blocks, 1000) == 11 + 48
    assert book.room(WIDER, blocks, 20) == 11 + 16  # counted block by block until enough
    for _ in range(11):
        book.take(WIDER, within=blocks)
    book.take(WIDER, within=blocks)  # the second block now
    assert book.room(WIDER, blocks, 1000) == 15 + 32  # the first one's holes are not counted


def test_a_block_claimed_under_a_coarser_earlier_size_holds_the_blocks_inside_it() -> None:
    # Before a /24 had blocks of 4 it had blocks of 16; a host that kept such a block across
    # its upgrade still allocates in all of it, so no one else may claim a part.
    table = BlockTable("h1")
    old = IPv4Network("10.1.0.16/28")
    table.claim("h2", "blue", old, 100.0)
    inside = [b for b in blocks_of(NET.subnet) if b.subnet_of(old)]
    assert len(inside) == 4
    assert {table.holder("blue", b) for b in inside} == {"h2"}
    assert table.holder("blue", blocks_of(NET.subnet)[3]) is None  # 10.1.0.12/30: outside it
    assert table.free_block(NET, start=4) == blocks_of(NET.subnet)[8]  # past 10.1.0.16/28
    table.release("h2", "blue", old)
    assert table.holder("blue", inside[0]) is None
