"""etcd v3 backend (aetcd, the maintained asyncio client).

What etcd and aetcd really do, and how this module answers (see BACKENDS.md):

- aetcd has no keepalive loop: `keep_session` refreshes the lease every TTL/3.
  An expired lease does not raise, it reports TTL <= 0: then we take a new
  lease and re-put every owned record.
- The lease ID is saved in the state directory, so a restarted daemon resumes
  its lease and its records never blink out for the other hosts.
- aetcd never resumes a watch: after a server restart the stream raises
  `ConnectionFailedError` and goes dead. We remember the last revision seen
  and re-watch from the next one.
- A watch from a compacted revision fails with `RevisionCompactedError`: we
  re-read the whole prefix and hand the caller a Snapshot (deletions that
  happened in the gap fall out of the replaced view).
- One transaction holds at most 128 operations and each key once.
- A wiped member re-initialised with the same configuration gets the same
  cluster ID, and once written to past the revision a watch stood at, its
  revision has not gone back either. So the watch also keeps the prefix's
  generation marker (store/keys.py): learnt when a watch starts, made if
  absent, and read with the listing after every interruption; gone or
  holding another token means the data we watched was lost.
- gRPC without keepalive trusts a connection whose packets are dropped, and
  waits up to 120 s between reconnections: `_CHANNEL_OPTIONS` pings every 6 s
  and retries every 1-2 s, so a host cut off from etcd is back in its
  listing about 2 s after the path is, not after TCP's retransmission backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aetcd
import aetcd.utils
import aetcd.watcher
import grpc
import grpc.aio

from overlayd.core.config import StoreConfig
from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import Fact
from overlayd.store.base import (
    AlreadyExists,
    Changes,
    NotFoundError,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
)
from overlayd.store.common import (
    REQUEST_TIMEOUT,
    Backoff,
    EndpointWrites,
    Health,
    RecordDecoder,
    SessionFile,
    StreamPace,
    first_line,
    renew_interval,
    republish,
    retry_while_unavailable,
)
from overlayd.store.keys import InvalidRecord, KeyLayout, encode, fact_for_delete, fact_for_put
from overlayd.util.metrics import Metrics

log = logging.getLogger(__name__)

_DELETE = aetcd.rpc.Event.EventType.DELETE

# Errors that mean "the server is not reachable right now" rather than "no".
_UNREACHABLE = (
    aetcd.ConnectionFailedError,
    aetcd.ConnectionTimeoutError,
    aetcd.InternalError,
    OSError,
    asyncio.TimeoutError,
)

# gRPC channel settings. Without them a connection whose packets are silently dropped
# (a firewall, a cable) looks alive: requests queue behind TCP's retransmission backoff,
# which after a 20 s outage is already several seconds, so the host's records came back
# in the store up to 8 s after the path did. A keepalive ping proves the connection
# (etcd refuses pings closer than its --grpc-keepalive-min-time, 5 s by default), and
# reconnection retries every second or two instead of gRPC's default of up to 120 s.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 6_000,
    "grpc.keepalive_timeout_ms": 3_000,
    "grpc.http2.max_pings_without_data": 0,  # a quiet watch stream still needs its pings
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": 1_000,  # also how long one connection attempt may take
    "grpc.max_reconnect_backoff_ms": 2_000,
}


class EtcdStore(Store):
    def __init__(
        self,
        config: StoreConfig,
        *,
        state_dir: str,
        metrics: Metrics | None = None,
        on_invalid: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._layout = KeyLayout(config.prefix)
        self._lease_file = SessionFile(state_dir, "etcd-lease")
        self._health = Health("etcd", metrics=metrics, log=log)
        self._pace = StreamPace(config.watch_pace)
        self._decoder = RecordDecoder(self._layout, metrics=metrics, on_invalid=on_invalid, log=log)
        self._on_invalid = on_invalid
        self._cluster_id = 0  # of the server we first read; another one means it lost its data
        self._generation: bytes | None = None  # the marker's token as the watch last read it
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None
        # Everything this node owns, as last published: re-put on a new lease.
        self._node: Node | None = None
        self._owned: dict[str, Endpoint] = {}
        self._writes = EndpointWrites(self._owned)
        self._lease_lock = asyncio.Lock()
        self._failover_lock = asyncio.Lock()
        self._current = 0  # index in store.url's members of the one the client talks to
        # Keys of claims, not records: the watch skips them without decoding.
        self._claim_prefixes = (
            self._layout.ip_claim_prefix().encode(),
            self._layout.vni_prefix().encode(),
        )

    # ----------------------------------------------------------------- plumbing

    @property
    def healthy(self) -> bool:
        return self._health.up

    @property
    def client(self) -> aetcd.Client:
        if self._client is None:
            raise StoreUnavailable("etcd client is not connected")
        return self._client

    async def _call(self, operation: str, fn: Callable[[], Any]) -> Any:
        """Run one request, translating client errors to StoreError and tracking health."""
        used = self._client
        try:
            try:
                result = await fn()
            except aetcd.exceptions.UnauthenticatedError:
                # etcd's auth tokens expire (5 min by default) and aetcd does not
                # renew them: authenticate again, once, and retry.
                log.info("etcd auth token expired: authenticating again")
                await self._reconnect()
                result = await fn()
        except _UNREACHABLE as exc:
            self._health.set(False)
            self._health.count_error(operation)
            await self._fail_over(used)
            raise StoreUnavailable(f"etcd at {self._config.url} is unreachable: {first_line(exc)}") from None
        except aetcd.ClientError as exc:
            self._health.count_error(operation)
            raise StoreError(f"etcd {operation} failed: {first_line(exc)}") from None
        self._health.set(True)
        return result

    async def connect(self) -> None:
        self._client = await self._open(range(len(self._config.endpoints)))
        self._health.set(True)

    async def _fail_over(self, failed: aetcd.Client | None) -> None:
        """The member we talk to is unreachable: with several in store.url, move to the next
        one that answers (aetcd talks to one host). If none does, keep the client we have:
        gRPC reconnects it when its member comes back."""
        count = len(self._config.endpoints)
        if count < 2 or failed is None or self._client is not failed:
            return  # one member only, or another call moved on already
        async with self._failover_lock:
            if self._client is not failed:
                return
            order = [(self._current + k) % count for k in range(1, count + 1)]
            try:
                client = await self._open(order)
            except StoreError as exc:
                log.warning("etcd: no other member answers: %s", first_line(exc))
                return
            self._client = client
            endpoint = self._config.endpoints[self._current]
            log.warning("etcd: moved to member %s:%d", endpoint.host, endpoint.port)
            await _close_quietly(failed)

    async def _open(self, order: Iterable[int]) -> aetcd.Client:
        """A connected client of the first member in `order` that answers."""
        errors = []
        credentials = _tls_credentials(self._config)
        for index in order:
            endpoint = self._config.endpoints[index]
            kwargs: dict[str, Any] = {
                "host": endpoint.host,
                "port": endpoint.port,
                "username": self._config.username,
                "password": self._config.password,
                "timeout": REQUEST_TIMEOUT,
                "options": _CHANNEL_OPTIONS,
            }
            client = aetcd.Client(**kwargs) if credentials is None else _TlsClient(credentials, **kwargs)
            where = f"{endpoint.host}:{endpoint.port}"
            try:
                await client.connect()
                # connect() alone does not reach the server. A key under our prefix: a user
                # whose role grants that prefix alone (least privilege) may read nothing else.
                await client.get(self._config.prefix.encode())
            except aetcd.exceptions.UnauthenticatedError as exc:
                await _close_quietly(client)
                raise StoreError(
                    f"etcd at {where} refused the credentials of user {self._config.username!r}: "
                    f"{first_line(exc)} (check store.username and store.password)"
                ) from None
            except (TimeoutError, aetcd.ClientError, OSError) as exc:
                await _close_quietly(client)
                text = first_line(exc)
                if credentials is not None and _looks_like_tls(text):
                    raise StoreError(
                        f"TLS with etcd at {where} failed: {text} (check store.tls_ca, tls_cert, tls_key)"
                    ) from None
                if "user name is empty" in text or "authentication is enabled" in text.lower():
                    raise StoreError(
                        f"etcd at {where} requires authentication: {text} (set store.username/password)"
                    ) from None
                errors.append(f"{where}: {text}")
                continue
            self._current = index
            return client
        self._health.set(False)
        raise StoreUnavailable(f"cannot reach etcd ({'; '.join(errors)})")

    async def close(self) -> None:
        if self._client is not None:
            await _close_quietly(self._client)
            self._client = None

    async def _reconnect(self) -> None:
        await self.close()
        await self.connect()

    # ----------------------------------------------------------------- session

    async def open_session(self, node: Node) -> None:
        async with self._lease_lock:
            saved = self._load_lease_id()
            if saved is not None and await self._lease_alive(saved):
                self._lease_id = saved
                log.info("resumed etcd lease %x", saved)
            else:
                await self._new_lease()
        self._node = node
        await self._put_node()

    async def _put_node(self) -> None:
        if self._node is None:
            return
        lease_id = self._require_lease()
        key, value = self._layout.node(self._node.name).encode(), encode(self._node)
        await self._call("put", lambda: self.client.put(key, value, lease=lease_id))

    async def _lease_alive(self, lease_id: int) -> bool:
        info = await self._call("lease", lambda: self.client.refresh_lease(lease_id))
        return int(info.TTL) > 0

    async def _new_lease(self) -> None:
        lease = await self._call("lease", lambda: self.client.lease(self._config.lease_ttl))
        self._lease_id = int(lease.id)
        self._save_lease_id(self._lease_id)
        log.info("granted etcd lease %x (ttl %ss)", self._lease_id, self._config.lease_ttl)

    async def keep_session(self) -> None:
        interval = renew_interval(self._config.lease_ttl)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._refresh_or_renew()
            except StoreError as exc:
                log.warning("lease keepalive failed: %s", exc)
                interval = renew_interval(self._config.lease_ttl, failing=True)
            else:
                interval = renew_interval(self._config.lease_ttl)

    async def _refresh_or_renew(self) -> None:
        async with self._lease_lock:
            if self._lease_id is not None and await self._lease_alive(self._lease_id):
                return
            log.warning("etcd lease %x expired: taking a new one and re-publishing", self._lease_id or 0)
            await self._new_lease()
            await self._put_node()
            await republish(self._writes, self._owned, self._put_endpoint, log=log, report=self._on_invalid)

    async def release_session(self) -> None:
        if self._lease_id is not None:
            lease_id = self._lease_id
            await self._call("lease", lambda: self.client.revoke_lease(lease_id))
            self._lease_id = None
            self._owned.clear()
            self._node = None
        self._lease_file.remove()

    def _load_lease_id(self) -> int | None:
        text = self._lease_file.load()
        try:
            return int(text, 16) if text is not None else None
        except ValueError:
            return None

    def _save_lease_id(self, lease_id: int) -> None:
        self._lease_file.save(f"{lease_id:x}")

    def _require_lease(self) -> int:
        if self._lease_id is None:
            raise StoreError("no etcd session: open_session() first")
        return self._lease_id

    # ----------------------------------------------------------------- records

    async def create_network(self, network: Network) -> None:
        tx = self.client.transactions
        net_key = self._layout.network(network.name).encode()
        vni_key = self._layout.vni(network.vni).encode()
        ok, responses = await self._call(
            "txn",
            lambda: self.client.transaction(
                compare=[tx.create(net_key) == 0, tx.create(vni_key) == 0],
                success=[
                    tx.put(net_key, encode(network)),
                    tx.put(vni_key, network.name.encode()),
                ],
                failure=[tx.get(net_key), tx.get(vni_key)],
            ),
        )
        if ok:
            return
        if _txn_values(responses, 0):
            raise AlreadyExists("network name", network.name)
        holder = _txn_values(responses, 1)
        raise AlreadyExists("VNI", str(network.vni), holder[0].decode() if holder else None)

    async def delete_network(self, name: str) -> None:
        net_key = self._layout.network(name).encode()
        current = await self._call("get", lambda: self.client.get(net_key))
        if current is None:
            raise NotFoundError(f"network {name} not found")
        network = Network.from_dict(json.loads(current.value))
        tx = self.client.transactions
        vni_key = self._layout.vni(network.vni).encode()
        ok, _ = await self._call(
            "txn",
            lambda: self.client.transaction(
                compare=[tx.mod(net_key) == current.mod_revision],
                success=[tx.delete(net_key), tx.delete(vni_key)],
                failure=[],
            ),
        )
        if not ok:
            raise StoreError(f"network {name} changed while being deleted; try again")

    async def create_endpoint(self, endpoint: Endpoint) -> None:
        lease_id = self._require_lease()
        tx = self.client.transactions
        ep_key = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_key = self._layout.ip_claim(endpoint.network, endpoint.ip)
        value = encode(endpoint)
        ok, responses = await self._call(
            "txn",
            lambda: self.client.transaction(
                compare=[tx.create(ep_key.encode()) == 0, tx.create(ip_key.encode()) == 0],
                success=[
                    tx.put(ep_key.encode(), value, lease=lease_id),
                    tx.put(ip_key.encode(), endpoint.key.encode(), lease=lease_id),
                ],
                failure=[tx.get(ep_key.encode()), tx.get(ip_key.encode())],
            ),
        )
        if not ok:
            if _txn_values(responses, 0):
                raise AlreadyExists("endpoint name", endpoint.key)
            holder = _txn_values(responses, 1)
            raise AlreadyExists("IP", str(endpoint.ip), holder[0].decode() if holder else None)
        self._owned[endpoint.key] = endpoint

    async def publish_endpoint(self, endpoint: Endpoint) -> None:
        async with self._writes.hold(endpoint.key):
            await self._put_endpoint(endpoint)

    async def _put_endpoint(self, endpoint: Endpoint) -> None:
        lease_id = self._require_lease()
        tx = self.client.transactions
        ep_key = self._layout.endpoint(endpoint.network, endpoint.name).encode()
        ip_key = self._layout.ip_claim(endpoint.network, endpoint.ip).encode()
        claim = endpoint.key.encode()
        puts = [
            tx.put(ep_key, encode(endpoint), lease=lease_id),
            tx.put(ip_key, claim, lease=lease_id),
        ]
        # The claim is ours if it is free or already names this endpoint; if
        # another endpoint took the IP while our lease had lapsed, it keeps it.
        ok, _ = await self._call(
            "txn",
            lambda: self.client.transaction(compare=[tx.create(ip_key) == 0], success=puts, failure=[]),
        )
        if not ok:
            ok, responses = await self._call(
                "txn",
                lambda: self.client.transaction(
                    compare=[tx.value(ip_key) == claim], success=puts, failure=[tx.get(ip_key)]
                ),
            )
            if not ok:
                holder = _txn_values(responses, 0)
                raise AlreadyExists("IP", str(endpoint.ip), holder[0].decode() if holder else None)
        self._owned[endpoint.key] = endpoint

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        async with self._writes.hold(endpoint.key):
            await self._delete_endpoint(endpoint)

    async def _delete_endpoint(self, endpoint: Endpoint) -> None:
        tx = self.client.transactions
        ep_key = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_key = self._layout.ip_claim(endpoint.network, endpoint.ip)
        # Release the IP only if this endpoint still holds it: never free a
        # claim that someone else took after ours lapsed.
        await self._call(
            "txn",
            lambda: self.client.transaction(
                compare=[tx.value(ip_key.encode()) == endpoint.key.encode()],
                success=[tx.delete(ep_key.encode()), tx.delete(ip_key.encode())],
                failure=[tx.delete(ep_key.encode())],
            ),
        )
        self._owned.pop(endpoint.key, None)

    # ----------------------------------------------------------------- reading

    async def snapshot(self) -> Snapshot:
        result = await self._call("list", lambda: self.client.get_prefix(self._config.prefix.encode()))
        facts: list[Fact] = []
        marker = self._layout.generation().encode()
        for kv in result:
            if kv.key == marker:
                # The generation the watch from this snapshot starts in, if it has none yet.
                self._generation = self._generation or kv.value
                continue
            fact = self._decoder.put(kv.key.decode(errors="replace"), kv.value)
            if fact is not None:
                facts.append(fact)
        self._cluster_id = self._cluster_id or int(result.header.cluster_id)
        return Snapshot(facts=facts, revision=int(result.header.revision))

    async def ensure_session(self) -> None:
        await self._refresh_or_renew()

    async def _data_lost(self, revision: int) -> Snapshot | None:
        """After an interruption: a snapshot marked `data_lost` if the server is not the one
        we watched (another cluster ID: wiped and re-initialised, or restored from a backup)
        or its revision went back below what we saw (an older backup); else None."""
        known = self._cluster_id
        result = await self._call("list", lambda: self.client.get_prefix(self._config.prefix.encode()))
        cluster, now = int(result.header.cluster_id), int(result.header.revision)
        marker = self._layout.generation().encode()
        listed = next((kv.value for kv in result if kv.key == marker), None)
        generation = listed if listed is not None else await self._read_generation()
        if known and cluster != known:
            why = f"etcd cluster ID changed from {known:x} to {cluster:x}"
        elif now < revision:
            why = f"etcd revision went back from {revision} to {now}"
        elif self._generation is not None and generation != self._generation:
            why = f"etcd generation marker {marker.decode()} is gone or made anew"
        else:
            self._generation = generation
            return None
        self._cluster_id, self._generation = cluster, generation
        facts = [f for kv in result if (f := self._decoder.put(kv.key.decode(errors="replace"), kv.value))]
        return Snapshot(facts=facts, revision=now, data_lost=why)

    async def _read_generation(self) -> bytes:
        """The token in the prefix's generation marker, made now if there is none
        (two watchers making it at once: one create wins, and both read its token)."""
        key = self._layout.generation().encode()
        tx = self.client.transactions
        token = secrets.token_hex(8).encode()
        ok, responses = await self._call(
            "txn",
            lambda: self.client.transaction(
                compare=[tx.create(key) == 0], success=[tx.put(key, token)], failure=[tx.get(key)]
            ),
        )
        if ok:
            return token
        held = _txn_values(responses, 0)
        if not held:
            raise StoreUnavailable("etcd: generation marker vanished while made")
        return held[0]

    async def watch(self, after_revision: int) -> AsyncIterator[Changes | Snapshot]:
        revision = after_revision
        backoff = Backoff()
        interrupted = False
        while True:
            watching = self._client
            try:
                if self._generation is None:  # not in the snapshot (nobody made it yet): make it
                    self._generation = await self._read_generation()
                if interrupted:
                    lost = await self._data_lost(revision)
                    interrupted = False
                    if lost is not None:
                        log.warning("%s: the server lost its data", lost.data_lost)
                        revision = lost.revision
                        yield lost
                async for response in self._responses(revision + 1):
                    backoff.reset()
                    self._health.set(True)
                    # etcd never splits one revision across responses (no `fragment`):
                    # resuming after the last event's revision loses nothing.
                    revision = int(response.events[-1].kv.mod_revision)
                    facts = self._response_facts(response.events)
                    if facts:
                        yield Changes(facts, revision)
                # The stream ended without an error: treat as a disconnect.
                raise aetcd.ConnectionFailedError("watch stream ended")
            except aetcd.RevisionCompactedError:
                log.warning("etcd history compacted past revision %d: re-listing", revision)
                snap = await retry_while_unavailable(self.snapshot)
                revision = snap.revision
                yield snap
            except aetcd.exceptions.UnauthenticatedError:
                log.info("etcd auth token expired: authenticating again")
                try:
                    await self._reconnect()
                except StoreError as exc:
                    log.warning("etcd watch: %s", exc)
                    await backoff.wait()
            except (*_UNREACHABLE, StoreUnavailable) as exc:
                self._health.set(False)
                interrupted = True
                await self._fail_over(watching)
                log.warning(
                    "etcd watch interrupted (%s); resuming after revision %d",
                    first_line(exc),
                    revision,
                )
                await backoff.wait()

    async def _responses(self, start_revision: int) -> AsyncGenerator[Any, None]:
        """The watch responses that carry events, from `start_revision` on, as etcd sends them.

        Our own Watch stream rather than aetcd's `watch_prefix`: that one hands out one
        event at a time (an object and a queue hop each), so a response carrying a
        transaction's hundred records became a hundred passes through admission, desired
        state and the reconciler's trigger. Errors come out as aetcd's exceptions.

        Paced (`store.watch_pace`, beside gossip): in a burst, the watch is cancelled for
        the pace and made again after the last revision read, on the same stream (so a
        server restart meanwhile still ends it, and the resume checks for lost data); the
        new watch's first response brings what changed meanwhile, not one per change.
        """
        call = aetcd.rpc.WatchStub(self.client.channel).Watch(metadata=self.client.metadata)
        try:
            watch_id = await self._create_watch(call, start_revision)
            while True:
                response = await _read(call)
                if response is None:
                    return
                if response.events:
                    yield response
                    if self._pace.hold_back():
                        last = int(response.events[-1].kv.mod_revision)
                        async for response in self._cancel_watch(call, watch_id):
                            last = int(response.events[-1].kv.mod_revision)
                            yield response
                        await asyncio.sleep(self._pace.interval)
                        watch_id = await self._create_watch(call, last + 1)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                # Its channel was closed under it (another call moved to another member).
                raise aetcd.ConnectionFailedError(f"watch stream cancelled: {exc.details()}") from None
            aetcd.exceptions._handle_exception(exc)  # raises the matching aetcd error
        except asyncio.InvalidStateError:  # the call had ended before the first write
            raise aetcd.ConnectionFailedError("watch stream ended before it started") from None
        finally:
            call.cancel()

    async def _create_watch(self, call: Any, start_revision: int) -> int:
        """Watch the prefix from `start_revision` on `call`: the new watch's ID."""
        prefix = self._config.prefix.encode()
        create = aetcd.rpc.WatchCreateRequest(
            key=prefix, range_end=aetcd.utils.prefix_range_end(prefix), start_revision=start_revision
        )
        # `asyncio.timeout`, not `wait_for`: on Python 3.11 that drops a cancel that comes
        # as the answer does, and the watch would go on reading after its collector stopped.
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await call.write(aetcd.rpc.WatchRequest(create_request=create))
        async with asyncio.timeout(REQUEST_TIMEOUT):
            created = await _read(call)
        if created is None:
            raise aetcd.ConnectionFailedError("watch stream ended as the watch was made")
        return int(created.watch_id)

    async def _cancel_watch(self, call: Any, watch_id: int) -> AsyncGenerator[Any, None]:
        """Cancel watch `watch_id` on `call`: the responses with events etcd sent before
        its answer (they are read, not lost)."""
        cancel = aetcd.rpc.WatchCancelRequest(watch_id=watch_id)
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await call.write(aetcd.rpc.WatchRequest(cancel_request=cancel))
        while True:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response = await _read(call, cancelling=watch_id)
            if response is None:
                raise aetcd.ConnectionFailedError("watch stream ended as the watch was cancelled")
            if response.canceled:
                return
            if response.events:
                yield response

    def _response_facts(self, events: Any) -> list[Fact]:
        """The facts of one response's events, in order. Address and VNI claims (half of
        the events of an endpoint's creation) are dropped by their key, before any decoding."""
        claims, layout = self._claim_prefixes, self._layout
        facts: list[Fact] = []
        report = self._decoder.put
        for event in events:
            kv = event.kv
            raw = kv.key
            if raw.startswith(claims):
                continue
            key = raw.decode(errors="replace")
            if event.type == _DELETE:
                fact = fact_for_delete(layout, key)
            else:
                # Decoded here, not through the decoder (a call less per record of a join);
                # a value that is not a record goes to it to be reported and skipped.
                try:
                    fact = fact_for_put(layout, key, kv.value)
                except InvalidRecord:
                    fact = report(key, kv.value)
            if fact is not None:
                facts.append(fact)
        self._health.count_facts(facts)
        return facts


