"""SWIM membership: the member table, its merge rules, suspicion and piggybacked updates.

No I/O and no timers: the node feeds in what it heard (`apply`), what its probes
found (`suspect`, `record_rtt`) and the time (`expire`), and sends what comes
out (`piggyback`, `snapshot`). The rules, as in SWIM with incarnations:

- alive(i)   beats anything with a lower incarnation;
- suspect(i) beats alive(j) for i >= j, and suspect(j) for i > j;
- dead(i) / left(i) beat alive/suspect(j) for i >= j, and dead/left(j) for i > j;
- about this node: a suspect/dead claim at incarnation >= ours is refuted by
  taking the next incarnation and spreading alive(next).

A suspect becomes dead when nobody refutes within the suspicion timeout,
`suspicion_mult * max(1, log10(N)) * probe_interval`, which grows with the
cluster because news takes about log(N) rounds to reach everyone. Every change
is piggybacked on the next `retransmit_mult * ceil(log10(N + 1))` messages.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from overlayd.gossip.schema import MemberState, MemberUpdate
from overlayd.gossip.skew import OffsetFilter
from overlayd.gossip.sumtree import SumTree, entry_hash

ALIVE, SUSPECT, DEAD, LEFT = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT
_GONE = (DEAD, LEFT)


@dataclass(frozen=True)
class MemberInfo:
    """A peer as this node sees it (what `overlayctl peers` and /status show)."""

    name: str
    addr: str
    port: int
    state: MemberState
    incarnation: int
    rtt: float | None  # smoothed round-trip time of direct probes, seconds
    since: float  # wall-clock time of the last state change
    # Its wall clock minus ours, seconds, from direct probes (see `skew`); None until one answered.
    clock_offset: float | None = None

    @property
    def live(self) -> bool:
        """Alive, or suspected (which it may still refute): a member of the cluster."""
        return self.state in (ALIVE, SUSPECT)


@dataclass
class _Member:
    info: MemberInfo
    suspect_deadline: float | None = None  # monotonic
    clock: OffsetFilter | None = None  # made at the first sample: most members are rarely probed


@dataclass(frozen=True)
class MemberChanged:
    """A member's state or incarnation changed (an event for the daemon and the metrics)."""

    member: MemberInfo
    previous: MemberState | None  # None: first heard of


