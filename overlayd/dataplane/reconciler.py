"""The reconcile loop: desired state against the kernel mirror, one batch of dirty keys at a time.

Two things mark keys dirty: desired state (a view change touched them) and
the kernel mirror (a notification showed them change: our own write's echo,
which compares equal and costs nothing more, or someone else's change,
which is repaired at once). A pass takes every dirty key, plans the commands
for exactly those (`dataplane.diff.plan`), and executes them as one batch;
whatever becomes dirty while a batch is written goes into the next one. A
pass with nothing dirty does nothing.

Each gateway namespace (a VXLAN network with egress) has a notification
socket of its own, opened when the namespace is made or found and closed
when it goes; its links, addresses and routes are repaired at once like the
host's. nftables tables and the namespaces' pins send no notifications: they
are compared on full reads (and read back by the executor after each write).

A full read of the kernel (dump, load the mirror, compare every key) runs
at start-up — adopting what is already right instead of flushing it — then
every `verify_interval` as a safety net, and at once after a netlink
overrun (the mirror missed notifications).

A failed kernel operation is never dropped: it is counted, kept in
`errors` for /status, and its keys are compared again after a backoff
(0.2 s doubling to 10 s) until the kernel matches.

While `hold_deletions` is set (a restarted daemon whose view is not
complete yet) nothing is removed from the kernel; `release_hold()` compares
everything again once the view is whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from itertools import compress, repeat
from operator import is_, itemgetter

from overlayd.dataplane.announce import Removed, own_announcement_needed
from overlayd.dataplane.commands import (
    AnnounceArp,
    AppendFlood,
    Command,
    DeleteAddr,
    DeleteFdb,
    DeleteFlood,
    DeleteLink,
    DeleteNeigh,
    DeleteNetns,
    DeleteNft,
    DeleteRoute,
    EnableForwarding,
    EnsureBridge,
    EnsureNetns,
    EnsureVeth,
    EnsureVxlan,
    ReplaceAddr,
    ReplaceFdb,
    ReplaceNeigh,
    ReplaceNft,
    ReplaceRoute,
    SetInnerLink,
    SetPort,
    describe,
)
from overlayd.dataplane.desired import DesiredState
from overlayd.dataplane.diff import diff, plan
from overlayd.dataplane.kernel import Kernel, OpResult
from overlayd.dataplane.kstate import HOST_NS, Dirty, PortSpec, Tables
from overlayd.dataplane.mirror import Mirror
from overlayd.dataplane.monitor import INSIDE_GROUPS, RCVBUF, Monitor
from overlayd.util.metrics import Metrics

log = logging.getLogger(__name__)

_RETRY_MIN, _RETRY_MAX = 0.2, 10.0
# A failure that recurs on every retry is logged again at most this often (seconds).
_LOG_REPEAT_EVERY = 60.0
# An OpResult's command and error, taken at C speed from a batch's results.
_command_of, _error_of = itemgetter(0), itemgetter(1)


@dataclass
class PassReport:
    trigger: str
    started_at: float
    duration: float
    applied: int
    failed: int
    kind: str = "incremental"  # or "full": the whole kernel was read and compared
    held: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "trigger": self.trigger,
            "kind": self.kind,
            "started_at": self.started_at,
            "duration_ms": round(self.duration * 1000, 3),
            "applied": self.applied,
            "failed": self.failed,
            "held_deletions": self.held,
        }


class Reconciler:
    def __init__(
        self,
        *,
        kernel: Kernel,
        desired: DesiredState,
        metrics: Metrics,
        verify_interval: float,
        on_applied: Callable[[Sequence[Command]], None] | None = None,
        hold_deletions: bool = False,
        monitor_rcvbuf: int = RCVBUF,
    ) -> None:
        self._kernel = kernel
        self.desired = desired
        self.mirror = Mirror()
        self._metrics = metrics
        self._verify_interval = verify_interval
        self._on_applied = on_applied
        self.hold_deletions = hold_deletions
        self._monitor = Monitor(
            netns=kernel.netns,
            on_datagram=self._notified,
            on_overrun=self.request_full,
            rcvbuf=monitor_rcvbuf,
        )
        # Gateway namespaces followed, each by a monitor of its own (opened after the
        # namespace is made or found, closed when it goes).
        self._inside: dict[str, Monitor] = {}
        self._rcvbuf = monitor_rcvbuf
        # Notifications held back during a dump: (namespace, datagram).
        self._buffer: list[tuple[str, bytes]] | None = None
        self._wake = asyncio.Event()
        self._full_requested = "startup"
        self._retry = Dirty()
        self._retry_delay = _RETRY_MIN
        self._retry_at: float | None = None
        self._full_at = 0.0  # loop time of the last full pass
        self._alarm: asyncio.TimerHandle | None = None  # wakes `_sleep` at `_alarm_at`
        self._alarm_at = 0.0
        self._lock = asyncio.Lock()
        # Set after the next pass, for whoever waits for one (`wait_links`); made only then:
        # not a new Event per pass.
        self._passed: asyncio.Event | None = None
        self.first_pass_done = asyncio.Event()
        self.last: PassReport | None = None
        self.last_full: PassReport | None = None
        self.errors: deque[str] = deque(maxlen=50)
        self._ports_seen: set[str] = set()  # local endpoints' ports seen in the kernel, still wanted
        # Remote addresses removed lately, with the MAC they were known by: a new neighbour
        # entry is announced on the local bridge only if a local container may hold another
        # MAC for its address (`dataplane.announce`).
        self._removed = Removed()
        self._logged: dict[str, float] = {}  # failure line -> monotonic time it was last logged
        self._repeats: dict[str, int] = {}  # failure line -> times it recurred since
        self.passes = 0

    # --- telling it ---

    @property
    def overruns(self) -> int:
        """Netlink overruns seen (each forced a full re-read)."""
        return self._monitor.overruns

    def trigger(self) -> None:
        self._wake.set()

    def local_endpoint_gone(self, ip: IPv4Address, mac: str) -> None:
        """A local endpoint left: if its address comes back as a remote one, announce that.

        Its neighbours on this bridge may have cached `mac` for `ip`, and no entry
        of ours named the address (a local endpoint needs none), so only this says so.
        """
        self._removed.removed(ip, mac)

    def recall_removals(self, removals: Iterable[tuple[IPv4Address, str, float]]) -> None:
        """Addresses removed in an earlier life of the daemon, oldest first: (address, MAC,
        seconds ago), from the local registry (`recent_removals` of that life on a clean
        stop; after a crash, the local endpoints' removals only)."""
        before = len(self._removed)
        self._removed.recall(removals)
        if len(self._removed) > before:
            recalled = len(self._removed) - before
            log.info("remembering %d address removals of the last minutes", recalled)

    def recent_removals(self) -> list[tuple[IPv4Address, str, float]]:
        """The addresses removed lately, remote and local, for the next life: (address, MAC,
        seconds ago), oldest first."""
        return self._removed.export()

    def own_announcement_needed(self, device: str, ip: IPv4Address, mac: str) -> bool:
        """Whether a new local endpoint (`ip`, `mac`) on the network of VXLAN device `device`
        must announce itself: see `announce.own_announcement_needed`."""
        current = self.mirror.tables.neigh.get((device, ip))
        return own_announcement_needed(ip, mac, removed=self._removed, current=current)

    def request_full(self, reason: str = "overrun") -> None:
        """Read and compare everything at the next pass (e.g. after a netlink overrun)."""
        if reason == "overrun":
            self._metrics.netlink_overruns.inc()
        self._full_requested = reason
        self._wake.set()

    def hold(self) -> None:
        """The view cannot be trusted to be complete (the store lost its data): hold
        deletions again until `release_hold`."""
        if not self.hold_deletions:
            self.hold_deletions = True
            log.warning("view incomplete: holding deletions")

    def release_hold(self) -> None:
        """The view is complete: deletions held since start-up may go now."""
        if self.hold_deletions:
            self.hold_deletions = False
            log.info("view complete: comparing everything, held deletions may go")
            self.request_full("hold-released")

    def _notified(self, data: bytes, netns: str = "") -> None:
        if self._buffer is not None:
            self._buffer.append((netns, data))
            return
        self.mirror.apply_datagram(data, netns)
        if self.mirror.dirty:
            self._wake.set()

    def _follow_namespaces(self, names: Iterable[str], *, renew: Iterable[str] = ()) -> None:
        """One monitor per gateway namespace in `names`; `renew`: namespaces made anew."""
        wanted = set(names)
        for name in [*renew, *(n for n in self._inside if n not in wanted)]:
            monitor = self._inside.pop(name, None)
            if monitor is not None:
                monitor.close()
        for name in sorted(wanted - self._inside.keys()):
            monitor = Monitor(
                netns=name,
                on_datagram=self._notifier(name),
                on_overrun=self.request_full,
                rcvbuf=min(self._rcvbuf, 1 << 20),
                groups=INSIDE_GROUPS,
            )
            try:
                monitor.start()
            except OSError as exc:
                log.warning("cannot follow namespace %s: %s", name, exc)
                continue
            self._inside[name] = monitor

    def _notifier(self, netns: str) -> Callable[[bytes], None]:
        def notified(data: bytes) -> None:
            self._notified(data, netns)

        return notified

    def _drain(self) -> None:
        self._monitor.drain()
        for monitor in self._inside.values():
            monitor.drain()

    # --- running ---

    def start_monitor(self) -> None:
        """Subscribe to notifications (before the first dump, so nothing falls between)."""
        self._monitor.start()
        # Entry writes go out on the kernel's raw socket: their neighbour echoes are dropped
        # by the kernel (or, without the filter, not parsed).
        self.mirror.own_port = self._kernel.rtnl.port
        self._monitor.ignore_echoes(self.mirror.own_port)

    def close(self) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._monitor.close()
        for monitor in self._inside.values():
            monitor.close()
        self._inside.clear()

    async def run(self) -> None:
        """Run forever: a full pass now, then a pass whenever something is dirty."""
        self.start_monitor()
        try:
            while True:
                full = self._full_requested
                if full:
                    self._full_requested = ""
                    await self.reconcile_full(full)
                else:
                    await self.reconcile("change")
                await self._sleep()
        finally:
            self.close()

    async def _sleep(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self._full_at + self._verify_interval
        if self._retry_at is not None:
            deadline = min(deadline, self._retry_at)
        self._wake.clear()
        if self._has_work():
            # Another pass at once, once the rest of the daemon (gossip, API) had a turn: a
            # pass may not suspend at all (its writes' answers and echoes are read at once).
            await asyncio.sleep(0)
            return
        # A timer that sets the event, not `wait_for`: no task per pass, and on Python 3.11
        # `wait_for` could swallow a cancel that came as the event was set (a stop hung).
        self._arm(loop, deadline)
        await self._wake.wait()
        now = loop.time()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self.desired.dirty.update(self._retry.take())
        if now >= self._full_at + self._verify_interval and not self._full_requested:
            self._full_requested = "periodic"

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """The wake-up at `deadline` (the next periodic verify or retry). Kept from pass to
        pass while the deadline stays: not a timer made and cancelled for every change."""
        alarm = self._alarm
        if alarm is not None:
            if self._alarm_at == deadline:
                return
            alarm.cancel()
        self._alarm_at = deadline
        self._alarm = loop.call_at(deadline, self._ring)

    def _ring(self) -> None:
        self._alarm = None
        self._wake.set()

    def _has_work(self) -> bool:
        return bool(self._full_requested or self.desired.dirty or self.mirror.dirty)

    async def reconcile(self, trigger: str) -> PassReport:
        """One incremental pass over what is dirty. Passes never overlap."""
        async with self._lock:
            self._drain()
            dirty = self.desired.dirty.take(self.mirror.dirty)
            return await self._apply(trigger, "incremental", dirty)

    async def reconcile_full(self, trigger: str) -> PassReport:
        """Read the whole kernel into the mirror and compare every key."""
        async with self._lock:
            # Follow every gateway namespace there is before reading it.
            self._follow_namespaces(self._kernel.gateway_namespaces())
            self._drain()
            self._buffer = []
            started, t0 = time.time(), time.perf_counter()
            try:
                # nftables are read at start-up (tables left by an earlier life) and while any
                # is wanted or known; otherwise a full verify runs no program at all.
                t = self.desired.tables
                nft_tables = trigger == "startup" or bool(t.nft or t.netns or self.mirror.tables.nft)
                dump = await self._kernel.dump(nft_tables=nft_tables)
            except Exception as exc:
                buffered, self._buffer = self._buffer, None
                for netns, data in buffered:
                    self.mirror.apply_datagram(data, netns)
                log.exception("reading the kernel failed")
                return self._report(trigger, "full", started, t0, 0, [f"dump: {exc}"], 0)
            # Notifications that arrived during the dump are newer than parts of it:
            # replaying them in order leaves each key as its last event says.
            self.mirror.load_dump(dump, mark=False)
            buffered, self._buffer = self._buffer, None
            for netns, data in buffered:
                self.mirror.apply_datagram(data, netns)
            dirty = self.mirror.dirty.take()
            dirty.update(self.desired.dirty.take())
            dirty.update(differences(self.desired.tables, self.mirror.tables))
            self._full_at = asyncio.get_running_loop().time()
            report = await self._apply(trigger, "full", dirty, started=started, t0=t0)
            self.last_full = report
            return report

    async def _apply(
        self, trigger: str, kind: str, dirty: Dirty, *, started: float | None = None, t0: float | None = None
    ) -> PassReport:
        if started is None or t0 is None:
            started, t0 = time.time(), time.perf_counter()
        errors: list[str] = []
        applied = 0
        held = 0
        missing: list[PortSpec] = []
        if dirty:
            self._removed.expire()
            result = plan(
                self.desired.tables,
                self.mirror.tables,
                dirty,
                hold_deletions=self.hold_deletions,
                previous=self._removed,
            )
            held = result.held
            # A port is missing only once it was there: an endpoint being added has its
            # record (and port) wanted a moment before its veth exists.
            missing = [port for port in result.missing_ports if port.ifname in self._ports_seen]
            for name in dirty.links:
                if name in self.mirror.tables.ports:
                    self._ports_seen.add(name)
                elif name not in self.desired.tables.ports:
                    self._ports_seen.discard(name)
            if result.commands:
                try:
                    devices = self.mirror.vxlan_indexes()
                    outcomes = await self._kernel.execute(result.commands, devices=devices)
                except Exception as exc:  # a failed write must not kill the loop: retry
                    log.exception("kernel write failed")
                    outcomes = [OpResult(cmd, f"{exc}") for cmd in result.commands]
                # At C speed (a join's thousands of outcomes), then the failures, if any.
                applied_ok = map(is_, map(_error_of, outcomes), repeat(None))
                done = list(compress(map(_command_of, outcomes), applied_ok))
                if len(done) != len(outcomes):
                    for cmd, error in outcomes:
                        if error is not None:
                            errors.append(f"{describe(cmd)}: {error}")
                            _mark(self._retry, cmd)
                applied = len(done)
                kinds = set(map(type, done))  # at C speed: the loops below run only if needed
                self.mirror.assume_all(done)
                self._remember(done, kinds)
                # The echoes of these writes wait in the notification socket already: read
                # now, they find the mirror as assumed, and the loop is not woken for them.
                echoes = self._echoes(done, kinds)
                if echoes is None:
                    self._monitor.read_some()
                elif self._buffer is None:
                    # Into the mirror directly (`_notified` less a call and a look at the
                    # mirror per echo), which is then looked at once, as `_notified` would.
                    self._monitor.read_echoes(echoes, self.mirror.apply_datagram)
                    if self.mirror.dirty:
                        self._wake.set()
                else:
                    self._monitor.read_echoes(echoes)
                if done and log.isEnabledFor(logging.DEBUG):
                    for cmd in done:
                        log.debug("applied: %s", describe(cmd))
                if kinds & _NETNS_COMMANDS:
                    renewed = [_netns_of(cmd) for cmd in done if isinstance(cmd, EnsureNetns | DeleteNetns)]
                    self._follow_namespaces(self.mirror.namespaces(), renew=renewed)
                if done and self._on_applied is not None:
                    self._on_applied(done)
        if errors:
            loop = asyncio.get_running_loop()
            self._retry_at = loop.time() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
        elif not self._retry:
            self._retry_delay = _RETRY_MIN
        # Reported, not retried: writing again cannot bring a deleted veth back.
        reported = [
            f"port {port.ifname} of a local endpoint in network {port.network} is missing: its veth "
            "was deleted behind overlayd's back; remove and add the endpoint again"
            for port in missing
        ]
        return self._report(trigger, kind, started, t0, applied, errors, held, reported)

    def _echoes(self, done: list[Command], kinds: set[type]) -> int | None:
        """How many notifications the host's monitor gets for `done`, if only entries were
        written (else None: links and layer 3 send a varying number). One per FDB or flood
        write (VXLAN sends them from port 0, past the socket filter) and per neighbour
        delete (the kernel's removal notice, port 0); a neighbour write's own (our port)
        only where the filter is not attached; none for an announcement. An entry the write left as
        it was sends none: then the count is one too high, which costs the one read that
        finds the socket empty, as before."""
        counts = _ECHOES_FILTERED if self._monitor.echoes_filtered else _ECHOES
        if not kinds <= counts.keys():
            return None
        return sum(map(counts.__getitem__, map(type, done)))

    def _remember(self, done: list[Command], kinds: set[type]) -> None:
        """Remote addresses removed (and back) for `_removed`; `kinds`: the classes in `done`.
        Deletions are few, and a join's additions are looked at only while something was
        removed lately."""
        removed = self._removed
        if not removed and DeleteNeigh not in kinds and DeleteRoute not in kinds:
            return
        for cmd in done:
            if type(cmd) is DeleteNeigh:
                removed.removed(cmd.entry.ip, cmd.entry.mac)
            elif type(cmd) is ReplaceNeigh:
                removed.added(cmd.entry.ip)
            elif type(cmd) is DeleteRoute:
                netns, dst = cmd.key
                if netns == HOST_NS and dst.prefixlen == 32:
                    removed.removed(dst.network_address, "")  # the gateway answered for it

    def _log_failure(self, fmt: str, line: str) -> None:
        """The same failure is logged once per `_LOG_REPEAT_EVERY` seconds, with how often it
        recurred meanwhile: a write that keeps failing on every retry never floods the log."""
        now = time.monotonic()
        last = self._logged.get(line)
        if last is not None and now - last < _LOG_REPEAT_EVERY:
            self._repeats[line] = self._repeats.get(line, 0) + 1
            return
        if len(self._logged) > 1000:  # bounded: forget the oldest
            for old in list(self._logged)[:500]:
                self._logged.pop(old, None)
                self._repeats.pop(old, None)
        again = self._repeats.pop(line, 0)
        self._logged[line] = now
        log.warning(fmt + (f" ({again} more times since last said)" if again else ""), line)

    def _report(
        self,
        trigger: str,
        kind: str,
        started: float,
        t0: float,
        applied: int,
        errors: list[str],
        held: int,
        reported: Sequence[str] = (),
    ) -> PassReport:
        duration = time.perf_counter() - t0
        self._metrics.reconcile_duration_of(kind).observe(duration)
        self._metrics.reconciles_by(trigger).inc()
        report = PassReport(trigger, started, duration, applied, len(errors), kind, held, errors)
        self.passes += 1
        if applied or errors or kind == "full":
            self.last = report
        for line in errors:
            self._log_failure("kernel op failed (will retry): %s", line)
            self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}")
        for line in reported:
            self._log_failure("%s", line)
            self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}")
        if applied:
            # Debug, not info: every change anywhere in the cluster lands here on every host,
            # which made it the busiest log line and ~5% of a remote daemon's CPU per change.
            # /status (`last reconcile`) and overlayd_reconcile_* report the same.
            log.debug("reconcile (%s): applied %d changes in %.1f ms", trigger, applied, duration * 1e3)
        if not errors and not self._retry:
            # Nothing failed and nothing waits for a retry: the kernel matches (READY).
            self.first_pass_done.set()
        elif not self.first_pass_done.is_set() and self._retry_delay >= _RETRY_MAX:
            # Still failing after every retry up to the longest delay (a foreign device
            # holding a name or a VNI, say): ready with the errors in /status, rather
            # than never ready, which a service manager turns into a restart loop.
            log.warning("ready with %d kernel errors still failing (see /status errors)", len(errors))
            self.first_pass_done.set()
        if self._passed is not None:
            self._passed.set()
            self._passed = None
        return report

    # --- asking ---

    async def pending(self) -> list[Command]:
        """What a full pass would change right now (a fresh read), without changing anything."""
        async with self._lock:
            return diff(self.desired.tables.state(), await self._kernel.observe())

    def converged_links(self, names: Iterable[str]) -> bool:
        t, m = self.desired.tables, self.mirror.tables
        for name in names:
            if name in t.bridges:
                if m.bridges.get(name) != t.bridges[name]:
                    return False
            elif name in t.vxlans:
                if m.vxlans.get(name) != t.vxlans[name]:
                    return False
            else:
                return False
        return True

    async def wait_links(self, names: Iterable[str], timeout: float = 10.0) -> None:
        """Until the kernel holds `names` (our bridges/VXLAN devices) as desired."""
        wanted = list(names)
        async with asyncio.timeout(timeout):
            while True:
                self._drain()
                if self.converged_links(wanted):
                    return
                passed = self._passed
                if passed is None:
                    passed = self._passed = asyncio.Event()
                self.trigger()
                await passed.wait()


