"""The overlayd daemon: wires store, view, reconciler and API together.

Start-up order matters for never dropping a live endpoint:

1. the admin and status servers come up first, so an operator can see why
   the daemon is not ready yet;
2. the store is connected (retrying while it is down) and the node's lease is
   resumed or taken, and every endpoint in the local registry is re-published;
3. the first snapshot of the store becomes the view; only then does the
   reconciler run, so a daemon that cannot reach the store never mistakes
   "I know nothing yet" for "delete everything";
4. the watch applies changes; each change triggers a (coalesced) reconcile.

Shutdown (SIGTERM/SIGINT) has one path: stop tasks, close servers and the
store client, and leave the kernel alone. The lease is not revoked: a
restarted daemon resumes it, so no other host ever sees this host's
endpoints disappear because of a restart. Only `teardown` (the admin API's
explicit "this host leaves the overlay") removes the kernel objects and gives
the lease up, and then the daemon exits.

Under systemd (`Type=notify`) the daemon says READY=1 once the first
reconcile is done, keeps a one-line STATUS= current, sends WATCHDOG=1 while
its tasks are alive, and STOPPING=1 on the way out (see `sdnotify`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from ipaddress import IPv4Address
from typing import Any

from overlayd import config as config_mod
from overlayd.api.admin import start_admin_server
from overlayd.api.service import JSON, BadRequest, Conflict, NotFound, Unavailable
from overlayd.api.status import start_status_server
from overlayd.config import Config, ConfigError, GossipSettings
from overlayd.dataplane.commands import describe
from overlayd.dataplane.desired import desired_state, overlay_mtu
from overlayd.dataplane.endpoints import (
    create_local_endpoint,
    delete_local_endpoint,
    quarantine_local_endpoint,
)
from overlayd.dataplane.inspect import inspect_endpoint
from overlayd.dataplane.kernel import Kernel, KernelError, Underlay
from overlayd.dataplane.kstate import KernelState, bridge_name, veth_name
from overlayd.dataplane.teardown import remove_owned_links
from overlayd.gossip import MemberInfo, MemberState, Record
from overlayd.metrics import Metrics
from overlayd.model import (
    Endpoint,
    Network,
    Node,
    ValidationError,
    endpoint_key,
    first_free_ip,
    parse_ipv4,
    parse_subnet,
    random_mac,
    validate_name,
)
from overlayd.peering import ENDPOINT, Peering
from overlayd.reconciler import Reconciler
from overlayd.registry import LocalRegistry
from overlayd.sdnotify import Notifier
from overlayd.state import (
    ClusterView,
    EndpointDeleted,
    EndpointPut,
    Fact,
    NetworkDeleted,
    NetworkPut,
    NodeDeleted,
    NodePut,
)
from overlayd.store.base import (
    AlreadyExists,
    NotFoundError,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
)
from overlayd.store.factory import make_store
from overlayd.store.gossip import GossipStore
from overlayd.tasks import TaskGroup

log = logging.getLogger("overlayd")

# Automatic VNIs start above the range people tend to pick by hand.
AUTO_VNI_START = 4096
_ALLOC_ATTEMPTS = 64
_CONNECT_RETRY_MAX = 5.0
# STATUS= is re-sent at most this often (and only when the line changed).
_STATUS_MIN_INTERVAL = 1.0
# Bounds on the store calls of an explicit teardown and of the doctor's probe.
_STORE_CALL_TIMEOUT = 5.0


class Daemon:
    """One host's overlayd. Implements `api.service.AdminService`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.view = ClusterView()
        self.registry = LocalRegistry(config.state_dir)
        self.tasks = TaskGroup()
        self.started_at = time.time()
        self.underlay: Underlay | None = None
        self.synced = False
        self._stop = asyncio.Event()
        self._mutate = asyncio.Lock()  # one admin change at a time: allocation stays simple
        self._kernel: Kernel | None = None
        self._store: Store | None = None
        self._reconciler: Reconciler | None = None
        # Remote endpoints heard of but not yet programmed: key -> (created_at at the owner, path).
        self._unprogrammed: dict[str, tuple[float, str]] = {}
        # With a KV store: gossip carries changes ahead of the watch (None: no gossip).
        self._peering: Peering | None = None
        self._early_gossip: list[Record] = []
        # Own writes the KV store missed while unreachable, replayed when it returns.
        self._pending_kv: dict[str, Endpoint] = {}
        self._pending_kv_delete: dict[str, Endpoint] = {}
        # Own endpoints withdrawn after losing a clash: key -> (endpoint, why), until removed.
        self._conflicts: dict[str, tuple[Endpoint, str]] = {}
        self._invalid_records: list[str] = []
        # Which path facts about remote records arrive by (the latency histogram's label).
        self._fact_path = "kv" if config.store is not None else "gossip"
        self.notifier = Notifier()
        self._ready_notified = False
        self._store_error: str | None = None
        self._store_latency: float | None = None
        self._counts = (0, 0)  # local, remote endpoints, as of the last gauge update
        # Tasks that keep the overlay in place; teardown cancels them first.
        self._overlay_tasks: list[asyncio.Task[Any]] = []
        self._tearing_down = False
        self._torn_down = False
        self._fatal: str | None = None  # why the daemon had to stop (main prints it, exit 1)

    # ================================================================ lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        closers: list[tuple[str, Any]] = []
        try:
            self.registry.load()
            self._kernel = Kernel(metrics=self.metrics)
            await self._kernel.__aenter__()
            closers.append(("kernel", self._kernel.__aexit__(None, None, None)))
            self.underlay = await self._kernel.underlay(
                interface=self.config.underlay_interface, address=self.config.vtep_address
            )
            log.info(
                "node %s: VTEP %s on %s (MTU %d)",
                self.config.node_name,
                self.underlay.address,
                self.underlay.ifname,
                self.underlay.mtu,
            )
            self._reconciler = Reconciler(
                kernel=self._kernel,
                desired=self._desired,
                metrics=self.metrics,
                interval=self.config.reconcile_interval,
                on_converged=self._record_convergence,
            )
            admin = await start_admin_server(self, self.config.admin_socket)
            closers.append(("admin server", admin.close()))
            status = await start_status_server(self, self.metrics, self.config.status_listen)
            closers.append(("status server", status.close()))

            self._store = self._make_store()
            closers.append(("store", self._store.close()))
            if self.config.store is not None and self.config.gossip is not None:
                self._peering = await self._start_peering(self.config.gossip)
                closers.append(("gossip", self._peering.stop(leave=False)))
            self.tasks.spawn(self._notify_status(), name="sd-status")
            if self.notifier.watchdog_interval is not None:
                self.tasks.spawn(self._watchdog(self.notifier.watchdog_interval), name="sd-watchdog")
            self._overlay_tasks.append(self.tasks.spawn(self._start_store_and_sync(), name="store-sync"))
            await self._stop.wait()
            if self._torn_down:
                log.info("stopping after teardown (dataplane removed, lease released)")
            else:
                log.info("stopping (dataplane and lease are kept)")
        finally:
            self.notifier.stopping("stopping")
            await self.tasks.cancel_all()
            await _close_all(reversed(closers))
            self.notifier.close()
        if self._fatal is not None:
            raise RuntimeError(self._fatal)

    async def _start_peering(self, settings: GossipSettings) -> Peering:
        """Gossip beside the KV store: changes reach peers in milliseconds, also while it is down."""
        assert self.underlay is not None
        peering = Peering(
            node_name=self.config.node_name,
            settings=settings,
            advertise=self.underlay.address,
            registry=self.metrics.registry,
            on_record=self._on_gossip_record,
        )
        try:
            await peering.start()
        except OSError as exc:
            raise RuntimeError(f"cannot start gossip on port {settings.port}: {exc}") from None
        peering.publish_node(self._self_node())
        for endpoint in self.registry.all():
            peering.publish_endpoint(endpoint)
        return peering

    def _on_gossip_record(self, record: Record) -> None:
        if not self.synced:
            # Until the first snapshot, the KV store has not said what exists.
            self._early_gossip.append(record)
            return
        fact = self._gossip_fact(record)
        if fact is not None and self._apply_fact(fact, path="gossip"):
            self._update_gauges()
            self._require_reconciler().trigger()

    def _gossip_fact(self, record: Record) -> Fact | None:
        """What a gossip record may change in a KV-backed view.

        The KV store stays the authority for deletion: gossip removes an
        endpoint only when its owner said so (a tombstone), never because a
        peer went quiet. Networks come from the store alone.
        """
        peering = self._peering
        assert peering is not None
        if record.owner == self.config.node_name:
            # Our own endpoint from before a restart that we no longer have: withdraw it.
            if (
                record.kind == ENDPOINT
                and record.payload is not None
                and record.key not in self.registry
                and record.incarnation < peering.node.incarnation
            ):
                peering.delete_endpoint(record.key)
            return None
        if record.payload is None:
            current = self.view.endpoints.get(record.key) if record.kind == ENDPOINT else None
            if current is not None and current.owner == record.owner:
                return EndpointDeleted(record.key)
            return None
        fact = peering.to_fact(record)
        match fact:
            case EndpointPut(endpoint):
                current = self.view.endpoints.get(endpoint.key)
                if current is None:
                    # Ahead of the store only for a member gossip sees alive: peers keep
                    # a dead host's records (its lease, not a tombstone, ended them), and
                    # they must not come back from there.
                    if self._gossip_alive(record.owner):
                        return fact
                elif current != endpoint and endpoint.created_at >= current.created_at:
                    return fact
            case NodePut(node) if node.name not in self.view.nodes:
                return fact
        return None

    def _gossip_alive(self, name: str) -> bool:
        member = self._members().get(name)
        return member is not None and member.state in (MemberState.ALIVE, MemberState.SUSPECT)

    def _merge_gossip_into_view(self) -> bool:
        """After a KV snapshot: keep what gossip knows that the store has not caught up with."""
        if self._peering is None:
            return False
        changed = False
        for record in [*self._early_gossip, *self._peering.node.records()]:
            fact = self._gossip_fact(record)
            if fact is not None and not isinstance(fact, EndpointDeleted):
                changed |= self._apply_fact(fact, path="gossip")
        self._early_gossip.clear()
        return changed

    def _endpoint_conflict(self, key: str, why: str) -> None:
        """An own endpoint lost a clash found late (claims made on both sides of a partition).

        It leaves the overlay: out of the view, its veth off the bridge and
        down, so it cannot answer for an address that is another endpoint's
        now. The veth stays, and the endpoint is listed with the reason, until
        the operator removes it.
        """
        endpoint = self.registry.get(key)
        if endpoint is None:
            return
        self._conflicts[key] = (endpoint, why)
        self._invalid_records.append(f"endpoint {key} withdrawn: {why}")
        self.registry.remove(key)
        self.view.apply(EndpointDeleted(key))
        self._update_gauges()
        self.tasks.spawn(self._quarantine(endpoint), name=f"quarantine-{key}")

    async def _quarantine(self, endpoint: Endpoint) -> None:
        async with self._mutate:
            await quarantine_local_endpoint(
                self._require_kernel(), host_ifname=veth_name(endpoint.network, endpoint.name)
            )
        self._require_reconciler().trigger()

    async def _flush_pending_kv(self) -> None:
        """Write what the store missed while unreachable, once it answers again."""
        store = self._require_store()
        while True:
            await asyncio.sleep(1.0)
            if not (self._pending_kv or self._pending_kv_delete):
                continue
            async with self._mutate:
                for key, endpoint in list(self._pending_kv.items()):
                    try:
                        await store.create_endpoint(endpoint)
                    except AlreadyExists as exc:
                        if exc.what != "endpoint name" and exc.holder != key:
                            # Someone took the IP or name in the store meanwhile: loud, not silent.
                            message = f"endpoint {key} created during a store outage conflicts: {exc}"
                            log.error(message)
                            self._invalid_records.append(message)
                    except StoreError:
                        break  # still down: try again later
                    self._pending_kv.pop(key, None)
                    log.info("endpoint %s written to the store after the outage", key)
                for key, endpoint in list(self._pending_kv_delete.items()):
                    try:
                        await store.delete_endpoint(endpoint)
                    except StoreError:
                        break
                    self._pending_kv_delete.pop(key, None)

    def _make_store(self) -> Store:
        if self.config.store is None:
            assert self.config.gossip is not None  # config guarantees it
            return GossipStore(
                self.config.gossip,
                registry=self.metrics.registry,
                node_name=self.config.node_name,
                on_conflict=self._endpoint_conflict,
            )
        return make_store(
            self.config.store,
            state_dir=self.config.state_dir,
            metrics=self.metrics,
            on_invalid=self._invalid_records.append,
        )

    async def _start_store_and_sync(self) -> None:
        store = self._require_store()
        delay = 0.2
        while True:
            try:
                try:
                    await store.connect()
                except StoreUnavailable:
                    raise
                except StoreError as exc:
                    # Wrong credentials or TLS settings: retrying cannot help. One line, then exit.
                    self._fatal = f"cannot use the store: {exc}"
                    log.error("%s", self._fatal)
                    self._stop.set()
                    return
                await store.open_session(self._self_node())
                for endpoint in self.registry.all():
                    try:
                        await store.publish_endpoint(endpoint)
                    except AlreadyExists as exc:
                        message = f"endpoint {endpoint.key} cannot be re-published: {exc}"
                        log.error("%s", message)
                        self._invalid_records.append(message)
                snapshot = await store.snapshot()
                break
            except StoreError as exc:
                log.warning("store not ready: %s (retrying)", exc)
                self._store_error = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _CONNECT_RETRY_MAX)
        self._store_error = None
        self._apply_snapshot(snapshot)
        self.synced = True
        log.info(
            "synced with store at revision %d: %d networks, %d nodes, %d endpoints",
            snapshot.revision,
            len(self.view.networks),
            len(self.view.nodes),
            len(self.view.endpoints),
        )
        reconciler = self._require_reconciler()
        if self._peering is not None:
            self._merge_gossip_into_view()
            self._overlay_tasks.append(self.tasks.spawn(self._flush_pending_kv(), name="kv-replay"))
        self._overlay_tasks += [
            self.tasks.spawn(store.keep_session(), name="store-session"),
            self.tasks.spawn(self._watch(snapshot.revision), name="store-watch"),
            self.tasks.spawn(reconciler.run(), name="reconciler"),
        ]
        await reconciler.first_pass_done.wait()
        log.info("ready: first reconcile done")
        self._ready_notified = True
        self.notifier.ready(self.status_line())

    # ================================================================ service manager

    def status_line(self) -> str:
        """One line for systemd's STATUS= (and `systemctl status`)."""
        if self._tearing_down:
            return "tearing down"
        if not self.synced:
            if self._store_error:
                return f"starting: waiting for the store ({self._store_error})"
            return f"starting: connecting to the store at {self._store_url()}"
        if not self._ready_notified:
            return "starting: first reconcile"
        local, remote = self._counts
        line = (
            f"ready: {_plural(len(self.view.networks), 'network')}, "
            f"{local} local / {remote} remote endpoints, "
            f"store {'healthy' if self._store and self._store.healthy else 'UNREACHABLE'}"
        )
        last = self._reconciler.last if self._reconciler else None
        if last is not None and last.failed:
            line += f", {_plural(last.failed, 'kernel operation')} failing"
        return line

    async def _notify_status(self) -> None:
        """Send STATUS= when the line changed, at most once per _STATUS_MIN_INTERVAL."""
        if not self.notifier.enabled:
            return
        sent = None
        while True:
            line = self.status_line()
            if line != sent:
                self.notifier.status(line)
                sent = line
            await asyncio.sleep(_STATUS_MIN_INTERVAL)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every `interval` while the loop runs and no task has died.

        A blocked event loop stops the pings by itself; a dead task (the
        reconciler, the watch) leaves a daemon that looks alive but no longer
        does its job, so it stops them too and lets systemd restart it.
        """
        silent = False
        while True:
            if self.tasks.failures:
                if not silent:
                    names = ", ".join(name for name, _ in self.tasks.failures)
                    log.error("task(s) %s died: no more watchdog pings, expecting a restart", names)
                    silent = True
            else:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _watch(self, revision: int) -> None:
        async for batch in self._require_store().watch(revision):
            if isinstance(batch, Snapshot):
                changed = self._apply_snapshot(batch)
            else:
                changed = False
                for fact in batch.facts:
                    changed |= self._apply_fact(fact)
            self._update_gauges()
            if changed:
                self._require_reconciler().trigger()

    def _is_own(self, fact: Fact) -> bool:
        """Facts about this node's own records: the local registry is their authority."""
        match fact:
            case EndpointPut(ep):
                return ep.owner == self.config.node_name or ep.key in self.registry
            case EndpointDeleted(key):
                return key in self.registry
            case NodePut(node):
                return node.name == self.config.node_name
            case NodeDeleted(name):
                return name == self.config.node_name
        return False

    def _apply_fact(self, fact: Fact, *, path: str | None = None) -> bool:
        if self._is_own(fact):
            return False
        if isinstance(fact, NodePut) and self._peering is not None and self.config.gossip is not None:
            # Membership is seeded from the store's node records too (same port cluster-wide).
            self._peering.add_seeds([(str(fact.node.vtep), self.config.gossip.port)])
        if isinstance(fact, EndpointPut) and fact.endpoint.key not in self.view.endpoints:
            self._unprogrammed[fact.endpoint.key] = (fact.endpoint.created_at, path or self._fact_path)
        elif isinstance(fact, EndpointDeleted):
            self._unprogrammed.pop(fact.key, None)
        return self.view.apply(fact)

    def _apply_snapshot(self, snapshot: Snapshot) -> bool:
        facts = [f for f in snapshot.facts if not self._is_own(f)]
        facts.append(NodePut(self._self_node()))
        facts += [EndpointPut(ep) for ep in self.registry.all()]
        changed = self.view.replace_all(facts)
        if self._peering is not None and self.config.gossip is not None:
            port = self.config.gossip.port
            others = [n for n in self.view.nodes.values() if n.name != self.config.node_name]
            self._peering.add_seeds([(str(n.vtep), port) for n in others])
        if self.synced or self._early_gossip:
            changed |= self._merge_gossip_into_view()
        self._update_gauges()
        return changed

    def _self_node(self) -> Node:
        assert self.underlay is not None
        return Node(name=self.config.node_name, vtep=self.underlay.address, started_at=self.started_at)

    def _desired(self) -> KernelState:
        assert self.underlay is not None
        return desired_state(
            self.view,
            local_node=self.config.node_name,
            local_vtep=self.underlay.address,
            underlay_mtu=self.underlay.mtu,
        )

    def _record_convergence(self, programmed: KernelState) -> None:
        """Observe creation-to-programmed latency for remote endpoints now in the kernel."""
        if not self._unprogrammed:
            return
        now = time.time()
        macs = {entry.mac for entry in programmed.fdb}
        for key, (created_at, path) in list(self._unprogrammed.items()):
            endpoint = self.view.endpoints.get(key)
            if endpoint is None:
                del self._unprogrammed[key]
            elif endpoint.mac in macs:
                del self._unprogrammed[key]
                if created_at > 0:
                    latency = max(now - created_at, 0.0)
                    self.metrics.convergence_latency.labels(path=path).observe(latency)

    def _update_gauges(self) -> None:
        local = sum(1 for ep in self.view.endpoints.values() if ep.owner == self.config.node_name)
        self._counts = (local, len(self.view.endpoints) - local)
        self.metrics.endpoints_known.labels(locality="local").set(local)
        self.metrics.endpoints_known.labels(locality="remote").set(len(self.view.endpoints) - local)
        self.metrics.networks_known.set(len(self.view.networks))

    def _require_store(self) -> Store:
        assert self._store is not None
        return self._store

    def _require_reconciler(self) -> Reconciler:
        assert self._reconciler is not None
        return self._reconciler

    def _require_kernel(self) -> Kernel:
        assert self._kernel is not None
        return self._kernel

    def _require_synced(self) -> Store:
        if self._tearing_down:
            raise Unavailable("this host's overlay is being torn down; overlayd stops afterwards")
        if not self.synced:
            raise Unavailable(f"not connected to the KV store at {self._store_url()} yet; try again")
        return self._require_store()

    def _store_url(self) -> str:
        # Only scheme and addresses: credentials never leave the daemon.
        return self.config.store.url if self.config.store else "gossip"

    # ================================================================ read-only API

    def is_ready(self) -> bool:
        return self._reconciler is not None and self._reconciler.first_pass_done.is_set()

    def status(self) -> JSON:
        reconciler = self._reconciler
        local = [ep for ep in self.view.endpoints.values() if ep.owner == self.config.node_name]
        return {
            "node": self.config.node_name,
            "vtep": str(self.underlay.address) if self.underlay else None,
            "underlay": (
                {"interface": self.underlay.ifname, "mtu": self.underlay.mtu} if self.underlay else None
            ),
            "ready": self.is_ready(),
            "started_at": self.started_at,
            "pid": os.getpid(),
            "summary": self.status_line(),
            "store": {
                "url": self._store_url(),
                "healthy": bool(self._store and self._store.healthy),
                "synced": self.synced,
                # From the last `store_probe` (overlayctl doctor); None before the first.
                "latency_ms": None if self._store_latency is None else round(self._store_latency * 1e3, 3),
                "invalid_records": self._invalid_records[-10:],
                # Own changes made while the store was unreachable, not yet written to it.
                "pending_writes": len(self._pending_kv) + len(self._pending_kv_delete),
            },
            "gossip": self._gossip_status(),
            "networks": sorted(self.view.networks),
            "nodes": len(self.view.nodes),
            "endpoints": {"local": len(local), "remote": len(self.view.endpoints) - len(local)},
            "last_reconcile": reconciler.last.to_dict() if reconciler and reconciler.last else None,
            "errors": list(reconciler.errors)[-20:] if reconciler else [],
        }

    def _current_peering(self) -> Peering | None:
        """The gossip layer, whether it runs beside a KV store or is the store."""
        if isinstance(self._store, GossipStore):
            return self._store.peering
        return self._peering

    def _members(self) -> dict[str, MemberInfo]:
        peering = self._current_peering()
        return {m.name: m for m in peering.members()} if peering is not None else {}

    def peers(self) -> list[JSON]:
        counts: dict[str, int] = {}
        for ep in self.view.endpoints.values():
            counts[ep.owner] = counts.get(ep.owner, 0) + 1
        members = self._members()
        out: list[JSON] = []
        for node in sorted(self.view.nodes.values(), key=lambda n: n.name):
            record: JSON = {
                "name": node.name,
                "vtep": str(node.vtep),
                "started_at": node.started_at,
                "endpoints": counts.get(node.name, 0),
                "self": node.name == self.config.node_name,
            }
            member = members.pop(node.name, None)
            if self.config.gossip is not None:
                record["state"] = "alive" if record["self"] else (member.state.value if member else "unknown")
                record["rtt_ms"] = round(member.rtt * 1e3, 3) if member and member.rtt is not None else None
            out.append(record)
        # Members gossip knows that have no node record in the view (dead past grace, joining).
        for member in sorted(members.values(), key=lambda m: m.name):
            out.append(
                {
                    "name": member.name,
                    "vtep": member.addr,
                    "started_at": None,
                    "endpoints": 0,
                    "self": False,
                    "state": member.state.value,
                    "rtt_ms": round(member.rtt * 1e3, 3) if member.rtt is not None else None,
                }
            )
        return out

    def _gossip_status(self) -> JSON | None:
        if self.config.gossip is None:
            return None
        states: dict[str, int] = {}
        for member in self._members().values():
            states[member.state.value] = states.get(member.state.value, 0) + 1
        return {"port": self.config.gossip.port, "members": states, "insecure": not self.config.gossip.keys}

    def network_list(self) -> list[JSON]:
        out = []
        for network in sorted(self.view.networks.values(), key=lambda n: n.name):
            record = network.to_dict()
            record["endpoints"] = len(self.view.endpoints_in(network.name))
            out.append(record)
        return out

    def network_inspect(self, name: str) -> JSON:
        network = self.view.networks.get(name)
        if network is None:
            raise NotFound(f"network {name} not found")
        record = network.to_dict()
        if self.underlay:
            record["host_mtu"] = overlay_mtu(network, self.underlay.mtu)
        record["endpoints"] = [
            ep.to_dict() for ep in sorted(self.view.endpoints_in(name), key=lambda e: e.name)
        ]
        return record

    def endpoint_list(self, network: str | None = None) -> list[JSON]:
        listed: list[tuple[Endpoint, str | None]] = [(ep, None) for ep in self.view.endpoints.values()]
        listed += [(ep, why) for ep, why in self._conflicts.values()]
        out = []
        for ep, why in sorted(listed, key=lambda item: (item[0].network, item[0].name)):
            if network is None or ep.network == network:
                record = ep.to_dict()
                if why is not None:
                    record["conflict"] = why
                out.append(record)
        return out

    async def store_probe(self) -> JSON:
        """Time one full read of the cluster view from the store (bounded)."""
        store = self._require_store()
        t0 = time.perf_counter()
        error = None
        try:
            await asyncio.wait_for(store.snapshot(), _STORE_CALL_TIMEOUT)
        except TimeoutError:
            error = f"no answer within {_STORE_CALL_TIMEOUT:g}s"
        except StoreError as exc:
            error = str(exc)
        latency = time.perf_counter() - t0
        if error is None:
            self._store_latency = latency
        return {
            "url": self._store_url(),
            "ok": error is None,
            "latency_ms": round(latency * 1e3, 3) if error is None else None,
            "error": error,
        }

    async def diff(self) -> list[str]:
        if not self.synced:
            raise Unavailable("not synced with the KV store yet: the desired state is unknown")
        commands = await self._require_reconciler().pending()
        return [describe(cmd) for cmd in commands]

    # ================================================================ networks

    async def network_create(
        self,
        *,
        name: str,
        subnet: str,
        vni: int | None = None,
        gateway: str | None = None,
        mtu: int | None = None,
    ) -> JSON:
        store = self._require_synced()
        async with self._mutate:
            # Validate everything before touching the store (VNI checked with a placeholder).
            candidate = Network(
                name=name,
                vni=1 if vni is None else vni,
                subnet=parse_subnet(subnet),
                gateway=parse_ipv4(gateway, "gateway") if gateway is not None else None,
                mtu=mtu,
            )
            if name in self.view.networks:
                raise Conflict(f"network {name} already exists")
            if vni is not None:
                holder = self._vni_holder(vni)
                if holder:
                    raise Conflict(f"VNI {vni} is already used by network {holder}")
                candidates = [vni]
            else:
                used = {n.vni for n in self.view.networks.values()}
                candidates = [
                    v for v in range(AUTO_VNI_START, AUTO_VNI_START + 4 * _ALLOC_ATTEMPTS) if v not in used
                ][:_ALLOC_ATTEMPTS]
            for choice in candidates:
                network = Network(
                    name=name, vni=choice, subnet=candidate.subnet, gateway=candidate.gateway, mtu=mtu
                )
                try:
                    await store.create_network(network)
                except AlreadyExists as exc:
                    if exc.what == "network name":
                        raise Conflict(f"network {name} already exists") from None
                    if vni is not None:
                        raise Conflict(f"VNI {vni} is already used by network {exc.holder}") from None
                    continue
                except StoreError as exc:
                    raise Unavailable(str(exc)) from None
                self.view.apply(NetworkPut(network))
                self._update_gauges()
                log.info("created network %s (VNI %d, %s)", name, network.vni, network.subnet)
                return network.to_dict()
            raise Conflict("could not allocate a free VNI; give one with --vni")

    def _vni_holder(self, vni: int) -> str | None:
        for network in self.view.networks.values():
            if network.vni == vni:
                return network.name
        return None

    async def network_remove(self, name: str) -> None:
        store = self._require_synced()
        async with self._mutate:
            if name not in self.view.networks:
                raise NotFound(f"network {name} not found")
            members = self.view.endpoints_in(name)
            if members:
                raise Conflict(f"network {name} still has {len(members)} endpoint(s); remove them first")
            try:
                await store.delete_network(name)
            except NotFoundError:
                pass
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
            self.view.apply(NetworkDeleted(name))
            self._update_gauges()
            self._require_reconciler().trigger()
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
        store = self._require_synced()
        async with self._mutate:
            net = self.view.networks.get(network)
            if net is None:
                raise NotFound(f"network {network} not found")
            validate_name(name, "endpoint name")
            _validate_ifname(ifname)
            netns_path = _netns_path(netns)
            if not os.path.exists(netns_path):  # noqa: ASYNC240 (a stat of /run/netns, never blocks)
                raise BadRequest(f"network namespace {netns} not found ({netns_path})")
            key = endpoint_key(network, name)
            if key in self.view.endpoints:
                raise Conflict(f"endpoint {name} already exists in network {network}")
            taken = self.view.taken_ips(network)
            if ip is not None:
                address = parse_ipv4(ip, "IP")
                net.check_endpoint_ip(address)
                if address in taken:
                    raise Conflict(f"IP {address} is already in use in network {network}")
            endpoint = await self._claim_endpoint(store, net, name, ip, taken, netns, ifname)
            try:
                await self._plumb_endpoint(net, endpoint)
            except Exception as exc:
                await self._unclaim_endpoint(store, endpoint)
                if isinstance(exc, KernelError):
                    raise BadRequest(str(exc)) from None
                raise
            log.info("endpoint %s: %s %s in %s", key, endpoint.ip, endpoint.mac, netns)
            return endpoint.to_dict()

    async def _claim_endpoint(
        self,
        store: Store,
        net: Network,
        name: str,
        ip: str | None,
        taken: set[IPv4Address],
        netns: str,
        ifname: str,
    ) -> Endpoint:
        """CAS the endpoint and its IP into the store; with no IP given, take the first free one."""
        taken = set(taken)
        for _ in range(_ALLOC_ATTEMPTS):
            try:
                address = parse_ipv4(ip, "IP") if ip is not None else first_free_ip(net, taken)
            except ValidationError as exc:
                raise Conflict(str(exc)) from None
            endpoint = Endpoint(
                network=net.name,
                name=name,
                ip=address,
                mac=random_mac(),
                owner=self.config.node_name,
                created_at=time.time(),
                netns=netns,
                ifname=ifname,
            )
            try:
                await store.create_endpoint(endpoint)
            except AlreadyExists as exc:
                if exc.what == "IP" and ip is None:
                    taken.add(address)  # someone else won it: try the next one
                    continue
                raise Conflict(str(exc)) from None
            except StoreUnavailable as exc:
                if self._peering is None:
                    raise Unavailable(str(exc)) from None
                # Gossip carries it now; the store gets it (compare-and-set) when it returns.
                log.warning("%s: endpoint %s goes out by gossip, stored later", exc, endpoint.key)
                self._pending_kv[endpoint.key] = endpoint
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
            self.registry.add(endpoint)
            self.view.apply(EndpointPut(endpoint))
            if self._peering is not None:
                self._peering.publish_endpoint(endpoint)
            self._update_gauges()
            return endpoint
        raise Conflict(f"could not allocate an IP in network {net.name}: too many concurrent claims")

    async def _plumb_endpoint(self, net: Network, endpoint: Endpoint) -> None:
        """Bridge and VXLAN device first (a reconcile pass), then the veth into the namespace."""
        assert self.underlay is not None
        report = await self._require_reconciler().reconcile("endpoint-add")
        bridge = bridge_name(net.vni)
        await create_local_endpoint(
            self._require_kernel(),
            netns=endpoint.netns,
            ifname=endpoint.ifname,
            host_ifname=veth_name(endpoint.network, endpoint.name),
            ip=endpoint.ip,
            prefixlen=net.subnet.prefixlen,
            mac=endpoint.mac,
            mtu=overlay_mtu(net, self.underlay.mtu),
            gateway=net.gateway,
            bridge=bridge,
            network=net.name,
        )
        if report.failed:
            log.warning(
                "endpoint %s plumbed, but the last reconcile had %d failures", endpoint.key, report.failed
            )
        self._require_reconciler().trigger()

    async def _unclaim_endpoint(self, store: Store, endpoint: Endpoint) -> None:
        """Undo `_claim_endpoint` after a failure, so nothing stays half-created."""
        if self._pending_kv.pop(endpoint.key, None) is None:
            try:
                await store.delete_endpoint(endpoint)
            except StoreError as exc:
                log.error("could not release endpoint %s after failure: %s", endpoint.key, exc)
        if self._peering is not None:
            self._peering.delete_endpoint(endpoint.key)
        self.registry.remove(endpoint.key)
        self.view.apply(EndpointDeleted(endpoint.key))
        self._update_gauges()
        self._require_reconciler().trigger()

    async def endpoint_remove(self, *, network: str, name: str) -> None:
        store = self._require_synced()
        async with self._mutate:
            key = endpoint_key(network, name)
            if key in self._conflicts:
                # Withdrawn already (lost a clash): only its veth is left.
                await delete_local_endpoint(self._require_kernel(), host_ifname=veth_name(network, name))
                del self._conflicts[key]
                log.info("removed withdrawn endpoint %s", key)
                return
            endpoint = self.registry.get(key)
            if endpoint is None:
                other = self.view.endpoints.get(key)
                if other is not None:
                    raise Conflict(f"endpoint {key} is owned by {other.owner}; remove it there")
                raise NotFound(f"endpoint {key} not found")
            if self._pending_kv.pop(key, None) is None:
                try:
                    await store.delete_endpoint(endpoint)
                except StoreUnavailable as exc:
                    if self._peering is None:
                        raise Unavailable(str(exc)) from None
                    log.warning("%s: removal of %s goes out by gossip, stored later", exc, key)
                    self._pending_kv_delete[key] = endpoint
                except StoreError as exc:
                    raise Unavailable(str(exc)) from None
            if self._peering is not None:
                self._peering.delete_endpoint(key)
            await delete_local_endpoint(self._require_kernel(), host_ifname=veth_name(network, name))
            self.registry.remove(key)
            self.view.apply(EndpointDeleted(key))
            self._update_gauges()
            self._require_reconciler().trigger()
            log.info("removed endpoint %s", key)

    async def endpoint_check(self, *, network: str, name: str) -> JSON:
        """The CNI plugin's CHECK: what this host's endpoint's namespace holds now."""
        endpoint = self.registry.get(endpoint_key(network, name))
        if endpoint is None:
            raise NotFound(f"endpoint {network}/{name} is not on this host")
        return (await inspect_endpoint(endpoint)).to_json()

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
        async with self._mutate:
            if self._tearing_down:
                raise Conflict("a teardown is already in progress")
            self._tearing_down = True
            log.warning("teardown requested: removing this host's overlay")
            for task in self._overlay_tasks:
                task.cancel()
            if self._overlay_tasks:
                await asyncio.wait(self._overlay_tasks, timeout=_STORE_CALL_TIMEOUT)
            errors: list[str] = []
            store = self._require_store()
            removed_endpoints = []
            for endpoint in self.registry.all():
                if store.healthy:
                    try:
                        await asyncio.wait_for(store.delete_endpoint(endpoint), _STORE_CALL_TIMEOUT)
                    except (StoreError, TimeoutError) as exc:
                        errors.append(f"endpoint {endpoint.key}: store: {_why(exc)}")
                try:
                    await delete_local_endpoint(
                        self._require_kernel(), host_ifname=veth_name(endpoint.network, endpoint.name)
                    )
                except KernelError as exc:
                    errors.append(f"endpoint {endpoint.key}: {exc}")
                self.registry.remove(endpoint.key)
                self.view.apply(EndpointDeleted(endpoint.key))
                removed_endpoints.append(endpoint.key)
            lease_released = False
            try:
                await asyncio.wait_for(store.release_session(), _STORE_CALL_TIMEOUT)
                lease_released = True
            except (StoreError, TimeoutError) as exc:
                if self.config.store is not None:
                    ttl = f"within {self.config.store.lease_ttl}s"
                else:
                    ttl = "once peers declare this host dead"
                errors.append(f"lease not released ({_why(exc)}); this host's records expire {ttl}")
            links = await remove_owned_links(self._require_kernel())
            errors += links.errors
            self._update_gauges()
            self._torn_down = True
            log.warning(
                "teardown: %d endpoints, %d links removed, lease %s, %d errors",
                len(removed_endpoints),
                len(links.removed),
                "released" if lease_released else "NOT released",
                len(errors),
            )
            # Stop once this answer is on its way (the admin server lets it finish).
            asyncio.get_running_loop().call_soon(self._stop.set)
            return {
                "node": self.config.node_name,
                "endpoints_removed": removed_endpoints,
                "links_removed": links.removed,
                "lease_released": lease_released,
                "errors": errors,
                "stopping": True,
            }


def _why(exc: BaseException) -> str:
    return str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def _validate_ifname(ifname: str) -> None:
    if not ifname or len(ifname) > 15 or "/" in ifname or any(c.isspace() for c in ifname):
        raise BadRequest(f"invalid interface name {ifname!r}: 1-15 characters, no '/' or spaces")


async def _close_all(closers: Any) -> None:
    """Close in the given order, collecting errors instead of stopping at the first."""
    for what, coro in closers:
        try:
            await coro
        except Exception as exc:
            log.error("error closing %s: %s", what, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="overlayd", description="VXLAN overlay control plane daemon")
    parser.add_argument("--config", default=config_mod.DEFAULT_PATH, help="TOML config file")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"overlayd: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(Daemon(cfg).run())
    except (KernelError, OSError, RuntimeError) as exc:
        print(f"overlayd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
