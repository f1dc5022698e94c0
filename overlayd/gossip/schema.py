"""The gossip wire schema: typed messages, encoded as msgpack arrays, checked strictly.

Every message is `[SCHEMA_VERSION, type, field...]` with a fixed number of
fields per type. `decode` either returns a fully validated message or raises
`SchemaError` (the one error type a receiver counts and drops); it never
returns something half-checked. msgpack carries only plain data (no pickle,
extension types are refused), so decoding cannot execute anything.

Records are an opaque typed envelope: the daemon maps its Network / Endpoint /
Node records into `Record(kind, key, owner, ..., payload)`. `(incarnation,
version)` is the record's stamp, advanced only by its owner; a deletion is a
tombstone (payload None) with the owner's wall-clock time of deletion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import msgpack

from overlayd.gossip import sumtree

SCHEMA_VERSION = 1
MAX_MESSAGE = 65_507  # the largest UDP payload; nothing legitimate is bigger
MAX_NAME = 253
MAX_ITEMS = 4096  # records / updates / digest entries in one message
MAX_DEPTH = 8  # nesting of a record payload
_INT64 = 2**63

Stamp = tuple[int, int]  # (incarnation, version)


class SchemaError(ValueError):
    """A message that does not follow the schema; the receiver counts and drops it."""


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True)
class Record:
    """One gossiped fact, identified by (owner, kind, key); payload None is a tombstone."""

    kind: str
    key: str
    owner: str
    incarnation: int
    version: int
    payload: dict[str, Any] | None
    deleted_at: float | None = None

    @property
    def stamp(self) -> Stamp:
        return (self.incarnation, self.version)

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.owner, self.kind, self.key)

    @property
    def tombstone(self) -> bool:
        return self.payload is None

    def to_wire(self) -> list[Any]:
        return [
            self.kind,
            self.key,
            self.owner,
            self.incarnation,
            self.version,
            self.payload,
            self.deleted_at,
        ]

    @classmethod
    def from_wire(cls, v: Any) -> Record:
        kind, key, owner, inc, ver, payload, deleted_at = _fields(v, 7, "record")
        if payload is None:
            if not _is_float(deleted_at) or not math.isfinite(deleted_at) or deleted_at < 0:
                raise SchemaError("tombstone needs a finite deleted_at")
            deleted_at = float(deleted_at)
        else:
            if deleted_at is not None:
                raise SchemaError("a record with a payload has no deleted_at")
            if not isinstance(payload, dict):
                raise SchemaError("record payload must be a map")
            _check_plain(payload, 0)
        return _trusted_record(
            cls,
            _name(kind, "kind"),
            _text(key, "key"),
            _name(owner, "owner"),
            _uint(inc, "incarnation"),
            _version(ver),
            payload,
            deleted_at,
        )

    def normalized(self) -> Record:
        """This record as every receiver will see it (tuples become lists), or SchemaError."""
        try:
            wire = msgpack.unpackb(msgpack.packb(self.to_wire(), use_bin_type=True), raw=False)
        except (TypeError, ValueError) as e:
            raise SchemaError(f"record cannot be encoded: {e}") from None
        return Record.from_wire(wire)


def _trusted_record(
    cls: type[Record],
    kind: str,
    key: str,
    owner: str,
    incarnation: int,
    version: int,
    payload: dict[str, Any] | None,
    deleted_at: float | None,
) -> Record:
    """A Record of fields `from_wire` has checked, built without the frozen dataclass's
    `__init__`: that sets each field through `object.__setattr__`, three times the cost
    of filling the instance's dict, and every record a member receives is built here."""
    rec = object.__new__(cls)
    fields = rec.__dict__
    fields["kind"] = kind
    fields["key"] = key
    fields["owner"] = owner
    fields["incarnation"] = incarnation
    fields["version"] = version
    fields["payload"] = payload
    fields["deleted_at"] = deleted_at
    return rec