class Membership:
    def __init__(
        self,
        name: str,
        addr: str,
        port: int,
        *,
        incarnation: int = 0,
        probe_interval: float = 1.0,
        suspicion_mult: float = 4.0,
        retransmit_mult: int = 3,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self._port = port
        self.incarnation = incarnation
        self.leaving = False
        # What anti-entropy compares: every member that may be up, this node included. The
        # dead and departed are left out, so a member that forgot one (reaped, or joined after
        # its death) still agrees with those that remember it.
        self.tree = SumTree()
        self.refutations = 0
        self.probe_interval = probe_interval
        self.suspicion_mult = suspicion_mult
        self.retransmit_mult = retransmit_mult
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._members: dict[str, _Member] = {}
        # News to piggyback: sends left -> {name: update}, so the freshest go first without
        # sorting a queue that holds every member after a mass join (it ran per message).
        self._queue: dict[int, dict[str, MemberUpdate]] = {}
        self._left: dict[str, int] = {}  # name -> sends left
        self._probe_order: list[str] = []
        # Kept as they change, not recomputed from all members per event (at a thousand members
        # that was most of the CPU): who may be up (pushes sample it per datagram), who is
        # suspect (expire looks at them each probe round), and how many are in each state.
        self._live: list[str] | None = None
        self._suspects: set[str] = set()
        self._counts: dict[MemberState, int] = {}
        self._ring: list[str] | None = None  # live names and ours, sorted (see successor)
        self._tree_self()

    @property
    def port(self) -> int:
        return self._port

    @port.setter
    def port(self, port: int) -> None:
        self._port = port  # known only once the socket is bound
        self._tree_self()

    def _tree_self(self) -> None:
        self.tree.set(self.name, None if self.leaving else member_hash(self.self_update()))

    # --- views ---

    def get(self, name: str) -> MemberInfo | None:
        m = self._members.get(name)
        return m.info if m else None

    def update_of(self, name: str) -> MemberUpdate | None:
        """What this node would say about `name` (itself included), or None if unknown."""
        if name == self.name:
            return self.self_update()
        m = self._members.get(name)
        return _update(m.info) if m else None

    def members(self) -> list[MemberInfo]:
        return sorted((m.info for m in self._members.values()), key=lambda i: i.name)

    def counts(self) -> dict[MemberState, int]:
        return {state: n for state, n in self._counts.items() if n}

    def live(self) -> list[MemberInfo]:
        """Members that may be up (alive or suspect): targets for probes and pushes."""
        return [self._members[n].info for n in self._live_list()]

    def _live_list(self) -> list[str]:
        if self._live is None:
            self._live = [n for n, m in self._members.items() if m.info.state not in _GONE]
        return self._live

    def gone(self) -> list[MemberInfo]:
        return [m.info for m in self._members.values() if m.info.state in _GONE]

    def neighbours(self) -> list[MemberInfo]:
        """The live members just after and just before this node in name order, wrapping
        around: its neighbours on a ring every node draws the same way (while they agree on
        who is alive). One member when there is only one other, none when alone."""
        return self.ring(2)

    def ring(self, k: int, exclude: Collection[str] = ()) -> list[MemberInfo]:
        """The first `k` live members not in `exclude` at ring distance 1, -1, 2, -2, ...
        from this node (fewer if there are not that many): the same every node draws."""
        if self._ring is None:
            self._ring = sorted([*self._live_list(), self.name])
        ring = self._ring
        n = len(ring)
        at = bisect.bisect_left(ring, self.name)
        names: dict[str, None] = {}  # ordered and distinct: a small ring wraps onto itself
        for d in range(1, n // 2 + 1):
            if len(names) >= k:
                break
            for name in (ring[(at + d) % n], ring[(at - d) % n]):
                if name not in exclude and len(names) < k:
                    names[name] = None
        return [self._members[name].info for name in names]

    def cluster_size(self) -> int:
        return 1 + len(self._live_list())

    def self_update(self) -> MemberUpdate:
        state = LEFT if self.leaving else ALIVE
        return MemberUpdate(self.name, self.addr, self.port, state, self.incarnation)

    def snapshot(self) -> list[MemberUpdate]:
        """Everything this node knows, itself first: the payload of a membership sync."""
        return [self.self_update()] + [_update(m.info) for m in self._members.values()]

    def suspicion_timeout(self) -> float:
        return self.suspicion_mult * max(1.0, math.log10(self.cluster_size())) * self.probe_interval

    # --- what we hear ---

    def apply(self, u: MemberUpdate, *, snapshot: bool = False) -> MemberChanged | None:
        """Merge what someone said about a member; the change it made, if any. Changes are
        passed on, piggybacked on our next messages.

        `snapshot`: `u` is part of a whole membership (the answer to a join or a knock).
        Members first heard of that way are not announced again: that news is old, and a
        node joining a thousand-member cluster would otherwise piggyback a thousand stale
        joins for minutes (anti-entropy carries them where missing). Changes to members we
        knew (a refutation, a death) still spread, so a healing cluster settles fast.
        """
        if u.name == self.name:
            self._about_self(u)
            return None
        m = self._members.get(u.name)
        if m is None:
            if u.state in _GONE:
                return None  # news of the death of a stranger: nothing to keep
            return self._set(u.name, u, None, spread=not snapshot)
        cur = m.info
        if u.state == ALIVE:
            accept = u.incarnation > cur.incarnation
        elif u.state == SUSPECT:
            accept = (cur.state == ALIVE and u.incarnation >= cur.incarnation) or (
                cur.state == SUSPECT and u.incarnation > cur.incarnation
            )
        elif u.state == LEFT:
            accept = u.incarnation > cur.incarnation or (
                u.incarnation == cur.incarnation and cur.state != LEFT
            )
        else:  # DEAD
            accept = u.incarnation > cur.incarnation or (
                u.incarnation == cur.incarnation and cur.state not in _GONE
            )
        if not accept:
            return None
        return self._set(u.name, u, cur.state)

    def _about_self(self, u: MemberUpdate) -> None:
        if self.leaving or u.incarnation < self.incarnation:
            return
        if u.state == ALIVE and u.incarnation == self.incarnation:
            return
        # Someone believes we are suspect/dead/left, or alive at an incarnation we never
        # took (a previous life of this name): out-bid it and tell everyone.
        self.incarnation = u.incarnation + 1
        self._tree_self()
        if u.state != ALIVE:
            self.refutations += 1
        self._enqueue(self.self_update())

    def _set(
        self, name: str, u: MemberUpdate, previous: MemberState | None, spread: bool = True
    ) -> MemberChanged:
        old = self._members.get(name)
        rtt = old.info.rtt if old else None
        offset = old.info.clock_offset if old else None
        since = self._wall() if previous != u.state else (old.info.since if old else self._wall())
        info = MemberInfo(u.name, u.addr, u.port, u.state, u.incarnation, rtt, since, offset)
        deadline = self._clock() + self.suspicion_timeout() if u.state == SUSPECT else None
        if old is not None and old.info.state == SUSPECT and u.state == SUSPECT:
            deadline = old.suspect_deadline  # a repeated suspicion does not extend the first
        # The host's clock outlives a restart of its daemon: keep its samples.
        self._members[name] = _Member(info, deadline, old.clock if old else None)
        self._live = self._ring = None
        if old is not None:
            self._counts[old.info.state] -= 1
        self._counts[u.state] = self._counts.get(u.state, 0) + 1
        if u.state == SUSPECT:
            self._suspects.add(name)
        else:
            self._suspects.discard(name)
        self.tree.set(name, None if u.state in _GONE else member_hash(u))
        if previous is None and u.state not in _GONE:
            # New members go to a random place in this round's probe order.
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), name)
        if spread:
            self._enqueue(u)
        return MemberChanged(info, previous)

    # --- what our probes find ---

    def suspect(self, name: str) -> MemberChanged | None:
        """A probe of `name` failed, directly and indirectly."""
        m = self._members.get(name)
        if m is None or m.info.state != ALIVE:
            return None
        i = m.info
        return self._set(name, MemberUpdate(i.name, i.addr, i.port, SUSPECT, i.incarnation), ALIVE)

    def record_rtt(self, name: str, rtt: float) -> None:
        m = self._members.get(name)
        if m is not None:
            old = m.info.rtt
            m.info = replace(m.info, rtt=rtt if old is None else 0.8 * old + 0.2 * rtt)

    def record_clock(self, name: str, offset: float, rtt: float) -> None:
        """One clock-offset sample of `name` from a direct probe (see `skew`)."""
        m = self._members.get(name)
        if m is not None:
            if m.clock is None:
                m.clock = OffsetFilter()
            m.info = replace(m.info, clock_offset=m.clock.add(offset, rtt))

    def expire(self) -> list[MemberChanged]:
        """Declare dead the suspects whose timeout passed."""
        now = self._clock()
        out = []
        for name in list(self._suspects):
            m = self._members[name]
            if m.suspect_deadline is not None and m.suspect_deadline <= now:
                i = m.info
                out.append(
                    self._set(name, MemberUpdate(i.name, i.addr, i.port, DEAD, i.incarnation), SUSPECT)
                )
        return out

    def reap(self, older_than: float) -> list[str]:
        """Forget members dead or left for more than `older_than` seconds."""
        cutoff = self._wall() - older_than
        gone = [n for n, m in self._members.items() if m.info.state in _GONE and m.info.since <= cutoff]
        for n in gone:
            self._counts[self._members.pop(n).info.state] -= 1
            self.tree.set(n, None)
            self._dequeue(n)
        return gone

    def leave(self) -> MemberUpdate:
        self.leaving = True
        self._tree_self()
        update = self.self_update()
        self._enqueue(update)
        return update

    def next_probe_target(self) -> MemberInfo | None:
        """Round-robin over a shuffled list, reshuffled each round (SWIM's bounded detection time)."""
        for _ in range(2):
            while self._probe_order:
                m = self._members.get(self._probe_order.pop())
                if m is not None and m.info.state not in _GONE:
                    return m.info
            self._probe_order = [n for n, m in self._members.items() if m.info.state not in _GONE]
            self._rng.shuffle(self._probe_order)
        return None

    def random_live(
        self, k: int, exclude: Collection[str] = (), alive_only: bool = False
    ) -> list[MemberInfo]:
        if not alive_only:
            # Called for every push: sample from the cached list and drop the excluded ones,
            # which is uniform over the rest and costs O(k) instead of a pass over everyone.
            live = self._live_list()
            picks = self._rng.sample(live, min(k + len(exclude), len(live)))
            return [self._members[n].info for n in picks if n not in exclude][:k]
        pool = [
            m.info for m in self._members.values() if m.info.name not in exclude and m.info.state == ALIVE
        ]
        return self._rng.sample(pool, min(k, len(pool)))

    # --- what we say ---

    def pending_news(self) -> int:
        """Updates still waiting to be piggybacked."""
        return len(self._left)

    def _enqueue(self, u: MemberUpdate) -> None:
        limit = max(1, self.retransmit_mult * math.ceil(math.log10(self.cluster_size() + 1)))
        self._dequeue(u.name)
        self._queue.setdefault(limit, {})[u.name] = u
        self._left[u.name] = limit

    def _dequeue(self, name: str) -> MemberUpdate | None:
        left = self._left.pop(name, None)
        if left is None:
            return None
        bucket = self._queue[left]
        u = bucket.pop(name)
        if not bucket:
            del self._queue[left]
        return u

    def piggyback(self, budget: int, to: str | None = None) -> list[MemberUpdate]:
        """Updates to ride on a message to `to`, within about `budget` bytes.

        A member we think suspect or dead always hears it from us, so it can refute at once.
        """
        out: list[MemberUpdate] = []
        if to is not None:
            m = self._members.get(to)
            if m is not None and m.info.state != ALIVE:
                out.append(_update(m.info))
                budget -= _size(out[0])
        taken: list[tuple[str, int]] = []
        full = False
        for left in sorted(self._queue, reverse=True):  # the least sent first
            for name, u in self._queue[left].items():
                if budget < _size(u):
                    full = True
                    break
                if name == to:
                    continue  # its own news is no news to it (its state, if not alive, went first)
                out.append(u)
                budget -= _size(u)
                taken.append((name, left))
            if full:
                break
        for name, left in taken:  # moved after the loop: an update goes once per message
            sent = self._dequeue(name)
            if sent is not None and left > 1:
                self._queue.setdefault(left - 1, {})[name] = sent
                self._left[name] = left - 1
        return out


def member_hash(u: MemberUpdate) -> int:
    return entry_hash(f"{u.name}\0{u.addr}\0{u.port}\0{u.state.value}\0{u.incarnation}")


def _update(i: MemberInfo) -> MemberUpdate:
    return MemberUpdate(i.name, i.addr, i.port, i.state, i.incarnation)


def _size(u: MemberUpdate) -> int:
    # msgpack size of an update, rounded up: strings plus headers and two 64-bit ints.
    return len(u.name.encode()) + len(u.addr) + 32
