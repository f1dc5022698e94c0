"""The gossip wire schema: every message round-trips; anything else is one SchemaError."""

from __future__ import annotations

import os
import random
from typing import Any

import msgpack
import pytest

from overlayd.gossip import schema
from overlayd.gossip.schema import (
    Ack,
    Digest,
    Members,
    MemberState,
    MemberUpdate,
    Ping,
    PingReq,
    Push,
    PushAck,
    Record,
    Records,
    Request,
    SchemaError,
)

UP = MemberUpdate("h2", "198.18.0.2", 7946, MemberState.SUSPECT, 12)
PUT = Record("endpoint", "net1/c1", "h1", 1700, 3, {"ip": "10.0.0.5", "tags": ["a", 1, 2.5, None, True]})
TOMB = Record("endpoint", "net1/c0", "h1", 1700, 4, None, 1234.5)

MESSAGES = [
    Ping(1, "h2", (UP,)),
    PingReq(2, "h3", "198.18.0.3", 7946, ()),
    Ack(3, "h3", (UP, UP)),
    Push(4, (PUT, TOMB)),
    PushAck((1700, 4)),
    Digest("", None, (("h1", (1700, 4)), ("h2", (9, 0)))),
    Digest("h1", "h3", (("h2", (1, 1)),)),
    Request("h1", (1700, 2)),
    Records("h1", (1700, 2), (1700, 4), False, (PUT, TOMB)),
    Members(False, (UP,)),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: schema.Message) -> None:
    assert schema.decode(schema.encode(msg)) == msg


def wire(*fields: Any) -> bytes:
    return bytes(msgpack.packb(list(fields), use_bin_type=True))


REC = PUT.to_wire()
MEM = UP.to_wire()