@dataclass(frozen=True)
class MemberUpdate:
    """What one node says about a member: where it is, its state and incarnation."""

    name: str
    addr: str
    port: int
    state: MemberState
    incarnation: int

    def to_wire(self) -> list[Any]:
        return [self.name, self.addr, self.port, self.state.value, self.incarnation]

    @classmethod
    def from_wire(cls, v: Any) -> MemberUpdate:
        name, addr, port, state, inc = _fields(v, 5, "member update")
        port = _uint(port, "port")
        if not 0 < port < 65536:
            raise SchemaError(f"bad port {port}")
        try:
            st = MemberState(state)
        except ValueError:
            raise SchemaError(f"bad member state {state!r}") from None
        return cls(_name(name, "member name"), _name(addr, "address"), port, st, _uint(inc, "incarnation"))


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    seq: int
    target: str  # the name the prober expects to answer (guards against reused addresses)
    updates: tuple[MemberUpdate, ...] = ()


@dataclass(frozen=True)
class PingReq:
    """Ask the receiver to ping `target` at addr:port on the sender's behalf."""

    seq: int
    target: str
    addr: str
    port: int
    updates: tuple[MemberUpdate, ...] = ()


@dataclass(frozen=True)
class Ack:
    seq: int
    target: str  # the member that was probed (differs from the sender for an indirect ack)
    updates: tuple[MemberUpdate, ...] = ()


@dataclass(frozen=True)
class Push:
    """Fresh records; the receiver forwards what was new to it while `hops` > 0."""

    hops: int
    records: tuple[Record, ...]


@dataclass(frozen=True)
class PushAck:
    """The answer to a push its owner sent straight to us: the newest stamp in it, which we
    now hold. The owner sends again, for a while, to whoever has not acked the stamp it
    pushed (a lost copy or ack), so members need not forward copies. A gap below it is
    the member's to fill (it asks the owner at once, `GossipNode._pull_gap`)."""

    stamp: Stamp


@dataclass(frozen=True)
class Digest:
    """The sender's watermarks (owner -> stamp) for exactly the owners in [lo, hi).

    A digest too big for one datagram is split by owner ranges; an owner inside
    the range and missing from `entries` is one the sender knows nothing of.
    `hi` None means no upper bound; `lo` "" means from the first owner.
    """

    lo: str
    hi: str | None
    entries: tuple[tuple[str, Stamp], ...]


RECORDS_TABLE, MEMBERS_TABLE = "records", "members"
TABLES = (RECORDS_TABLE, MEMBERS_TABLE)


@dataclass(frozen=True)
class Sums:
    """The sender's sums of the children of some tree nodes at `level` of one table (see
    `sumtree`): the receiver answers, for each child whose sum differs from its own, with
    that child's entries or its children's sums."""

    table: str  # RECORDS_TABLE (owner -> watermark) or MEMBERS_TABLE
    level: int
    nodes: tuple[int, ...]
    sums: tuple[int, ...]  # sumtree.FANOUT per node, in the order of `nodes`


@dataclass(frozen=True)
class InSync:
    """The answer to a level-0 `Sums` that matched: the sender's table equals the receiver's.

    Without it, agreement is silence, and a node that restarted could not tell "nothing
    differs" from "nobody answered"; with it, it knows when it has caught up.
    """

    table: str


@dataclass(frozen=True)
class Watermarks:
    """The sender's watermarks for exactly the owners under some tree nodes at `level`: the
    receiver asks for what it lacks and sends what the sender lacks."""

    level: int
    nodes: tuple[int, ...]
    entries: tuple[tuple[str, Stamp], ...]


class Step(IntEnum):
    """The turns of a member-entries exchange; each side merges what it hears, then:"""

    OPEN = 0  # answer with all of yours under the nodes where they differ from these
    ANSWER = 1  # send yours back where they still differ (your view beat theirs)
    CORRECT = 2  # nothing more: the SWIM rules are no total order, so this must end


@dataclass(frozen=True)
class MemberEntries:
    """What the sender knows of the members under some tree nodes at `level`, at `step` of
    the exchange (OPEN: all of it; ANSWER and CORRECT: only where the two differ)."""

    level: int
    nodes: tuple[int, ...]
    step: Step
    updates: tuple[MemberUpdate, ...]


@dataclass(frozen=True)
class Request:
    """Send me `owner`'s records newer than `after`."""

    owner: str
    after: Stamp


@dataclass(frozen=True)
class Records:
    """`owner`'s records in (after, upto], ascending; `more` if the sender has more beyond `upto`."""

    owner: str
    after: Stamp
    upto: Stamp
    more: bool
    records: tuple[Record, ...]


