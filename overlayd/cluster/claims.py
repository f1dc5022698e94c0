"""How this host claims names and addresses cluster-wide, and gives them back.

Two implementations of one small protocol: `KvClaims` (compare-and-set in
the KV store; beside gossip, changes also go out by gossip at once, and
while the store is unreachable they go out by gossip alone and wait in
`WriteBehind` until it answers again) and `store.gossip.GossipClaims` (the
embedded mode: no server, first claim wins). Either way a claim that
succeeded is in the admission (`Engine.from_own`) before the call returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from overlayd.cluster.peering import Peering
from overlayd.core.admission import FactSink, NetworkClaimed
from overlayd.core.model import Endpoint, Network
from overlayd.core.view import EndpointDeleted, EndpointPut, NetworkDeleted
from overlayd.store.base import AlreadyExists, NotFoundError, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)


class Claims(Protocol):
    async def create_network(self, network: Network) -> None:
        """Claim the name and VNI; AlreadyExists names which one is taken."""

    async def delete_network(self, name: str) -> None:
        """Give the name and VNI back; NotFoundError if there is no such network."""

    async def create_endpoint(self, endpoint: Endpoint, *, contested: bool) -> None:
        """Claim the key and address of a new own endpoint; AlreadyExists if taken.

        `contested`: the address was not picked from this host's own block, so
        someone else may be claiming it right now (matters without a store).
        """

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        """Give an own endpoint's key and address back. Idempotent."""

    async def release(self) -> None:
        """This host leaves: everything it holds goes at once (teardown)."""


class WriteBehind:
    """Own endpoint changes the store missed while unreachable, written when it answers again.

    Gossip carried them to the other hosts already; the store gets them with
    compare-and-set, so a record someone else took meanwhile is reported,
    never overwritten.
    """

    def __init__(self, store: Store, *, report: Callable[[str], None]) -> None:
        self._store = store
        self._report = report
        self.creates: dict[str, Endpoint] = {}
        self.deletes: dict[str, Endpoint] = {}

    def __len__(self) -> int:
        return len(self.creates) + len(self.deletes)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.creates or self.deletes:
                await self.flush()

    async def flush(self) -> None:
        for key, endpoint in list(self.creates.items()):
            try:
                await self._store.create_endpoint(endpoint)
            except AlreadyExists as exc:
                if exc.what != "endpoint name" and exc.holder != key:
                    # Someone took the IP or name in the store meanwhile: loud, not silent.
                    message = f"endpoint {key} created during a store outage conflicts: {exc}"
                    log.error(message)
                    self._report(message)
            except StoreError:
                return  # still down: try again later
            if self.creates.get(key) is endpoint:
                del self.creates[key]
            log.info("endpoint %s written to the store after the outage", key)
        for key, endpoint in list(self.deletes.items()):
            try:
                await self._store.delete_endpoint(endpoint)
            except StoreError:
                return
            if self.deletes.get(key) is endpoint:
                del self.deletes[key]
            log.info("removal of endpoint %s written to the store after the outage", key)


class KvClaims:
    def __init__(
        self,
        *,
        store: Store,
        engine: FactSink,
        node: str,
        peering: Peering | None,
        pending: WriteBehind,
    ) -> None:
        self._store = store
        self._engine = engine
        self._node = node
        self._peering = peering
        self.pending = pending

    async def create_network(self, network: Network) -> None:
        await self._store.create_network(network)
        self._engine.from_own([NetworkClaimed(self._node, network, time.time())])

    async def delete_network(self, name: str) -> None:
        try:
            await self._store.delete_network(name)
        except NotFoundError:
            pass
        self._engine.from_own([NetworkDeleted(name)])

    async def create_endpoint(self, endpoint: Endpoint, *, contested: bool) -> None:
        try:
            await self._store.create_endpoint(endpoint)
        except StoreUnavailable as exc:
            if self._peering is None:
                raise
            # Gossip carries it now; the store gets it (compare-and-set) when it returns.
            log.warning("%s: endpoint %s goes out by gossip, stored later", exc, endpoint.key)
            self.pending.creates[endpoint.key] = endpoint
        self._engine.from_own([EndpointPut(endpoint)])
        if self._peering is not None:
            self._peering.publish_endpoint(endpoint)

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        # The owner's gossip removal goes out first, not after the store's round trip: on
        # every peer it withdraws the store's record of it too (`Admission`: an owner's
        # tombstone), so the peers' kernels let go a store write and a watch event sooner.
        if self._peering is not None:
            self._peering.delete_endpoint(endpoint.key)
        if self.pending.creates.pop(endpoint.key, None) is None:
            try:
                await self._store.delete_endpoint(endpoint)
            except StoreUnavailable as exc:
                if self._peering is None:
                    raise
                log.warning("%s: removal of %s went out by gossip, stored later", exc, endpoint.key)
                self.pending.deletes[endpoint.key] = endpoint
            except StoreError:
                # Refused (not unreachable): the endpoint stays, and so must its record on
                # the peers that dropped it on the removal; published again, it is newer
                # than the removal everywhere. The caller reports the refusal.
                if self._peering is not None:
                    self._peering.publish_endpoint(endpoint)
                raise
        self._engine.from_own([EndpointDeleted(endpoint.key)])

    async def release(self) -> None:
        """Teardown: the lease goes (every record bound to it with it), and gossip hears the leave."""
        try:
            await self._store.release_session()
        finally:
            if self._peering is not None:
                for endpoint in self._engine.view.owned_by(self._node):
                    self._peering.delete_endpoint(endpoint.key)
                await self._peering.stop(leave=True)
