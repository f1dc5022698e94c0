"""The clocks a gossip node reads, behind one small interface so they can be replaced.

A node reads two clocks: `monotonic()` for intervals and deadlines (suspicion
timeouts, RTTs, rate limits) and `wall()` for what travels (frame timestamps,
tombstones' deletion times, the default incarnation). Real nodes use the
system's; a simulation runs both from its virtual event-loop time, and a test
can shift one node's wall clock to play a host whose clock is off.

Timers themselves (probe intervals, timeouts) come from the asyncio loop, so
a loop with virtual time (`virtualtime.VirtualTimeLoop`) drives them; a
`LoopClock` keeps the node's own readings on that same time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The host's clocks (what every real node uses)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


SYSTEM = SystemClock()


@dataclass(frozen=True)
class ShiftedClock:
    """`base` with its wall clock `offset` seconds ahead (negative: behind): a badly set host."""

    base: Clock
    offset: float

    def monotonic(self) -> float:
        return self.base.monotonic()

    def wall(self) -> float:
        return self.base.wall() + self.offset


@dataclass(frozen=True)
class LoopClock:
    """Both clocks from an event loop's time; the wall clock starts at `epoch`.

    With a virtual-time loop this is simulated time: a node's timestamps,
    deadlines and timers all agree, however fast the simulation runs.
    """

    loop: asyncio.AbstractEventLoop
    epoch: float = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.loop.time()

    def wall(self) -> float:
        return self.epoch + self.loop.time()
