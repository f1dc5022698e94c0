"""Which remote addresses left the kernel lately, and the MAC local containers knew them by.

A new neighbour entry on a VXLAN device is announced on the local bridge (a
gratuitous ARP) so that a local container that cached another MAC for the
address hears the new one at once. A container can only have cached another
MAC if the address was in use before: its neighbour entry held another MAC
until now, or a routed network's host route to it (the gateway answered for
it) goes in the same pass (the diff sees both), or either was removed a
while ago and the address comes back with another MAC (an IP reused). This
remembers the last kind for `WINDOW` seconds; the diff announces nothing
else, so a host that joins with 10,000 new addresses sends no 10,000 ARPs
to containers that never heard of them.

An address that was a local endpoint's and comes back as a remote one is
told by the endpoint's removal (`Reconciler.local_endpoint_gone`): no kernel
object of overlayd's names a local endpoint's IP.

Past the window a container that still holds the old MAC (a stale entry it
has not used since) re-validates it on first use: its unicast probe reaches
the VXLAN device, which answers from the new neighbour entry (`proxy`).

The same memory tells a new *local* endpoint whether to announce its own
address (`own_announcement_needed`): see there.
Pure: no I/O; the clock is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from ipaddress import IPv4Address

# Longer than a container's ARP entry stays trusted without a probe (reachable for
# 15-45 s after the last confirmation, then 5 s of delay before probing), with margin.
WINDOW = 600.0
# Bounded: a leave of many endpoints remembers at most this many (the oldest go first).
LIMIT = 65536


class Removed(Mapping[IPv4Address, str]):
    """Addresses removed within the last `window` seconds: address -> the MAC it had ("": the
    gateway's, a routed network's host route)."""

    def __init__(
        self, *, window: float = WINDOW, limit: int = LIMIT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._limit = limit
        self._clock = clock
        self._macs: dict[IPv4Address, str] = {}
        self._since: dict[IPv4Address, float] = {}  # insertion order is removal order
        # Until then an address removed within the window may be missing: the limit pushed
        # it out early.
        self._partial_until = -math.inf

    def removed(self, key: IPv4Address, mac: str) -> None:
        """The address `key` (known by `mac`) left the kernel now."""
        self._since.pop(key, None)  # to the end: removed last
        self._since[key] = self._clock()
        self._macs[key] = mac
        self._trim()

    def recall(self, removals: Iterable[tuple[IPv4Address, str, float]]) -> None:
        """Removals of an earlier life, oldest first: (address, MAC, seconds ago).

        Called once at start, before any removal of this life (the order of `_since` is
        the order of removal). What is older than the window is not taken; a removal "in
        the future" (the wall clock stepped back since) counts as one just now.
        """
        now = self._clock()
        ours = set(self._since)
        for key, mac, ago in removals:
            if ago < self._window and key not in ours:
                self._since.pop(key, None)  # an address removed twice: the later MAC is the one to beat
                self._since[key] = now - max(ago, 0.0)
                self._macs[key] = mac
        self._trim()

    def export(self) -> list[tuple[IPv4Address, str, float]]:
        """What `recall` takes in the next life: (address, MAC, seconds ago), oldest first,
        within the window."""
        now = self._clock()
        young = ((key, now - since) for key, since in self._since.items())
        return [(key, self._macs[key], ago) for key, ago in young if ago < self._window]

    def _trim(self) -> None:
        while len(self._since) > self._limit:
            oldest = next(iter(self._since))
            self._partial_until = max(self._partial_until, self._since[oldest] + self._window)
            self._forget(oldest)

    def complete(self) -> bool:
        """Whether every address removed within the window is here (the limit pushed none of
        them out early): only then does an address missing here prove it was not removed lately.
        """
        return self._clock() >= self._partial_until

    def added(self, key: IPv4Address) -> None:
        """The address `key` has a neighbour entry again: what it had before is announced or moot."""
        if key in self._since:
            self._forget(key)

    def expire(self) -> None:
        """Forget what was removed longer than the window ago."""
        oldest = self._clock() - self._window
        old: list[IPv4Address] = []
        for key, since in self._since.items():
            if since > oldest:
                break
            old.append(key)
        for key in old:
            self._forget(key)

    def _forget(self, key: IPv4Address) -> None:
        del self._since[key]
        del self._macs[key]

    def __getitem__(self, key: IPv4Address) -> str:
        return self._macs[key]

    def get(self, key: IPv4Address, default: str | None = None) -> str | None:  # type: ignore[override]
        # The dict's own: Mapping.get would raise and catch a KeyError per new entry.
        return self._macs.get(key, default)

    def __iter__(self) -> Iterator[IPv4Address]:
        return iter(self._macs)

    def __len__(self) -> int:
        return len(self._macs)


def own_announcement_needed(ip: IPv4Address, mac: str, *, removed: Removed, current: str | None) -> bool:
    """Whether a new local endpoint (`ip`, `mac`) must announce itself (a gratuitous ARP).

    The announcement is flooded to every port of the host's bridge (and each
    namespace behind it processes it): per-add work that grows with the host's
    endpoints. It matters only to a container that cached another MAC for `ip`,
    which it can have only if `ip` was in use lately with another MAC on this
    network: as a remote endpoint (`current`: the neighbour entry the mirror holds
    for it on the network's VXLAN device, None if none; or, removed since, in
    `removed`), as a local one (its removal is in `removed`,
    `Reconciler.local_endpoint_gone`), or behind a routed network's gateway (in
    `removed` with ""). The caller covers what this cannot see: a gateway on this
    host caches every endpoint's MAC, and a named address is typically one given
    back and taken again.

    What it does not know, the announcement is sent for:
    - `removed` pushed some address out early (`Removed.complete`);
    - not known at all, hence not covered: remote endpoints removed before this daemon
      was killed (SIGKILL, a crash). A clean stop keeps the whole memory in the local
      registry, and a crash keeps the local endpoints' removals (the registry's journal);
      the next life recalls them (`Reconciler.recall_removals`). A remote address freed
      just before a crash of this daemon and handed to a local endpoint just after
      reaches containers here that still cache the old MAC without an announcement;
      each recovers by itself within about a minute (its entry stays trusted for up to
      45 s, then 5 s of delay and 3 unanswered unicast probes, then a broadcast query
      the new endpoint answers);
    - an address removed longer ago than the window, whose old MAC a container still
      holds without having used it since: it re-validates the entry on first use
      (5 s of delay, 3 unanswered unicast probes, then the broadcast query).
    """
    if current is not None and current != mac:
        return True
    if not removed.complete():
        return True
    previous = removed.get(ip)
    return previous is not None and previous != mac
