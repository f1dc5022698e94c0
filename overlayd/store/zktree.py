"""The ZooKeeper watch's memory: which record znodes a watch stream has reported, and the diff.

Pure: no I/O. ZooKeeper's one-shot watches only say "this znode (or its
children) changed"; the store re-reads what an event names and hands the
result here. The mirror compares it with what it reported before and returns
the differences (`Put`, `Gone`) in zxid order, so several changes that landed
between two reads come out as one, in the order they were made.

Record znodes sit in three directories under the prefix:

    <base>/networks/<name>   <base>/nodes/<name>   <base>/endpoints/<network>/<name>
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Rec:
    """A record znode as read: the zxid of its last modification, and its data."""

    zxid: int
    data: bytes


@dataclass(frozen=True)
class Put:
    """A record znode appeared or changed."""

    path: str
    rec: Rec

    @property
    def zxid(self) -> int:
        return self.rec.zxid


@dataclass(frozen=True)
class Gone:
    """A record znode disappeared (`zxid`: its directory's last child change)."""

    path: str
    zxid: int


Change = Put | Gone


@dataclass(frozen=True)
class Dirs:
    """Where record znodes live under `base` (the chroot plus the prefix, no trailing '/')."""

    base: str

    @property
    def networks(self) -> str:
        return f"{self.base}/networks"

    @property
    def nodes(self) -> str:
        return f"{self.base}/nodes"

    @property
    def endpoints(self) -> str:
        return f"{self.base}/endpoints"

    def is_record_dir(self, path: str) -> bool:
        """networks/, nodes/ or one network's endpoints/<network>/."""
        return path in (self.networks, self.nodes) or _parent(path) == self.endpoints

    def is_record(self, path: str) -> bool:
        parent = _parent(path)
        return parent in (self.networks, self.nodes) or _parent(parent) == self.endpoints

    def classify(self, paths: Iterable[str]) -> tuple[bool, set[str], set[str]]:
        """Paths events named -> (endpoints/ itself?, record directories, records); others dropped."""
        top = False
        dirs: set[str] = set()
        records: set[str] = set()
        for path in paths:
            if path == self.endpoints:
                top = True
            elif self.is_record_dir(path):
                dirs.add(path)
            elif self.is_record(path):
                records.add(path)
        return top, dirs, records

    def plan(self, events: Iterable[tuple[str, bool]]) -> Reads:
        """Events as (path, whether it announced the znode's deletion) -> what to read.

        A record's deletion is not read back (a read of a deleted znode answers
        nothing): its directory is listed instead, which its own child watch
        asks for anyway (the two events mostly come together: one listing for
        both). The record stays `deleted`: if the listing still shows it, it was
        made again since and is read, which also arms its data watch again.
        """
        events = list(events)
        deleted = {path for path, gone in events if gone}
        top, dirs, records = self.classify(path for path, gone in events if not gone)
        _, _, gone_records = self.classify(deleted)
        gone_top, gone_dirs, _ = self.classify(deleted - gone_records)
        dirs |= gone_dirs | {_parent(path) for path in gone_records}
        return Reads(top or gone_top, dirs, records - gone_records, gone_records)


@dataclass(frozen=True)
class Reads:
    """What one batch of events asks to read (see `Dirs.plan`)."""

    top: bool  # endpoints/ itself: its network directories
    dirs: set[str]  # record directories to list
    records: set[str]  # records to read
    deleted: set[str]  # records whose deletion an event announced: read only if listed again


class Mirror:
    """What one watch stream has reported: record znodes by path, indexed by directory."""

    def __init__(self, records: Mapping[str, Rec] | None = None, revision: int = 0) -> None:
        self.records: dict[str, Rec] = {}
        self._children: dict[str, set[str]] = {}
        self.revision = revision
        for path, rec in (records or {}).items():
            self._add(path, rec)

    def _add(self, path: str, rec: Rec) -> None:
        self.records[path] = rec
        self._children.setdefault(_parent(path), set()).add(path)

    def in_dir(self, directory: str) -> set[str]:
        """Paths of the records known in `directory`."""
        return set(self._children.get(directory, ()))

    def subdirs(self, directory: str) -> set[str]:
        """Names of the directories right under `directory` that hold known records."""
        prefix = directory + "/"
        return {d[len(prefix) :] for d, paths in self._children.items() if paths and d.startswith(prefix)}

    def put(self, path: str, rec: Rec) -> Put | None:
        """Record what a read returned; a Put if it is new or newer than what was reported."""
        old = self.records.get(path)
        if old is not None and old.zxid >= rec.zxid:
            return None
        self._add(path, rec)
        return Put(path, rec)

    def remove(self, path: str, zxid: int) -> Gone | None:
        if self.records.pop(path, None) is None:
            return None
        siblings = self._children.get(_parent(path))
        if siblings is not None:
            siblings.discard(path)
            if not siblings:
                del self._children[_parent(path)]
        return Gone(path, zxid)

    def sync_dir(
        self, directory: str, children: Iterable[str], zxid: int, reread: Iterable[str] = ()
    ) -> tuple[list[Change], set[str]]:
        """A directory listing: Gone for known records no longer listed; the paths to read:
        those not known yet, and those of `reread` that are listed."""
        listed = {f"{directory}/{name}" for name in children}
        known = self.in_dir(directory)
        gone = [g for path in sorted(known - listed) if (g := self.remove(path, zxid)) is not None]
        return list(gone), (listed - known) | (listed & set(reread))

    def drop_dir(self, directory: str, zxid: int) -> list[Change]:
        """The directory itself vanished: every record in it is gone."""
        return [g for path in sorted(self.in_dir(directory)) if (g := self.remove(path, zxid)) is not None]

    def replace(self, current: Mapping[str, Rec], revision: int) -> list[Change]:
        """A full re-read: make the mirror hold `current`; what differs (unordered)."""
        changes: list[Change] = [
            g for path in sorted(set(self.records) - set(current)) if (g := self.remove(path, revision))
        ]
        changes += [p for path, rec in current.items() if (p := self.put(path, rec)) is not None]
        return changes

    def advance(self, changes: list[Change], revision: int) -> list[Change]:
        """Sort `changes` by zxid and move the revision past them and `revision`."""
        changes = sorted(changes, key=lambda c: c.zxid)
        self.revision = max(self.revision, revision, *(c.zxid for c in changes))
        return changes


def _parent(path: str) -> str:
    return path.rpartition("/")[0]