@dataclass(frozen=True)
class Members:
    """A (part of a) membership snapshot; a non-reply asks for the receiver's snapshot back."""

    reply: bool
    updates: tuple[MemberUpdate, ...]


Message = (
    Ping
    | PingReq
    | Ack
    | Push
    | PushAck
    | Digest
    | Request
    | Records
    | Members
    | Sums
    | InSync
    | Watermarks
    | MemberEntries
)


def encode(msg: Message) -> bytes:
    return bytes(msgpack.packb(to_wire(msg), use_bin_type=True))


def to_wire(msg: Message) -> list[Any]:
    v = SCHEMA_VERSION
    match msg:  # the types are disjoint: the most frequent first (a push and its ack per change)
        case PushAck((inc, ver)):
            return [v, "push-ack", inc, ver]
        case Push(hops, records):
            return [v, "push", hops, [r.to_wire() for r in records]]
        case Ping(seq, target, updates):
            return [v, "ping", seq, target, [u.to_wire() for u in updates]]
        case PingReq(seq, target, addr, port, updates):
            return [v, "ping-req", seq, target, addr, port, [u.to_wire() for u in updates]]
        case Ack(seq, target, updates):
            return [v, "ack", seq, target, [u.to_wire() for u in updates]]
        case Digest(lo, hi, entries):
            return [v, "digest", lo, hi, [[o, i, n] for o, (i, n) in entries]]
        case Request(owner, (inc, ver)):
            return [v, "request", owner, inc, ver]
        case Records(owner, after, upto, more, records):
            return [v, "records", owner, *after, *upto, more, [r.to_wire() for r in records]]
        case Members(reply, updates):
            return [v, "members", reply, [u.to_wire() for u in updates]]
        case Sums(table, level, nodes, sums):
            return [v, "sums", table, level, list(nodes), list(sums)]
        case InSync(table):
            return [v, "in-sync", table]
        case Watermarks(level, nodes, entries):
            return [v, "watermarks", level, list(nodes), [[o, i, n] for o, (i, n) in entries]]
        case MemberEntries(level, nodes, step, updates):
            return [v, "member-entries", level, list(nodes), int(step), [u.to_wire() for u in updates]]
    raise TypeError(f"not a gossip message: {msg!r}")


def decode(data: bytes) -> Message:
    """The message in `data`, fully validated, or SchemaError."""
    return parse(unpack(data))


def unpack(data: bytes) -> list[Any]:
    """The msgpack array in `data`, or SchemaError; only its shape is checked (`parse` the rest).

    Apart so a receiver can tell a copy of what it holds from the array alone
    (`push_records`): the full check costs several times the unpacking."""
    if len(data) > MAX_MESSAGE:
        raise SchemaError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    try:
        v = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except SchemaError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise SchemaError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(v, list) or len(v) < 2:
        raise SchemaError("a message is an array [version, type, ...]")
    return v


def push_records(v: list[Any]) -> list[Any] | None:
    """The records of an unpacked push, as arrays still unchecked; None if `v` is no push."""
    if len(v) == 4 and v[1] == "push" and v[0] == SCHEMA_VERSION and isinstance(v[3], list):
        return v[3]
    return None


