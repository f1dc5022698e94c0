"""What a gossip node needs from the network, so a simulation can stand in for UDP.

A real node binds a UDP socket through asyncio; `GossipNode(network=...)`
instead asks a `DatagramNetwork` for a `BoundSender` and receives through the
callback it hands over. `simnet.SimNetwork` is the one other implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Addr = tuple[str, int]
Deliver = Callable[[bytes, Addr], None]


class Sender(Protocol):
    """The sending half of a bound datagram endpoint (an asyncio DatagramTransport is one)."""

    def sendto(self, data: bytes, addr: Addr) -> None: ...

    def close(self) -> None: ...


class BoundSender(Sender, Protocol):
    @property
    def address(self) -> Addr: ...


class DatagramNetwork(Protocol):
    def open(self, addr: Addr, deliver: Deliver) -> BoundSender:
        """Bind `addr` (port 0: any free port); datagrams for it go to `deliver(data, source)`."""
        ...
