"""The async interface every KV backend implements, and its errors.

The store is the authority for the cluster view. Records a node owns (its
node record, its endpoints and their IP claims) are bound to the node's
lease/session, so they vanish when the node dies; networks and VNI claims are
permanent. Allocation (network names, VNIs, IPs) is compare-and-set, so two
hosts never get the same one.

Backends keep their own session alive and, when it is lost, make a new one
and re-publish every owned record themselves: the rest of the daemon never
sees a lease.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import Fact


class StoreError(Exception):
    """A store operation failed; the message is one line for an operator."""


class StoreUnavailable(StoreError):
    """The KV server cannot be reached (or timed out)."""


class AlreadyExists(StoreError):
    """A compare-and-set lost: `what` is taken ("network name", "VNI", "IP", "endpoint name")."""

    def __init__(self, what: str, value: str, holder: str | None = None) -> None:
        self.what = what
        self.value = value
        self.holder = holder
        held = f" (held by {holder})" if holder else ""
        super().__init__(f"{what} {value} is already taken{held}")


class NotFoundError(StoreError):
    pass


@dataclass(frozen=True)
class Snapshot:
    """The whole prefix as of `revision`: the caller replaces its view with it."""

    facts: list[Fact]
    revision: int
    # Set when the server turned out to have lost its data (or to be an older backup):
    # why we think so. The caller keeps its dataplane and re-publishes before trusting it.
    data_lost: str | None = None


@dataclass(frozen=True)
class Changes:
    """Facts observed by the watch, in order, up to `revision`."""

    facts: list[Fact]
    revision: int


class Store(abc.ABC):
    """One KV backend. All methods raise StoreUnavailable when the server is unreachable."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and check the server answers."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the client. Does NOT give up the session: a restarted daemon reuses it."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """True while the last exchange with the server succeeded."""

    @abc.abstractmethod
    async def open_session(self, node: Node) -> None:
        """Get (or resume, if a saved one is still alive) this node's lease and publish `node`."""

    @abc.abstractmethod
    async def keep_session(self) -> None:
        """Run forever: keep the lease alive; on loss get a new one and re-publish owned records."""

    @abc.abstractmethod
    async def ensure_session(self) -> None:
        """Check the lease/session now; if the server no longer has it, take a new one and
        re-publish the node and the owned endpoints (what `keep_session` does when it notices)."""

    @abc.abstractmethod
    async def release_session(self) -> None:
        """Give the lease up now: every owned record disappears (explicit teardown only)."""

    @abc.abstractmethod
    async def create_network(self, network: Network) -> None:
        """Create network and claim its VNI atomically; AlreadyExists on name or VNI conflict."""

    @abc.abstractmethod
    async def delete_network(self, name: str) -> None:
        """Delete the network and release its VNI; NotFoundError if absent."""

    @abc.abstractmethod
    async def create_endpoint(self, endpoint: Endpoint) -> None:
        """Claim the IP and publish the endpoint atomically, owned by this node's lease."""

    @abc.abstractmethod
    async def publish_endpoint(self, endpoint: Endpoint) -> None:
        """(Re-)publish an endpoint this node owns, with its IP claim."""

    @abc.abstractmethod
    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        """Delete an endpoint this node owns and release its IP. Idempotent."""

    @abc.abstractmethod
    async def snapshot(self) -> Snapshot:
        """Read everything under the prefix."""

    @abc.abstractmethod
    def watch(self, after_revision: int) -> AsyncIterator[Changes | Snapshot]:
        """Changes after `after_revision`, forever; resumes by itself after disconnects.

        Yields a Snapshot when it had to re-read everything (history compacted,
        server state lost): the caller replaces its view with it.
        """
