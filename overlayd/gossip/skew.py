"""Peers' clock offsets, estimated from probe round trips the way NTP does. Pure: no clock of its own.

Every direct probe is a time exchange: we note our wall clock when the ping
leaves (t1) and measure the round trip with the monotonic clock (rtt); the
ack's frame carries the peer's wall clock when it sealed the ack (t3), which it
does as it handles the ping. If the two legs take the same time, our wall clock
read t1 + rtt/2 at that moment, so

    offset = t3 - (t1 + rtt/2)        (peer minus us; positive: the peer is ahead)

and whatever asymmetry the legs have, the error is at most rtt/2. Taking the
midpoint from t1 and the monotonic rtt, rather than from a second wall reading,
keeps a wall-clock step during the exchange out of the sample.

Samples are filtered as NTP's clock filter does: of the last few, the one with
the smallest round trip wins, since it had the least room for queueing on one
leg only. The estimate is therefore stale by at most `size` probes of that peer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def offset_sample(sent_wall: float, peer_wall: float, rtt: float) -> float:
    """The peer's clock minus ours, from one exchange (see the module doc)."""
    return peer_wall - (sent_wall + rtt / 2)


@dataclass(frozen=True)
class Sample:
    offset: float
    rtt: float


class OffsetFilter:
    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError("the filter needs room for one sample")
        self._samples: deque[Sample] = deque(maxlen=size)

    def add(self, offset: float, rtt: float) -> float:
        """Take one sample; the estimate after it."""
        if rtt < 0:
            raise ValueError("a round trip cannot be negative")
        self._samples.append(Sample(offset, rtt))
        estimate = self.estimate
        assert estimate is not None
        return estimate

    @property
    def estimate(self) -> float | None:
        if not self._samples:
            return None
        return min(self._samples, key=lambda s: s.rtt).offset

    @property
    def error(self) -> float | None:
        """The bound on the estimate's error: half the round trip of the sample it comes from."""
        if not self._samples:
            return None
        return min(s.rtt for s in self._samples) / 2
