"""The overlayd daemon: builds the parts, runs them, and stops them.

Wiring and lifecycle only; every decision lives in a module of its own:
`admission` (which claim wins), `engine` (a change's path to the kernel),
`reconciler` (kernel mirror and batches), `operations` (the admin API's
changes), `report` (what the daemon says about itself), `claims` and
`store.gossip` (claiming names and addresses), `feeds` (store watch and
gossip into the engine).

Start-up order matters for never dropping a live endpoint:

1. the admin and status servers come up first, so an operator can see why
   the daemon is not ready yet;
2. this host's own records (its node, the endpoints in its local registry)
   enter the view, and the store is connected (retrying while it is down)
   and the node's lease resumed or taken, or, in gossip-only mode, gossip
   starts; own records are re-published;
3. the first read of the cluster view is applied; only then does the
   reconciler run, and it removes nothing from the kernel until the view is
   complete (the store's first snapshot; gossip-only: after hearing the
   live peers), so a restart never turns "I know nothing yet" into "delete
   everything";
4. the watch and gossip apply changes as they come, each one O(change).

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
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any

from overlayd.api.admin import start_admin_server
from overlayd.api.service import JSON, NotFound, Unavailable
from overlayd.api.status import start_status_server
from overlayd.cluster.claims import Claims, KvClaims, WriteBehind
from overlayd.cluster.feeds import GossipFeed, follow_store
from overlayd.cluster.gossip_claims import GossipClaims
from overlayd.cluster.peering import Peering
from overlayd.core import config as config_mod
from overlayd.core.admission import Conflict as LostClaim
from overlayd.core.config import Config, ConfigError, GossipSettings
from overlayd.core.ipam import AddressBook, BlockTable
from overlayd.core.model import Node, endpoint_key
from overlayd.core.view import EndpointPut, NodePut
from overlayd.daemon.engine import Engine
from overlayd.daemon.operations import Operations
from overlayd.daemon.registry import LocalRegistry
from overlayd.daemon.report import Report
from overlayd.daemon.runstate import RunState
from overlayd.daemon.sdnotify import Notifier
from overlayd.dataplane.desired import DesiredState
from overlayd.dataplane.inspect import inspect_endpoint
from overlayd.dataplane.kernel import Kernel, KernelError, Underlay
from overlayd.dataplane.reconciler import Reconciler
from overlayd.store.base import AlreadyExists, Store, StoreError, StoreUnavailable
from overlayd.store.common import retry_while_unavailable
from overlayd.store.factory import make_store
from overlayd.util.metrics import Metrics
from overlayd.util.tasks import TaskGroup

log = logging.getLogger("overlayd")

_CONNECT_RETRY_MAX = 5.0
# STATUS= is re-sent at most this often (and only when the line changed).
_STATUS_MIN_INTERVAL = 1.0


class Daemon:
    """One host's overlayd."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.state = RunState()
        self.registry = LocalRegistry(config.state_dir)
        self.tasks = TaskGroup()
        self.started_at = time.time()
        self.notifier = Notifier()
        self.underlay: Underlay | None = None
        self.engine = Engine(
            node=config.node_name,
            authority=config.store is not None,
            metrics=self.metrics,
            on_conflict=self._lost,
            on_node=self._seed,
        )
        self._stop = asyncio.Event()
        self._kernel: Kernel | None = None
        self._reconciler: Reconciler | None = None
        self._store: Store | None = None
        self._peering: Peering | None = None
        self._write_behind: WriteBehind | None = None
        self._blocks = BlockTable(config.node_name)
        self._addresses = AddressBook(self.engine.view)
        self._feed = GossipFeed(
            node=config.node_name,
            engine=self.engine,
            registry=self.registry,
            authority=config.store is not None,
            dead_grace=config.gossip.dead_grace if config.gossip else 30.0,
            blocks=self._blocks if config.store is None else None,
        )
        self.ops: Operations | None = None
        # Tasks that keep the overlay in place; teardown cancels them first.
        self._overlay_tasks: list[asyncio.Task[Any]] = []
        self._ready_notified = False
        self.report = Report(
            config=config,
            state=self.state,
            engine=self.engine,
            started_at=self.started_at,
            underlay=lambda: self.underlay,
            reconciler=lambda: self._reconciler,
            store=lambda: self._store,
            peering=lambda: self._peering,
            pending_writes=lambda: len(self._write_behind) if self._write_behind is not None else 0,
        )
        self.service = LocalService(self)

    # ================================================================ lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        closers: list[tuple[str, Awaitable[Any]]] = []
        try:
            self.registry.load()
            kernel = Kernel(metrics=self.metrics, gateway_netns_prefix=self.config.gateway_netns_prefix)
            await kernel.__aenter__()
            self._kernel = kernel
            closers.append(("kernel", kernel.__aexit__(None, None, None)))
            underlay = await kernel.underlay(
                interface=self.config.underlay_interface, address=self.config.vtep_address
            )
            self.underlay = underlay
            log.info(
                "node %s: VTEP %s on %s (MTU %d, segment %s)",
                self.config.node_name,
                underlay.address,
                underlay.ifname,
                underlay.mtu,
                underlay.network,
            )
            desired = DesiredState(
                self.engine.view,
                local_node=self.config.node_name,
                local_vtep=underlay.address,
                underlay_mtu=underlay.mtu,
                underlay_ifname=underlay.ifname,
                underlay_network=underlay.network,
                gateway_netns_prefix=self.config.gateway_netns_prefix,
                egress_interfaces=self.config.egress_interfaces,
            )
            reconciler = Reconciler(
                kernel=kernel,
                desired=desired,
                metrics=self.metrics,
                verify_interval=self.config.reconcile_interval,
                on_applied=self.engine.applied,
                # Until the view is complete, nothing it merely lacks is deleted.
                hold_deletions=True,
            )
            self._reconciler = reconciler
            reconciler.recall_removals(self.registry.recent_removals())
            self.engine.attach(desired, reconciler)
            self.engine.from_own(
                [NodePut(self._self_node()), *(EndpointPut(ep) for ep in self.registry.all())]
            )

            admin = await start_admin_server(self.service, self.config.admin_socket)
            closers.append(("admin server", admin.close()))
            status = await start_status_server(self.report, self.metrics, self.config.status_listen)
            closers.append(("status server", status.close()))

            claims = await self._start_mode(closers)
            self.ops = Operations(
                node=self.config.node_name,
                state=self.state,
                engine=self.engine,
                registry=self.registry,
                claims=claims,
                kernel=kernel,
                reconciler=reconciler,
                underlay=underlay,
                addresses=self._addresses,
                lease_ttl=(
                    f"within {self.config.store.lease_ttl}s"
                    if self.config.store is not None
                    else "once peers declare this host dead"
                ),
                stop=self._stop.set,
                overlay_tasks=lambda: self._overlay_tasks,
                tasks=self.tasks,
            )
            self.tasks.spawn(self._notify_status(), name="sd-status")
            if self.notifier.watchdog_interval is not None:
                self.tasks.spawn(self._watchdog(self.notifier.watchdog_interval), name="sd-watchdog")
            sync = self._sync_store() if self.config.store is not None else self._sync_gossip()
            self._overlay_tasks.append(self.tasks.spawn(sync, name="sync"))
            await self._stop.wait()
            if self.state.torn_down:
                log.info("stopping after teardown (dataplane removed, lease released)")
            else:
                log.info("stopping (dataplane and lease are kept)")
        finally:
            self.notifier.stopping("stopping")
            await self.tasks.cancel_all()
            if self._reconciler is not None:
                await self._keep_removals(self._reconciler)
                self._reconciler.close()
            await _close_all(reversed(closers))
            self.notifier.close()
        if self.state.fatal is not None:
            raise RuntimeError(self.state.fatal)

    async def _keep_removals(self, reconciler: Reconciler) -> None:
        """Hand the addresses removed lately to the next life (a lost hint is no error)."""
        try:
            await self.registry.keep_removals(reconciler.recent_removals())
        except OSError as exc:
            log.warning("cannot keep the recent address removals for the next start: %s", exc)

    async def _start_mode(self, closers: list[tuple[str, Awaitable[Any]]]) -> Claims:
        """The store (and gossip beside it), or gossip alone; how this host claims things."""
        gossip = self.config.gossip
        if self.config.store is None:
            assert gossip is not None  # config guarantees it
            peering = await self._start_peering(gossip)
            closers.append(("gossip", peering.stop(leave=False)))
            claims = GossipClaims(
                node=self.config.node_name,
                peering=peering,
                engine=self.engine,
                blocks=self._blocks,
                addresses=self._addresses,
                metrics=self.metrics,
            )
            self._feed.claims = claims
            self.engine.on_network = claims.network_known
            self.engine.on_network_gone = claims.network_gone
            return claims
        store = make_store(
            self.config.store,
            state_dir=self.config.state_dir,
            metrics=self.metrics,
            on_invalid=self.state.report_invalid,
        )
        self._store = store
        closers.append(("store", store.close()))
        beside: Peering | None = None
        if gossip is not None:
            beside = await self._start_peering(gossip)
            closers.append(("gossip", beside.stop(leave=False)))
        self._write_behind = WriteBehind(store, report=self.state.report_invalid)
        return KvClaims(
            store=store,
            engine=self.engine,
            node=self.config.node_name,
            peering=beside,
            pending=self._write_behind,
        )

    async def _start_peering(self, settings: GossipSettings) -> Peering:
        """Gossip: changes reach peers in milliseconds (beside a store, also while it is down)."""
        assert self.underlay is not None
        peering = Peering(
            node_name=self.config.node_name,
            settings=settings,
            advertise=self.underlay.address,
            registry=self.metrics.registry,
            on_record=self._feed.record,
            on_member=self._feed.member,
            tasks=self.tasks,
        )
        try:
            await peering.start()
        except OSError as exc:
            raise RuntimeError(f"cannot start gossip on port {settings.port}: {exc}") from None
        self._peering = peering
        self._feed.peering = peering
        # This life's own records go out before anything a peer says is settled.
        peering.publish_node(self._self_node())
        for endpoint in self.registry.all():
            peering.publish_endpoint(endpoint)
        self._overlay_tasks.append(self.tasks.spawn(self._feed.run(), name="gossip-feed"))
        return peering

    async def _sync_store(self) -> None:
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
                    self.state.fatal = f"cannot use the store: {exc}"
                    log.error("%s", self.state.fatal)
                    self._stop.set()
                    return
                await store.open_session(self._self_node())
                for endpoint in self.registry.all():
                    try:
                        await store.publish_endpoint(endpoint)
                    except AlreadyExists as exc:
                        message = f"endpoint {endpoint.key} cannot be re-published: {exc}"
                        log.error("%s", message)
                        self.state.report_invalid(message)
                snapshot = await store.snapshot()
                break
            except StoreError as exc:
                log.warning("store not ready: %s (retrying)", exc)
                self.state.store_error = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _CONNECT_RETRY_MAX)
        self.state.store_error = None
        self.engine.store_snapshot(snapshot.facts)
        self.state.synced = True
        view = self.engine.view
        log.info(
            "synced with store at revision %d: %d networks, %d nodes, %d endpoints",
            snapshot.revision,
            len(view.networks),
            len(view.nodes),
            len(view.endpoints),
        )
        # The store's whole content is in: the view is complete.
        self._view_complete()
        reconciler = self._require_reconciler()
        self._overlay_tasks += [
            self.tasks.spawn(store.keep_session(), name="store-session"),
            self.tasks.spawn(
                follow_store(store, self.engine, snapshot.revision, on_data_lost=self._store_data_lost),
                name="store-watch",
            ),
            self.tasks.spawn(reconciler.run(), name="reconciler"),
        ]
        if self._write_behind is not None and self._peering is not None:
            self._overlay_tasks.append(self.tasks.spawn(self._write_behind.run(), name="kv-replay"))
        await self._ready(reconciler)

    async def _store_data_lost(self, why: str) -> None:
        """The store lost its data (or is an older backup): keep the dataplane, put back
        what belongs in the store, and trust the store's deletions again only after every
        live host has had the time to notice and do the same.

        What goes back: this host's node and endpoints (on a new lease or session if the
        old one is gone) and every network in the view with its VNI claim. Networks go
        through compare-and-set, so hosts doing this at once agree: the first one
        creates each network, the others find it there.
        """
        assert self.config.store is not None
        store = self._require_store()
        self.state.store_data_loss = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}: {why}"
        self.metrics.store_data_loss.inc()
        log.warning("the store lost its data (%s): keeping the dataplane, re-publishing", why)
        reconciler = self._require_reconciler()
        reconciler.hold()
        networks = list(self.engine.view.networks.values())
        try:
            await retry_while_unavailable(store.ensure_session)
            for endpoint in self.registry.all():
                try:
                    await retry_while_unavailable(partial(store.publish_endpoint, endpoint))
                except AlreadyExists as exc:
                    self.state.report_invalid(f"endpoint {endpoint.key} cannot be re-published: {exc}")
            created = 0
            for network in networks:
                try:
                    await retry_while_unavailable(partial(store.create_network, network))
                    created += 1
                except AlreadyExists:
                    pass  # another host put it back first: the same record, or theirs wins
            log.info("re-published after the store's data loss: %d endpoints, %d of %d networks",
                     len(self.registry.all()), created, len(networks))
        except StoreError as exc:
            log.error("re-publishing after the store's data loss failed: %s", exc)
            self.state.report_invalid(f"re-publishing after the store's data loss failed: {exc}")
        grace = 2.0 * self.config.store.lease_ttl
        self.tasks.spawn(self._release_after(grace), name="data-loss-hold")

    async def _release_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._require_reconciler().release_hold()

    async def _sync_gossip(self) -> None:
        """Gossip-only: the view fills as peers are heard; deletions wait until it is complete."""
        assert self.config.gossip is not None
        self.state.synced = True
        reconciler = self._require_reconciler()
        self._overlay_tasks.append(self.tasks.spawn(reconciler.run(), name="reconciler"))
        await self._ready(reconciler)
        await self._caught_up(self.config.gossip)
        self._view_complete()
        if self._feed.claims is not None:
            self._feed.claims.view_complete()

    async def _caught_up(self, settings: GossipSettings) -> None:
        """Until a live peer said our record tables match (gossip asks at once after a
        start, then every quarter second).

        Bounded: after two anti-entropy rounds and a probe, every live peer has
        been heard whatever happened to the datagrams in between. A host with
        no live peer waits that long too; it holds no other host's entries that
        could be stale, so nothing is kept waiting that matters.
        """
        peering = self._peering
        assert peering is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        cap = 2 * settings.anti_entropy_interval + settings.probe_interval
        while not peering.caught_up():
            if loop.time() - started >= cap:
                log.warning("no peer confirmed our view within %.1fs: taking it as complete", cap)
                return
            await asyncio.sleep(0.05)
        log.info("caught up with the live peers after %.2fs", loop.time() - started)

    def _view_complete(self) -> None:
        self.state.view_complete = True
        self.state.view_complete_at = time.time()
        self._require_reconciler().release_hold()

    async def _ready(self, reconciler: Reconciler) -> None:
        await reconciler.first_pass_done.wait()
        # What start-up made lives as long as the daemon: keep it out of the
        # cyclic collector's full passes.
        gc.freeze()
        # A join of thousands of endpoints grows the heap by hundreds of thousands of
        # long-lived objects; with the default third threshold (10) the collector ran a
        # full pass over all of them every ~70,000 allocations that outlived gen1 (three
        # passes, 0.6-0.8 s of CPU in a 10,000-endpoint join). 100 defers the full pass
        # until ~700,000 such allocations; young cycles are still collected as often.
        gc.set_threshold(700, 10, 100)
        log.info("ready: first reconcile done")
        self._ready_notified = True
        self.notifier.ready(self.report.status_line())

    def _self_node(self) -> Node:
        assert self.underlay is not None
        return Node(name=self.config.node_name, vtep=self.underlay.address, started_at=self.started_at)

    def _seed(self, node: Node) -> None:
        """Beside a store, gossip membership is seeded from the store's node records too."""
        if self._peering is not None and self.config.gossip is not None and self.config.store is not None:
            self._peering.add_seeds([(str(node.vtep), self.config.gossip.port)])

    def _lost(self, conflict: LostClaim) -> None:
        if self.ops is not None:
            self.ops.lost(conflict)

    # ================================================================ service manager

    async def _notify_status(self) -> None:
        """Send STATUS= when the line changed, at most once per _STATUS_MIN_INTERVAL."""
        if not self.notifier.enabled:
            return
        sent = None
        while True:
            line = self.report.status_line()
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

    # ================================================================ helpers

    def _require_store(self) -> Store:
        assert self._store is not None
        return self._store

    def _require_reconciler(self) -> Reconciler:
        assert self._reconciler is not None
        return self._reconciler

    def require_ops(self) -> Operations:
        if self.ops is None:
            raise Unavailable("overlayd is still starting; try again")
        return self.ops


