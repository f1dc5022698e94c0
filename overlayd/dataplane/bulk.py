"""Making tens of thousands of small objects at once without the cycle collector stepping in.

A full verify at 10,000 remote endpoints makes ~100,000 short-lived tuples in
a few tens of milliseconds (the rows of the FDB and neighbour dumps, the
mirror's table keys). Every 700 allocations start a collection of the young
generation, every tenth of those one of the middle generation, and now and
then a full collection walks every object the daemon holds (view, desired
state, mirror, store cache): in a daemon of that size each full collection
costs tens of milliseconds, more than the verify's own work. None of these
objects form reference cycles, so reference counting frees them all; the
collector is paused while they are made and runs as usual afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off (left as it was if already off).

    Process-wide: keep the block to work that makes many objects at once and ends soon.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
