"""The path of one change, from a source to the kernel, each step O(change).

    facts (store watch, gossip, this host's own records)
      -> admission (pure: which claim wins)        -> view deltas, conflicts
      -> desired state (pure: entries they touch)  -> dirty keys
      -> reconciler (mirror, plan, batched netlink) -> kernel

`Engine` holds the admission and the desired state, follows every outcome
with the gauges and the convergence clock, and wakes the reconciler. It
does no I/O itself; the daemon wires the reconciler in once the underlay is
known (desired state needs the local VTEP and MTU).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from overlayd.core.admission import Admission, Conflict, GossipFact, NetworkClaimed, Outcome
from overlayd.core.model import Network, Node
from overlayd.core.view import ClusterView, EndpointChanged, Fact, NetworkChanged, NodeChanged
from overlayd.dataplane.commands import Command, ReplaceFdb
from overlayd.dataplane.desired import DesiredState
from overlayd.dataplane.reconciler import Reconciler
from overlayd.util.metrics import HistogramSeries, Metrics

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        *,
        node: str,
        authority: bool,
        metrics: Metrics,
        on_conflict: Callable[[Conflict], None] | None = None,
        on_node: Callable[[Node], None] | None = None,
    ) -> None:
        self.node = node
        self.admission = Admission(node=node, authority=authority)
        self.view: ClusterView = self.admission.view
        self._metrics = metrics
        self._on_conflict = on_conflict
        self._on_node = on_node
        # Gossip-only: a network new in the view, and one gone from it (this host claims its
        # first address blocks of it, and gives them back).
        self.on_network: Callable[[Network], object] | None = None
        self.on_network_gone: Callable[[str], object] | None = None
        # Callers of `network_soon`, by network name, until it is in the view.
        self._network_waiters: dict[str, list[asyncio.Future[Network]]] = {}
        self.desired: DesiredState | None = None
        self.reconciler: Reconciler | None = None
        self.local = 0
        self.remote = 0
        # Remote endpoints heard of but not yet programmed: key -> (created_at at the owner, path).
        self._unprogrammed: dict[str, tuple[float, str]] = {}
        # Series looked up once: these are updated per outcome and per programmed entry.
        self._known_local = metrics.endpoints_known.labels(locality="local")
        self._known_remote = metrics.endpoints_known.labels(locality="remote")
        self._latency: dict[str, HistogramSeries] = {}

    def attach(self, desired: DesiredState, reconciler: Reconciler) -> None:
        """Connect the kernel side; desired state starts from the view as it stands."""
        self.desired = desired
        self.reconciler = reconciler
        reconciler.trigger()

    # --- facts in ---

    def from_own(self, facts: Iterable[Fact | NetworkClaimed]) -> Outcome:
        return self._follow(self.admission.from_own(facts), "own")

    def from_store(self, facts: Iterable[Fact]) -> Outcome:
        return self._follow(self.admission.from_store(facts), "kv")

    def store_snapshot(self, facts: Iterable[Fact]) -> Outcome:
        return self._follow(self.admission.store_snapshot(facts), "kv")

    def from_gossip(self, facts: Iterable[GossipFact]) -> Outcome:
        return self._follow(self.admission.from_gossip(facts), "gossip")

    # --- following an outcome ---

    def _follow(self, outcome: Outcome, path: str) -> Outcome:
        if not outcome:
            return outcome
        networks_changed = False
        me, unprogrammed = self.node, self._unprogrammed
        local = remote = 0  # this outcome's steps
        for delta in outcome.deltas:
            if type(delta) is EndpointChanged:  # nearly every delta: no match for it
                old, new = delta.old, delta.new
                if old is not None:
                    if old.owner == me:
                        local -= 1
                    else:
                        remote -= 1
                if new is None:
                    unprogrammed.pop(delta.key, None)
                elif new.owner == me:
                    local += 1
                else:
                    remote += 1
                    if old is None or old.mac != new.mac or old.owner != new.owner:
                        unprogrammed[new.key] = (new.created_at, path)
                continue
            match delta:
                case NetworkChanged(old_network, new_network):
                    networks_changed = True
                    if old_network is None and new_network is not None:
                        if self.on_network is not None:
                            self.on_network(new_network)
                        for waiter in self._network_waiters.pop(new_network.name, ()):
                            if not waiter.done():
                                waiter.set_result(new_network)
                    elif new_network is None and old_network is not None and self.on_network_gone is not None:
                        self.on_network_gone(old_network.name)
                case NodeChanged(_, new_node):
                    if new_node is not None and new_node.name != me and self._on_node is not None:
                        self._on_node(new_node)
        self.local += local
        self.remote += remote
        self._known_local.set(self.local)
        self._known_remote.set(self.remote)
        if networks_changed:
            self._metrics.networks_known.set(len(self.view.networks))
        if self.desired is not None:
            self.desired.apply(outcome.deltas)
            if self.reconciler is not None and self.desired.dirty:
                self.reconciler.trigger()
        if self._on_conflict is not None:
            for conflict in outcome.conflicts:
                self._on_conflict(conflict)
        return outcome

    async def network_soon(self, name: str, timeout: float) -> Network | None:
        """Network `name`, waiting up to `timeout` seconds for the view to hear of it: one
        just created on another host reaches this one by a watch (paced beside gossip) or
        by gossip, and its creator may already have told a client that it exists."""
        network = self.view.networks.get(name)
        if network is not None:
            return network
        waiter: asyncio.Future[Network] = asyncio.get_running_loop().create_future()
        waiters = self._network_waiters.setdefault(name, [])
        waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return None
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._network_waiters.get(name) is waiters:
                del self._network_waiters[name]

    # --- the kernel said ---

    def applied(self, commands: Sequence[Command]) -> None:
        """Entries the kernel took: observe creation-to-programmed latency for remote endpoints."""
        if not self._unprogrammed or self.desired is None:
            return
        now = time.time()
        holder_of, unprogrammed = self.desired.fdb_holder_of(), self._unprogrammed
        latency: HistogramSeries | None = None
        latency_path = ""
        ages: list[float] = []  # latency's, observed together (one call per path and batch)
        for cmd in commands:
            if type(cmd) is not ReplaceFdb:
                continue
            key = holder_of(cmd.entry[:2])  # (device, mac)
            if key is None:
                continue
            pending = unprogrammed.pop(key, None)
            if pending is not None and pending[0] > 0:
                if latency is None or pending[1] != latency_path:  # one path per batch, nearly always
                    if latency is not None:
                        latency.observe_all(ages)
                        ages = []
                    latency_path = pending[1]
                    latency = self._latency_of(latency_path)
                age = now - pending[0]
                ages.append(age if age > 0.0 else 0.0)
        if latency is not None:
            latency.observe_all(ages)

    def _latency_of(self, path: str) -> HistogramSeries:
        child = self._latency.get(path)
        if child is None:
            child = self._latency[path] = self._metrics.convergence_latency.labels(path=path)
        return child
