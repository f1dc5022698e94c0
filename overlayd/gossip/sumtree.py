"""A hash tree over named entries, so two nodes find where their tables differ in O(log N).

Anti-entropy used to send a node's whole table (every owner's watermark, every
member) to a peer each round: O(N) bytes per member per round, which at a
thousand members is most of the traffic of a cluster at rest. Here each node
keeps, for each table, a fixed tree over its entries:

- an entry is a key (an owner or member name) and a 63-bit hash of its value
  (a watermark, a member's address/state/incarnation);
- its leaf is the top `LEAF_BITS` bits of a hash of the key, so every node
  puts a key in the same place whatever else it holds;
- each tree node holds the XOR of the hashes under it and their count, both
  updated in O(depth) when an entry changes.

Two nodes with the same entries have the same sums everywhere. Comparing the
16 sums below the root tells which sixteenth differs; descending only there,
a difference in k entries costs about k * log16(N) small messages and a table
that agrees costs one message of 16 sums. A subtree with few entries is sent
as its entries rather than descended further (`SMALL`).

Two different tables have equal sums by accident with odds of 2^-63; someone who
chooses the values could make XORs collide, but only authenticated peers feed
this tree, and a difference hidden that way lasts only until either entry
changes again. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array

FANOUT_BITS = 4
FANOUT = 1 << FANOUT_BITS  # children per tree node
DEPTH = 3  # levels below the root; the leaves are at level DEPTH
LEAF_BITS = FANOUT_BITS * DEPTH  # 4096 leaves: about one entry each at a few thousand members
# A subtree with at most this many entries is sent as its entries instead of being
# descended further: one datagram instead of another round trip (names are short).
SMALL = 24


def entry_hash(data: str) -> int:
    """A 63-bit hash of an entry's value, as text (the caller joins the fields unambiguously)."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big") >> 1


def leaf_of(key: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(key.encode(), digest_size=8, person=b"ovl-leaf").digest()[:2], "big"
    ) >> (16 - LEAF_BITS)


def node_of(key: str, level: int) -> int:
    """The tree node at `level` (0: the root) whose subtree holds `key`."""
    return leaf_of(key) >> (FANOUT_BITS * (DEPTH - level))


def check_node(level: int, index: int, *, leaf_ok: bool) -> None:
    """ValueError unless (level, index) names a node of the tree (a leaf only if `leaf_ok`)."""
    top = DEPTH if leaf_ok else DEPTH - 1
    if not 0 <= level <= top:
        raise ValueError(f"tree level {level} outside 0..{top}")
    if not 0 <= index < FANOUT**level:
        raise ValueError(f"tree node {index} does not exist at level {level}")


class SumTree:
    def __init__(self) -> None:
        self._sums = [array("Q", bytes(8 * FANOUT**level)) for level in range(DEPTH + 1)]
        self._counts = [array("I", bytes(4 * FANOUT**level)) for level in range(DEPTH + 1)]
        self._hashes: dict[str, int] = {}
        self._leaves: dict[str, int] = {}
        self._order: list[tuple[int, str]] = []  # (leaf, key), sorted: a subtree is a slice

    def __len__(self) -> int:
        return len(self._hashes)

    @property
    def root(self) -> int:
        return self._sums[0][0]

    def get(self, key: str) -> int | None:
        return self._hashes.get(key)

    def set(self, key: str, h: int | None) -> None:
        """Put `key` with value hash `h` (None: remove it)."""
        old = self._hashes.get(key)
        if old == h:
            return
        leaf = self._leaves.get(key)
        if leaf is None:
            leaf = leaf_of(key)
        delta = (old or 0) ^ (h or 0)
        count = (h is not None) - (old is not None)
        for level in range(DEPTH + 1):
            i = leaf >> (FANOUT_BITS * (DEPTH - level))
            self._sums[level][i] ^= delta
            self._counts[level][i] += count
        if h is None:
            del self._hashes[key], self._leaves[key]
            pos = bisect.bisect_left(self._order, (leaf, key))
            del self._order[pos]
        else:
            self._hashes[key] = h
            if old is None:
                self._leaves[key] = leaf
                bisect.insort(self._order, (leaf, key))

    def children(self, level: int, index: int) -> tuple[int, ...]:
        """The sums of the FANOUT children of tree node (level, index), level < DEPTH."""
        first = index * FANOUT
        return tuple(self._sums[level + 1][first : first + FANOUT])

    def count(self, level: int, index: int) -> int:
        return self._counts[level][index]

    def keys_under(self, level: int, index: int) -> list[str]:
        shift = FANOUT_BITS * (DEPTH - level)
        lo = bisect.bisect_left(self._order, (index << shift, ""))
        hi = bisect.bisect_left(self._order, ((index + 1) << shift, ""))
        return [key for _, key in self._order[lo:hi]]


def differing_children(mine: tuple[int, ...], theirs: tuple[int, ...], index: int) -> list[int]:
    """Indexes (one level down) of the children of node `index` whose sums differ."""
    return [index * FANOUT + j for j in range(FANOUT) if mine[j] != theirs[j]]