MALFORMED = {
    "empty": b"",
    "not msgpack": b"\xc1\xc1\xc1",
    "truncated": schema.encode(MESSAGES[3])[:-3],
    "trailing bytes": schema.encode(MESSAGES[0]) + b"\x00",
    "not an array": bytes(msgpack.packb({"type": "ping"})),
    "wrong version": wire(2, "ping", 1, "h2", []),
    "bool as version": wire(True, "ping", 1, "h2", []),
    "unknown type": wire(1, "pong", 1, "h2", []),
    "type not a string": wire(1, 7, 1, "h2", []),
    "missing field": wire(1, "ping", 1, "h2"),
    "extra field": wire(1, "ping", 1, "h2", [], 0),
    "negative seq": wire(1, "ping", -1, "h2", []),
    "bool as int": wire(1, "ping", True, "h2", []),
    "huge int": wire(1, "ping", 2**64 - 1, "h2", []),
    "float seq": wire(1, "ping", 1.0, "h2", []),
    "empty name": wire(1, "ping", 1, "", []),
    "control char in name": wire(1, "ping", 1, "h\n2", []),
    "bytes as name": wire(1, "ping", 1, b"h2", []),
    "updates not a list": wire(1, "ping", 1, "h2", {}),
    "bad member state": wire(1, "ack", 1, "h2", [["h2", "198.18.0.2", 7946, "zombie", 1]]),
    "port zero": wire(1, "ack", 1, "h2", [["h2", "198.18.0.2", 0, "alive", 1]]),
    "port too big": wire(1, "ping-req", 1, "h2", "198.18.0.2", 70000, []),
    "hops absurd": wire(1, "push", 1000, [REC]),
    "record short": wire(1, "push", 1, [REC[:6]]),
    "payload not a map": wire(1, "push", 1, [[*REC[:5], [1, 2], None]]),
    "payload with bytes": wire(1, "push", 1, [[*REC[:5], {"k": b"\x00"}, None]]),
    "payload int keys": wire(1, "push", 1, [[*REC[:5], {1: "x"}, None]]),
    "payload with deleted_at": wire(1, "push", 1, [[*REC[:5], {"a": 1}, 5.0]]),
    "tombstone without time": wire(1, "push", 1, [[*REC[:5], None, None]]),
    "tombstone NaN time": wire(1, "push", 1, [[*REC[:5], None, float("nan")]]),
    "payload NaN": wire(1, "push", 1, [[*REC[:5], {"x": float("inf")}, None]]),
    "version negative": wire(1, "push", 1, [[*REC[:4], -1, {"a": 1}, None]]),
    "version zero": wire(1, "push", 1, [[*REC[:4], 0, {"a": 1}, None]]),
    "records of another owner": wire(1, "records", "h9", 1, 0, 1, 5, False, [REC]),
    "records upto before after": wire(1, "records", "h1", 1, 5, 1, 0, False, []),
    "digest entry outside range": wire(1, "digest", "h5", "h9", [["h1", 1, 1]]),
    "digest entry short": wire(1, "digest", "", None, [["h1", 1]]),
    "request bad stamp": wire(1, "request", "h1", "1", 0),
    "members reply not bool": wire(1, "members", 1, [MEM]),
    "ext type": b"\x95\x01\xa4ping\x01\xd4\x05\x00\x90",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_is_one_error_type(data: bytes) -> None:
    with pytest.raises(SchemaError):
        schema.decode(data)


def test_deep_payload_rejected() -> None:
    deep: Any = "x"
    for _ in range(schema.MAX_DEPTH + 2):
        deep = {"d": deep}
    with pytest.raises(SchemaError):
        schema.decode(wire(1, "push", 1, [[*REC[:5], deep, None]]))


def _nested(depth: int, leaf: Any) -> Any:
    """`leaf` at `depth` levels below the payload map (depth 1: a value of the payload)."""
    value = leaf
    for _ in range(depth - 1):
        value = {"d": value}
    return {"d": value}


@pytest.mark.parametrize("leaf", ["x", 1, 1.5, None, True, [], {}])
def test_payload_depth_limit_is_exact(leaf: Any) -> None:
    # Flat maps take a fast path; the limit must be the same on it and off it.
    ok = schema.decode(wire(1, "push", 1, [[*REC[:5], _nested(schema.MAX_DEPTH, leaf), None]]))
    assert isinstance(ok, Push)
    with pytest.raises(SchemaError, match="too deep"):
        schema.decode(wire(1, "push", 1, [[*REC[:5], _nested(schema.MAX_DEPTH + 1, leaf), None]]))


@pytest.mark.parametrize(
    "payload",
    [
        {"a": "x", "n": 2**63},
        {"a": "x", "n": 2**64 - 1},
        {"a": "x", "n": float("nan")},
        {"a": "x", "n": float("-inf")},
        {"a": "x", "l": [1, b"\x00"]},
        {"a": "x", "m": {"k": float("inf")}},
    ],
    ids=["int over", "uint64 max", "nan", "-inf", "bytes in list", "inf in map"],
)
def test_payload_values_checked_on_every_path(payload: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        schema.decode(wire(1, "push", 1, [[*REC[:5], payload, None]]))


def test_payload_extreme_values_accepted() -> None:
    payload = {"s": "x", "lo": -(2**63), "hi": 2**63 - 1, "f": -0.0, "b": False, "z": None}
    msg = schema.decode(wire(1, "push", 1, [[*REC[:5], payload, None]]))
    assert isinstance(msg, Push) and msg.records[0].payload == payload


def test_oversized_rejected_before_parsing() -> None:
    with pytest.raises(SchemaError, match="over"):
        schema.decode(b"\x00" * (schema.MAX_MESSAGE + 1))


def test_too_many_items_rejected() -> None:
    with pytest.raises(SchemaError, match="items"):
        schema.decode(wire(1, "digest", "", None, [["a", 0, 0]] * (schema.MAX_ITEMS + 1)))


def test_random_garbage_never_escapes_as_another_error() -> None:
    rng = random.Random(7)
    valid = [schema.encode(m) for m in MESSAGES]
    for i in range(5000):
        if i % 2:
            data = os.urandom(rng.randrange(0, 200))
        else:  # flip bytes of a valid message: the nastiest inputs are nearly right
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        try:
            msg = schema.decode(data)
        except SchemaError:
            continue
        # Whatever got through is a well-formed message that encodes again.
        assert schema.decode(schema.encode(msg)) == msg


def test_normalized_record_is_what_receivers_see() -> None:
    r = Record("network", "blue", "h1", 1, 1, {"vnis": (1, 2)})
    assert r.normalized().payload == {"vnis": [1, 2]}
    with pytest.raises(SchemaError):
        Record("network", "blue", "h1", 1, 1, {"x": object()}).normalized()
    with pytest.raises(SchemaError):
        Record("network", "", "h1", 1, 1, {}).normalized()
