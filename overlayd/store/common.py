"""What the KV backends (etcd, Consul, ZooKeeper) share, written once.

- timing: how long one request may take, the bounds of retry delays, and
  when to renew a lease;
- `Backoff`: delays that double up to a cap, with jitter, reset after a success;
- `RoundPace`: how long a polling watch (Consul, ZooKeeper) waits before its
  next read round, so that bursts of changes are read together; `StreamPace`:
  the same for a streaming one (etcd), which closes its stream for the pace;
- `retry_while_unavailable`: run a read until the server answers;
- `SessionFile`: the lease/session a restarted daemon resumes, saved atomically
  in the state directory (each backend keeps its own format in it);
- `Health`: whether the server answered last time (logged on change, exported
  as `overlayd_store_up`), and the error and watch-event counters;
- `RecordDecoder`: a stored value as a fact, or reported and skipped when it is
  not one of ours (someone else wrote under our prefix), never a crash;
- `EndpointWrites` and `republish`: put every owned endpoint back after a new
  lease/session, never one the daemon deleted meanwhile.

The server-specific parts (clients, transactions, watches) stay in the
backends' own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from overlayd.core.model import Endpoint
from overlayd.core.view import Fact
from overlayd.store.base import AlreadyExists, StoreUnavailable
from overlayd.store.keys import InvalidRecord, KeyLayout, fact_for_put
from overlayd.util.metrics import CounterSeries, Metrics

T = TypeVar("T")

# One request to a KV server, in seconds (blocking watch queries add their own wait).
REQUEST_TIMEOUT = 5.0
# Retry delays: the first, and the most any backoff waits between two attempts.
RETRY_MIN, RETRY_MAX = 0.2, 5.0
# Log lines quote at most this much of a stored value someone else wrote.
_LOG_LIMIT = 300


def renew_interval(ttl: float, *, failing: bool = False) -> float:
    """How long to wait before renewing a lease/session of `ttl` seconds.

    A third of the TTL leaves two more tries before it runs out; after a
    failed renewal, a sixth: the lease is ticking.
    """
    return max(ttl / 6, 0.3) if failing else max(ttl / 3, 0.5)


def first_line(exc: BaseException | str) -> str:
    """The first line of an error (client libraries put tracebacks and dumps after it)."""
    text = str(exc).strip() or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text.splitlines()[0] if text else ""


class Backoff:
    """Delays that double from `first` up to `cap`; `reset()` after a success.

    Each delay is spread by +-`jitter` (a fraction), so the hosts that lost the
    same server do not all come back to it in the same instant.
    """

    def __init__(self, first: float = RETRY_MIN, cap: float = RETRY_MAX, *, jitter: float = 0.2) -> None:
        self._first = first
        self._cap = cap
        self._jitter = jitter
        self._delay = first

    def reset(self) -> None:
        self._delay = self._first

    def next_delay(self) -> float:
        """The delay to wait now; the one after it doubles."""
        delay = self._delay
        if self._jitter:
            delay *= random.uniform(1 - self._jitter, 1 + self._jitter)
        self._delay = min(self._delay * 2, self._cap)
        return delay

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())


class RoundPace:
    """Starts of a polling watch's read rounds at least `interval` seconds apart.

    A round that starts after a quiet spell starts at once: pacing only holds
    back a round that would follow the last one closely, and whatever changes
    meanwhile is read in that one round. `interval` 0 never waits.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: float | None = None

    def delay(self) -> float:
        """Seconds to wait before the next round may start (0: now)."""
        if self._last is None or self._interval <= 0:
            return 0.0
        return max(0.0, self._last + self._interval - self._clock())

    def started(self) -> None:
        """A round starts now."""
        self._last = self._clock()

    async def wait(self) -> None:
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)