class LocalService:
    """The admin API's answers (`api.service.AdminService`): reads from `Report`, changes through
    `Operations`."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._report = daemon.report

    def status(self) -> JSON:
        return self._report.status()

    def is_ready(self) -> bool:
        return self._report.is_ready()

    def peers(self) -> list[JSON]:
        return self._report.peers()

    def network_list(self) -> list[JSON]:
        return self._report.network_list()

    def network_inspect(self, name: str) -> JSON:
        return self._report.network_inspect(name)

    def endpoint_list(self, network: str | None = None) -> list[JSON]:
        return self._report.endpoint_list(network)

    async def diff(self) -> list[str]:
        return await self._report.diff()

    async def store_probe(self) -> JSON:
        return await self._report.store_probe()

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
        return await self._daemon.require_ops().network_create(
            name=name, subnet=subnet, vni=vni, gateway=gateway, mtu=mtu, mode=mode, egress=egress
        )

    async def network_remove(self, name: str) -> None:
        await self._daemon.require_ops().network_remove(name)

    async def endpoint_add(
        self,
        *,
        network: str,
        name: str,
        netns: str,
        ip: str | None = None,
        ifname: str = "eth0",
    ) -> JSON:
        return await self._daemon.require_ops().endpoint_add(
            network=network, name=name, netns=netns, ip=ip, ifname=ifname
        )

    async def endpoint_remove(self, *, network: str, name: str) -> None:
        await self._daemon.require_ops().endpoint_remove(network=network, name=name)

    async def endpoint_check(self, *, network: str, name: str) -> JSON:
        """The CNI plugin's CHECK: what this host's endpoint's namespace holds now."""
        endpoint = self._daemon.registry.get(endpoint_key(network, name))
        if endpoint is None:
            raise NotFound(f"endpoint {network}/{name} is not on this host")
        return (await inspect_endpoint(endpoint)).to_json()

    async def teardown(self) -> JSON:
        return await self._daemon.require_ops().teardown()


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
    # Worker threads (a veth made in the kernel, the registry's fsync) wait for the GIL after
    # every system call; the default 5 ms turn of the event loop made each such wait up
    # to 5 ms, several per add. 0.5 ms keeps them short at little cost to the loop.
    sys.setswitchinterval(0.0005)
    daemon = Daemon(cfg)
    try:
        secrets = config_mod.secrets_held(config_mod.file_keys(args.config))
        exposed = config_mod.exposure_warning(args.config, os.stat(args.config).st_mode, secrets)
    except (OSError, ValueError):
        exposed = None  # it was just read: a race with an editor; nothing to warn about
    if exposed is not None:
        log.warning("%s", exposed)
        daemon.state.warnings.append(exposed)
    try:
        asyncio.run(daemon.run())
    except (KernelError, OSError, RuntimeError) as exc:
        print(f"overlayd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