def differences(want: Tables, have: Tables) -> Dirty:
    """The keys whose values differ between two tables, and every link (links are few).

    Whole dictionaries compare at C speed: a full verify of a converged
    kernel with 20,000 entries costs a few milliseconds here.
    """
    out = Dirty(links=want.links() | have.links())
    if want.fdb != have.fdb:
        out.fdb = {key for key, _ in want.fdb.items() ^ have.fdb.items()}
    if want.neigh != have.neigh:
        out.neigh = {key for key, _ in want.neigh.items() ^ have.neigh.items()}
    if want.flood != have.flood:
        out.flood = want.flood ^ have.flood
    # Gateway namespaces and what is in them: few, compared whole.
    out.netns = want.netns.keys() | have.netns.keys()
    out.inner = want.inner.keys() | have.inner.keys()
    out.addrs = want.addrs ^ have.addrs
    if want.routes != have.routes:
        out.routes = {key for key, _ in want.routes.items() ^ have.routes.items()}
    out.forwarding = want.forwarding - have.forwarding
    out.nft = want.nft.keys() | have.nft.keys()
    return out


_NETNS_COMMANDS: frozenset[type] = frozenset((EnsureNetns, DeleteNetns))
# Notifications the host's monitor receives per entry command written (`Reconciler._echoes`).
_ECHOES: dict[type, int] = {
    ReplaceFdb: 1,
    DeleteFdb: 1,
    AppendFlood: 1,
    DeleteFlood: 1,
    # Unfiltered, a neighbour delete comes back twice: the entry gone FAILED (our port),
    # then its removal (port 0).
    ReplaceNeigh: 1,
    DeleteNeigh: 2,
    AnnounceArp: 0,
}
_ECHOES_FILTERED: dict[type, int] = {**_ECHOES, ReplaceNeigh: 0, DeleteNeigh: 1}