async def _read(call: Any, *, cancelling: int | None = None) -> Any:
    """The next response of a Watch stream (None: the stream ended), or the error it means.

    `cancelling`: the ID of a watch we asked etcd to cancel, whose `canceled` answer is
    handed back; any other cancellation (a compacted start revision, a server that gave
    up) is an error.
    """
    response = await call.read()
    if response is grpc.aio.EOF:
        return None
    if response.compact_revision:
        raise aetcd.RevisionCompactedError(int(response.compact_revision))
    if response.canceled and not (cancelling is not None and response.watch_id == cancelling):
        raise aetcd.ConnectionFailedError(f"etcd canceled the watch: {response.cancel_reason}")
    return response

class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd over TLS: aetcd itself only builds plaintext gRPC channels.

    Same steps as aetcd's own connect (channel, optional authentication,
    stubs, watcher), with a secure channel. Pinned to aetcd 1.0's attributes.
    """

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", self._credentials, options=list(self._options.items())
        )
        rpc = aetcd.rpc
        if self._username is not None and self._password is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            try:
                response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise aetcd.exceptions.UnauthenticatedError(exc.details()) from None
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise aetcd.ConnectionFailedError(exc.details()) from None
                raise aetcd.ClientError(exc.details()) from None
            self.metadata = (("token", response.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def _tls_credentials(config: StoreConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials from store.tls_ca / tls_cert / tls_key, or None for plaintext."""
    if config.scheme != "etcds" and not config.tls_ca and not config.tls_cert:
        return None

    def read(path: str | None, key: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise StoreError(f"{key}: cannot read {path}: {exc.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(config.tls_ca, "store.tls_ca"),
        private_key=read(config.tls_key, "store.tls_key"),
        certificate_chain=read(config.tls_cert, "store.tls_cert"),
    )


def _looks_like_tls(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ("ssl", "tls", "handshake", "certificate", "tsi_"))


def _txn_values(responses: list[Any], index: int) -> list[bytes]:
    """Values of the index-th `get` in a failed transaction's responses."""
    try:
        return [value for value, _meta in responses[index]]
    except (IndexError, TypeError, ValueError):
        return []


async def _close_quietly(client: aetcd.Client) -> None:
    try:
        await client.close()
    except Exception as exc:  # closing a broken channel must not mask the real error
        log.debug("closing etcd client: %s", exc)
