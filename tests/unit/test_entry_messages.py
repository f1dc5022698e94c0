"""The FDB and neighbour requests `Kernel.execute` writes, byte for byte as pyroute2 encodes
the same entries (pyroute2 is the reference; overlayd packs these itself, one head per
operation and device), and the sequence numbers a batch is stamped with."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from overlayd.core.model import Ip4
from overlayd.dataplane import netlink as nl
from overlayd.dataplane.commands import (
    AppendFlood,
    Command,
    DeleteFdb,
    DeleteFlood,
    DeleteNeigh,
    ReplaceFdb,
    ReplaceNeigh,
)
from overlayd.dataplane.kernel import Kernel
from overlayd.dataplane.kstate import FdbEntry, FloodEntry, NeighEntry
from overlayd.dataplane.rtnl import Rtnl

VX = "ovvx4243"
BRIDGE = nl.NUD_PERMANENT | nl.NUD_NOARP
CREATE_REPLACE = nl.NLM_F_REQUEST | nl.NLM_F_CREATE | nl.NLM_F_REPLACE
NEW, DEL, REQUEST, SELF = nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH, nl.NLM_F_REQUEST, nl.NTF_SELF


def pyroute2_request(
    kind: int, flags: int, family: int, index: int, state: int, ndm_flags: int, attrs: list[tuple[str, Any]]
) -> bytes:
    msg = ndmsg()
    msg["family"], msg["ifindex"], msg["state"], msg["flags"] = family, index, state, ndm_flags
    msg["attrs"] = attrs
    msg["header"]["type"], msg["header"]["flags"], msg["header"]["sequence_number"] = kind, flags, 0
    msg.encode()
    return bytes(msg.data)


def reference(cmd: Command, index: int) -> bytes:
    """What pyroute2 sends for `cmd` on device `index` (as `bridge fdb` / `ip neigh` would)."""
    match cmd:
        case ReplaceFdb(FdbEntry(_, mac, dst)):
            attrs = [("NDA_LLADDR", mac), ("NDA_DST", str(dst))]
            return pyroute2_request(NEW, CREATE_REPLACE, nl.AF_BRIDGE, index, BRIDGE, SELF, attrs)
        case DeleteFdb(FdbEntry(_, mac, dst)):
            attrs = [("NDA_LLADDR", mac), ("NDA_DST", str(dst))]
            return pyroute2_request(DEL, REQUEST, nl.AF_BRIDGE, index, BRIDGE, SELF, attrs)
        case AppendFlood(FloodEntry(_, dst)):
            attrs = [("NDA_LLADDR", "00:00:00:00:00:00"), ("NDA_DST", str(dst))]
            flags = REQUEST | nl.NLM_F_CREATE | nl.NLM_F_APPEND
            return pyroute2_request(NEW, flags, nl.AF_BRIDGE, index, BRIDGE, SELF, attrs)
        case DeleteFlood(FloodEntry(_, dst)):
            attrs = [("NDA_LLADDR", "00:00:00:00:00:00"), ("NDA_DST", str(dst))]
            return pyroute2_request(DEL, REQUEST, nl.AF_BRIDGE, index, BRIDGE, SELF, attrs)
        case ReplaceNeigh(NeighEntry(_, ip, mac)):
            attrs = [("NDA_LLADDR", mac), ("NDA_DST", str(ip))]
            return pyroute2_request(NEW, CREATE_REPLACE, nl.AF_INET, index, nl.NUD_PERMANENT, 0, attrs)
        case DeleteNeigh(NeighEntry(_, ip, _)):
            return pyroute2_request(DEL, REQUEST, nl.AF_INET, index, 0, 0, [("NDA_DST", str(ip))])
    raise AssertionError(f"not an entry command: {cmd!r}")


class RecordingRtnl:
    """Takes a batch as the kernel would, every request applied; keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def batch(self, msgs: Sequence[bytes]) -> list[tuple[int, str]]:
        self.sent.extend(msgs)
        return [(0, "")] * len(msgs)


