"""A simulated datagram network for gossip nodes in one process: latency, loss, CPU, counters.

`SimNetwork.open(addr, deliver)` gives a node a transport (what `GossipNode`
takes through its `network=` seam instead of a UDP socket). Datagrams are
bytes, exactly what a socket would carry, so framing, encryption and the
schema run for real; only the wire is simulated:

- each datagram is lost with probability `loss`, else it arrives after a
  one-way latency drawn uniformly from `latency`;
- each host has one CPU: handling a datagram costs `cpu` seconds of it,
  datagrams queue in arrival order, and what the handler sends leaves when
  the handling ends. Without this every member would handle a burst of
  pushes at the same instant, which no real host does;
- bytes and datagrams are counted per sender.

Deliveries are scheduled with `loop.call_at`, so on a `VirtualTimeLoop` a
simulated second costs only the CPU of the handlers. Nothing here knows about
gossip: it moves bytes between addresses.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass

Addr = tuple[str, int]
Deliver = Callable[[bytes, Addr], None]


@dataclass(frozen=True)
class LinkModel:
    latency: tuple[float, float] = (0.0001, 0.0005)  # one way, seconds, uniform in [lo, hi]
    loss: float = 0.0  # probability that a datagram is dropped
    cpu: float = 0.0  # host CPU seconds to handle one received datagram

    def __post_init__(self) -> None:
        lo, hi = self.latency
        if not 0 <= lo <= hi:
            raise ValueError("latency must be 0 <= lo <= hi")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")
        if self.cpu < 0:
            raise ValueError("cpu must not be negative")


@dataclass
class Counters:
    datagrams: int = 0
    bytes: int = 0
    lost: int = 0


class _Host:
    __slots__ = ("busy_until", "counters", "deliver", "open")

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self.busy_until = 0.0  # its CPU is taken until then
        self.counters = Counters()
        self.open = True


class SimNetwork:
    def __init__(
        self,
        model: LinkModel = LinkModel(),
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.model = model
        self._loop = loop
        self._rng = rng or random.Random()
        self._hosts: dict[Addr, _Host] = {}
        self._next_port = 40000
        # Drop rule on top of `loss` (a partition in a test): True drops src -> dst.
        self.cut: Callable[[Addr, Addr], bool] | None = None
        # Datagrams in flight or queued, (when, seq, handle?, host, data, source): a heap of
        # tuples, compared in C, behind one loop timer; a timer per datagram costs far more.
        self._flight: list[tuple[float, int, bool, Addr, bytes, Addr]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._depart: float | None = None  # while a handler runs: when what it sends leaves

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop or asyncio.get_running_loop()

    def open(self, addr: Addr, deliver: Deliver) -> SimTransport:
        """Bind `addr` (port 0: pick a free one); `deliver(data, source)` receives datagrams."""
        host, port = addr
        if port == 0:
            while (host, self._next_port) in self._hosts:
                self._next_port += 1
            port = self._next_port
        addr = (host, port)
        old = self._hosts.get(addr)
        if old is not None and old.open:
            raise OSError(f"address {host}:{port} in use")
        self._hosts[addr] = _Host(deliver)
        return SimTransport(self, addr)

    def counters(self, addr: Addr) -> Counters:
        return self._hosts[addr].counters

    def total(self) -> Counters:
        out = Counters()
        for h in self._hosts.values():
            out.datagrams += h.counters.datagrams
            out.bytes += h.counters.bytes
            out.lost += h.counters.lost
        return out

    def _send(self, src: Addr, data: bytes, dst: Addr) -> None:
        sender = self._hosts[src]
        sender.counters.datagrams += 1
        sender.counters.bytes += len(data)
        if self._rng.random() < self.model.loss or (self.cut is not None and self.cut(src, dst)):
            sender.counters.lost += 1
            return
        lo, hi = self.model.latency
        now = self.loop.time()
        # Sent while handling a datagram: it leaves when that handling ends. From a timer:
        # once the host's CPU is free.
        depart = self._depart if self._depart is not None else max(now, sender.busy_until)
        self._schedule(depart + self._rng.uniform(lo, hi), False, dst, data, src)

    def _schedule(self, when: float, handle: bool, dst: Addr, data: bytes, src: Addr) -> None:
        self._seq += 1
        heapq.heappush(self._flight, (when, self._seq, handle, dst, data, src))
        if self._flight[0][1] == self._seq:  # the new earliest: move the timer up
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._run)

    def _run(self) -> None:
        self._timer = None
        loop = self.loop
        while self._flight and self._flight[0][0] <= loop.time():
            when, _, handle, dst, data, src = heapq.heappop(self._flight)
            if handle:
                self._handle(dst, data, src, when)
            else:
                self._arrive(dst, data, src)
        if self._flight and self._timer is None:
            self._timer = loop.call_at(self._flight[0][0], self._run)

    def _arrive(self, dst: Addr, data: bytes, src: Addr) -> None:
        host = self._hosts.get(dst)
        if host is None or not host.open:
            return  # nobody listens: a real network would answer ICMP, which gossip ignores
        now = self.loop.time()
        start = max(now, host.busy_until)
        host.busy_until = start + self.model.cpu  # one CPU: its next free moment, in arrival order
        if start > now:
            self._schedule(start, True, dst, data, src)  # wait for the datagrams ahead of it
        else:
            self._handle(dst, data, src, start)

    def _handle(self, dst: Addr, data: bytes, src: Addr, start: float) -> None:
        host = self._hosts[dst]
        if not host.open:
            return
        self._depart = start + self.model.cpu
        try:
            host.deliver(data, src)
        finally:
            self._depart = None


class SimTransport:
    """The sending half a node holds: `sendto` and `close`, like an asyncio datagram transport."""

    def __init__(self, net: SimNetwork, addr: Addr) -> None:
        self._net = net
        self.address = addr

    def sendto(self, data: bytes, addr: Addr) -> None:
        self._net._send(self.address, bytes(data), addr)

    def close(self) -> None:
        self._net._hosts[self.address].open = False
