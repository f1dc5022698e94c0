"""The Consul watch's memory: the keys it has reported, cut into units, and the diff.

Pure: no I/O. Consul has no change feed: a blocking query on the prefix only
says that something under it changed (its X-Consul-Index passed the one asked
for), and only a listing with values (`?recurse`) carries each key's
ModifyIndex. Re-listing the whole prefix on every change costs O(all records)
per change. So the watch cuts the prefix into units and re-lists only those
that moved:

    networks/   nodes/   endpoints/<network>/   any other first-level folder or key

`vni/` and `ipam/` hold claims, which state no facts (`keys.fact_for_put`
gives None for them, and their deletion is no fact either), and the key
`generation` names the prefix's generation, which the driver reads itself
(store/consul.py): the watch never lists them, so IP claims cost nothing.
Units are re-listed one by one, so a round does not see the prefix at one
index as a single listing would; the driver lists endpoint units before
networks/ and nodes/, so that an endpoint seen in a round comes with the
network and node records written before it.

Which units moved: a unit's index (its `X-Consul-Index`) is the highest
ModifyIndex in it, or of a deletion in it while Consul keeps that tombstone
(about 15 minutes), and every write gets an index above all earlier ones. So
"something changed in the unit since we listed it at index I" is "its index is
now above I", which a `?keys&separator=/` query on the unit's path without its
trailing '/' answers in a few bytes (the query also covers siblings whose name
starts the same: that only re-lists more than needed). Only units with many
keys (`PROBE_ABOVE`) are probed first; small ones are listed at once, as
cheaply, and so is a big network when endpoints/ moved and no other unit
below it did (`Mirror.surely_moved`). While `endpoints/` holds one network
(or none), all of it is listed at once instead (`Mirror.split_listing`):
the same data as that network's listing, without the keys query before it.
`networks/` and `nodes/` are probed together, as the keys starting "n"
(`Mirror.probe_group`): most rounds move one endpoint unit only, and then
neither is read. For that, a unit read (or probed unmoved) in a round is
known up to the round's top index, not only up to its own last write: a
write it missed came after, with a higher index. A watch that
was away longer than a tombstone lives cannot trust an index that did not
move, so the driver lists every unit then (`full`).

What changed: keys missing from a listing are gone; keys with another
ModifyIndex are put, and only their values are decoded. The mirror takes a
whole round at once (`diff`, then `commit` once it is delivered) and changes
nothing before, so a round cut short by a disconnect is simply read again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from overlayd.store.keys import GENERATION  # the generation marker: no fact, never listed

CLAIMS = ("vni/", "ipam/")  # first-level folders of claims: no facts, never listed
SPLIT = "endpoints/"  # the first-level folder cut into one unit per network
PROBE_ABOVE = 16  # a unit with more keys is probed (its index alone) before it is re-listed

_EMPTY: Mapping[str, int] = MappingProxyType({})


def unit_of(rel: str) -> str | None:
    """The unit holding a key (relative to the prefix); None for claims.

    Units are named by their path relative to the prefix: a folder unit ends
    with '/' and holds every key below it; any other name is a single key
    (not a record of ours: it is read to be reported). `SPLIT` itself, as a
    unit, is the single key of that name, never the folder.
    """
    first, sep, rest = rel.partition("/")
    if not sep:
        return None if rel == GENERATION else rel
    folder = first + "/"
    if folder in CLAIMS:
        return None
    if folder != SPLIT:
        return folder
    network, sep, _ = rest.partition("/")
    return f"{SPLIT}{network}/" if sep else f"{SPLIT}{network}"


def _common_start(a: str, b: str) -> str:
    """The characters `a` and `b` start with alike (not whole path parts: "networks/", "nodes/" -> "n")."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def is_folder(unit: str) -> bool:
    return unit.endswith("/") and unit != SPLIT


@dataclass(frozen=True)
class Put:
    """A key that appeared or changed: its value still as Consul sends it (base64, or None)."""

    key: str
    modify_index: int
    value: str | None


@dataclass(frozen=True)
class Diff:
    """What a round found: keys gone (sorted), then puts in write (ModifyIndex) order."""

    gone: list[str]
    puts: list[Put]


@dataclass(frozen=True)
class Listing:
    """One unit as read: its X-Consul-Index and Consul's entries (JSON objects)."""

    index: int
    items: list[dict[str, Any]]