def _netns_of(cmd: EnsureNetns | DeleteNetns) -> str:
    return cmd.spec.name if isinstance(cmd, EnsureNetns) else cmd.name


def _mark(dirty: Dirty, cmd: Command) -> None:
    """Mark the key a failed command was for, to compare it again later."""
    match cmd:
        case ReplaceFdb(e) | DeleteFdb(e):
            dirty.fdb.add((e.device, e.mac))
        case AppendFlood(f) | DeleteFlood(f):
            dirty.flood.add((f.device, f.dst))
        case ReplaceNeigh(n) | DeleteNeigh(n):
            dirty.neigh.add((n.device, n.ip))
        case EnsureBridge(b):
            dirty.links.add(b.ifname)
        case EnsureVxlan(v):
            dirty.links.add(v.ifname)
        case SetPort(p):
            dirty.links.add(p.ifname)
        case DeleteLink(ifname):
            dirty.links.add(ifname)
        case EnsureVeth(v):
            dirty.links.add(v.ifname)
        case SetInnerLink(i):
            dirty.inner.add((i.netns, i.ifname))
        case EnsureNetns(ns):
            dirty.netns.add(ns.name)
        case DeleteNetns(name):
            dirty.netns.add(name)
        case ReplaceAddr(key) | DeleteAddr(key):
            dirty.addrs.add(key)
        case ReplaceRoute(key, _) | DeleteRoute(key):
            dirty.routes.add(key)
        case EnableForwarding(netns, device):
            dirty.forwarding.add((netns, device))
        case ReplaceNft(table):
            dirty.nft.add((table.netns, table.family))
        case DeleteNft(netns, family):
            dirty.nft.add((netns, family))
        case AnnounceArp():
            pass  # the neighbour it announces is in place; nothing to compare again
