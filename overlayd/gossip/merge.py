"""Merging gossiped records, and the digests anti-entropy compares. Pure: no I/O, no clock.

A record is identified by (owner, kind, key). Its stamp (incarnation, version)
is advanced only by its owner: every change the owner makes takes the next
version of its current incarnation (a restarted owner takes a higher
incarnation). So stamps of one owner are totally ordered, and per owner a node
can say "I have everything up to stamp W" — its *watermark* for that owner.

Why per owner and not per (kind, key): versions of different owners are not
comparable (each counts on its own), so a key claimed by two owners is two
records here, and the daemon decides between them with its own rule (the
cluster view keeps the newest endpoint holding an IP).

Watermarks are what digests carry. A watermark only moves over stamps known to
be complete: the next version of the same incarnation arriving (a push seen in
order), or an anti-entropy chunk that covers (after, upto] of a peer that had
everything up to `upto`. A lost push therefore leaves the watermark behind and
the next anti-entropy exchange fills the gap; it can never be skipped over.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from overlayd.gossip.schema import Record, Stamp
from overlayd.gossip.sumtree import SumTree, entry_hash

ZERO: Stamp = (0, 0)
Ident = tuple[str, str, str]  # (owner, kind, key)


def wins(new: Record, old: Record | None) -> bool:
    """True if `new` replaces `old` (the record held under the same identity)."""
    if old is None:
        return True
    if new.stamp != old.stamp:
        return new.stamp > old.stamp
    if new == old:
        return False  # the same record again (a duplicate push): the common case, and cheap
    # Same stamp twice means a confused owner; decide the same way everywhere.
    if new.tombstone != old.tombstone:
        return new.tombstone
    return _canonical(new) > _canonical(old)


def _canonical(r: Record) -> str:
    return json.dumps([r.payload, r.deleted_at], sort_keys=True)


def watermark_hash(owner: str, stamp: Stamp) -> int:
    return entry_hash(f"{owner}\0{stamp[0]}\0{stamp[1]}")


@dataclass(frozen=True)
class DigestDiff:
    """What one digest comparison calls for, per owner.

    ask:  owner -> my watermark: request their records newer than it.
    send: owner -> their watermark: send them my records newer than it.
    """

    ask: dict[str, Stamp]
    send: dict[str, Stamp]


def diff_digests(
    mine: Mapping[str, Stamp], theirs: Mapping[str, Stamp], lo: str = "", hi: str | None = None
) -> DigestDiff:
    """Compare digests; `theirs` covers exactly the owners in [lo, hi) (hi None: no upper bound).

    An owner inside the range that `theirs` does not list is one they know
    nothing of; outside the range nothing can be said, so nothing is sent.
    """
    ask = {o: mine.get(o, ZERO) for o, w in theirs.items() if w > mine.get(o, ZERO)}
    send = {
        o: theirs.get(o, ZERO)
        for o, w in mine.items()
        if lo <= o and (hi is None or o < hi) and w > theirs.get(o, ZERO)
    }
    return DigestDiff(ask, send)


DigestPart = tuple[str, str | None, list[tuple[str, Stamp]]]  # (lo, hi, entries)


def split_digest(digest: Mapping[str, Stamp], budget: int) -> list[DigestPart]:
    """Split a digest into parts of about `budget` bytes, each covering a range [lo, hi) of owners.

    The ranges are contiguous and cover every possible owner name, so a part
    also says which owners its sender does *not* know (see `diff_digests`).
    """
    parts: list[list[tuple[str, Stamp]]] = [[]]
    room = budget
    for owner, stamp in sorted(digest.items()):
        size = len(owner.encode()) + 24  # msgpack: array header, name, two 64-bit ints
        if parts[-1] and size > room:
            parts.append([])
            room = budget
        parts[-1].append((owner, stamp))
        room -= size
    return [
        ("" if i == 0 else part[0][0], parts[i + 1][0][0] if i + 1 < len(parts) else None, part)
        for i, part in enumerate(parts)
    ]


@dataclass
class RecordTable:
    """The records a node holds, and its watermark per owner."""

    _records: dict[Ident, Record] = field(default_factory=dict)
    # Per owner: stamp -> identity of the record holding it, and the stamps sorted (cached).
    _stamps: dict[str, dict[Stamp, Ident]] = field(default_factory=dict)
    _sorted: dict[str, list[Stamp]] = field(default_factory=dict)
    _watermarks: dict[str, Stamp] = field(default_factory=dict)
    # Per owner: stamps seen above the watermark, waiting for the gap below them to fill.
    _pending: dict[str, set[Stamp]] = field(default_factory=dict)
    # The watermarks as a hash tree: what anti-entropy compares instead of the whole digest.
    tree: SumTree = field(default_factory=SumTree)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, ident: Ident) -> Record | None:
        return self._records.get(ident)

    def all(self) -> list[Record]:
        return list(self._records.values())

    def apply(self, rec: Record) -> bool:
        """Merge one record; True if it replaced what was held (the view changed)."""
        ident, stamp = rec.ident, rec.stamp  # properties that build a tuple on each use
        old = self._records.get(ident)
        if old is None and stamp <= self._watermarks.get(rec.owner, ZERO):
            # Covered by the watermark yet not held: it was superseded by a deletion
            # that has since been reaped. Taking it would bring a deleted record back.
            return False
        self._seen(rec.owner, stamp)
        return self._store(rec, ident, stamp, old)

    def adopt(self, rec: Record) -> bool:
        """Keep a record of this node's own earlier life that peers still hold.

        Its stamp is below the node's own watermark, so `apply` would refuse it
        as superseded; but nothing superseded it, the owner simply forgot it on
        restart. Adopting it lets the owner see it and then re-publish or delete it.
        """
        ident = rec.ident
        return self._store(rec, ident, rec.stamp, self._records.get(ident))

    def _store(self, rec: Record, ident: Ident, stamp: Stamp, old: Record | None) -> bool:
        """`old`: what is held under `ident` now."""
        if not wins(rec, old):
            return False
        if old is not None:
            self._unindex(old)
        self._records[ident] = rec
        self._stamps.setdefault(rec.owner, {})[stamp] = ident
        self._sorted.pop(rec.owner, None)
        return True

    def _unindex(self, rec: Record) -> None:
        stamps = self._stamps.get(rec.owner)
        if stamps is not None and stamps.get(rec.stamp) == rec.ident:
            del stamps[rec.stamp]
            self._sorted.pop(rec.owner, None)
            if not stamps:
                del self._stamps[rec.owner]

    # --- watermarks ---

    def watermark(self, owner: str) -> Stamp:
        return self._watermarks.get(owner, ZERO)

    def has_gap(self, owner: str) -> bool:
        """True if stamps of `owner` above the watermark arrived while one below them is missing."""
        return owner in self._pending

    def digest(self) -> dict[str, Stamp]:
        return dict(self._watermarks)

    def watermarks_of(self, owners: Iterable[str]) -> list[tuple[str, Stamp]]:
        return [(o, self.watermark(o)) for o in owners]

    def _set_watermark(self, owner: str, stamp: Stamp) -> None:
        self._watermarks[owner] = stamp
        self.tree.set(owner, watermark_hash(owner, stamp))

    def set_watermark(self, owner: str, stamp: Stamp) -> None:
        """For the owner itself: it has everything it made, up to its current stamp."""
        if stamp > self.watermark(owner):
            self._set_watermark(owner, stamp)
            self._settle(owner)

    def advance(self, owner: str, after: Stamp, upto: Stamp) -> bool:
        """A peer sent everything of `owner` in (after, upto]; True if the watermark moved."""
        wm = self.watermark(owner)
        if after > wm or upto <= wm:
            return False  # a gap before `after` (an earlier chunk was lost), or nothing new
        self._set_watermark(owner, upto)
        self._settle(owner)
        return True

    def _seen(self, owner: str, stamp: Stamp) -> None:
        wm = self.watermark(owner)
        if stamp <= wm:
            return
        if stamp == (wm[0], wm[1] + 1):
            self._set_watermark(owner, stamp)
            self._settle(owner)
        else:
            self._pending.setdefault(owner, set()).add(stamp)

    def _settle(self, owner: str) -> None:
        """Move the watermark over pending stamps that are now contiguous; drop those below it."""
        pending = self._pending.get(owner)
        if not pending:
            return
        inc, ver = self._watermarks[owner]
        while (inc, ver + 1) in pending:
            ver += 1
        if (inc, ver) != self._watermarks[owner]:
            self._set_watermark(owner, (inc, ver))
        pending -= {s for s in pending if s <= (inc, ver)}
        if not pending:
            del self._pending[owner]

    # --- transfer ---

    def records_after(self, owner: str, after: Stamp) -> Iterator[Record]:
        """`owner`'s records with stamps above `after`, oldest first."""
        stamps = self._sorted.get(owner)
        if stamps is None:
            stamps = self._sorted[owner] = sorted(self._stamps.get(owner, {}))
        held = self._stamps.get(owner, {})
        for stamp in stamps[bisect.bisect_right(stamps, after) :]:
            ident = held.get(stamp)
            if ident is not None:
                yield self._records[ident]

    # --- reaping ---

    def reap(self, now: float, ttl: float) -> list[Record]:
        """Forget tombstones deleted more than `ttl` seconds before `now`; the ones forgotten.

        The watermark stays, so a reaped deletion is never asked for again; a
        peer cut off for longer than `ttl` may keep the deleted record, which is
        why `ttl` must exceed the longest partition the cluster should survive.
        """
        gone = [r for r in self._records.values() if r.deleted_at is not None and r.deleted_at + ttl <= now]
        for r in gone:
            del self._records[r.ident]
            self._unindex(r)
        return gone