@dataclass
class Round:
    """What one pass read, handed to `Mirror.apply` whole."""

    present: set[str] = field(default_factory=set)  # every unit that exists now
    listings: dict[str, Listing] = field(default_factory=dict)  # the units re-listed
    split_index: int | None = None  # the index of `SPLIT`'s folder listing, if it was read
    # The prefix's index the round started from, and the units a probe found unmoved: a
    # unit listed or found unmoved in this round holds every write up to `top` (see `commit`).
    top: int = 0
    unmoved: set[str] = field(default_factory=set)


@dataclass
class Unit:
    # Every write to the unit up to this index is known: its index when last listed, or the
    # round's top index if that is higher (or the snapshot's index it was built from).
    index: int
    known: dict[str, int] = field(default_factory=dict)  # Consul key -> ModifyIndex


def compare(known: Mapping[str, int], items: list[dict[str, Any]]) -> tuple[list[str], list[Put]]:
    """A unit's listing against what was reported of it: (keys gone, keys put)."""
    seen = known.get  # once: this runs over every key of a unit that moved
    fresh = [item for item in items if seen(item["Key"]) != item.get("ModifyIndex", 0)]
    new = sum(1 for item in fresh if item["Key"] not in known)
    gone: list[str] = []
    if len(items) - new != len(known):  # some known key is not listed any more
        listed = {item["Key"] for item in items}
        gone = [key for key in known if key not in listed]
    return gone, [Put(item["Key"], item.get("ModifyIndex", 0), item.get("Value")) for item in fresh]


