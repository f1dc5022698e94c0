"""Reading FDB and neighbour dumps a datagram at a time (`netlink.neigh_dump_rows`).

The messages are built with pyroute2's own message classes, in the layout the
kernel uses (a VXLAN FDB entry: NDA_LLADDR, NDA_DST, NDA_CACHEINFO; a neighbour:
NDA_DST, NDA_LLADDR, NDA_PROBES, NDA_CACHEINFO) and in others, and every answer is
checked against `parse_neigh`, the attribute scan notifications go through.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2.netlink.rtnl.ndmsg import ndmsg

from overlayd.dataplane import netlink as nl

SEQ = 41
VX_INDEX, OTHER_INDEX = 7, 3
CACHEINFO = ("NDA_CACHEINFO", {"ndm_confirmed": 0, "ndm_used": 0, "ndm_updated": 0, "ndm_refcnt": 0})


def encoded(msg: Any, kind: int, seq: int, flags: int) -> bytes:
    msg["header"]["type"] = kind
    msg["header"]["sequence_number"] = seq
    msg["header"]["flags"] = flags
    msg.encode()
    return bytes(msg.data)


def entry(
    family: int,
    index: int,
    attrs: list[tuple[str, Any]],
    *,
    state: int = nl.NUD_PERMANENT,
    flags: int = 0,
    seq: int = SEQ,
    msg_flags: int = nl.NLM_F_MULTI,
) -> bytes:
    msg = ndmsg()
    msg["family"], msg["ifindex"], msg["state"], msg["flags"] = family, index, state, flags
    msg["attrs"] = attrs
    return encoded(msg, nl.RTM_NEWNEIGH, seq, msg_flags)


def fdb(mac: str, dst: str, index: int = VX_INDEX, **kw: Any) -> bytes:
    """A VXLAN FDB entry as the kernel dumps it."""
    kw.setdefault("flags", nl.NTF_SELF)
    return entry(nl.AF_BRIDGE, index, [("NDA_LLADDR", mac), ("NDA_DST", dst), CACHEINFO], **kw)


def neigh(ip: str, mac: str, index: int = VX_INDEX, **kw: Any) -> bytes:
    """A neighbour entry as the kernel dumps it."""
    attrs = [("NDA_DST", ip), ("NDA_LLADDR", mac), ("NDA_PROBES", 0), CACHEINFO]
    return entry(nl.AF_INET, index, attrs, **kw)


def done(seq: int = SEQ, flags: int = nl.NLM_F_MULTI) -> bytes:
    return nl.HDR.pack(nl.HDR.size + 4, nl.NLMSG_DONE, flags, seq, 0) + bytes(4)


def error(code: int, text: str) -> bytes:
    """An NLMSG_ERROR as a socket with NETLINK_CAP_ACK and NETLINK_EXT_ACK gets it: the errno,
    the request's header echoed, the kernel's explanation."""
    request = nl.HDR.pack(nl.HDR.size + nl.NDMSG.size, nl.RTM_GETNEIGH, nl.NLM_F_DUMP, SEQ, 0)
    body = nl.I32.pack(-code) + request + nl.nla_str(nl.NLMSGERR_ATTR_MSG, text)
    return nl.HDR.pack(nl.HDR.size + len(body), nl.NLMSG_ERROR, nl.NLM_F_ACK_TLVS, SEQ, 0) + body


def reference(data: bytes, *, devices: set[int], flags: int = 0, state: int = 0) -> list[nl.RawNeigh]:
    """What the attribute scan keeps of the same datagram."""
    out = []
    for kind, _flags, seq, start, end in nl.messages(data):
        if kind == nl.RTM_NEWNEIGH and seq == SEQ:
            row = nl.parse_neigh(data, start, end)
            if row is not None and row[0] in devices and (row[1] & flags or row[2] & state):
                out.append(row)
    return out


def read(data: bytes, **kw: Any) -> tuple[list[nl.RawNeigh], nl.DumpPart]:
    rows: list[nl.RawNeigh] = []
    part = nl.neigh_dump_rows(data, SEQ, rows, **kw)
    return rows, part


def test_fdb_entries_the_device_holds_are_read_as_the_attribute_scan_reads_them() -> None:
    data = b"".join(
        [
            fdb("02:43:00:00:00:02", "198.18.5.2"),
            fdb("00:00:00:00:00:00", "198.18.5.3"),
            # The bridge's own entry for the same MAC on the same port: not the device's.
            entry(
                nl.AF_BRIDGE,
                VX_INDEX,
                [("NDA_LLADDR", "02:43:00:00:00:02"), ("NDA_MASTER", 6), CACHEINFO],
                state=2,
            ),
            fdb("02:43:00:00:00:04", "198.18.5.2", index=OTHER_INDEX),
            done(),
        ]
    )
    rows, part = read(data, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert rows == reference(data, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert [(r[3].hex(":"), r[4]) for r in rows] == [
        ("02:43:00:00:00:02", bytes([198, 18, 5, 2])),
        ("00:00:00:00:00:00", bytes([198, 18, 5, 3])),
    ]
    assert part == nl.DumpPart(done=True, interrupted=False)


def test_permanent_neighbours_are_read_others_left_out() -> None:
    data = b"".join(
        [
            neigh("10.43.0.2", "02:43:00:00:00:02"),
            neigh("10.43.0.3", "02:43:00:00:00:03", state=0x02),  # reachable: learned, not ours
            neigh("10.43.0.4", "02:43:00:00:00:04", index=OTHER_INDEX),
            neigh("10.43.0.5", "02:43:00:00:00:05", state=nl.NUD_PERMANENT | nl.NUD_NOARP),
        ]
    )
    rows, part = read(data, devices={VX_INDEX}, state=nl.NUD_PERMANENT)
    assert rows == reference(data, devices={VX_INDEX}, state=nl.NUD_PERMANENT)
    assert [r[4] for r in rows] == [bytes([10, 43, 0, 2]), bytes([10, 43, 0, 5])]
    assert part == nl.DumpPart(done=False, interrupted=False)  # no NLMSG_DONE yet: more to read


def test_entries_laid_out_otherwise_are_read_by_the_attribute_scan() -> None:
    data = b"".join(
        [
            # Other order, an attribute before the address pair, a remote with port and VNI,
            # an IPv6 destination (not ours), no link-layer address (not ours).
            entry(
                nl.AF_BRIDGE,
                VX_INDEX,
                [("NDA_DST", "198.18.5.2"), ("NDA_LLADDR", "02:43:00:00:00:06")],
                flags=2,
            ),
            entry(
                nl.AF_BRIDGE,
                VX_INDEX,
                [("NDA_VNI", 77), ("NDA_LLADDR", "02:43:00:00:00:07"), ("NDA_DST", "198.18.5.4")],
                flags=2,
            ),
            entry(
                nl.AF_BRIDGE,
                VX_INDEX,
                [
                    ("NDA_LLADDR", "02:43:00:00:00:08"),
                    ("NDA_DST", "198.18.5.5"),
                    ("NDA_PORT", 5555),
                    ("NDA_VNI", 77),
                ],
                flags=2,
            ),
            entry(
                nl.AF_BRIDGE,
                VX_INDEX,
                [("NDA_LLADDR", "02:43:00:00:00:09"), ("NDA_DST", "2001:db8::1")],
                flags=2,
            ),
            entry(nl.AF_INET, VX_INDEX, [("NDA_DST", "10.43.0.9")]),
            entry(nl.AF_INET, VX_INDEX, [("NDA_LLADDR", "02:43:00:00:00:0a"), ("NDA_DST", "10.43.0.10")]),
        ]
    )
    rows, _ = read(data, devices={VX_INDEX}, flags=nl.NTF_SELF, state=nl.NUD_PERMANENT)
    assert rows == reference(data, devices={VX_INDEX}, flags=nl.NTF_SELF, state=nl.NUD_PERMANENT)
    assert [r[3].hex(":")[-2:] for r in rows] == ["06", "07", "08", "0a"]


def test_messages_of_another_request_are_skipped() -> None:
    data = fdb("02:43:00:00:00:02", "198.18.5.2", seq=SEQ - 1) + done(seq=SEQ - 1)
    assert read(data, devices={VX_INDEX}, flags=nl.NTF_SELF) == ([], nl.DumpPart(False, False))
    data += fdb("02:43:00:00:00:03", "198.18.5.2") + done()
    rows, part = read(data, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert [r[3].hex(":") for r in rows] == ["02:43:00:00:00:03"] and part.done


def test_a_dump_marked_interrupted_says_so() -> None:
    flags = nl.NLM_F_MULTI | nl.NLM_F_DUMP_INTR
    in_entry = fdb("02:43:00:00:00:02", "198.18.5.2", msg_flags=flags)
    assert read(in_entry, devices={VX_INDEX}, flags=nl.NTF_SELF)[1] == nl.DumpPart(False, True)
    rows, part = read(fdb("02:43:00:00:00:02", "198.18.5.2") + done(flags=flags), devices={VX_INDEX}, flags=2)
    assert len(rows) == 1 and part == nl.DumpPart(True, True)


def test_an_error_ends_the_dump_with_the_kernels_reason() -> None:
    rows, part = read(error(errno.EINVAL, "Invalid header for neighbor dump"), devices={VX_INDEX}, flags=2)
    assert rows == []
    assert part == nl.DumpPart(True, False, errno.EINVAL, "Invalid header for neighbor dump")


def test_a_truncated_datagram_yields_what_is_whole() -> None:
    data = fdb("02:43:00:00:00:02", "198.18.5.2") + fdb("02:43:00:00:00:03", "198.18.5.2")
    rows, part = read(data[: len(data) - 10], devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert [r[3].hex(":") for r in rows] == ["02:43:00:00:00:02"] and not part.done


# --- datagrams of entries all of one length: read whole (`_uniform_rows`) -----------------


def fdb_run(count: int, **kw: Any) -> list[bytes]:
    return [
        fdb(f"02:43:00:00:{i >> 8:02x}:{i & 255:02x}", f"198.18.5.{2 + i % 3}", **kw) for i in range(count)
    ]


def check_uniform(data: bytes, *, whole: bool, **kw: Any) -> tuple[list[nl.RawNeigh], nl.DumpPart]:
    """Read `data` both ways: the same rows as the attribute scan, and taken whole or not as said."""
    rows, part = read(data, **kw)
    assert rows == reference(data, **kw)
    taken: list[nl.RawNeigh] = []
    assert (
        nl._uniform_rows(data, SEQ, taken, kw["devices"], kw.get("flags", 0), kw.get("state", 0)) is not None
    ) == whole
    return rows, part


def test_a_run_of_entries_of_one_length_is_read_whole() -> None:
    data = b"".join([*fdb_run(300), fdb("00:00:00:00:00:00", "198.18.5.9"), done()])
    rows, part = check_uniform(data, whole=True, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert len(rows) == 301 and part == nl.DumpPart(True, False)
    neighbours = b"".join(
        neigh(f"10.43.{i >> 8}.{i & 255}", f"02:43:00:00:00:{i & 255:02x}") for i in range(200)
    )
    rows, part = check_uniform(neighbours, whole=True, devices={VX_INDEX}, state=nl.NUD_PERMANENT)
    assert len(rows) == 200 and part == nl.DumpPart(False, False)


def test_unwanted_entries_of_the_same_length_are_left_out_of_a_whole_read() -> None:
    data = b"".join(
        [
            *fdb_run(50),
            *fdb_run(20, index=OTHER_INDEX),
            *fdb_run(20, flags=0),  # the same length, but not the device's own
            *fdb_run(10),
        ]
    )
    rows, _ = check_uniform(data, whole=True, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert len(rows) == 60
    rows, _ = check_uniform(data, whole=True, devices={OTHER_INDEX}, flags=nl.NTF_SELF)
    assert len(rows) == 20


def test_a_wanted_entry_laid_out_otherwise_sends_the_datagram_to_the_walk() -> None:
    # The same length as the others, the addresses in the other order.
    swapped = entry(
        nl.AF_BRIDGE,
        VX_INDEX,
        [("NDA_DST", "198.18.5.7"), ("NDA_LLADDR", "02:43:00:00:07:07"), CACHEINFO],
        flags=2,
    )
    data = b"".join([*fdb_run(30), swapped, *fdb_run(30)])
    assert len(swapped) == len(fdb_run(1)[0])
    rows, _ = check_uniform(data, whole=False, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert len(rows) == 61 and rows[30][3].hex(":") == "02:43:00:00:07:07"
    # Unwanted, it changes nothing.
    rows, _ = check_uniform(data, whole=True, devices={OTHER_INDEX}, flags=nl.NTF_SELF)
    assert rows == []


def test_a_whole_read_sees_another_request_and_an_interrupted_dump() -> None:
    stale = b"".join([*fdb_run(10), fdb("02:43:00:00:09:09", "198.18.5.2", seq=SEQ + 5), *fdb_run(10)])
    rows, _ = check_uniform(stale, whole=False, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert len(rows) == 20
    flags = nl.NLM_F_MULTI | nl.NLM_F_DUMP_INTR
    changed = b"".join([*fdb_run(10), fdb("02:43:00:00:09:09", "198.18.5.2", msg_flags=flags), *fdb_run(10)])
    rows, part = check_uniform(changed, whole=True, devices={VX_INDEX}, flags=nl.NTF_SELF)
    assert len(rows) == 21 and part == nl.DumpPart(False, True)
    rows, part = check_uniform(
        b"".join(fdb_run(10)) + done(flags=flags), whole=True, devices={VX_INDEX}, flags=2
    )
    assert part == nl.DumpPart(True, True)
