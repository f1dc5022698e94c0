"""Choosing addresses for new endpoints. Pure: no I/O, no clock.

`AddressBook` picks the next free address of a network without scanning the
subnet for every add: a cursor per network walks forward past addresses the
view holds or that an add still in flight has reserved, so concurrent adds
on one host never pick the same address and N adds cost O(N), not O(N^2).

`BlockTable` is the gossip-only half (no compare-and-set to lean on): each
host claims address blocks of a network once and allocates inside its own
blocks without asking anyone, as Calico's IPAM does. A block's first claim
wins, the same rule the admission applies to every gossip claim
(`admission.rank`), so every host agrees on who holds a block; only a block
claim waits to hear of concurrent ones, never an endpoint inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from overlayd.core.admission import Tier, rank
from overlayd.core.model import Ip4, Network
from overlayd.core.view import ClusterView


class SubnetFull(Exception):
    """No free address is left where the caller asked."""


def block_prefixlen(subnet: IPv4Network) -> int:
    """The size of one allocation block: at most 64 addresses, and at least 64 blocks a subnet
    down to blocks of 4 (a /24 has 64 blocks of 4).

    Every host that adds endpoints in a network holds a block of it, and a host without one
    settles each add: a /24 in 16 blocks of 16 left half of a 30-host cluster without.
    """
    return min(30, max(subnet.prefixlen + 6, 26))


@functools.lru_cache(maxsize=64)
def blocks_of(subnet: IPv4Network) -> tuple[IPv4Network, ...]:
    """The blocks of a subnet, in address order (made once per subnet: a /16 has 1,024)."""
    return tuple(subnet.subnets(new_prefix=block_prefixlen(subnet)))


def block_of(subnet: IPv4Network, ip: IPv4Address) -> IPv4Network:
    return IPv4Network((int(ip), block_prefixlen(subnet)), strict=False)


class AddressBook:
    def __init__(self, view: ClusterView) -> None:
        self._view = view
        self._cursor: dict[str, int] = {}  # network -> next offset to try
        self._reserved: dict[str, set[IPv4Address]] = {}
        self._block_hint: dict[str, int] = {}  # network -> index of the block that had room

    def is_free(self, network: Network, ip: IPv4Address) -> bool:
        return (
            self._view.ip_holder(network.name, ip) is None
            and ip not in self._reserved.get(network.name, ())
            and network.is_host_address(ip)
            and ip != network.gateway
        )

    def reserve(self, network: str, ip: IPv4Address) -> None:
        """Hold `ip` for an add in flight (until `release`)."""
        self._reserved.setdefault(network, set()).add(ip)

    def release(self, network: str, ip: IPv4Address) -> None:
        reserved = self._reserved.get(network)
        if reserved is not None:
            reserved.discard(ip)
            if not reserved:
                del self._reserved[network]

    def take(self, network: Network, within: Sequence[IPv4Network] | None = None) -> IPv4Address:
        """Reserve and return the next free address (in `within` blocks, else anywhere in the subnet)."""
        if within is None:
            ip = self._next_in(network, network.subnet, key=network.name)
        else:
            # Start at the block that had room last time: full blocks are not scanned
            # again for every add (holes in them are found when the others fill up).
            ip = None
            start = self._block_hint.get(network.name, 0)
            for step in range(len(within)):
                i = (start + step) % len(within)
                ip = self._next_in(network, within[i], key=f"{network.name}/{within[i]}")
                if ip is not None:
                    self._block_hint[network.name] = i
                    break
        if ip is None:
            where = network.subnet if within is None else ", ".join(map(str, within)) or "no blocks"
            raise SubnetFull(f"network {network.name} has no free address in {where}")
        self.reserve(network.name, ip)
        return ip

    def room(self, network: Network, within: Sequence[IPv4Network], enough: int) -> int:
        """Addresses of `within` that `take` has not passed yet, counted until `enough`.

        A lower bound on the free ones: the rest of the block `take` works in and the
        blocks it has not started, but not the holes (given back) behind its cursors.
        Counted from that block on and stopped at `enough`, so an add that has room
        ahead costs one or two blocks' look, not one per block the host holds.
        """
        if not within:
            return 0
        start = self._block_hint.get(network.name, 0) % len(within)
        total = 0
        for step in range(len(within)):
            i = (start + step) % len(within)
            block = within[i]
            cursor = self._cursor.get(f"{network.name}/{block}")
            if cursor is None:
                total += block.num_addresses
            elif step == 0:
                total += block.num_addresses - cursor
            if total >= enough:
                break
        return total

    def _next_in(self, network: Network, block: IPv4Network, *, key: str) -> IPv4Address | None:
        first, size = int(block.network_address), block.num_addresses
        start = self._cursor.get(key, 0)
        for step in range(size):
            offset = (start + step) % size
            ip = Ip4(first + offset)
            if self.is_free(network, ip):
                self._cursor[key] = offset + 1
                return ip
        return None


class BlockTable:
    """Who allocates in which block, per network: the first claim of a block holds it."""

    def __init__(self, node: str) -> None:
        self.node = node
        # (network, block) -> owner -> created_at of its claim
        self._claims: dict[tuple[str, IPv4Network], dict[str, float]] = {}
        self._excluded: set[str] = set()
        self._mine: dict[str, list[IPv4Network]] = {}  # network -> `mine()`, until a claim changes
        # network -> the block sizes its claims have used: one, unless some were claimed under
        # an earlier block-size rule and kept across an upgrade (`holder` honours those)
        self._prefixlens: dict[str, set[int]] = {}

    def claim(self, owner: str, network: str, block: IPv4Network, created_at: float) -> None:
        self._claims.setdefault((network, block), {})[owner] = created_at
        self._prefixlens.setdefault(network, set()).add(block.prefixlen)
        self._mine.pop(network, None)

    def release(self, owner: str, network: str, block: IPv4Network) -> None:
        claims = self._claims.get((network, block))
        if claims is not None:
            claims.pop(owner, None)
            if not claims:
                del self._claims[(network, block)]
        self._mine.pop(network, None)

    def set_admissible(self, owner: str, admissible: bool) -> None:
        """A member dead past its grace period frees its blocks (they come back with it)."""
        if admissible:
            self._excluded.discard(owner)
        else:
            self._excluded.add(owner)
        self._mine.clear()

    def holder(self, network: str, block: IPv4Network) -> str | None:
        """Who allocates in `block`: its first live claim's owner; for a block no one claimed,
        whoever holds a bigger block around it (a claim made under an earlier, coarser block
        size and adopted across the restart that upgraded its owner)."""
        found = self._first_claim(network, block)
        if found is None:
            for prefixlen in self._prefixlens.get(network, ()):
                if prefixlen < block.prefixlen:
                    found = self._first_claim(network, block.supernet(new_prefix=prefixlen))
                    if found is not None:
                        break
        return found

    def _first_claim(self, network: str, block: IPv4Network) -> str | None:
        claims = self._claims.get((network, block), {})
        live = [(o, at) for o, at in claims.items() if o == self.node or o not in self._excluded]
        if not live:
            return None
        return min(live, key=lambda c: rank(Tier.GOSSIP, c[1], c[0], str(block)))[0]

    def claimed_at(self, network: str, block: IPv4Network, owner: str) -> float | None:
        return self._claims.get((network, block), {}).get(owner)

    def mine(self, network: str) -> list[IPv4Network]:
        """The blocks this host holds in `network`, in address order (kept until a claim changes)."""
        cached = self._mine.get(network)
        if cached is None:
            cached = self._mine[network] = sorted(
                block
                for (net, block), claims in self._claims.items()
                if net == network and self.node in claims and self.holder(net, block) == self.node
            )
        return cached

    def free_block(self, network: Network, *, start: int = 0) -> IPv4Network | None:
        """An unclaimed block of `network`, searching from block number `start` (spreads hosts out)."""
        blocks = blocks_of(network.subnet)
        for step in range(len(blocks)):
            block = blocks[(start + step) % len(blocks)]
            if self.holder(network.name, block) is None:
                return block
        return None

    def claims_of(self, owner: str) -> list[tuple[str, IPv4Network]]:
        return [key for key, claims in self._claims.items() if owner in claims]
