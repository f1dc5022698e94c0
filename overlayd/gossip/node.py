"""GossipNode: SWIM membership, push dissemination and anti-entropy over one UDP socket.

This is the I/O shell around the pure parts: `framing` seals and opens
datagrams, `schema` encodes and checks messages, `membership` and `merge` decide.
Every datagram is one message and fits the configured MTU; nothing larger is
ever sent, so any amount of state moves as many small datagrams.

Three ways a record travels:

1. push — in a cluster of up to `direct_push` members, `publish` sends the new
   record to every live member itself, each answers with a small ack, and the
   owner sends again to those that did not answer (loss tolerance: a member
   misses it only if its copy and every resend, or their acks, are lost);
   in a bigger one it sends it to about ln(N) + 4 peers
   (its two ring neighbours, the rest random) and a peer that learns something
   new forwards it the same way, `hops` times at most (about log2 N), so news
   reaches a thousand members in a few LAN round trips (bench/gossip_scale.py);
2. anti-entropy — every `anti_entropy_interval` the node sends one random peer
   the sums of its hash trees (`sumtree`: over the owners' watermarks and over
   the members); where they differ the two descend to the differing entries
   only, then send what the other lacks and ask for what they lack, one
   bounded chunk per request. A round where nothing differs is one small
   datagram per table, whatever the cluster's size; this repairs whatever
   pushes missed;
3. membership sync rides the same trees, so views converge, and joins and
   healed partitions find each other through small knocks answered with a
   snapshot.

Every direct probe doubles as a time exchange: members carry their clock's
offset from ours (`skew`), for `overlayctl doctor`.

A malformed, forged, replayed or stale datagram is counted by reason and
dropped; nothing a peer sends can raise out of the receive path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import socket
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from overlayd.gossip import schema
from overlayd.gossip.clock import SYSTEM, Clock
from overlayd.gossip.framing import FrameError, Framer, Keyring
from overlayd.gossip.membership import MemberChanged, MemberInfo, Membership
from overlayd.gossip.merge import RecordTable, diff_digests
from overlayd.gossip.metrics import GossipMetrics
from overlayd.gossip.schema import (
    MEMBERS_TABLE,
    RECORDS_TABLE,
    Ack,
    Digest,
    InSync,
    MemberEntries,
    Members,
    MemberState,
    MemberUpdate,
    Message,
    Ping,
    PingReq,
    Push,
    PushAck,
    Record,
    Records,
    Request,
    SchemaError,
    Stamp,
    Step,
    Sums,
    Watermarks,
)
from overlayd.gossip.skew import offset_sample
from overlayd.gossip.sumtree import DEPTH, FANOUT, SMALL, SumTree, differing_children
from overlayd.gossip.transport import DatagramNetwork, Sender
from overlayd.util.tasks import TaskGroup

log = logging.getLogger(__name__)

Addr = tuple[str, int]
OnChange = Callable[[Record], None]
OnMember = Callable[[MemberInfo], None]

_TYPE = {
    Ping: "ping",
    PingReq: "ping-req",
    Ack: "ack",
    Push: "push",
    PushAck: "push-ack",
    Digest: "digest",
    Request: "request",
    Records: "records",
    Members: "members",
    Sums: "sums",
    InSync: "in-sync",
    Watermarks: "watermarks",
    MemberEntries: "member-entries",
}
# The hops of a push its owner sent to every live member itself (`GossipNode._spread`):
# the member acks it (`PushAck`) and forwards nothing. Members of an earlier release
# forwarded such a push to their three nearest on the ring with hops `_FORWARDED`; a
# copy like that is taken in and not passed on. The epidemic push never sends hops 0,
# nor hops 1 from the records' owner unless `push_hops` is 1 (then its receivers ack
# where they would have forwarded nothing).
_DIRECT = 1
_FORWARDED = 0
# A member acks one owner's direct pushes at most once per this many seconds (more
# arrive together: one ack for all, at the end of the window). Well below `push_retry`.
_ACK_WINDOW = 0.005
# However slow acks have been, a lost copy is resent within this many seconds.
_MAX_RESEND_AFTER = 0.25
# Room for a message's own fields around its list of items (type, seq, owner name, stamps...).
_ENVELOPE = 64 + schema.MAX_NAME


@dataclass(frozen=True)
class GossipConfig:
    probe_interval: float = 1.0
    probe_timeout: float = 0.5  # direct ack wait; the rest of the interval waits for indirect acks
    indirect_checks: int = 3  # k peers asked to probe on our behalf
    suspicion_mult: float = 4.0
    retransmit_mult: int = 3
    fanout: int = 3  # at least this many peers per push (see GossipNode._fanout); 0: no pushes
    push_hops: int | None = None  # None: max(2, ceil(log2(N + 1)))
    # Up to this many live peers, a change goes from its owner straight to each of them
    # (see GossipNode._spread); beyond, the epidemic push above.
    direct_push: int = 64
    # A direct push not acked within `push_retry` seconds (or three times the usual ack
    # delay, when members are slower than that) is sent again, after twice as long the
    # next time, `push_retries` times at most; anti-entropy repairs the rest.
    push_retry: float = 0.025
    push_retries: int = 3
    anti_entropy_interval: float = 5.0
    # Anti-entropy pace until a peer said our tables match (a restart catching up), for at
    # most `catch_up_rounds` rounds (a node alone in its cluster never hears it).
    catch_up_interval: float = 0.25
    catch_up_rounds: int = 20
    mtu: int = 1400  # largest datagram sent or accepted (UDP payload bytes)
    tombstone_ttl: float = 1800.0
    dead_reap: float = 600.0  # forget dead/left members after this long
    max_skew: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ValueError("probe_timeout must be positive and below probe_interval")
        if self.mtu < 576 or self.mtu > schema.MAX_MESSAGE:
            raise ValueError(f"mtu must be 576..{schema.MAX_MESSAGE}")
        if self.fanout < 0 or self.indirect_checks < 0 or self.direct_push < 0 or self.push_retries < 0:
            raise ValueError("fanout, indirect_checks, direct_push and push_retries must not be negative")
        if self.push_retry <= 0:
            raise ValueError("push_retry must be positive")
        if self.anti_entropy_interval <= 0 or self.tombstone_ttl <= 0:
            raise ValueError("intervals must be positive")


class GossipNode:
    """One member of a gossip cluster.

    `on_change(record)` is called for every record this node learns from a peer
    that changes its table (a newer put, or a tombstone); the node's own
    `publish`/`delete` do not call it. After a restart it is also called with
    this node's own records from its previous life (owner == name, an older
    incarnation) that peers still hold: the daemon re-publishes those it still
    owns and deletes the others. `on_member(info)` is called when a
    member's state or incarnation changes. Callbacks run on the event loop and
    must not block; their exceptions are logged, never propagated.
    """

    def __init__(
        self,
        name: str,
        *,
        keyring: Keyring,
        bind: str = "0.0.0.0",
        port: int = 7946,
        advertise: str | None = None,
        seeds: Iterable[Addr] = (),
        on_change: OnChange | None = None,
        on_member: OnMember | None = None,
        metrics: GossipMetrics | None = None,
        config: GossipConfig = GossipConfig(),
        incarnation: int | None = None,
        sock: socket.socket | None = None,
        network: DatagramNetwork | None = None,
        clock: Clock = SYSTEM,
        tasks: TaskGroup | None = None,
    ) -> None:
        """`sock`: an already bound UDP socket to use instead of binding bind:port
        (one made in another network namespace, or handed over by systemd).
        `network`: a simulated network to bind on instead of UDP (`simnet`).
        `clock`: where wall-clock and monotonic readings come from (tests and
        simulations; timers always come from the event loop).
        `tasks`: the caller's TaskGroup to run the probe and anti-entropy loops
        in, so their death shows where the caller watches (the daemon's
        watchdog); without it the node keeps a group of its own. Either way
        `failures` lists this node's dead loops."""
        if sock is not None and network is not None:
            raise ValueError("give a socket or a network, not both")
        if sock is not None:
            bind, port = sock.getsockname()[:2]
        advertise = advertise or bind
        if advertise in ("0.0.0.0", "::", ""):
            raise ValueError("bind is a wildcard address: give the address peers reach this node at")
        # Name and address must be valid on the wire; fail here, not in every peer.
        MemberUpdate.from_wire(MemberUpdate(name, advertise, 1, MemberState.ALIVE, 0).to_wire())
        self.name = name
        self.config = config
        self._bind = bind
        self._port = port
        self._sock = sock
        self._network = network
        self._clock = clock
        self._advertise = advertise
        self._seeds: set[Addr] = set(seeds)
        self._on_change = on_change
        self._on_member = on_member
        self._metrics = metrics
        self._framer = Framer(name, keyring, max_skew=config.max_skew, clock=clock.wall)
        # The records' incarnation: a restarted owner must stamp above its previous life,
        # so by default it is the start time in milliseconds.
        self.incarnation = incarnation if incarnation is not None else int(clock.wall() * 1000)
        self._version = 0
        self._table = RecordTable()
        self._ms = Membership(
            name,
            advertise,
            port,
            incarnation=self.incarnation,
            probe_interval=config.probe_interval,
            suspicion_mult=config.suspicion_mult,
            retransmit_mult=config.retransmit_mult,
            clock=clock.monotonic,
            wall=clock.wall,
        )
        self._seq = itertools.count(1)
        self._probes: dict[int, _Probe] = {}
        self._relays: dict[int, tuple[Addr, int, str]] = {}  # our seq -> (asker, its seq, target)
        self._transport: asyncio.DatagramTransport | None = None  # the UDP one, if any
        self._sender: Sender | None = None  # what datagrams leave through (UDP or simulated)
        self._tasks = tasks if tasks is not None else TaskGroup()
        self._loops: list[asyncio.Task[Any]] = []
        self._failures: list[tuple[str, BaseException]] = []
        self._rng = random.Random()
        self._gap_pulls: dict[str, float] = {}  # owner -> when we last asked to fill a gap
        # Members that have not acked a direct push of ours yet (see `_spread`).
        self._unacked: dict[str, _Unacked] = {}
        self._outbox: list[Record] = []  # own changes of this turn of the loop, pushed next turn
        self._resend_timer: asyncio.TimerHandle | None = None
        self._ack_delay = 0.0  # smoothed seconds from a direct push to its ack
        # Acks we send (see `_ack`): owner -> loop time of the last, and the one held back.
        self._acked_at: dict[str, float] = {}
        self._acks_held: dict[str, _HeldAck] = {}
        # Anti-entropy rounds left in which we ask the peer for our own records: after a
        # restart, peers may hold records of our previous life that we must re-publish or delete.
        self._own_sync_rounds = 2
        self._budget = config.mtu - self._framer.overhead - _ENVELOPE
        # Set once a live peer said its record table equals ours (`InSync`): from then on
        # this node has heard what the cluster holds, not merely what came its way. Until
        # then anti-entropy runs every `catch_up_interval`, not every anti_entropy_interval.
        self.caught_up = asyncio.Event()

    # --- public API ---

    @property
    def port(self) -> int:
        """The UDP port in use (the one the OS chose when constructed with port 0)."""
        return self._ms.port

    @property
    def address(self) -> Addr:
        return (self._advertise, self._ms.port)

    def is_caught_up(self) -> bool:
        """A live peer said its record table equals ours (see `InSync`)."""
        return self.caught_up.is_set()

    @property
    def failures(self) -> list[tuple[str, BaseException]]:
        """This node's loops that died, as (task name, exception): a node with any is deaf
        or mute in part and should be restarted (the daemon stops its watchdog pings)."""
        return list(self._failures)

    async def start(self) -> None:
        if self._framer.keyring.is_insecure:
            log.warning("gossip runs INSECURE: datagrams are neither encrypted nor authenticated")
        loop = asyncio.get_running_loop()
        if self._network is not None:
            bound = self._network.open((self._bind, self._port), self._datagram)
            self._sender = bound
            self._ms.port = bound.address[1]
        else:
            if self._sock is not None:
                transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=self._sock)
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Protocol(self), local_addr=(self._bind, self._port)
                )
            self._transport = self._sender = transport
            self._ms.port = transport.get_extra_info("sockname")[1]
        self._spawn(self._probe_loop(), f"gossip-probe-{self.name}")
        self._spawn(self._anti_entropy_loop(), f"gossip-anti-entropy-{self.name}")
        self._join()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self._tasks.spawn(coro, name=name)
        self._loops.append(task)
        task.add_done_callback(self._loop_done)

    def _loop_done(self, task: asyncio.Task[Any]) -> None:
        # The group logs the failure; this keeps it where `failures` can tell.
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._failures.append((task.get_name(), exc))

    async def stop(self, *, leave: bool = True) -> None:
        """Stop; with `leave`, first tell some peers this node is leaving (state `left`)."""
        if self._sender is None:
            return
        self._flush_outbox()  # changes of this very turn (a teardown's tombstones) go first
        if leave:
            update = self._ms.leave()
            for m in self._ms.random_live(2 * max(1, self.config.fanout)):
                self._send((m.addr, m.port), Members(True, (update,)))
        # Only our own loops: the group may be the daemon's, holding its other tasks.
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        if loops:
            _, pending = await asyncio.wait(loops, timeout=5.0)
            for task in pending:
                log.warning("task %s did not stop within 5s", task.get_name())
        for probe in self._probes.values():
            probe.answered.cancel()
        self._probes.clear()
        if self._resend_timer is not None:
            self._resend_timer.cancel()
            self._resend_timer = None
        self._unacked.clear()
        self._sender.close()
        self._sender = self._transport = None

    def publish(self, kind: str, key: str, payload: dict[str, Any]) -> Record:
        """Put a record owned by this node and spread it; the stamped record.

        Raises SchemaError if the record breaks the schema and ValueError if it
        cannot fit in one datagram.
        """
        return self._local(Record(kind, key, self.name, self.incarnation, self._version + 1, payload))

    def delete(self, kind: str, key: str) -> Record:
        """Delete a record owned by this node: spread a tombstone."""
        return self._local(
            Record(kind, key, self.name, self.incarnation, self._version + 1, None, self._clock.wall())
        )

    def records(self, *, tombstones: bool = False) -> list[Record]:
        return [r for r in self._table.all() if tombstones or not r.tombstone]

    def get(self, owner: str, kind: str, key: str) -> Record | None:
        return self._table.get((owner, kind, key))

    def members(self) -> list[MemberInfo]:
        """The peers this node knows (not itself), with state, incarnation and RTT."""
        return self._ms.members()

    def add_seeds(self, seeds: Iterable[Addr]) -> None:
        """More addresses to join through (e.g. from the KV store's node records)."""
        new = set(seeds) - self._seeds
        self._seeds |= new
        if self._sender is not None:
            for addr in new:
                self._knock(addr)

    # --- local changes ---

    def _local(self, rec: Record) -> Record:
        rec = rec.normalized()
        if _size(rec) > self._budget:
            raise ValueError(f"record {rec.kind}/{rec.key} is {_size(rec)} bytes; at most {self._budget} fit")
        self._version = rec.version
        self._table.apply(rec)
        self._table.set_watermark(self.name, rec.stamp)
        self._spread(rec)
        return rec

    def _spread(self, rec: Record) -> None:
        """Send a change of ours on its way.

        In a small cluster, to every live peer directly, marked `_DIRECT`: each of them
        answers with a `PushAck` and passes nothing on, and those that have not acked
        within `push_retry` get it again (`_resend`). Per change (or per turn of the loop
        that made several) a member handles one datagram in and one out, the owner one
        out (sealed once) and one in per member:
        datagrams are most of what a change costs a member in CPU, and members share the
        cores (every copy forwarded "just in case" cost each member three more in and
        three out). The change arrives in one hop. A member misses it for longer than
        the first resend only if its copy or its ack is lost (about 2p), and for longer
        than k resends about (2p)^(k+1): at 5% loss, 1e-3 after the second, some 50 ms
        on a LAN. Beyond `direct_push` peers the owner's serial sends would delay the
        last ones more than the epidemic's hops do.
        """
        live = self._ms.live()
        if self.config.fanout == 0 or len(live) > self.config.direct_push:
            self._push([rec], self._hops(), exclude=())
            return
        if self._sender is None:
            return  # not started, or stopped: anti-entropy and resends have nothing to send with
        # Changes made in the same turn of the event loop (concurrent adds on this host:
        # about two a turn with 16 clients) go in one push, sent first thing in the next
        # turn: a datagram out, and one in and one out on every member, per turn, not per
        # change.
        self._outbox.append(rec)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush_outbox)

    def _flush_outbox(self) -> None:
        """Push the changes `_spread` held back in the last turn (see there)."""
        records, self._outbox = self._outbox, []
        if not records or self._sender is None:
            return
        live = self._ms.live()
        self._send_push(records, _DIRECT, live)
        for rec in records:  # in order: the first sets what the members held before them
            self._await_acks(live, rec.stamp)

    def _await_acks(self, members: list[MemberInfo], stamp: Stamp) -> None:
        """Expect `members` to ack our records up to `stamp`; resend to those that do not."""
        if self.config.push_retries == 0 or not members or self._sender is None:
            return
        before = (stamp[0], stamp[1] - 1)  # they hold at most what came before this one
        now = asyncio.get_running_loop().time()
        due = now + self._resend_after()
        for m in members:
            waiting = self._unacked.get(m.name)
            if waiting is None:
                self._unacked[m.name] = _Unacked((m.addr, m.port), before, stamp, 0, due, now)
            else:
                waiting.need = max(waiting.need, stamp)
        self._schedule_resend()

    def _schedule_resend(self) -> None:
        """Run `_resend` when the earliest resend is due (sooner than a timer already set for
        a later one: a member waiting long after its own resends must not hold up another's)."""
        if not self._unacked:
            return
        due = min(w.due for w in self._unacked.values())
        if self._resend_timer is not None:
            if self._resend_timer.when() <= due:
                return
            self._resend_timer.cancel()
        self._resend_timer = asyncio.get_running_loop().call_at(due, self._resend)

    def _resend(self) -> None:
        """Send our records again to the members that have not acked them (one datagram each)."""
        self._resend_timer = None
        now = asyncio.get_running_loop().time()
        for name, waiting in list(self._unacked.items()):
            if waiting.due > now:
                continue
            member = self._ms.get(name)
            if (
                waiting.tries >= self.config.push_retries
                or member is None
                or member.state not in (MemberState.ALIVE, MemberState.SUSPECT)
            ):
                del self._unacked[name]  # anti-entropy takes it from here
                continue
            waiting.tries += 1
            waiting.due = now + self._resend_after() * 2**waiting.tries
            waiting.addr = (member.addr, member.port)
            chunk = next(
                _chunks(self._table.records_after(self.name, waiting.since), _size, self._budget), []
            )
            if chunk:
                self._send(waiting.addr, Push(_DIRECT, tuple(chunk)))
            else:
                del self._unacked[name]  # nothing newer left to send (e.g. reaped)
        self._schedule_resend()

    def _resend_after(self) -> float:
        """Seconds to wait for an ack: members busy with a burst of changes (many of them
        sharing a few cores) answer late, and resending to them would only add to it."""
        return max(self.config.push_retry, min(3 * self._ack_delay, _MAX_RESEND_AFTER))

    def _acked(self, sender: str, stamp: Stamp) -> None:
        waiting = self._unacked.get(sender)
        if waiting is None or stamp < waiting.need:
            return
        del self._unacked[sender]
        if waiting.tries == 0:  # an ack of a resent push could answer either copy: not timed
            delay = asyncio.get_running_loop().time() - waiting.sent
            self._ack_delay += 0.1 * (delay - self._ack_delay)

    def _hops(self) -> int:
        if self.config.push_hops is not None:
            return self.config.push_hops
        return max(2, math.ceil(math.log2(self._ms.cluster_size() + 1)))

    def _fanout(self) -> int:
        """Peers each push goes to: `fanout`, raised to ln(N) + 4 in larger clusters.

        If every member that learns a record forwards it to f random peers, a
        member is missed with probability about e^-f; ln(N) + 4 keeps the chance
        that anyone at all is missed near 2%, and the ring edges (`_push_targets`)
        cut that again, so the tail rarely waits for anti-entropy, and each
        member still sends only O(log N) datagrams per change.
        """
        if self.config.fanout == 0:
            return 0
        return max(self.config.fanout, math.ceil(math.log(self._ms.cluster_size()) + 4))

    def _push_targets(self, exclude: set[str]) -> list[MemberInfo]:
        """`_fanout()` peers: our two neighbours on the ring of names, the rest at random.

        With random peers only, a member is missed when no push picks it, about e^-f of
        them (at loss p, e^-f(1-p)). The ring edges make every member that has a record
        hand it to both its neighbours, so a member is missed only if, besides, neither
        neighbour got its copy to it: each of them was missed itself (rare) or that
        datagram was lost, about p^2. At 5% loss that is some 60 times fewer misses, for
        no extra datagram.
        """
        fanout = self._fanout()
        if fanout == 0:
            return []
        ring = [m for m in self._ms.neighbours() if m.name not in exclude][:fanout]
        taken = exclude | {m.name for m in ring}
        return ring + self._ms.random_live(fanout - len(ring), exclude=taken)

    def _push(self, records: list[Record], hops: int, exclude: Iterable[str]) -> None:
        if hops <= 0 or not records:
            return
        self._send_push(records, hops, self._push_targets(set(exclude)))

    def _send_push(self, records: list[Record], hops: int, targets: list[MemberInfo]) -> None:
        for chunk in _chunks(records, _size, self._budget):
            self._send_all([(m.addr, m.port) for m in targets], Push(hops, tuple(chunk)))

    def _relay(
        self, sender: str, addr: Addr, hops: int, records: tuple[Record, ...], learned: list[Record]
    ) -> None:
        """Answer a push its owner sent to every member itself (`_spread`) with an ack; pass
        an epidemic one on."""
        if hops == _DIRECT:
            if len(records) == 1:  # a change of one record: spare the generators below
                if records[0].owner == sender:
                    self._ack(sender, addr, records[0].stamp)
                    return
            elif all(r.owner == sender for r in records):
                self._ack(sender, addr, max(r.stamp for r in records))
                return
        if hops == _FORWARDED:
            return  # a copy forwarded by a member of an earlier release: the end of its way
        self._push(learned, hops - 1, exclude=(sender,))

    def _ack(self, owner: str, addr: Addr, stamp: Stamp) -> None:
        """Ack `owner`'s direct push: at once, unless we acked it less than `_ACK_WINDOW` ago;
        then once at the end of the window, for everything it pushed meanwhile (the newest
        stamp: a lost one below it shows as a gap here, which we fill at once, `_pull_gap`).
        An owner publishing a burst then hears one ack per window from each member, not one
        per change."""
        if self._sender is None:
            return  # not started (or stopped): nothing can be sent
        loop = asyncio.get_running_loop()
        now = loop.time()
        held = self._acks_held.get(owner)
        if held is not None:
            held.stamp = max(held.stamp, stamp)
            held.addr = addr
            return
        last = self._acked_at.get(owner)
        if last is None or now - last >= _ACK_WINDOW:
            self._acked_at[owner] = now
            self._send(addr, PushAck(stamp))
            return
        self._acks_held[owner] = held = _HeldAck(addr, stamp)
        loop.call_at(last + _ACK_WINDOW, self._release_ack, owner)

    def _release_ack(self, owner: str) -> None:
        held = self._acks_held.pop(owner, None)
        if held is not None:
            self._acked_at[owner] = asyncio.get_running_loop().time()
            self._send(held.addr, PushAck(held.stamp))

    # --- receiving ---

    def _datagram(self, data: bytes, addr: Addr) -> None:
        if self._metrics:
            self._metrics.received_bytes(len(data))
        if len(data) > self.config.mtu:
            self._reject("oversized")
            return
        try:
            opened = self._framer.open(data)
        except FrameError as e:
            self._reject(e.reason)
            return
        if opened.sender == self.name:
            self._reject("self")
            return
        try:
            wire = schema.unpack(opened.body)
            if self._known_push(wire, opened.sender, addr):
                return
            msg = schema.parse(wire)
        except SchemaError as e:
            log.debug("gossip: bad message from %s %s: %s", opened.sender, addr, e)
            self._reject("schema")
            return
        if self._metrics:
            self._metrics.received(_TYPE[type(msg)])
        try:
            self._handle(opened.sender, addr, msg, opened.timestamp)
        except Exception:
            # A bug of ours, not the peer's: keep serving, but loudly.
            log.exception("gossip: handling %s from %s failed", _TYPE[type(msg)], opened.sender)
            self._reject("error")

    def _known_push(self, wire: list[Any], sender: str, addr: Addr) -> bool:
        """True if `wire` is a push of records we hold exactly as they are: handled here.

        Every member gets each change several times over (see `_spread`), and all but the
        first copy change nothing; comparing the unchecked arrays to what we hold skips
        the schema's checks and the merge for those. A record equal to one we hold passed
        those checks when it came in, and merging it again would be a no-op (`wins`)."""
        records = schema.push_records(wire)
        if not records:
            return False
        for r in records:
            if not isinstance(r, list) or len(r) != 7:
                return False
            kind, key, owner, incarnation, version = r[:5]
            if type(kind) is not str or type(key) is not str or type(owner) is not str:
                return False  # (also keeps unhashable junk out of the lookup)
            if type(incarnation) is not int or type(version) is not int:
                return False  # 1.0 or True equals 1, yet the schema refuses them
            held = self._table.get((owner, kind, key))
            if held is None or held.to_wire() != r:
                return False
        if self._metrics:
            self._metrics.received("push")
        owners = {r[2] for r in records}
        if wire[2] == _DIRECT and owners == {sender}:
            # A resend: our ack was lost, or is slower than the owner's patience.
            self._ack(sender, addr, max((r[3], r[4]) for r in records))
        for owner in owners:
            if self._table.has_gap(owner):
                self._pull_gap(addr, owner)
        return True

    def _reject(self, reason: str) -> None:
        if self._metrics:
            self._metrics.messages_rejected.labels(reason).inc()

    def _handle(self, sender: str, addr: Addr, msg: Message, sent_at: float) -> None:
        """`sent_at`: the sender's wall clock when it sealed the datagram."""
        match msg:  # the types are disjoint: the most frequent first (a push and its ack per change)
            case Push(hops, records):
                learned = [r for r in records if self._merge(r, "push")]
                self._relay(sender, addr, hops, records, learned)
                owners = (records[0].owner,) if len(records) == 1 else {r.owner for r in records}
                for owner in owners:
                    if self._table.has_gap(owner):
                        self._pull_gap(addr, owner)
            case PushAck(stamp):
                self._acked(sender, stamp)
            case Ping(seq, target, updates):
                self._apply_members(updates)
                if target == self.name:
                    self._send(addr, Ack(seq, self.name, self._piggyback(sender)))
            case PingReq(seq, target, taddr, tport, updates):
                self._apply_members(updates)
                ours = next(self._seq)
                self._relays[ours] = (addr, seq, target)
                asyncio.get_running_loop().call_later(
                    self.config.probe_interval, self._relays.pop, ours, None
                )
                self._send((taddr, tport), Ping(ours, target, self._piggyback(target)))
            case Ack(seq, target, updates):
                self._apply_members(updates)
                relay = self._relays.pop(seq, None)
                if relay is not None:
                    asker, their_seq, expected = relay
                    if target == expected:
                        self._send(asker, Ack(their_seq, target, ()))
                    return
                probe = self._probes.get(seq)
                if probe is None or probe.target != target:
                    return
                if sender == target and not probe.timed:
                    # Straight from the target (a relayed ack carries the helper's clock):
                    # a round trip and a time exchange.
                    probe.timed = True
                    rtt = self._clock.monotonic() - probe.sent
                    self._ms.record_rtt(target, rtt)
                    self._ms.record_clock(target, offset_sample(probe.sent_wall, sent_at, rtt), rtt)
                if not probe.answered.done():
                    probe.answered.set_result(None)
            case Sums(table, level, nodes, sums):
                if level == 0 and self._metrics:
                    self._metrics.anti_entropy.labels("responder").inc()
                self._answer_sums(addr, table, level, nodes, sums)
            case InSync(table):
                if table == RECORDS_TABLE and not self.caught_up.is_set():
                    log.debug("gossip %s: caught up with %s", self.name, sender)
                    self.caught_up.set()
            case Watermarks(level, nodes, entries):
                held = self._table.watermarks_of(self._keys_under(self._table.tree, level, nodes))
                diff = diff_digests(dict(held), dict(entries))
                for owner, wm in diff.ask.items():
                    self._send(addr, Request(owner, wm))
                for owner, theirs in diff.send.items():
                    self._send_records(addr, owner, theirs)
            case MemberEntries(level, nodes, step, updates):
                self._apply_members(updates)
                named = {u.name: u for u in updates}
                if step == Step.OPEN:
                    self._answer_member_entries(addr, level, nodes, named, Step.ANSWER)
                elif step == Step.ANSWER:
                    # Where ours beat what they answered (we hold it dead, they alive), they
                    # must hear ours, or a member believed dead never learns it and refutes.
                    self._answer_member_entries(addr, level, nodes, named, Step.CORRECT)
            case Digest(lo, hi, entries):
                # Sent by nodes from before the sum tree: still answered, so a cluster
                # upgraded one node at a time keeps converging.
                if self._metrics:
                    self._metrics.anti_entropy.labels("responder").inc()
                diff = diff_digests(self._table.digest(), dict(entries), lo, hi)
                for owner, mine in diff.ask.items():
                    self._send(addr, Request(owner, mine))
                for owner, theirs in diff.send.items():
                    self._send_records(addr, owner, theirs)
            case Request(owner, after):
                self._send_records(addr, owner, after)
            case Records(owner, after, upto, more, records) if owner == self.name:
                # Our own records as a peer holds them (the sync after a restart): keep
                # reading while they are from an earlier life.
                for r in records:
                    self._merge(r, "anti_entropy")
                if more and records and records[-1].incarnation < self.incarnation:
                    self._send(addr, Request(owner, records[-1].stamp))
            case Records(owner, after, upto, more, records):
                before = self._table.watermark(owner)
                for r in records:
                    if self._merge(r, "anti_entropy") and self._metrics:
                        self._metrics.records_repaired.inc()
                self._table.advance(owner, after, upto)
                if owner == sender and records:
                    # The owner filling a gap of ours: tell it, or it resends what it waits on.
                    self._send(addr, PushAck(records[-1].stamp))
                # Ask for the next chunk only while chunks move us on (no loops on a stuck peer).
                if more and self._table.watermark(owner) > before:
                    self._send(addr, Request(owner, self._table.watermark(owner)))
            case Members(reply, updates):
                known = self._ms.get(sender)
                self._apply_members(updates, snapshot=reply)
                if not reply:
                    self._answer_knock(addr, known)

    def _merge(self, rec: Record, path: str) -> bool:
        if rec.owner == self.name and rec.incarnation < self.incarnation:
            changed = self._table.adopt(rec)  # from our previous life: the daemon decides
        else:
            changed = self._table.apply(rec)
            if changed and rec.owner == self.name:
                log.warning(
                    "gossip: a peer holds %s/%s of ours at incarnation %d, above ours (%d)",
                    rec.kind,
                    rec.key,
                    rec.incarnation,
                    self.incarnation,
                )
        if not changed:
            return False
        if self._metrics:
            self._metrics.learned(path)
        if self._on_change is not None:
            try:
                self._on_change(rec)
            except Exception:
                log.exception("gossip: on_change failed for %s/%s", rec.kind, rec.key)
        return True

    def _apply_members(self, updates: Iterable[MemberUpdate], *, snapshot: bool = False) -> None:
        refuted = self._ms.refutations
        for u in updates:
            change = self._ms.apply(u, snapshot=snapshot)
            if change is not None:
                self._member_changed(change)
        if self._ms.refutations != refuted:
            if self._metrics:
                self._metrics.refutations.inc(self._ms.refutations - refuted)
            self._announce_alive()

    def _pull_gap(self, addr: Addr, owner: str) -> None:
        """A push skipped a version of `owner`: ask its sender at once rather than wait for
        anti-entropy, at most once per probe interval per owner."""
        now = self._clock.monotonic()
        if self._gap_pulls.get(owner, 0.0) + self.config.probe_interval > now:
            return
        self._gap_pulls[owner] = now
        self._send(addr, Request(owner, self._table.watermark(owner)))

    def _announce_alive(self) -> None:
        """Tell a few peers at once that this node is alive (do not wait for piggybacking)."""
        update = self._ms.self_update()
        for m in self._ms.random_live(self.config.fanout):
            self._send((m.addr, m.port), Members(True, (update,)))

    def _member_changed(self, change: MemberChanged) -> None:
        if self._metrics:
            if change.member.state == MemberState.SUSPECT and change.previous == MemberState.ALIVE:
                self._metrics.suspicions.inc()
            self._metrics.set_peers(self._ms.counts())
        log.debug(
            "gossip %s: %s is %s (incarnation %d)",
            self.name,
            change.member.name,
            change.member.state,
            change.member.incarnation,
        )
        if self._on_member is not None:
            try:
                self._on_member(change.member)
            except Exception:
                log.exception("gossip: on_member failed for %s", change.member.name)

    # --- sending ---

    def _send(self, addr: Addr, msg: Message, body: bytes | None = None) -> None:
        """Seal and send `msg` (`body`: its encoding, when the caller has it already)."""
        self._send_all((addr,), msg, body)

    def _send_all(self, addrs: Collection[Addr], msg: Message, body: bytes | None = None) -> None:
        """Send `msg` to each of `addrs`, sealed once.

        One packet for all is as safe as one each: a packet names its sender, not its
        receiver, so a copy meant for one peer could always be replayed to another; each
        receiver keeps its own replay window, so each takes the packet once. Sealing once
        saves the owner of a change most of the cost of telling every member (`_spread`).
        """
        if self._sender is None or not addrs:
            return
        packet = self._framer.seal(schema.encode(msg) if body is None else body)
        if len(packet) > self.config.mtu:
            # Every sender sizes its message to the MTU; reaching this is a bug of ours.
            log.error("gossip: %s of %d bytes exceeds the MTU; not sent", _TYPE[type(msg)], len(packet))
            return
        for addr in addrs:
            self._sender.sendto(packet, addr)
        if self._metrics:
            self._metrics.sent(_TYPE[type(msg)], len(packet), len(addrs))

    def _piggyback(self, to: str | None) -> tuple[MemberUpdate, ...]:
        return tuple(self._ms.piggyback(self._budget // 2, to))

    def _send_members(self, addr: Addr, *, reply: bool) -> None:
        for chunk in _chunks(self._ms.snapshot(), _update_size, self._budget):
            self._send(addr, Members(reply, tuple(chunk)))

    def _send_records(self, addr: Addr, owner: str, after: Stamp) -> None:
        """One chunk of `owner`'s records newer than `after`; the peer asks again for more."""
        chunk: list[Record] = []
        room = self._budget
        more = False
        for rec in self._table.records_after(owner, after):
            size = _size(rec)
            if size > room:
                more = True
                break
            chunk.append(rec)
            room -= size
        wm = self._table.watermark(owner)
        # Claim completeness only up to our own watermark: above it we may have gaps.
        upto = min(chunk[-1].stamp, wm) if more else wm
        upto = max(upto, after)
        if chunk or upto > after:
            self._send(addr, Records(owner, after, upto, more, tuple(chunk)))

    # --- anti-entropy: descend the sum trees where they differ (see sumtree) ---
    #
    # A round opens with our sums of the root's children. The peer answers, for the
    # children that differ, with their entries when few (SMALL) or with their children's
    # sums, and so on down: each turn goes one level deeper and can only be answered by
    # entries at the bottom, so an exchange ends within DEPTH + 3 messages. Sibling nodes
    # share datagrams, so a table that differs everywhere costs about what a full copy
    # would, and one that differs in k entries about k * DEPTH small messages.

    def _tree(self, table: str) -> SumTree:
        return self._table.tree if table == RECORDS_TABLE else self._ms.tree

    @staticmethod
    def _keys_under(tree: SumTree, level: int, nodes: Iterable[int]) -> list[str]:
        return [key for node in nodes for key in tree.keys_under(level, node)]

    def _open_anti_entropy(self, addr: Addr) -> None:
        for table in (RECORDS_TABLE, MEMBERS_TABLE):
            self._send(addr, Sums(table, 0, (0,), self._tree(table).children(0, 0)))

    def _answer_sums(
        self, addr: Addr, table: str, level: int, nodes: tuple[int, ...], sums: tuple[int, ...]
    ) -> None:
        tree = self._tree(table)
        deeper, small = [], []
        for k, node in enumerate(nodes):
            theirs = sums[k * FANOUT : (k + 1) * FANOUT]
            for child in differing_children(tree.children(level, node), theirs, node):
                if level + 1 < DEPTH and tree.count(level + 1, child) > SMALL:
                    deeper.append(child)
                else:
                    small.append(child)
        if level == 0 and table == RECORDS_TABLE and not deeper and not small:
            # Equal tables: say so (a few bytes), or the initiator hears only silence.
            self._send(addr, InSync(table))
            return
        # Each node's sums take FANOUT int64s (9 bytes each in msgpack), plus its index.
        per_datagram = max(1, self._budget // (FANOUT * 9 + 9))
        for i in range(0, len(deeper), per_datagram):
            group = tuple(deeper[i : i + per_datagram])
            sums_out = tuple(x for node in group for x in tree.children(level + 1, node))
            self._send(addr, Sums(table, level + 1, group, sums_out))
        if small and table == RECORDS_TABLE:
            self._send_watermarks(addr, level + 1, small)
        elif small:
            self._send_member_entries(addr, level + 1, small)

    def _send_watermarks(self, addr: Addr, level: int, nodes: list[int]) -> None:
        """Our watermarks under tree nodes, even none (the peer then sends what we lack)."""
        tree = self._table.tree
        for group, keys in _groups(nodes, lambda n: tree.keys_under(level, n), self._budget):
            entries = self._table.watermarks_of(keys)
            # Only a crowded leaf fills more than a datagram; the peer takes each part for
            # the whole node and may send records we have: harmless, and rare.
            for chunk in _chunks(entries, _watermark_size, self._budget) if entries else [[]]:
                self._send(addr, Watermarks(level, tuple(group), tuple(chunk)))

    def _send_member_entries(self, addr: Addr, level: int, nodes: list[int]) -> None:
        """Open a member exchange: all we know of the members under tree nodes, even none."""
        tree = self._ms.tree
        for group, names in _groups(nodes, lambda n: tree.keys_under(level, n), self._budget):
            updates = [u for u in map(self._ms.update_of, names) if u is not None]
            for chunk in _chunks(updates, _update_size, self._budget) if updates else [[]]:
                self._send(addr, MemberEntries(level, tuple(group), Step.OPEN, tuple(chunk)))

    def _answer_member_entries(
        self, addr: Addr, level: int, nodes: tuple[int, ...], theirs: dict[str, MemberUpdate], step: Step
    ) -> None:
        """Our view where it differs from `theirs` (already merged): at ANSWER, of every member
        under the nodes; at CORRECT, the last word, only of the members they named."""
        names = [] if step == Step.CORRECT else self._keys_under(self._ms.tree, level, nodes)
        known = set(names)
        # Also members they named that we hold as gone (and so keep out of our tree).
        names += [n for n in theirs if n not in known]
        out = []
        for name in names:
            mine = self._ms.update_of(name)
            if mine is not None and theirs.get(name) != mine:
                out.append(mine)
        for chunk in _chunks(out, _update_size, self._budget):
            self._send(addr, MemberEntries(level, nodes, step, tuple(chunk)))

    def _knock(self, addr: Addr, about: MemberInfo | None = None) -> None:
        """A few bytes asking `addr` for its membership (it answers with a snapshot): we say
        we are alive and, if we think it gone, that too, so a live one refutes at once."""
        updates = [self._ms.self_update()]
        if about is not None:
            updates.append(MemberUpdate(about.name, about.addr, about.port, about.state, about.incarnation))
        self._send(addr, Members(False, tuple(updates)))

    def _answer_knock(self, addr: Addr, sender: MemberInfo | None) -> None:
        """A join, or a member that believes us gone, or a partition healing.

        One we did not know, or held gone, needs everything we know: a snapshot. One we
        hold alive only needs our word (we refuted already if it said we were gone); the
        sum trees carry the rest. A snapshot per knock would swamp a cluster where many
        believe many dead, as after a stall: O(N) datagrams each, at a thousand members.
        """
        if sender is None or sender.state in (MemberState.DEAD, MemberState.LEFT):
            self._send_members(addr, reply=True)
        else:
            self._send(addr, Members(True, (self._ms.self_update(),)))

    def _join(self) -> None:
        for addr in self._seeds:
            if addr != self.address:
                self._knock(addr)

    # --- loops ---

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            for change in self._ms.expire():
                self._member_changed(change)
            target = self._ms.next_probe_target()
            if target is None:
                self._join()
            else:
                await self._probe(target)
            await asyncio.sleep(max(0.0, self.config.probe_interval - (loop.time() - started)))

    async def _probe(self, target: MemberInfo) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        seq = next(self._seq)
        fut: asyncio.Future[None] = loop.create_future()
        self._probes[seq] = _Probe(target.name, fut, self._clock.monotonic(), self._clock.wall())
        try:
            self._send((target.addr, target.port), Ping(seq, target.name, self._piggyback(target.name)))
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 that drops a cancel that comes
            # as the ack does, and the probe loop would run on past the node's stop.
            try:
                async with asyncio.timeout(cfg.probe_timeout):
                    await asyncio.shield(fut)
                return
            except TimeoutError:
                pass
            helpers = self._ms.random_live(cfg.indirect_checks, exclude={target.name}, alive_only=True)
            for h in helpers:
                req = PingReq(seq, target.name, target.addr, target.port, self._piggyback(h.name))
                self._send((h.addr, h.port), req)
            try:
                async with asyncio.timeout(cfg.probe_interval - cfg.probe_timeout):
                    await asyncio.shield(fut)
                return
            except TimeoutError:
                pass
            change = self._ms.suspect(target.name)
            if change is not None:
                self._member_changed(change)
                # Tell the suspect directly: if it is alive it refutes at once.
                suspect = MemberUpdate(
                    target.name, target.addr, target.port, MemberState.SUSPECT, change.member.incarnation
                )
                self._send((target.addr, target.port), Members(True, (suspect,)))
        finally:
            self._probes.pop(seq, None)
            fut.cancel()

    async def _anti_entropy_loop(self) -> None:
        interval = self.config.anti_entropy_interval
        catch_up = min(interval, self.config.catch_up_interval)
        # Start at a random point of the interval so the nodes' exchanges do not bunch up
        # (soon, while there is catching up to do).
        await asyncio.sleep(self._rng.uniform(0, catch_up if not self.caught_up.is_set() else interval))
        rounds = 0
        while True:
            self._anti_entropy_round()
            rounds += 1
            hurry = not self.caught_up.is_set() and rounds < self.config.catch_up_rounds
            pace = catch_up if hurry else interval
            await asyncio.sleep(pace * self._rng.uniform(0.8, 1.2))

    def _anti_entropy_round(self) -> None:
        now = self._clock.wall()
        self._table.reap(now, self.config.tombstone_ttl)
        if self._ms.reap(self.config.dead_reap) and self._metrics:
            self._metrics.set_peers(self._ms.counts())
        peers = self._ms.random_live(1, alive_only=True)
        if peers:
            peer = (peers[0].addr, peers[0].port)
            if self._metrics:
                self._metrics.anti_entropy.labels("initiator").inc()
            self._open_anti_entropy(peer)
            if self._own_sync_rounds > 0:
                self._own_sync_rounds -= 1
                self._send(peer, Request(self.name, (0, 0)))
        else:
            self._join()
        # Knock on one dead member's door: after a partition heals, both sides
        # believe the other dead and would otherwise never talk again.
        gone = self._ms.gone()
        if gone:
            m = self._rng.choice(gone)
            self._knock((m.addr, m.port), m)
        # And on one seed that is not a live member: dead members are forgotten after
        # `dead_reap`, seeds never are, so even a long partition heals through them.
        live = {(m.addr, m.port) for m in self._ms.live()}
        others = sorted(self._seeds - live - {self.address})
        if others and peers:
            self._knock(self._rng.choice(others))


@dataclass
class _HeldAck:
    """An ack held back to the end of its window: the newest stamp of the owner's pushes."""

    addr: Addr
    stamp: Stamp


@dataclass
class _Unacked:
    """A member that has not acked our record `need`; what we push after `since` is unacked."""

    addr: Addr
    since: Stamp
    need: Stamp
    tries: int
    due: float  # loop time of the next resend
    sent: float  # loop time of the first push it has not acked


@dataclass
class _Probe:
    """A probe waiting for its ack."""

    target: str
    answered: asyncio.Future[None]
    sent: float  # monotonic, when the ping left
    sent_wall: float  # our wall clock then (the time exchange's t1)
    timed: bool = False  # the direct ack came (its RTT and clock sample are taken)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, node: GossipNode) -> None:
        self._node = node

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._node._datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a stopped peer and the like: SWIM notices by itself.
        log.debug("gossip socket error: %s", exc)


def _size(rec: Record) -> int:
    return len(msgpack.packb(rec.to_wire(), use_bin_type=True))


def _watermark_size(entry: tuple[str, Stamp]) -> int:
    return len(entry[0].encode()) + 24  # msgpack: array header, name, two 64-bit ints


def _update_size(u: MemberUpdate) -> int:
    return len(msgpack.packb(u.to_wire(), use_bin_type=True))


def _groups(
    nodes: Iterable[int], keys: Callable[[int], list[str]], budget: int
) -> Iterator[tuple[list[int], list[str]]]:
    """Tree nodes with their keys, grouped so each group's entries fill about one datagram
    (an entry is a name plus about 30 bytes, whether a watermark or a member)."""
    group: list[int] = []
    names: list[str] = []
    room = budget
    for node in nodes:
        ks = keys(node)
        cost = 5 + sum(len(k.encode()) + 32 for k in ks)
        if group and cost > room:
            yield group, names
            group, names, room = [], [], budget
        group.append(node)
        names += ks
        room -= cost
    if group:
        yield group, names


def _chunks(items: Iterable[Any], size: Callable[[Any], int], budget: int) -> Iterator[list[Any]]:
    """Split `items` into lists whose summed sizes stay within `budget`."""
    chunk: list[Any] = []
    room = budget
    for item in items:
        s = size(item)
        if chunk and s > room:
            yield chunk
            chunk, room = [], budget
        chunk.append(item)
        room -= s
    if chunk:
        yield chunk