class Mirror:
    """The units one watch stream has reported, keyed by unit name."""

    def __init__(self, prefix: str, index: int, known: Mapping[str, int] = _EMPTY) -> None:
        """`prefix`: Consul's form (no leading '/'); `known`: Consul key -> ModifyIndex at `index`."""
        self.prefix = prefix
        self.units: dict[str, Unit] = {}
        self.split_index = index
        for key, modify_index in known.items():
            unit = self.unit_of_key(key)
            if unit is not None:
                self.units.setdefault(unit, Unit(index)).known[key] = modify_index

    def unit_of_key(self, key: str) -> str | None:
        return unit_of(key[len(self.prefix) :]) if key.startswith(self.prefix) else None

    def top_units(self, keys: Iterable[str]) -> tuple[set[str], bool]:
        """A `?keys&separator=/` listing of the prefix -> (its units but SPLIT's, whether SPLIT is there)."""
        units: set[str] = set()
        split = False
        for key in keys:
            rel = key[len(self.prefix) :]
            if rel == SPLIT:
                split = True
            elif rel not in CLAIMS and rel != GENERATION:
                units.add(rel)
        return units, split

    def split_units(self, index: int, keys: Iterable[str], *, full: bool) -> set[str] | None:
        """A `?keys&separator=/` listing of `SPLIT` -> its units, or None if nothing below it moved."""
        if index <= self.split_index and not full:
            return None
        return {key[len(self.prefix) :] for key in keys}

    def split_listing(self, listing: Listing) -> dict[str, Listing]:
        """A `?recurse` listing of all of `SPLIT`, cut into the listings of its units.

        Each gets the folder's index: every write below it up to that index is in the listing.
        """
        items: dict[str, list[dict[str, Any]]] = {}
        # Consul lists keys in order, so a network's keys come one after another: each
        # key that starts like the last folder unit's is that unit's without working out
        # its unit again (the listing is the whole network, at every change of it).
        head: str | None = None
        into: list[dict[str, Any]] = []
        for item in listing.items:
            key = item["Key"]
            if head is not None and key.startswith(head):
                into.append(item)
                continue
            unit = self.unit_of_key(key)
            if unit is None or not unit.startswith(SPLIT):
                head = None
                continue
            into = items.setdefault(unit, [])
            into.append(item)
            head = self.prefix + unit if is_folder(unit) else None
        return {unit: Listing(listing.index, listed) for unit, listed in items.items()}

    def known_split_units(self) -> set[str]:
        return {name for name in self.units if name.startswith(SPLIT)}

    def to_probe(self, units: Iterable[str], *, full: bool) -> set[str]:
        """Which of `units` to ask for their index before listing them: the big folders.

        None when indexes cannot be trusted (`full`): then every unit is listed.
        """
        if full:
            return set()
        return {
            u for u in units if is_folder(u) and u in self.units and len(self.units[u].known) > PROBE_ABOVE
        }

    def reading_order(self, units: Iterable[str], probe: set[str]) -> list[str]:
        """Endpoint units first (an endpoint seen then comes with the network and node
        records written before it), the small ones before the big; then the rest."""
        return sorted(units, key=lambda u: (not u.startswith(SPLIT), u in probe, u))

    def surely_moved(self, unit: str, round_: Round) -> bool:
        """Whether the move below `SPLIT` can only be in `unit`, so a probe would be a wasted trip.

        So when `SPLIT` moved, no unit below it appeared or vanished, and every
        other one was listed this round without moving. A wrong answer would
        only cost a listing: listing without a probe never misses a change.
        """
        if round_.split_index is None or not unit.startswith(SPLIT):
            return False
        others = {u for u in round_.present if u.startswith(SPLIT) and u != unit}
        if self.known_split_units() - others - {unit}:
            return False  # a unit vanished: that is a move below SPLIT
        for other in others:
            listing, known = round_.listings.get(other), self.units.get(other)
            if listing is None or known is None or listing.index > known.index:
                return False
        return True

    def probe_group(self, units: Iterable[str], *, full: bool) -> str | None:
        """The common start of `units` if one probe of it can tell that none of them moved.

        Only for two or more known units whose names share a start that no claim
        folder, `SPLIT` or the generation marker has (claims move with every
        endpoint write): `networks/` and `nodes/` share "n", so one request of a
        few bytes stands for two listings in a round that only an endpoint moved.
        None when indexes cannot be trusted (`full`).
        """
        names = sorted(units)
        if full or len(names) < 2 or any(n not in self.units or n.startswith(SPLIT) for n in names):
            return None
        start = _common_start(names[0], names[-1])  # sorted: the first and last differ soonest
        if not start or any(other.startswith(start) for other in (*CLAIMS, SPLIT, GENERATION)):
            return None
        return start

    def group_moved(self, units: Iterable[str], index: int) -> bool:
        """Whether a probe of the units' common start says any of them may have changed.

        The probe's index is the highest write below that start; a write any of them
        has not seen is above that unit's index, so it is enough to compare with the lowest.
        """
        return index > min(self.units[u].index for u in units)

    def moved(self, unit: str, index: int) -> bool:
        """Whether a probe's index says the unit changed since it was listed."""
        known = self.units.get(unit)
        return known is None or index > known.index

    def gone_at_top(self, round_: Round, gone: Iterable[str]) -> bool:
        """Whether every key in `gone` was found missing by a listing of its unit that
        answered at the round's top index or above.

        Such a listing came from a server that had reached the index the round woke
        up for, so it is not a server that restarted empty and answered below it: the
        check of the prefix's index the driver makes before delivering deletions would
        tell nothing more. A unit that vanished (no listing), or one whose index is
        below the top (writes elsewhere since, or a reaped tombstone), still asks for
        that check.
        """
        for key in gone:
            listing = round_.listings.get(self.unit_of_key(key) or "")
            if listing is None or listing.index < round_.top or listing.index <= 0:
                return False
        return True

    def diff(self, round_: Round) -> Diff:
        """What a whole round found, units gone and listings, in order; the mirror is left as it was."""
        gone: list[str] = []
        puts: list[Put] = []
        for name, unit in self.units.items():
            if name not in round_.present:
                gone.extend(unit.known)
        for name, listing in round_.listings.items():
            listed = self.units.get(name)
            unit_gone, unit_puts = compare(listed.known if listed is not None else _EMPTY, listing.items)
            gone.extend(unit_gone)
            puts.extend(unit_puts)
        gone.sort()
        puts.sort(key=lambda p: (p.modify_index, p.key))
        return Diff(gone, puts)

    def commit(self, round_: Round, diff: Diff) -> None:
        """Take the round and its diff as reported."""
        for name in [n for n in self.units if n not in round_.present]:
            del self.units[name]
        for key in diff.gone:
            holder = self.units.get(self.unit_of_key(key) or "")
            if holder is not None:
                holder.known.pop(key, None)
        for put in diff.puts:
            into = self.unit_of_key(put.key)
            if into is not None:
                self.units.setdefault(into, Unit(0)).known[put.key] = put.modify_index
        for name, listing in round_.listings.items():
            unit = self.units.get(name)
            if unit is not None:
                # Read after the round's top index was: any write it missed comes later,
                # with a higher index. That lets a later probe of a group compare with one index.
                unit.index = max(unit.index, listing.index, round_.top)
                if not unit.known:
                    del self.units[name]
        for name in round_.unmoved:
            unit = self.units.get(name)
            if unit is not None:
                unit.index = max(unit.index, round_.top)
        if round_.split_index is not None:
            self.split_index = max(self.split_index, round_.split_index)

    def apply(self, round_: Round) -> Diff:
        diff = self.diff(round_)
        self.commit(round_, diff)
        return diff