def commands(mac: str, vtep: IPv4Address, ip: IPv4Address, device: str = VX) -> list[Command]:
    return [
        ReplaceFdb(FdbEntry(device, mac, vtep)),
        ReplaceNeigh(NeighEntry(device, ip, mac)),
        AppendFlood(FloodEntry(device, vtep)),
        DeleteFdb(FdbEntry(device, mac, vtep)),
        DeleteNeigh(NeighEntry(device, ip, mac)),
        DeleteFlood(FloodEntry(device, vtep)),
    ]


async def execute(cmds: list[Command], devices: dict[str, int]) -> tuple[list[str | None], list[bytes]]:
    kernel = Kernel()
    rtnl = RecordingRtnl()
    kernel._rtnl = rtnl  # type: ignore[assignment]
    results = await kernel.execute(cmds, devices=devices)
    assert [r.command for r in results] == cmds
    return [r.error for r in results], rtnl.sent


@pytest.mark.parametrize("index", [1, 7, 2**31 - 1])
async def test_every_entry_request_is_the_bytes_pyroute2_encodes(index: int) -> None:
    cmds = [
        *commands("02:40:00:00:01:01", Ip4("198.18.7.50"), Ip4("10.200.64.1")),
        *commands("0a:ff:12:34:ab:cd", IPv4Address("255.255.255.254"), IPv4Address("0.0.0.1")),
        *commands("02:40:00:00:01:01", IPv4Address("198.18.7.51"), IPv4Address("10.200.64.2"), "ovvx9"),
    ]
    errors, sent = await execute(cmds, {VX: index, "ovvx9": index + 1 if index < 2**31 - 1 else 3})
    assert errors == [None] * len(cmds)
    indexes = [index] * 12 + [index + 1 if index < 2**31 - 1 else 3] * 6
    assert sent == [reference(cmd, i) for cmd, i in zip(cmds, indexes, strict=True)]
    # The messages the kernel module and its tests build one at a time are the same bytes.
    mac = nl.mac_bytes("02:40:00:00:01:01")
    assert nl.entry_message("replace_fdb", index, mac, Ip4("198.18.7.50")) == sent[0]
    assert nl.delete_neigh_message(index, Ip4("10.200.64.1")) == sent[4]


async def test_an_entry_whose_mac_is_not_one_fails_alone() -> None:
    good = commands("02:40:00:00:01:01", Ip4("198.18.7.50"), Ip4("10.200.64.1"))
    bad: list[Command] = [
        ReplaceFdb(FdbEntry(VX, "02:40:00:00:01", Ip4("198.18.7.50"))),
        ReplaceNeigh(NeighEntry(VX, Ip4("10.200.64.1"), "02:40:00:00:01:zz")),
        DeleteFdb(FdbEntry(VX, "02:40:00:00:01:01:02", Ip4("198.18.7.50"))),
    ]
    errors, sent = await execute([bad[0], *good, bad[1], bad[2]], {VX: 7})
    assert errors[1:-2] == [None] * len(good)
    assert errors[0] == "not a MAC address: '02:40:00:00:01'"
    assert errors[-2] == "not a MAC address: '02:40:00:00:01:zz'"
    assert errors[-1] == "not a MAC address: '02:40:00:00:01:01:02'"
    assert sent == [reference(cmd, 7) for cmd in good]


def test_a_batch_takes_sequence_numbers_in_a_row_never_zero() -> None:
    one, other = socket.socketpair()
    try:
        rtnl = Rtnl(one)
        assert rtnl._seqs(3) == range(1, 4)
        assert rtnl._next_seq() == 4
        rtnl._seq = 2**32 - 3
        assert rtnl._seqs(2) == range(2**32 - 2, 2**32)  # up to the largest
        assert rtnl._seqs(2) == range(1, 3)  # then from 1 again: 0 is never one
        rtnl._seq = 2**32 - 2
        assert rtnl._seqs(3) == range(1, 4)  # a batch that would pass 0 starts at 1
    finally:
        one.close()
        other.close()
