"""What the daemon says about itself: /status, `overlayctl status|peers|network ls|endpoint ls|diff`.

Read-only. Every answer costs O(what it lists): counts come from the
engine's running totals and the view's indexes, never from scanning every
endpoint.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from overlayd.api.service import JSON, NotFound, Unavailable
from overlayd.cluster.peering import Peering
from overlayd.core.config import Config
from overlayd.core.model import Endpoint, validate_name
from overlayd.daemon.engine import Engine
from overlayd.daemon.runstate import RunState
from overlayd.dataplane.commands import describe
from overlayd.dataplane.desired import PATH_VXLAN, overlay_mtu
from overlayd.dataplane.kernel import Underlay
from overlayd.dataplane.reconciler import Reconciler
from overlayd.gossip import MemberInfo
from overlayd.store.base import Store, StoreError

# Bound on the doctor's probe of the store.
_PROBE_TIMEOUT = 5.0


class Report:
    def __init__(
        self,
        *,
        config: Config,
        state: RunState,
        engine: Engine,
        started_at: float,
        underlay: Callable[[], Underlay | None],
        reconciler: Callable[[], Reconciler | None],
        store: Callable[[], Store | None],
        peering: Callable[[], Peering | None],
        pending_writes: Callable[[], int],
    ) -> None:
        self._config = config
        self._state = state
        self._engine = engine
        self._view = engine.view
        self._started_at = started_at
        self._underlay = underlay
        self._reconciler = reconciler
        self._store = store
        self._peering = peering
        self._pending_writes = pending_writes

    def store_url(self) -> str:
        # Only scheme and addresses: credentials never leave the daemon.
        return self._config.store.url if self._config.store else "gossip"

    def _store_healthy(self) -> bool:
        store = self._store()
        if self._config.store is None:
            return self._peering() is not None
        return store is not None and store.healthy

    # --- readiness ---

    def is_ready(self) -> bool:
        reconciler = self._reconciler()
        return reconciler is not None and reconciler.first_pass_done.is_set()

    def status_line(self) -> str:
        """One line for systemd's STATUS= (and `systemctl status`)."""
        state = self._state
        if state.tearing_down:
            return "tearing down"
        if not state.synced:
            if state.store_error:
                return f"starting: waiting for the store ({state.store_error})"
            return f"starting: connecting to the store at {self.store_url()}"
        if not self.is_ready():
            return "starting: first reconcile"
        line = (
            f"ready: {_plural(len(self._view.networks), 'network')}, "
            f"{self._engine.local} local / {self._engine.remote} remote endpoints, "
            f"store {'healthy' if self._store_healthy() else 'UNREACHABLE'}"
        )
        if not state.view_complete:
            line += ", view still completing (deletions held)"
        reconciler = self._reconciler()
        last = reconciler.last if reconciler else None
        if last is not None and last.failed:
            line += f", {_plural(last.failed, 'kernel operation')} failing"
        return line

    # --- status ---

    def status(self) -> JSON:
        reconciler = self._reconciler()
        underlay = self._underlay()
        state = self._state
        return {
            "node": self._config.node_name,
            "vtep": str(underlay.address) if underlay else None,
            "underlay": {"interface": underlay.ifname, "mtu": underlay.mtu} if underlay else None,
            "ready": self.is_ready(),
            "started_at": self._started_at,
            "pid": os.getpid(),
            "summary": self.status_line(),
            "store": {
                "url": self.store_url(),
                "healthy": self._store_healthy(),
                "synced": state.synced,
                # From the last `store_probe` (overlayctl doctor); None before the first.
                "latency_ms": None if state.store_latency is None else round(state.store_latency * 1e3, 3),
                "invalid_records": list(state.invalid_records),
                # Own changes made while the store was unreachable, not yet written to it.
                "pending_writes": self._pending_writes(),
                # Only once the store has lost its data (the schema's optional key).
                **({"data_loss": state.store_data_loss} if state.store_data_loss is not None else {}),
            },
            # Until the view is complete (a restart: the store's first read, or gossip
            # heard from the live peers) nothing is removed from the kernel.
            "view": {"complete": state.view_complete, "complete_at": state.view_complete_at},
            "gossip": self._gossip_status(),
            "networks": sorted(self._view.networks),
            "nodes": len(self._view.nodes),
            "endpoints": {"local": self._engine.local, "remote": self._engine.remote},
            "last_reconcile": reconciler.last.to_dict() if reconciler and reconciler.last else None,
            "last_full_reconcile": (
                reconciler.last_full.to_dict() if reconciler and reconciler.last_full else None
            ),
            "errors": self._errors(reconciler),
            **({"warnings": list(state.warnings)} if state.warnings else {}),
        }

    @staticmethod
    def _errors(reconciler: Reconciler | None) -> list[str]:
        if reconciler is None:
            return []
        # What desired state had to leave out (a routed subnet overlapping another), then
        # the kernel operations that failed.
        return [*reconciler.desired.problems.values(), *list(reconciler.errors)[-20:]]

    def _members(self) -> dict[str, MemberInfo]:
        peering = self._peering()
        return {m.name: m for m in peering.members()} if peering is not None else {}

    def _gossip_status(self) -> JSON | None:
        if self._config.gossip is None:
            return None
        states: dict[str, int] = {}
        for member in self._members().values():
            states[member.state.value] = states.get(member.state.value, 0) + 1
        return {"port": self._config.gossip.port, "members": states, "insecure": not self._config.gossip.keys}

    def peers(self) -> list[JSON]:
        counts = self._view.owners()
        members = self._members()
        me = self._config.node_name
        reconciler = self._reconciler()
        out: list[JSON] = []
        for node in sorted(self._view.nodes.values(), key=lambda n: n.name):
            record: JSON = {
                "name": node.name,
                "vtep": str(node.vtep),
                "started_at": node.started_at,
                "endpoints": counts.get(node.name, 0),
                "self": node.name == me,
            }
            member = members.pop(node.name, None)
            if self._config.gossip is not None:
                record["state"] = "alive" if record["self"] else (member.state.value if member else "unknown")
                record["rtt_ms"] = round(member.rtt * 1e3, 3) if member and member.rtt is not None else None
                record["clock_offset"] = member.clock_offset if member else None
            if reconciler is not None and not record["self"]:
                record["path"] = reconciler.desired.path_to(node.vtep)
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
                    "clock_offset": member.clock_offset,
                }
            )
        return out

    # --- networks and endpoints ---

    def network_list(self) -> list[JSON]:
        out = []
        for network in sorted(self._view.networks.values(), key=lambda n: n.name):
            record = network.to_dict()
            record["endpoints"] = self._view.count_in(network.name)
            out.append(record)
        return out

    def network_inspect(self, name: str) -> JSON:
        network = self._view.networks.get(name)
        if network is None:
            validate_name(name, "network name")  # a name no network can have: 400, not 503
            if not self._state.view_complete:  # not heard of yet, maybe (a restart, gossip-only)
                raise Unavailable(
                    f"network {name} not known yet: this host's view of the cluster is still completing; "
                    "try again"
                )
            raise NotFound(f"network {name} not found")
        record = network.to_dict()
        underlay = self._underlay()
        if underlay:
            record["host_mtu"] = overlay_mtu(network, underlay.mtu)
        endpoints = sorted(self._view.endpoints_in(name), key=lambda e: e.name)
        reconciler = self._reconciler()
        if reconciler is not None:
            desired = reconciler.desired
            netns = desired.gateway_netns_of(name)
            if netns is not None:
                record["gateway_netns"] = netns
            me = self._config.node_name
            paths = []
            for owner in sorted({ep.owner for ep in endpoints if ep.owner != me}):
                node = self._view.nodes.get(owner)
                if node is None:
                    continue
                path = desired.path_to(node.vtep) if network.routed else PATH_VXLAN
                paths.append({"node": owner, "vtep": str(node.vtep), "path": path})
            if paths:
                record["paths"] = paths
        record["endpoints"] = [ep.to_dict() for ep in endpoints]
        return record

    def endpoint_list(self, network: str | None = None) -> list[JSON]:
        if network is None:
            shown = list(self._view.endpoints.values())
        else:
            shown = self._view.endpoints_in(network)
        listed: list[tuple[Endpoint, str | None]] = [(ep, None) for ep in shown]
        listed += [
            (ep, why)
            for ep, why in self._state.conflicts.values()
            if network is None or ep.network == network
        ]
        out = []
        for ep, why in sorted(listed, key=lambda item: (item[0].network, item[0].name)):
            record = ep.to_dict()
            if why is not None:
                record["conflict"] = why
            out.append(record)
        return out

    # --- probes ---

    async def store_probe(self) -> JSON:
        """Time one full read of the cluster view from the store (bounded)."""
        store = self._store()
        t0 = time.perf_counter()
        error = None
        if self._config.store is None:
            # Gossip-only: the cluster view is this host's gossip table; reading it is local.
            if self._peering() is None:
                error = "gossip is not running yet"
        elif store is None:
            error = "not connected yet"
        else:
            try:
                async with asyncio.timeout(_PROBE_TIMEOUT):  # not wait_for: it can drop a cancel
                    await store.snapshot()
            except TimeoutError:
                error = f"no answer within {_PROBE_TIMEOUT:g}s"
            except StoreError as exc:
                error = str(exc)
        latency = time.perf_counter() - t0
        if error is None:
            self._state.store_latency = latency
        return {
            "url": self.store_url(),
            "ok": error is None,
            "latency_ms": round(latency * 1e3, 3) if error is None else None,
            "error": error,
        }

    async def diff(self) -> list[str]:
        reconciler = self._reconciler()
        if not self._state.synced or reconciler is None:
            raise Unavailable("not synced with the cluster view yet: the desired state is unknown")
        return [describe(cmd) for cmd in await reconciler.pending()]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