class StreamPace:
    """When a streaming watch (etcd's) closes its stream for a while, in a burst of changes.

    A stream brings each change as it happens: one message to receive and decode per
    change, on every host. Beside gossip the watch is the backstop, so a response that
    follows the last one within `interval` closes the stream for `interval`, and the
    reopened stream (resumed after the last revision read) brings everything that changed
    meanwhile in its first response. A change after a quiet spell is read at once, as
    without a pace. `interval` 0 never holds back.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def hold_back(self) -> bool:
        """A response was read just now: whether to close the stream for `interval`."""
        now = self._clock()
        held = self.interval > 0 and self._last is not None and now - self._last < self.interval
        self._last = now
        return held


async def retry_while_unavailable(op: Callable[[], Awaitable[T]], backoff: Backoff | None = None) -> T:
    """`await op()` until it does not raise StoreUnavailable (other errors propagate)."""
    backoff = backoff or Backoff(jitter=0)
    while True:
        try:
            return await op()
        except StoreUnavailable:
            await backoff.wait()


class SessionFile:
    """The lease or session this node holds, saved so that a restarted daemon resumes it.

    The text is the backend's own (a lease ID, a session UUID, an id and a
    password); it is replaced atomically, so a crash never leaves half a file.
    """

    def __init__(self, state_dir: str, name: str, *, private: bool = False) -> None:
        self.path = Path(state_dir) / name
        self._private = private  # holds a password: readable by root only

    def load(self) -> str | None:
        """The saved text without surrounding blanks, or None if nothing was saved."""
        try:
            return self.path.read_text().strip()
        except FileNotFoundError:
            return None

    def save(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        if self._private:
            tmp.touch(mode=0o600)
        tmp.write_text(text + "\n")
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Health:
    """Whether the server answered the last exchange, and the counters every backend keeps."""

    def __init__(self, backend: str, *, metrics: Metrics | None, log: logging.Logger) -> None:
        self._backend = backend  # as it appears in the log: "etcd", "consul", "zookeeper"
        self._metrics = metrics
        self._log = log  # the backend's own, so its lines keep their logger name
        self._up = False
        self._events: dict[tuple[type, str], CounterSeries] = {}

    @property
    def up(self) -> bool:
        return self._up

    def set(self, up: bool) -> None:
        # Called per watch event: only a change touches the log and the gauge (0 until the first "up").
        if up != self._up:
            self._log.info("%s %s", self._backend, "reachable" if up else "unreachable")
            self._up = up
            if self._metrics:
                self._metrics.store_up.set(1 if up else 0)

    def count_error(self, operation: str) -> None:
        if self._metrics:
            self._metrics.store_errors.labels(operation=operation).inc()

    def count_event(self, fact: Fact, action: str) -> None:
        """One fact the watch delivered ("put" or "delete"), by record kind."""
        if self._metrics:
            self._event_counter(self._metrics, type(fact), action).inc()

    def count_facts(self, facts: Iterable[Fact]) -> None:
        """Facts a watch response delivered, counted once per record kind and action
        (a call per kind and action per response, not per record). The action is
        the fact's: a put or a deletion."""
        if not self._metrics:
            return
        # A plain dict, not a Counter: a response of one change (nearly all of them, and
        # every one beside gossip is a second copy) pays no Counter construction.
        counts: dict[type, int] = {}
        for fact in facts:
            kind = fact.__class__
            counts[kind] = counts.get(kind, 0) + 1
        for kind, count in counts.items():
            action = "delete" if kind.__name__.endswith("Deleted") else "put"
            self._event_counter(self._metrics, kind, action).inc(count)

    def _event_counter(self, metrics: Metrics, kind: type, action: str) -> CounterSeries:
        child = self._events.get((kind, action))
        if child is None:
            # Kept by (class, action): no label name to derive per event.
            name = kind.__name__.removesuffix("Put").removesuffix("Deleted").lower()
            child = metrics.store_watch_events.labels(kind=name, action=action)
            self._events[(kind, action)] = child
        return child


class RecordDecoder:
    """Stored values as facts; what is not a valid record of ours is reported and skipped."""

    def __init__(
        self,
        layout: KeyLayout,
        *,
        metrics: Metrics | None,
        on_invalid: Callable[[str], None] | None,
        log: logging.Logger,
    ) -> None:
        self._layout = layout
        self._metrics = metrics
        self._on_invalid = on_invalid
        self._log = log

    def put(self, key: str, value: bytes) -> Fact | None:
        """The fact `key = value` states, or None (reported) if it is not a valid record."""
        try:
            return fact_for_put(self._layout, key, value)
        except InvalidRecord as exc:
            # Someone else wrote under our prefix: report and skip, never crash the watch.
            text = str(exc)
            shown = text if len(text) <= _LOG_LIMIT else text[:_LOG_LIMIT] + "..."
            self._log.warning("skipping invalid record %s", shown)
            if self._metrics:
                self._metrics.invalid_records.inc()
            if self._on_invalid:
                self._on_invalid(text)
            return None


class EndpointWrites:
    """One store write at a time per endpoint this host owns.

    A re-publish after a new lease/session walks the owned endpoints while the
    daemon may delete one of them. Were the delete to run between the walk's
    start and that endpoint's turn, or while its re-publish is in flight, the
    record and its IP claim would come back after the delete: an endpoint that
    is gone, announced to every host. So each publish and delete of an endpoint
    holds its key (`hold`), and a re-publish takes an endpoint only if it is
    still the one owned once it holds the key (`republish_one`).
    """

    def __init__(self, owned: Mapping[str, Endpoint]) -> None:
        self._owned = owned
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold the endpoint `key` for one write (a lock made when wanted, dropped when unused)."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]

    async def republish_one(self, endpoint: Endpoint, put: Callable[[Endpoint], Awaitable[None]]) -> None:
        """`put` the endpoint again, unless it was deleted or replaced since the walk began."""
        async with self.hold(endpoint.key):
            if self._owned.get(endpoint.key) is endpoint:
                await put(endpoint)


async def republish(
    writes: EndpointWrites,
    endpoints: Mapping[str, Endpoint],
    put: Callable[[Endpoint], Awaitable[None]],
    *,
    log: logging.Logger,
    report: Callable[[str], None] | None = None,
) -> None:
    """Publish every owned endpoint (`endpoints`, the map `writes` watches) again after a
    new lease/session; `put` writes one without holding it (`EndpointWrites`).

    An IP that another endpoint claimed while ours had lapsed stays theirs:
    that one endpoint is logged, reported (/status shows it) and left out,
    the others still go back.
    """
    for endpoint in list(endpoints.values()):
        try:
            await writes.republish_one(endpoint, put)
        except AlreadyExists as exc:
            message = f"endpoint {endpoint.key} cannot be re-published: {exc}"
            log.error("%s", message)
            if report is not None:
                report(message)
