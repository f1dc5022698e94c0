"""An asyncio event loop whose clock jumps to the next timer when nothing is runnable.

For simulations and tests: a thousand gossip nodes' probe and anti-entropy
timers cost no wall time, only the CPU of the callbacks themselves. The loop is
asyncio's own selector loop with two changes: `time()` reads a virtual clock,
and the selector never waits — asked to wait `timeout` seconds, it advances the
virtual clock by `timeout` and reports no I/O. So the loop runs everything
that is ready, then jumps straight to the earliest scheduled callback.

Consequences, by design:

- no real I/O can happen: sockets would never be reported ready (simulated
  transports deliver with `call_at`, see `simnet`);
- a loop with nothing ready and nothing scheduled would sleep forever;
  instead `select` raises `Stalled`, so a stuck simulation fails at once;
- time advances only between callbacks: a callback sees the time at which it
  was scheduled, however long it really takes.

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(main())
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any


class Stalled(RuntimeError):
    """Nothing is ready and nothing is scheduled: the simulation would wait forever."""


class _VirtualSelector(selectors.BaseSelector):
    """Holds registrations (the loop's self-pipe) but never waits: time jumps instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # asyncio's way of saying: wait until some I/O happens
            raise Stalled("nothing is ready and no timer is scheduled")
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock on (the selector does this when the loop would wait)."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
