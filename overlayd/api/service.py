"""What the admin API asks of the daemon, and the errors it can answer with.

The admin server (`api.admin`) and the status server (`api.status`) depend
only on this protocol; `daemon.Daemon` implements it. Every method returns
plain JSON-able data, so the wire format is just `json.dumps` of it.
"""

from __future__ import annotations

from typing import Any, Protocol

JSON = dict[str, Any]


class ApiError(Exception):
    """An error the admin API reports to its client as {"error": message}."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status = 400


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    """Duplicate name or VNI, IP already taken, subnet full, network still in use."""

    status = 409


class Unavailable(ApiError):
    """The KV store (or another dependency) cannot be reached right now."""

    status = 503


class AdminService(Protocol):
    # --- read-only, also served by the status server ---
    def status(self) -> JSON:
        """Node, store health, networks, local/remote endpoint counts, last reconcile, errors."""

    def is_ready(self) -> bool:
        """True once the first reconcile has completed."""

    def peers(self) -> list[JSON]:
        """Known nodes: name, vtep, started_at, endpoints (count), self (bool)."""

    # --- networks ---
    async def network_create(
        self,
        *,
        name: str,
        subnet: str,
        vni: int | None = None,
        gateway: str | None = None,
        mtu: int | None = None,
        mode: str | None = None,
        egress: str | None = None,
    ) -> JSON:
        """Create a network (VNI allocated when None; mode "vxlan" and egress "none" when None);
        returns the network record."""

    def network_list(self) -> list[JSON]: ...

    def network_inspect(self, name: str) -> JSON:
        """The network record plus its endpoints; NotFound if unknown."""

    async def network_remove(self, name: str) -> None:
        """Conflict while endpoints remain in it; NotFound if unknown."""

    # --- endpoints ---
    async def endpoint_add(
        self,
        *,
        network: str,
        name: str,
        netns: str,
        ip: str | None = None,
        ifname: str = "eth0",
    ) -> JSON:
        """Create a local endpoint in namespace `netns` (name or path); returns its record."""

    def endpoint_list(self, network: str | None = None) -> list[JSON]: ...

    async def endpoint_remove(self, *, network: str, name: str) -> None:
        """Delete a local endpoint (veth and record, releasing its IP)."""

    async def endpoint_check(self, *, network: str, name: str) -> JSON:
        """What a local endpoint's namespace holds now (`schema.EndpointCheck`); NotFound if not local."""

    # --- reconciler ---
    async def diff(self) -> list[str]:
        """What the reconciler would change right now, one line per command."""

    # --- operations ---
    async def store_probe(self) -> JSON:
        """Time one read of the cluster view from the store: {url, ok, latency_ms, error}."""

    async def teardown(self) -> JSON:
        """Remove this host's endpoints, links and lease, then stop; returns what was done."""