def parse(v: list[Any]) -> Message:
    """The message of an `unpack`ed array, fully validated, or SchemaError."""
    version, kind, *rest = v
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise SchemaError(f"unsupported schema version {version!r}")
    parse = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parse is None:
        raise SchemaError(f"unknown message type {kind!r}")
    try:
        return parse(rest)
    except SchemaError:
        raise
    except (TypeError, ValueError) as e:  # unpacking the wrong number of fields and the like
        raise SchemaError(f"bad {kind}: {e}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise SchemaError(f"msgpack extension type {code} is not allowed")


def _p_ping(f: list[Any]) -> Ping:
    seq, target, updates = _fields(f, 3, "ping")
    return Ping(_uint(seq, "seq"), _name(target, "target"), _updates(updates))


def _p_ping_req(f: list[Any]) -> PingReq:
    seq, target, addr, port, updates = _fields(f, 5, "ping-req")
    port = _uint(port, "port")
    if not 0 < port < 65536:
        raise SchemaError(f"bad port {port}")
    return PingReq(
        _uint(seq, "seq"), _name(target, "target"), _name(addr, "address"), port, _updates(updates)
    )


def _p_ack(f: list[Any]) -> Ack:
    seq, target, updates = _fields(f, 3, "ack")
    return Ack(_uint(seq, "seq"), _name(target, "target"), _updates(updates))


def _p_push(f: list[Any]) -> Push:
    hops, records = _fields(f, 2, "push")
    hops = _uint(hops, "hops")
    if hops > 64:
        raise SchemaError(f"hops {hops} is absurd")
    return Push(hops, _records(records))


def _p_push_ack(f: list[Any]) -> PushAck:
    inc, ver = _fields(f, 2, "push-ack")
    return PushAck((_uint(inc, "incarnation"), _uint(ver, "version")))


def _p_digest(f: list[Any]) -> Digest:
    lo, hi, entries = _fields(f, 3, "digest")
    if lo != "":
        lo = _name(lo, "digest lower bound")
    if hi is not None:
        hi = _name(hi, "digest upper bound")
    out = []
    for e in _list(entries, "digest entries"):
        owner, inc, ver = _fields(e, 3, "digest entry")
        owner = _name(owner, "owner")
        if owner < lo or (hi is not None and owner >= hi):
            raise SchemaError("digest entry outside its range")
        out.append((owner, (_uint(inc, "incarnation"), _uint(ver, "version"))))
    return Digest(lo, hi, tuple(out))


def _p_request(f: list[Any]) -> Request:
    owner, inc, ver = _fields(f, 3, "request")
    return Request(_name(owner, "owner"), (_uint(inc, "incarnation"), _uint(ver, "version")))


def _p_records(f: list[Any]) -> Records:
    owner, ai, av, ui, uv, more, records = _fields(f, 7, "records")
    after = (_uint(ai, "incarnation"), _uint(av, "version"))
    upto = (_uint(ui, "incarnation"), _uint(uv, "version"))
    if upto < after:
        raise SchemaError("records: upto is before after")
    recs = _records(records)
    owner = _name(owner, "owner")
    if any(r.owner != owner for r in recs):
        raise SchemaError("records: a record of another owner")
    return Records(owner, after, upto, _bool(more, "more"), recs)


def _p_members(f: list[Any]) -> Members:
    reply, updates = _fields(f, 2, "members")
    return Members(_bool(reply, "reply"), _updates(updates))


def _tree_nodes(level: Any, nodes: Any, *, leaf_ok: bool) -> tuple[int, tuple[int, ...]]:
    """A level and a non-empty list of distinct tree nodes at it."""
    level = _uint(level, "tree level")
    out = tuple(_uint(n, "tree node") for n in _list(nodes, "tree nodes"))
    if not out or len(set(out)) != len(out):
        raise SchemaError("tree nodes must be distinct, at least one")
    try:
        for node in out:
            sumtree.check_node(level, node, leaf_ok=leaf_ok)
    except ValueError as e:
        raise SchemaError(str(e)) from None
    return level, out


def _under(key: str, level: int, nodes: tuple[int, ...]) -> bool:
    return sumtree.node_of(key, level) in nodes


def _p_sums(f: list[Any]) -> Sums:
    table, level, nodes, sums = _fields(f, 4, "sums")
    if table not in TABLES:
        raise SchemaError(f"unknown table {table!r}")
    level, ns = _tree_nodes(level, nodes, leaf_ok=False)
    if not isinstance(sums, list) or len(sums) != sumtree.FANOUT * len(ns):
        raise SchemaError(f"sums: expected {sumtree.FANOUT} per tree node")
    return Sums(table, level, ns, tuple(_uint(x, "sum") for x in sums))


def _p_in_sync(f: list[Any]) -> InSync:
    (table,) = _fields(f, 1, "in-sync")
    if table not in TABLES:
        raise SchemaError(f"unknown table {table!r}")
    return InSync(table)


def _p_watermarks(f: list[Any]) -> Watermarks:
    level, nodes, entries = _fields(f, 3, "watermarks")
    level, ns = _tree_nodes(level, nodes, leaf_ok=True)
    out = []
    for e in _list(entries, "watermarks"):
        owner, inc, ver = _fields(e, 3, "watermark")
        owner = _name(owner, "owner")
        if not _under(owner, level, ns):
            raise SchemaError("watermark outside its tree nodes")
        out.append((owner, (_uint(inc, "incarnation"), _uint(ver, "version"))))
    return Watermarks(level, ns, tuple(out))


def _p_member_entries(f: list[Any]) -> MemberEntries:
    level, nodes, step, updates = _fields(f, 4, "member-entries")
    level, ns = _tree_nodes(level, nodes, leaf_ok=True)
    try:
        st = Step(_uint(step, "step"))
    except ValueError:
        raise SchemaError(f"bad step {step!r}") from None
    ups = _updates(updates)
    if not all(_under(u.name, level, ns) for u in ups):
        raise SchemaError("member outside its tree nodes")
    return MemberEntries(level, ns, st, ups)


_PARSERS: dict[str, Callable[[list[Any]], Message]] = {
    "ping": _p_ping,
    "ping-req": _p_ping_req,
    "ack": _p_ack,
    "push": _p_push,
    "push-ack": _p_push_ack,
    "digest": _p_digest,
    "request": _p_request,
    "records": _p_records,
    "members": _p_members,
    "sums": _p_sums,
    "in-sync": _p_in_sync,
    "watermarks": _p_watermarks,
    "member-entries": _p_member_entries,
}


# --- field checks ---------------------------------------------------------------------------


def _fields(v: Any, n: int, what: str) -> list[Any]:
    if not isinstance(v, list) or len(v) != n:
        raise SchemaError(f"{what}: expected {n} fields")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise SchemaError(f"{what} must be an array")
    if len(v) > MAX_ITEMS:
        raise SchemaError(f"{what}: {len(v)} items is over {MAX_ITEMS}")
    return v


def _updates(v: Any) -> tuple[MemberUpdate, ...]:
    return tuple(MemberUpdate.from_wire(u) for u in _list(v, "member updates"))


def _records(v: Any) -> tuple[Record, ...]:
    return tuple([Record.from_wire(r) for r in _list(v, "records")])


def _uint(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _INT64:
        raise SchemaError(f"{what} must be a non-negative 64-bit integer, got {v!r}")
    return v


def _version(v: Any) -> int:
    # Versions count from 1: (incarnation, 0) is "nothing yet" in a digest.
    ver = _uint(v, "version")
    if ver < 1:
        raise SchemaError("record version must be at least 1")
    return ver


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise SchemaError(f"{what} must be a boolean")
    return v


def _is_float(v: Any) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool)


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 1024:
        raise SchemaError(f"{what} must be a string of 1..1024 characters")
    return v


def _name(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME or not v.isprintable():
        raise SchemaError(f"{what} must be a printable string of 1..{MAX_NAME} characters")
    return v


def _check_plain(v: Any, depth: int) -> None:
    """Payloads hold only JSON-like data (no bytes, no extension types), nested at most MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise SchemaError("record payload nested too deep")
    if type(v) is dict and depth < MAX_DEPTH:
        # The common payload: a flat map of strings and numbers (an endpoint, a node).
        # What msgpack gives is of these exact types; anything else takes the full check.
        for k, item in v.items():
            if type(k) is not str:
                if not isinstance(k, str):
                    raise SchemaError("payload map keys must be strings")
            t = type(item)
            if t is str or item is None or t is bool:
                continue
            if t is float and math.isfinite(item):
                continue
            if t is int and -_INT64 <= item < _INT64:
                continue
            _check_plain(item, depth + 1)
        return
    if v is None or isinstance(v, bool | str):
        return
    if isinstance(v, int):
        if not -_INT64 <= v < _INT64:
            raise SchemaError("integer out of range")
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SchemaError("non-finite number in payload")
        return
    if isinstance(v, list):
        for item in v:
            _check_plain(item, depth + 1)
        return
    if isinstance(v, dict):
        for k, item in v.items():
            if not isinstance(k, str):
                raise SchemaError("payload map keys must be strings")
            _check_plain(item, depth + 1)
        return
    raise SchemaError(f"payload holds a {type(v).__name__}")
