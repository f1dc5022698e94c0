"""The admin API's changes: networks, endpoints, and taking this host out of the overlay.

Adds run concurrently: there is no global lock around kernel work. What two
adds at once must not share is reserved before either waits on anything —
the endpoint key (`_busy`) and the address (`AddressBook`) — and each add
then claims (compare-and-set in the store, or gossip), waits for its
network's bridge, and builds its veth in four netlink round trips. Network
changes, which are rare and pick VNIs, take one lock among themselves.

Nothing is left half-made: a failure after the claim gives the claim back,
and the kernel side of an endpoint is all or nothing
(`dataplane.endpoints`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

from overlayd.api.service import JSON, BadRequest, Conflict, NotFound, Unavailable
from overlayd.cluster.claims import Claims
from overlayd.cluster.gossip_claims import GossipClaims
from overlayd.core.admission import Conflict as LostClaim
from overlayd.core.ipam import AddressBook, SubnetFull
from overlayd.core.model import (
    EGRESS_NONE,
    MODE_VXLAN,
    Endpoint,
    Network,
    endpoint_key,
    parse_ipv4,
    parse_subnet,
    random_mac,
    routed_overlap,
    validate_name,
)
from overlayd.daemon.engine import Engine
from overlayd.daemon.registry import LocalRegistry
from overlayd.daemon.runstate import RunState
from overlayd.dataplane.commands import AnnounceArp
from overlayd.dataplane.desired import overlay_mtu
from overlayd.dataplane.endpoints import (
    create_local_endpoint,
    delete_local_endpoint,
    quarantine_local_endpoint,
)
from overlayd.dataplane.kernel import Kernel, KernelError, Underlay
from overlayd.dataplane.kstate import bridge_name, veth_name, vxlan_name
from overlayd.dataplane.reconciler import Reconciler
from overlayd.dataplane.teardown import remove_owned_links
from overlayd.store.base import AlreadyExists, StoreError
from overlayd.util.tasks import TaskGroup

log = logging.getLogger(__name__)

# Automatic VNIs start above the range people tend to pick by hand.
AUTO_VNI_START = 4096
_ALLOC_ATTEMPTS = 64
# Bounds on the store calls of an explicit teardown.
STORE_CALL_TIMEOUT = 5.0
# How long an add waits for its network's bridge and VXLAN device.
_LINKS_TIMEOUT = 10.0
# How long an add to a network this host has not heard of waits for it before "not found":
# a network created a moment ago elsewhere arrives within a paced watch round (0.3 s) and
# a store round trip.
_NETWORK_SOON = 1.0


class Operations:
    def __init__(
        self,
        *,
        node: str,
        state: RunState,
        engine: Engine,
        registry: LocalRegistry,
        claims: Claims,
        kernel: Kernel,
        reconciler: Reconciler,
        underlay: Underlay,
        addresses: AddressBook,
        lease_ttl: str,
        stop: Callable[[], None],
        overlay_tasks: Callable[[], list[asyncio.Task[Any]]],
        tasks: TaskGroup,
    ) -> None:
        self._node = node
        self._state = state
        self._engine = engine
        self._view = engine.view
        self._registry = registry
        self._claims = claims
        self._kernel = kernel
        self._reconciler = reconciler
        self._underlay = underlay
        self._addresses = addresses
        self._lease_ttl = lease_ttl
        self._stop = stop
        self._overlay_tasks = overlay_tasks
        self._tasks = tasks
        self._networks_lock = asyncio.Lock()
        self._busy: set[str] = set()  # endpoint keys an add or remove is working on

    def _require_synced(self) -> None:
        if self._state.tearing_down:
            raise Unavailable("this host's overlay is being torn down; overlayd stops afterwards")
        if not self._state.synced:
            raise Unavailable("not synced with the cluster view yet; try again")

    def _require_complete(self, what: str, name: str) -> None:
        """Before "not found": a view still completing (a restart in gossip-only mode, until
        the peers have been heard) may simply not have heard of `what` yet. A name nothing
        can have is a 400 at once."""
        validate_name(name, "network name")
        if not self._state.view_complete:
            raise Unavailable(
                f"{what} not known yet: this host's view of the cluster is still completing; try again"
            )

    # ================================================================ networks

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
        self._require_synced()
        # Validate everything before claiming anything (VNI checked with a placeholder).
        candidate = Network(
            name=name,
            vni=1 if vni is None else vni,
            subnet=parse_subnet(subnet),
            gateway=parse_ipv4(gateway, "gateway") if gateway is not None else None,
            mtu=mtu,
            mode=MODE_VXLAN if mode is None else mode,
            egress=EGRESS_NONE if egress is None else egress,
        )
        async with self._networks_lock:
            if name in self._view.networks:
                raise Conflict(f"network {name} already exists")
            if candidate.routed:
                # Routed networks share every host's routing table (and the underlay, which
                # carries their addresses unencapsulated): their subnets must not overlap.
                clash = routed_overlap(candidate, self._view.networks.values())
                if clash is not None:
                    raise Conflict(
                        f"subnet {candidate.subnet} overlaps routed network {clash.name} ({clash.subnet}): "
                        "routed networks share the hosts' routing tables; use another subnet or --mode vxlan"
                    )
            used = {n.vni: n.name for n in self._view.networks.values()}
            if vni is not None:
                if vni in used:
                    raise Conflict(f"VNI {vni} is already used by network {used[vni]}")
                candidates = [vni]
            else:
                free = (
                    v for v in range(AUTO_VNI_START, AUTO_VNI_START + 4 * _ALLOC_ATTEMPTS) if v not in used
                )
                candidates = [v for _, v in zip(range(_ALLOC_ATTEMPTS), free, strict=False)]
            for choice in candidates:
                network = replace(candidate, vni=choice)
                try:
                    await self._claims.create_network(network)
                except AlreadyExists as exc:
                    if exc.what == "network name":
                        raise Conflict(f"network {name} already exists") from None
                    if vni is not None:
                        raise Conflict(f"VNI {vni} is already used by network {exc.holder}") from None
                    continue
                except StoreError as exc:
                    raise Unavailable(str(exc)) from None
                log.info(
                    "created network %s (VNI %d, %s, mode %s, egress %s)",
                    name,
                    network.vni,
                    network.subnet,
                    network.mode,
                    network.egress,
                )
                return network.to_dict()
            raise Conflict("could not allocate a free VNI; give one with --vni")

    async def network_remove(self, name: str) -> None:
        self._require_synced()
        async with self._networks_lock:
            if name not in self._view.networks:
                self._require_complete(f"network {name}", name)
                raise NotFound(f"network {name} not found")
            members = self._view.count_in(name)
            if members:
                raise Conflict(f"network {name} still has {members} endpoint(s); remove them first")
            try:
                await self._claims.delete_network(name)
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
            log.info("removed network %s", name)

    # ================================================================ endpoints

    async def endpoint_add(
        self,
        *,
        network: str,
        name: str,
        netns: str,
        ip: str | None = None,
        ifname: str = "eth0",
    ) -> JSON:
        self._require_synced()
        net = self._view.networks.get(network)
        if net is None:
            self._require_complete(f"network {network}", network)
            net = await self._engine.network_soon(network, timeout=_NETWORK_SOON)
            if net is None:
                raise NotFound(f"network {network} not found")
        validate_name(name, "endpoint name")
        _validate_ifname(ifname)
        netns_path = _netns_path(netns)
        if not os.path.exists(netns_path):  # noqa: ASYNC240 (a stat of /run/netns, never blocks)
            raise BadRequest(f"network namespace {netns} not found ({netns_path})")
        key = endpoint_key(network, name)
        if key in self._view.endpoints or key in self._busy or key in self._registry:
            raise Conflict(f"endpoint {name} already exists in network {network}")
        requested = None
        if ip is not None:
            requested = parse_ipv4(ip, "IP")
            net.check_endpoint_ip(requested)
            if not self._addresses.is_free(net, requested):
                raise Conflict(f"IP {requested} is already in use in network {network}")
        self._busy.add(key)
        try:
            endpoint = await self._claim(net, name, requested, netns, ifname)
            try:
                await self._plumb(net, endpoint, named=requested is not None)
            except BaseException as exc:
                # It may have come up (and been heard) before it failed: remembered as a removal.
                self._reconciler.local_endpoint_gone(endpoint.ip, endpoint.mac)
                await self._unclaim(endpoint)
                if isinstance(exc, KernelError):
                    raise BadRequest(str(exc)) from None
                if isinstance(exc, TimeoutError):
                    raise Unavailable(f"the bridge of network {network} did not come up in time") from None
                raise
        finally:
            self._busy.discard(key)
        log.info("endpoint %s: %s %s in %s", key, endpoint.ip, endpoint.mac, netns)
        return endpoint.to_dict()

    async def _claim(
        self, net: Network, name: str, requested: IPv4Address | None, netns: str, ifname: str
    ) -> Endpoint:
        """Claim the endpoint and an address cluster-wide; with no address given, the next free one."""
        for _ in range(_ALLOC_ATTEMPTS):
            address, contested = await self._pick(net, requested)
            endpoint = Endpoint(
                network=net.name,
                name=name,
                ip=address,
                mac=random_mac(),
                owner=self._node,
                created_at=time.time(),
                netns=netns,
                ifname=ifname,
            )
            try:
                await self._claims.create_endpoint(endpoint, contested=contested)
            except AlreadyExists as exc:
                if exc.what == "IP" and requested is None:
                    continue  # someone else won it: the view has it now, so the next pick differs
                raise Conflict(str(exc)) from None
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
            finally:
                self._addresses.release(net.name, address)
            await self._registry.add(endpoint)
            return endpoint
        raise Conflict(f"could not allocate an IP in network {net.name}: too many concurrent claims")

    async def _pick(self, net: Network, requested: IPv4Address | None) -> tuple[IPv4Address, bool]:
        """An address reserved for this add, and whether claiming it is contested (gossip-only)."""
        gossip = self._claims if isinstance(self._claims, GossipClaims) else None
        try:
            if requested is not None:
                if not self._addresses.is_free(net, requested):
                    raise Conflict(f"IP {requested} is already in use in network {net.name}")
                self._addresses.reserve(net.name, requested)
                return requested, gossip is not None and gossip.contested(net, requested)
            if gossip is not None:
                return await gossip.take_address(net)
            return self._addresses.take(net), False
        except SubnetFull as exc:
            raise Conflict(str(exc)) from None

    async def _plumb(self, net: Network, endpoint: Endpoint, *, named: bool) -> None:
        """Once the network's bridge and VXLAN device are up, the veth into the namespace.

        The endpoint announces its address (a gratuitous ARP, flooded to every port on this
        host: its cost grows with the host's endpoints) where another MAC for it may be
        cached here: in a network with a gateway (which talks to every endpoint, and whose
        stale entry would cut the endpoint off from the outside), for an address the caller
        named (typically one given back and taken again: announced even where the memory
        of removals cannot tell), and for an address used lately with
        another MAC (`announce.own_announcement_needed`). Decided with no wait between the
        decision and the kernel work, so no removal can slip in between.
        """
        bridge = bridge_name(net.vni)
        vxlan = vxlan_name(net.vni)
        await self._reconciler.wait_links([bridge, vxlan], timeout=_LINKS_TIMEOUT)
        announce = (
            net.gateway is not None
            or named
            or self._reconciler.own_announcement_needed(vxlan, endpoint.ip, endpoint.mac)
        )
        await create_local_endpoint(
            self._kernel,
            netns=endpoint.netns,
            ifname=endpoint.ifname,
            host_ifname=veth_name(endpoint.network, endpoint.name),
            ip=endpoint.ip,
            prefixlen=net.subnet.prefixlen,
            mac=endpoint.mac,
            mtu=overlay_mtu(net, self._underlay.mtu),
            gateway=net.gateway,
            bridge=bridge,
            bridge_index=self._reconciler.mirror.link_index(bridge),
            network=net.name,
            announce=announce,
        )
        if announce:
            # Sent again from the bridge, now that the port is in place. The endpoint's own
            # announcement (arp_notify, as it comes up) did not always reach the bridge:
            # under load, right after a restart, one add in two (likely the port's carrier,
            # which the kernel turns on a moment after the peer comes up). From the bridge
            # it reaches every port already forwarding: every container that may hold the
            # old MAC. (The endpoint's own stays for a gateway on this bridge, which only
            # an announcement coming in through a port updates.)
            for _, error in await self._kernel.execute([AnnounceArp(bridge, endpoint.ip, endpoint.mac)]):
                if error is not None:
                    log.warning("endpoint %s: %s", endpoint.key, error)

    async def _unclaim(self, endpoint: Endpoint) -> None:
        """Undo `_claim` after a failure, so nothing stays half-created."""
        try:
            await self._claims.delete_endpoint(endpoint)
        except StoreError as exc:
            log.error("could not release endpoint %s after failure: %s", endpoint.key, exc)
        await self._registry.remove(endpoint.key)

    async def endpoint_remove(self, *, network: str, name: str) -> None:
        self._require_synced()
        key = endpoint_key(network, name)
        if key in self._state.conflicts:
            # Withdrawn already (lost a clash): only its veth is left.
            await delete_local_endpoint(self._kernel, host_ifname=veth_name(network, name))
            del self._state.conflicts[key]
            log.info("removed withdrawn endpoint %s", key)
            return
        endpoint = self._registry.get(key)
        if endpoint is None:
            other = self._view.endpoints.get(key)
            if other is not None:
                raise Conflict(f"endpoint {key} is owned by {other.owner}; remove it there")
            raise NotFound(f"endpoint {key} not found")
        if key in self._busy:
            raise Conflict(f"endpoint {key} is being changed by another request; try again")
        self._busy.add(key)
        try:
            # Remembered before the address is free: an add may take it again at once, and
            # must know that local containers may still hold this MAC for it.
            self._reconciler.local_endpoint_gone(endpoint.ip, endpoint.mac)
            try:
                await self._claims.delete_endpoint(endpoint)
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
            await delete_local_endpoint(self._kernel, host_ifname=veth_name(network, name))
            await self._registry.remove(key)
        finally:
            self._busy.discard(key)
        log.info("removed endpoint %s", key)

    # ================================================================ conflicts found late

    def lost(self, conflict: LostClaim) -> None:
        """An own claim lost a clash found late (claims made on both sides of a partition)."""
        if conflict.kind == "network":
            message = f"network {conflict.key}: {conflict.why}"
            log.error("%s", message)
            self._state.report_invalid(message)
            return
        gossip = self._claims if isinstance(self._claims, GossipClaims) else None
        if conflict.key in self._busy or (gossip is not None and conflict.key in gossip.settling):
            return  # the add in progress sees it and fails
        endpoint = self._registry.get(conflict.key)
        if endpoint is None:
            return
        self._tasks.spawn(self._withdraw(endpoint, conflict.why), name=f"withdraw-{endpoint.key}")

    async def _withdraw(self, endpoint: Endpoint, why: str) -> None:
        """Take the loser out of the overlay: out of the view, its veth off the bridge and down.

        The veth stays, and the endpoint is listed with the reason, until the
        operator removes it: removing it would cut the container off without
        anyone asking.
        """
        key = endpoint.key
        log.error("endpoint %s withdrawn from the overlay: %s", key, why)
        self._state.conflicts[key] = (endpoint, why)
        self._state.report_invalid(f"endpoint {key} withdrawn: {why}")
        # Its neighbours here may hold its MAC for the address it gives up (see `endpoint_remove`).
        self._reconciler.local_endpoint_gone(endpoint.ip, endpoint.mac)
        try:
            await self._claims.delete_endpoint(endpoint)
        except StoreError as exc:
            log.error("could not withdraw endpoint %s: %s", key, exc)
        await self._registry.remove(key)
        await quarantine_local_endpoint(self._kernel, host_ifname=veth_name(endpoint.network, endpoint.name))

    # ================================================================ teardown

    async def teardown(self) -> JSON:
        """Take this host out of the overlay, then stop the daemon.

        In order: stop what would put the overlay back (watch, lease
        keepalive, reconciler); delete every local endpoint (its record, if
        the store answers, and its veth); give the lease up, so the node
        record and anything still bound to it vanish at once for every other
        host; delete every link overlayd owns here. Networks are cluster-wide
        and stay. Errors are collected and reported, never half-hidden: what
        could not be released in the store still expires with the lease.
        """
        if self._state.tearing_down:
            raise Conflict("a teardown is already in progress")
        self._state.tearing_down = True
        log.warning("teardown requested: removing this host's overlay")
        tasks = self._overlay_tasks()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STORE_CALL_TIMEOUT)
        errors: list[str] = []
        removed_endpoints = []
        for endpoint in self._registry.all():
            try:
                async with asyncio.timeout(STORE_CALL_TIMEOUT):  # not wait_for: it can drop a cancel
                    await self._claims.delete_endpoint(endpoint)
            except (StoreError, TimeoutError) as exc:
                errors.append(f"endpoint {endpoint.key}: store: {_why(exc)}")
            try:
                await delete_local_endpoint(
                    self._kernel, host_ifname=veth_name(endpoint.network, endpoint.name)
                )
            except KernelError as exc:
                errors.append(f"endpoint {endpoint.key}: {exc}")
            await self._registry.remove(endpoint.key)
            removed_endpoints.append(endpoint.key)
        for key, (endpoint, _) in list(self._state.conflicts.items()):
            try:
                await delete_local_endpoint(
                    self._kernel, host_ifname=veth_name(endpoint.network, endpoint.name)
                )
            except KernelError as exc:
                errors.append(f"endpoint {key}: {exc}")
            del self._state.conflicts[key]
        await self._registry.compact()
        lease_released = False
        try:
            async with asyncio.timeout(STORE_CALL_TIMEOUT):
                await self._claims.release()
            lease_released = True
        except (StoreError, TimeoutError) as exc:
            errors.append(f"lease not released ({_why(exc)}); this host's records expire {self._lease_ttl}")
        links = await remove_owned_links(self._kernel)
        errors += links.errors
        self._state.torn_down = True
        log.warning(
            "teardown: %d endpoints, %d links removed, lease %s, %d errors",
            len(removed_endpoints),
            len(links.removed),
            "released" if lease_released else "NOT released",
            len(errors),
        )
        # Stop once this answer is on its way (the admin server lets it finish).
        asyncio.get_running_loop().call_soon(self._stop)
        return {
            "node": self._node,
            "endpoints_removed": removed_endpoints,
            "links_removed": links.removed,
            "lease_released": lease_released,
            "errors": errors,
            "stopping": True,
        }


def _why(exc: BaseException) -> str:
    return str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)


def _netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def _validate_ifname(ifname: str) -> None:
    if not ifname or len(ifname) > 15 or "/" in ifname or any(c.isspace() for c in ifname):
        raise BadRequest(f"invalid interface name {ifname!r}: 1-15 characters, no '/' or spaces")
