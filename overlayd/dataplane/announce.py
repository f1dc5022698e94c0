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
Pure: no I/O; the clock is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
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

    def removed(self, key: IPv4Address, mac: str) -> None:
        """The address `key` (known by `mac`) left the kernel now."""
        self._since.pop(key, None)  # to the end: removed last
        self._since[key] = self._clock()
        self._macs[key] = mac
        while len(self._since) > self._limit:
            self._forget(next(iter(self._since)))

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
