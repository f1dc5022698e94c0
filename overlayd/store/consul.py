"""Consul backend, spoken over Consul's HTTP API with aiohttp.

Why not py-consul: its asyncio client is a thin, little-maintained layer over
the same HTTP calls, without types and without the transaction and blocking
query details we need. aiohttp already ships with the daemon (status server),
so a small typed client of our own costs no new dependency and lets us map
every status code to our errors ourselves.

What Consul really does, and how this module answers (see BACKENDS.md):

- Owned records (node, endpoints, IP claims) are held by the node's session:
  TTL (Consul refuses < 10 s, so `lease_ttl` is raised to 10), Behavior
  "delete", LockDelay "0s" (the default 15 s makes `acquire` fail for a new
  session after the old one ended) and NodeChecks [] (a pure heartbeat, not
  tied to gossip health). Renewed every TTL/3; a dead owner's keys go after
  up to 2x TTL. A renewal answered 404 means the session is gone: we create a
  new one and re-acquire every owned key (an IP claim only if it is free or
  still ours).
- Only keys written with a session lock die with it, and `acquire` cannot be
  combined with `cas`: every write of owned keys is one `/v1/txn` holding
  guards (check-not-exists / check-index / delete-cas) and `lock` ops. A
  failed op rolls the whole transaction back (409) and names its OpIndex.
- Networks and VNI claims are created together with `cas` index 0 (create
  only if absent), so two hosts never get the same name or VNI.
- Watches are blocking queries on the prefix (`?index=N&wait=`), asked for
  its first level of keys only, so an idle watch costs a few bytes. Consul has
  no change feed, and only a listing with values (`?recurse`) carries each
  key's ModifyIndex; re-listing the whole prefix on every change cost
  O(all records) per change. So when the index moves the watch re-lists only
  the units that moved (networks/, nodes/, each network's endpoints/<net>/;
  never the claims under vni/ and ipam/), decodes only the values whose
  ModifyIndex changed, and yields what changed (store/consultree.py says how
  it tells which units moved). Several changes to one key between two
  listings arrive as the last one. An index that goes backwards (or is 0)
  means the server lost its state (a dev agent restart drops everything): we
  yield a Snapshot; the first-level index is read again before a round's
  deletions are handed over, so a restart in the middle of a round is not
  taken for deletions. An empty prefix answers 404 with a valid index.
- The index alone misses a loss when the emptied server has been written to
  past our index before the watch looks again (daemons re-publishing after a
  wipe do that within milliseconds). So the watch keeps a marker,
  `<prefix>generation`, holding a random token: created if absent (cas 0),
  read when a watch starts and again before any round hands over deletions.
  Gone or holding another token means the data we watched is not there any
  more: the round becomes a Snapshot marked data_lost, and the watch adopts
  the new generation (creating it if no one has yet).
- Keys are stored without the prefix's leading "/" (Consul paths cannot
  start with one); values are base64 in JSON. Limits: 512 KiB per value, 64
  operations per transaction.
- The ACL token (`store.token`) goes in the X-Consul-Token header and is never
  logged. `consuls://` (or `store.tls_ca`) speaks HTTPS, verifying the server
  against `store.tls_ca` (default: the system's CAs); `store.tls_cert` and
  `store.tls_key` add a client certificate for `verify_incoming` servers. A
  TLS failure is a StoreError at once, not "unreachable, retrying".
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

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
    RoundPace,
    SessionFile,
    first_line,
    renew_interval,
    republish,
    retry_while_unavailable,
)
from overlayd.store.consultree import SPLIT, Diff, Listing, Mirror, Round, is_folder, unit_of
from overlayd.store.keys import KeyLayout, encode, fact_for_delete
from overlayd.util.metrics import Metrics

log = logging.getLogger(__name__)

# Seconds a blocking query may hang (Consul adds up to wait/16 of jitter). It
# also bounds how long a watch can miss a server that restarted empty between
# two queries: such a server holds a query for an index it never reached.
_WATCH_WAIT = 5
_MIN_TTL = 10  # Consul refuses shorter session TTLs
_MAX_VALUE = 512 * 1024
_MAX_TXN_OPS = 64
# Words of a 500 that a server says while it starts, stops or changes leader ("No
# cluster leader", "rpc error ...", "raft is already shutdown" as a write races a
# stop, "leadership lost while committing log", "timed out enqueuing operation"):
# the request may work on a retry, so they mean "unavailable", not "refused".
_PASSING_500 = ("leader", "rpc error", "shutdown", "timed out")
_CAS_ATTEMPTS = 5  # re-read and retry a guarded write this often when it loses a race
_BASELINES = 4  # recent snapshots remembered so watch() can diff from their index
# A watch away longer than this lists every unit: Consul forgets a deletion's
# tombstone after about 15 minutes, and then a unit's index need not move for it.
_FULL_AFTER = 60.0
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# Errors that mean "the server is not reachable right now" rather than "no".
_UNREACHABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class _Entry:
    """One key as Consul lists it (key without the leading '/')."""

    key: str
    value: bytes
    modify_index: int
    session: str | None


@dataclass(frozen=True)
class _Response:
    status: int
    body: Any
    index: int


class _TxnFailed(Exception):
    """A transaction rolled back (409): the failed ops' indexes and Consul's reasons."""

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors.values()))


class ConsulStore(Store):
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
        self._cprefix = self._ckey(config.prefix)  # the prefix as Consul stores keys
        self._session_file = SessionFile(state_dir, "consul-session")
        self._health = Health("consul", metrics=metrics, log=log)
        self._decoder = RecordDecoder(self._layout, metrics=metrics, on_invalid=on_invalid, log=log)
        self._on_invalid = on_invalid
        self._ttl = max(config.lease_ttl, _MIN_TTL)
        self._http: aiohttp.ClientSession | None = None
        self._base = ""
        self._session_id: str | None = None
        self._session_lock = asyncio.Lock()
        # Set when a write finds the session gone: keep_session renews at once.
        self._session_suspect = asyncio.Event()
        # Everything this node owns, as last published: re-acquired on a new session.
        self._node: Node | None = None
        self._owned: dict[str, Endpoint] = {}
        self._writes = EndpointWrites(self._owned)
        # Endpoint key -> the ModifyIndex our last write gave its IP claim.
        self._claim_index: dict[str, int] = {}
        # index -> {key: ModifyIndex} of recent snapshots, the base a watch diffs from.
        self._baselines: OrderedDict[int, dict[str, int]] = OrderedDict()
        # The token in `<prefix>generation` when the watch last read it (None: not yet).
        self._generation: str | None = None

    # ----------------------------------------------------------------- plumbing

    @property
    def healthy(self) -> bool:
        return self._health.up

    def _ckey(self, key: str) -> str:
        """Our key (starts with '/') as Consul stores it."""
        return key.lstrip("/")

    def _okey(self, ckey: str) -> str:
        return "/" + ckey

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        timeout: float = REQUEST_TIMEOUT,
        expect: tuple[int, ...] = (200,),
    ) -> _Response:
        """One HTTP exchange; statuses outside `expect` become StoreError/StoreUnavailable."""
        if self._http is None:
            raise StoreUnavailable("consul client is not connected")
        try:
            async with self._http.request(
                method,
                self._base + path,
                params=params,
                data=json.dumps(body) if body is not None else None,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                raw = await response.read()
                index = _int(response.headers.get("X-Consul-Index"))
                status = response.status
                is_json = response.content_type == "application/json"
        except aiohttp.ClientSSLError as exc:
            # A wrong CA or certificate does not heal by retrying: say so at once.
            self._health.set(False)
            self._health.count_error(operation)
            raise StoreError(
                f"consul at {self._config.url}: TLS failed: {first_line(exc)} (check store.tls_ca)"
            ) from None
        except _UNREACHABLE as exc:
            self._health.set(False)
            self._health.count_error(operation)
            raise StoreUnavailable(
                f"consul at {self._config.url} is unreachable: {first_line(exc)}"
            ) from None
        if status in expect:
            self._health.set(True)
            parsed: Any = None
            # Errors Consul expects callers to handle (404, 409, 500) may be plain text.
            if raw and is_json:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    raise StoreError(f"consul {operation}: invalid JSON in the answer") from None
            return _Response(status, parsed, index)
        self._health.count_error(operation)
        text = first_line(raw.decode(errors="replace")) or f"HTTP {status}"
        if status == 403:
            self._health.set(True)
            raise StoreError(f"consul {operation} denied: {text} (check store.token)")
        if passing_failure(status, text):
            self._health.set(False)
            raise StoreUnavailable(f"consul at {self._config.url} cannot serve {operation}: {text}")
        self._health.set(True)
        raise StoreError(f"consul {operation} failed: {text}")

    async def connect(self) -> None:
        headers = {"X-Consul-Token": self._config.token} if self._config.token else {}
        # No gzip: aiohttp asks for it by default, and Consul then compresses every
        # listing. The HTTP API is normally the host's own agent (or a server on the
        # LAN): compressing a 1,000-endpoint listing cost the server ~11 ms and us
        # ~2 ms per change, for no transfer worth saving. Small answers are never
        # compressed anyway.
        headers["Accept-Encoding"] = "identity"
        context = _ssl_context(self._config)
        scheme = "https" if context is not None else "http"
        errors = []
        for endpoint in self._config.endpoints:
            connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
            http = aiohttp.ClientSession(headers=headers, connector=connector)
            self._http, self._base = http, f"{scheme}://{endpoint.host}:{endpoint.port}"
            try:
                leader = await self._request("connect", "GET", "/v1/status/leader")
                if not leader.body:
                    raise StoreUnavailable("no cluster leader")
                # With ACLs on, an unknown token is refused here (403), not at the first write.
                await self._request(
                    "connect",
                    "GET",
                    self._kv_path(self._config.prefix),
                    params={"keys": "", "separator": "/"},
                    expect=(200, 404),
                )
            except StoreUnavailable as exc:
                errors.append(f"{endpoint.host}:{endpoint.port}: {_strip_url(exc)}")
                await http.close()
                self._http = None
                continue
            except StoreError:
                await http.close()
                self._http = None
                self._health.set(False)
                raise
            return
        self._health.set(False)
        raise StoreUnavailable(f"cannot reach consul ({'; '.join(errors)})")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ----------------------------------------------------------------- KV helpers

    def _kv_path(self, key: str) -> str:
        return "/v1/kv/" + quote(self._ckey(key), safe="/")

    async def _get(self, key: str) -> _Entry | None:
        response = await self._request("get", "GET", self._kv_path(key), expect=(200, 404))
        if response.status == 404 or not response.body:
            return None
        return _entry(response.body[0])

    async def _list(self) -> tuple[list[dict[str, Any]], int]:
        """Everything under the prefix (Consul's entries, values still base64) and its index."""
        response = await self._request(
            "list",
            "GET",
            self._kv_path(self._config.prefix),
            params={"recurse": ""},
            expect=(200, 404),
        )
        # 404: the prefix is empty; its index is still valid.
        return list(response.body or []), response.index

    async def _keys(self, operation: str, path: str, index: int | None = None) -> _Response:
        """The keys under `path` up to the next '/', and the index of all below `path`.

        With `index`, a blocking query: it answers when the index passes it (or
        `wait` runs out). The index is the same as a full listing's, at a few
        bytes per first-level name.
        """
        params = {"keys": "", "separator": "/"}
        timeout = REQUEST_TIMEOUT
        if index is not None:
            params.update(index=str(index), wait=f"{_WATCH_WAIT}s")
            timeout += _WATCH_WAIT * (1 + 1 / 16)
        return await self._request(
            operation, "GET", self._kv_path(path), params=params, timeout=timeout, expect=(200, 404)
        )

    async def _read_unit(self, path: str, folder: bool) -> Listing:
        """One unit of the watch: a folder with every key below it, or a single key."""
        response = await self._request(
            "list", "GET", self._kv_path(path), params={"recurse": ""} if folder else None, expect=(200, 404)
        )
        return Listing(response.index, list(response.body or []))

    async def _txn(self, operation: str, ops: list[dict[str, Any]]) -> dict[str, int]:
        """Run KV ops atomically; _TxnFailed when Consul rolled them back.

        Returns the ModifyIndex of each key a write op left in place (Consul
        answers the writes with their entries; checks and deletions give none).
        """
        if len(ops) > _MAX_TXN_OPS:
            raise StoreError(f"consul {operation}: {len(ops)} ops exceed the {_MAX_TXN_OPS} per transaction")
        response = await self._request(
            operation, "PUT", "/v1/txn", body=[{"KV": op} for op in ops], expect=(200, 409)
        )
        if response.status == 409:
            errors = (response.body or {}).get("Errors") or []
            raise _TxnFailed({int(e.get("OpIndex", -1)): str(e.get("What", "")) for e in errors})
        written: dict[str, int] = {}
        for result in (response.body or {}).get("Results") or []:
            entry = result.get("KV") if isinstance(result, dict) else None
            if isinstance(entry, dict) and "Key" in entry:
                written[str(entry["Key"])] = _int(str(entry.get("ModifyIndex", 0)))
        return written

    def _value_op(self, verb: str, key: str, value: bytes, **extra: Any) -> dict[str, Any]:
        if len(value) > _MAX_VALUE:
            raise StoreError(f"{key}: value of {len(value)} bytes exceeds Consul's {_MAX_VALUE}")
        return {"Verb": verb, "Key": self._ckey(key), "Value": base64.b64encode(value).decode(), **extra}

    def _op(self, verb: str, key: str, **extra: Any) -> dict[str, Any]:
        return {"Verb": verb, "Key": self._ckey(key), **extra}

    def _guard(self, key: str, current: _Entry | None) -> dict[str, Any]:
        """Make sure `key` is as we last read it, and free for our session's lock.

        A key held by another session (our own previous life, after a restart
        without the saved session) is deleted first, then locked anew.
        """
        if current is None:
            return self._op("check-not-exists", key)
        if current.session == self._session_id:
            return self._op("check-index", key, Index=current.modify_index)
        return self._op("delete-cas", key, Index=current.modify_index)

    def _lock_op(self, key: str, value: bytes) -> dict[str, Any]:
        return self._value_op("lock", key, value, Session=self._require_session())

    def _lock_failed(self, exc: _TxnFailed, lock_indexes: range) -> StoreError:
        """A failed `lock`: our session is likely gone. Ask keep_session to look now."""
        reasons = "; ".join(exc.errors[i] for i in lock_indexes if i in exc.errors)
        self._session_suspect.set()
        return StoreError(f"consul session lost ({reasons or exc}); records are re-published when renewed")

    # ----------------------------------------------------------------- session

    async def open_session(self, node: Node) -> None:
        async with self._session_lock:
            saved = self._load_session_id()
            if saved is not None and await self._session_alive(saved):
                self._session_id = saved
                log.info("resumed consul session %s", saved)
            else:
                await self._new_session(node.name)
        self._node = node
        await self._publish_node()

    async def _session_alive(self, session_id: str) -> bool:
        # 404: gone. Any other failure (no leader, servers unreachable) raises:
        # the session may well be alive, and replacing it would churn every owned key.
        response = await self._request(
            "session", "PUT", f"/v1/session/renew/{quote(session_id, safe='')}", expect=(200, 404)
        )
        return response.status == 200

    async def _new_session(self, node_name: str) -> None:
        response = await self._request(
            "session",
            "PUT",
            "/v1/session/create",
            body={
                "Name": f"overlayd {node_name}",
                "TTL": f"{self._ttl}s",
                "Behavior": "delete",
                "LockDelay": "0s",
                "NodeChecks": [],
            },
        )
        session_id = (response.body or {}).get("ID")
        if not isinstance(session_id, str):
            raise StoreError("consul session create: no ID in the answer")
        self._session_id = session_id
        self._save_session_id(session_id)
        log.info("created consul session %s (ttl %ss)", session_id, self._ttl)

    async def _publish_node(self) -> None:
        if self._node is None:
            return
        key = self._layout.node(self._node.name)
        value = encode(self._node)
        for _ in range(_CAS_ATTEMPTS):
            current = await self._get(key)
            try:
                await self._txn("put", [self._guard(key, current), self._lock_op(key, value)])
                return
            except _TxnFailed as exc:
                if 1 in exc.errors:
                    raise self._lock_failed(exc, range(1, 2)) from None
        raise StoreError(f"node record {self._node.name} kept changing while being published")

    async def keep_session(self) -> None:
        interval = renew_interval(self._ttl)
        while True:
            try:
                # Not `wait_for`: on Python 3.11 it drops a cancel that comes as the event is
                # set, and this loop would run on past the daemon's stop.
                async with asyncio.timeout(interval):
                    await self._session_suspect.wait()
            except TimeoutError:
                pass
            self._session_suspect.clear()
            try:
                await self._renew_or_replace()
            except StoreError as exc:
                log.warning("consul session keepalive failed: %s", exc)
                interval = renew_interval(self._ttl, failing=True)
            else:
                interval = renew_interval(self._ttl)

    async def ensure_session(self) -> None:
        await self._renew_or_replace()

    async def _renew_or_replace(self) -> None:
        async with self._session_lock:
            if self._session_id is not None and await self._session_alive(self._session_id):
                return
            if self._node is None:
                return
            log.warning("consul session %s is gone: creating a new one and re-publishing", self._session_id)
            await self._new_session(self._node.name)
            await self._publish_node()
            await republish(self._writes, self._owned, self._put_endpoint, log=log, report=self._on_invalid)

    async def release_session(self) -> None:
        if self._session_id is not None:
            session_id = self._session_id
            await self._request("session", "PUT", f"/v1/session/destroy/{quote(session_id, safe='')}")
            self._session_id = None
            self._owned.clear()
            self._claim_index.clear()
            self._node = None
        self._session_file.remove()

    def _load_session_id(self) -> str | None:
        text = self._session_file.load()
        # Consul answers a malformed ID with 500, not 404: do not even ask.
        return text if text is not None and _UUID.fullmatch(text) else None

    def _save_session_id(self, session_id: str) -> None:
        self._session_file.save(session_id)

    def _require_session(self) -> str:
        if self._session_id is None:
            raise StoreError("no consul session: open_session() first")
        return self._session_id

    # ----------------------------------------------------------------- records

    async def create_network(self, network: Network) -> None:
        net_key = self._layout.network(network.name)
        vni_key = self._layout.vni(network.vni)
        try:
            await self._txn(
                "txn",
                [
                    self._value_op("cas", net_key, encode(network), Index=0),
                    self._value_op("cas", vni_key, network.name.encode(), Index=0),
                ],
            )
        except _TxnFailed as exc:
            if 0 in exc.errors:
                raise AlreadyExists("network name", network.name) from None
            holder = await self._get(vni_key)
            raise AlreadyExists(
                "VNI", str(network.vni), holder.value.decode(errors="replace") if holder else None
            ) from None

    async def delete_network(self, name: str) -> None:
        net_key = self._layout.network(name)
        current = await self._get(net_key)
        if current is None:
            raise NotFoundError(f"network {name} not found")
        ops = [self._op("delete-cas", net_key, Index=current.modify_index)]
        try:
            vni_key: str | None = self._layout.vni(Network.from_dict(json.loads(current.value)).vni)
        except (ValueError, TypeError):
            vni_key = None  # not a valid record: nothing of ours to release
        if vni_key is not None:
            claim = await self._get(vni_key)
            # Release the VNI only if it still names this network.
            if claim is not None and claim.value == name.encode():
                ops.append(self._op("delete-cas", vni_key, Index=claim.modify_index))
        try:
            await self._txn("txn", ops)
        except _TxnFailed:
            raise StoreError(f"network {name} changed while being deleted; try again") from None

    async def create_endpoint(self, endpoint: Endpoint) -> None:
        ep_key = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_key = self._layout.ip_claim(endpoint.network, endpoint.ip)
        try:
            written = await self._txn(
                "txn",
                [
                    self._op("check-not-exists", ep_key),
                    self._op("check-not-exists", ip_key),
                    self._lock_op(ep_key, encode(endpoint)),
                    self._lock_op(ip_key, endpoint.key.encode()),
                ],
            )
        except _TxnFailed as exc:
            if 0 in exc.errors:
                raise AlreadyExists("endpoint name", endpoint.key) from None
            if 1 in exc.errors:
                holder = await self._get(ip_key)
                raise AlreadyExists(
                    "IP", str(endpoint.ip), holder.value.decode(errors="replace") if holder else None
                ) from None
            raise self._lock_failed(exc, range(2, 4)) from None
        self._owned[endpoint.key] = endpoint
        self._remember_claim(endpoint, written.get(self._ckey(ip_key)))

    def _remember_claim(self, endpoint: Endpoint, modify_index: int | None) -> None:
        """The ModifyIndex our write gave the endpoint's IP claim: its delete needs no read then."""
        if modify_index:
            self._claim_index[endpoint.key] = modify_index
        else:
            self._claim_index.pop(endpoint.key, None)

    async def publish_endpoint(self, endpoint: Endpoint) -> None:
        async with self._writes.hold(endpoint.key):
            await self._put_endpoint(endpoint)

    async def _put_endpoint(self, endpoint: Endpoint) -> None:
        ep_key = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_key = self._layout.ip_claim(endpoint.network, endpoint.ip)
        claim = endpoint.key.encode()
        for _ in range(_CAS_ATTEMPTS):
            ep_now, ip_now = await self._get(ep_key), await self._get(ip_key)
            # The claim is ours if it is free or already names this endpoint; if
            # another endpoint took the IP while our session had lapsed, it keeps it.
            if ip_now is not None and ip_now.value != claim:
                raise AlreadyExists("IP", str(endpoint.ip), ip_now.value.decode(errors="replace"))
            try:
                written = await self._txn(
                    "txn",
                    [
                        self._guard(ep_key, ep_now),
                        self._guard(ip_key, ip_now),
                        self._lock_op(ep_key, encode(endpoint)),
                        self._lock_op(ip_key, claim),
                    ],
                )
            except _TxnFailed as exc:
                if 2 in exc.errors or 3 in exc.errors:
                    raise self._lock_failed(exc, range(2, 4)) from None
                continue  # a guard lost a race: read again
            self._owned[endpoint.key] = endpoint
            self._remember_claim(endpoint, written.get(self._ckey(ip_key)))
            return
        raise StoreError(f"endpoint {endpoint.key} kept changing while being published")

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        async with self._writes.hold(endpoint.key):
            await self._delete_endpoint(endpoint)

    async def _delete_endpoint(self, endpoint: Endpoint) -> None:
        ep_key = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_key = self._layout.ip_claim(endpoint.network, endpoint.ip)
        # The claim as our own write left it: if it is still at that index it names this
        # endpoint, so one transaction deletes both, without reading the claim first (a
        # round trip the deletion, and the gossip removal after it, waited for).
        written = self._claim_index.pop(endpoint.key, None)
        if written is not None:
            try:
                await self._txn(
                    "txn", [self._op("delete", ep_key), self._op("delete-cas", ip_key, Index=written)]
                )
            except _TxnFailed:
                pass  # the claim changed since (or is gone): read it, as below
            else:
                self._owned.pop(endpoint.key, None)
                return
        for _ in range(_CAS_ATTEMPTS):
            ops = [self._op("delete", ep_key)]
            # Release the IP only if this endpoint still holds it: never free a
            # claim that someone else took after ours lapsed.
            ip_now = await self._get(ip_key)
            if ip_now is not None and ip_now.value == endpoint.key.encode():
                ops.append(self._op("delete-cas", ip_key, Index=ip_now.modify_index))
            try:
                await self._txn("txn", ops)
            except _TxnFailed:
                continue
            self._owned.pop(endpoint.key, None)
            return
        raise StoreError(f"IP claim of endpoint {endpoint.key} kept changing while being deleted")

    # ----------------------------------------------------------------- reading

    async def snapshot(self) -> Snapshot:
        items, index = await self._list()
        if self._generation is None:  # the generation a watch from this snapshot starts in
            marker = self._ckey(self._layout.generation())
            held = next((item for item in items if item["Key"] == marker), None)
            self._generation = _value(held.get("Value")).decode(errors="replace") if held else None
        self._remember(index, items)
        return Snapshot(facts=self._facts(items), revision=index)

    def _remember(self, index: int, items: list[dict[str, Any]]) -> None:
        self._baselines[index] = self._known(items)
        self._baselines.move_to_end(index)
        while len(self._baselines) > _BASELINES:
            self._baselines.popitem(last=False)

    def _watched(self, key: str) -> bool:
        """Whether a key can state a fact (claims cannot: they are skipped undecoded)."""
        return unit_of(key[len(self._cprefix) :]) is not None

    def _known(self, items: list[dict[str, Any]]) -> dict[str, int]:
        """Key -> ModifyIndex of a listing, claims left out: what a watch diffs from."""
        return {item["Key"]: item.get("ModifyIndex", 0) for item in items if self._watched(item["Key"])}

    def _facts(self, items: list[dict[str, Any]]) -> list[Fact]:
        facts = []
        watched = [item for item in items if self._watched(item["Key"])]
        for item in sorted(watched, key=lambda i: i.get("ModifyIndex", 0)):
            fact = self._decoder.put(self._okey(item["Key"]), _value(item.get("Value")))
            if fact is not None:
                facts.append(fact)
        return facts

    def _changes(self, diff: Diff) -> list[Fact]:
        """A round's diff as facts: deletions, then puts in write order.

        Deletions carry no index, so they cannot be placed among the puts;
        they concern other keys than the puts, so the merged view is the same.
        """
        facts: list[Fact] = []
        for key in diff.gone:
            fact = fact_for_delete(self._layout, self._okey(key))
            if fact is not None:
                self._health.count_event(fact, "delete")
                facts.append(fact)
        for put in diff.puts:
            fact = self._decoder.put(self._okey(put.key), _value(put.value))
            if fact is not None:
                self._health.count_event(fact, "put")
                facts.append(fact)
        return facts

    async def _read_round(self, mirror: Mirror, top: _Response, *, full: bool) -> Round:
        """Read the units that moved (every unit if `full`); the mirror is left as it was."""
        round_ = Round(top=top.index)
        units, split = mirror.top_units(top.body or [])
        round_.present |= units
        if split and len(mirror.known_split_units()) <= 1:
            # One network (or none yet): listing all of endpoints/ is listing that network,
            # which a round that moved it does anyway, and the listing names the units
            # below as well as the keys query would: one request instead of two.
            folder_listing = await self._read_unit(mirror.prefix + SPLIT, True)
            cut = mirror.split_listing(folder_listing)
            round_.present |= set(cut)
            round_.listings.update(cut)
            round_.split_index = folder_listing.index
        elif split:
            folder = await self._keys("watch", mirror.prefix + SPLIT)
            below = mirror.split_units(folder.index, folder.body or [], full=full)
            if below is None:  # nothing moved below endpoints/: its units stay as they are
                round_.present |= mirror.known_split_units()
            else:
                round_.present |= below
                units |= below
                round_.split_index = folder.index
        probe = mirror.to_probe(units, full=full)
        order = mirror.reading_order(units, probe)
        for unit in [unit for unit in order if unit.startswith(SPLIT)]:
            await self._read_if_moved(mirror, round_, unit, probe)
        rest = [unit for unit in order if not unit.startswith(SPLIT)]
        # After the endpoint units, as the reading order wants. networks/ and nodes/ go in
        # one probe: when only endpoints moved (most rounds), neither is read.
        start = mirror.probe_group(rest, full=full)
        if start is not None:
            grouped = await self._keys("watch", mirror.prefix + start)
            if not mirror.group_moved(rest, grouped.index):
                round_.unmoved.update(rest)
                return round_
        for unit in rest:
            await self._read_if_moved(mirror, round_, unit, probe)
        return round_

    async def _read_if_moved(self, mirror: Mirror, round_: Round, unit: str, probe: set[str]) -> None:
        """List `unit` into the round, unless it is one to probe first and the probe says it did not move."""
        if unit in probe and not mirror.surely_moved(unit, round_):
            probed = await self._keys("watch", mirror.prefix + unit.rstrip("/"))
            if not mirror.moved(unit, probed.index):
                round_.unmoved.add(unit)
                return
        round_.listings[unit] = await self._read_unit(mirror.prefix + unit, is_folder(unit))

    async def _lost(self, why: str) -> tuple[Mirror, Snapshot]:
        """The server lost what we watched (`why`): what it holds now, marked data_lost."""
        log.warning("%s: the server lost its state", why)
        items, listed = await self._list()
        return self._mirror(listed, items), Snapshot(self._facts(items), listed, data_lost=why)

    async def _read_generation(self) -> str:
        """The token in the prefix's generation marker, made now if there is none.

        Two watchers making it at once: one create wins (cas 0), and both read its token.
        """
        key = self._layout.generation()
        entry = await self._get(key)
        if entry is None:
            token = secrets.token_hex(8)
            try:
                await self._txn("generation", [self._value_op("cas", key, token.encode(), Index=0)])
                return token
            except _TxnFailed:
                entry = await self._get(key)
                if entry is None:
                    raise StoreUnavailable("consul: generation marker vanished while made") from None
        return entry.value.decode(errors="replace")

    def _generation_lost(self, current: str) -> str | None:
        """Why `current` says the data we watched is gone, or None if it is the generation we saw."""
        seen = self._generation
        if seen is None or seen == current:
            return None
        return (
            f"consul generation marker {self._layout.generation()} is gone or made anew "
            f"(was {seen}, now {current})"
        )

    def _mirror(self, index: int, items: list[dict[str, Any]]) -> Mirror:
        return Mirror(self._cprefix, index, self._known(items))

    async def _advance(self, cursor: _Cursor) -> Changes | Snapshot | None:
        """One step of a watch: wait for the index to move, then read what moved."""
        if cursor.ahead is None:
            # Changes made while we wait out the pace make the query below answer at once.
            await cursor.pace.wait()
        top = cursor.ahead or await self._keys("watch", self._cprefix, cursor.index if cursor.block else None)
        cursor.ahead, cursor.block = None, True
        cursor.seen_now()
        if top.index == 0 or top.index < cursor.index:
            back = f"consul index went back from {cursor.index} to {top.index}"
            return await self._restart(cursor, back, await self._read_generation())
        if cursor.reconnected:
            # A server emptied while we were away may have been written to up to exactly
            # our index (or past it with nothing we held deleted): only the marker tells.
            generation = await self._read_generation()
            why = self._generation_lost(generation)
            if why is not None:
                return await self._restart(cursor, why, generation)
            self._generation, cursor.reconnected = generation, False
        if top.index == cursor.index:
            return None  # `wait` ran out, or woke up with nothing new
        cursor.pace.started()
        round_ = await self._read_round(cursor.mirror, top, full=cursor.full)
        diff = cursor.mirror.diff(round_)
        if diff.gone:
            # Read the index again before deleting anything: a server that lost its
            # state while we read answered for an empty store, and that is no list of
            # deletions. (Puts are real either way; a restart after them is found by
            # the next blocking query, which such a server answers with a lower index.)
            # Listings that answered at the top index or above already say what this
            # check would (`Mirror.gone_at_top`): then it is one request less per deletion.
            check: _Response | None = None
            if not cursor.mirror.gone_at_top(round_, diff.gone):
                check = await self._keys("watch", self._cprefix)
                if check.index == 0 or check.index < top.index:
                    cursor.index, cursor.ahead = top.index, check  # the next step finds the index gone back
                    return None
            # An emptied server written to past our index since: its index did not go
            # back, but the generation marker is gone or new.
            generation = await self._read_generation()
            why = self._generation_lost(generation)
            if why is not None:
                return await self._restart(cursor, why, generation)
            self._generation = generation
            # Written to while we read: go on at once, without a blocking query.
            cursor.ahead = check if check is not None and check.index > top.index else None
        cursor.index = top.index
        cursor.mirror.commit(round_, diff)
        cursor.full = False
        facts = self._changes(diff)
        return Changes(facts, top.index) if facts else None

    async def _restart(self, cursor: _Cursor, why: str, generation: str) -> Snapshot:
        """Start the cursor over from what the server holds now, handed over as data_lost.

        The new `generation` is taken in only here, with the snapshot that reports the
        loss: if reading fails first, the next round finds the same loss again.
        """
        cursor.mirror, snapshot = await self._lost(why)
        cursor.index, cursor.ahead, cursor.reconnected = snapshot.revision, None, False
        self._generation = generation
        return snapshot

    async def watch(self, after_revision: int) -> AsyncIterator[Changes | Snapshot]:
        if self._generation is None:  # not in the snapshot (nobody made it yet): make it
            self._generation = await retry_while_unavailable(self._read_generation)
        pace = RoundPace(self._config.watch_pace)
        baseline = self._baselines.get(after_revision)
        if baseline is not None:
            cursor = _Cursor(after_revision, Mirror(self._cprefix, after_revision, baseline), pace=pace)
        else:
            # Not from one of our snapshots: nothing to diff against unless the
            # prefix is still exactly at that index.
            items, now = await retry_while_unavailable(self._list)
            cursor = _Cursor(now, self._mirror(now, items), pace=pace)
            if now != after_revision:
                yield Snapshot(self._facts(items), now)
        backoff = Backoff()
        while True:
            try:
                out = await self._advance(cursor)
            except StoreUnavailable as exc:
                log.warning(
                    "consul watch interrupted (%s); resuming after index %d", _strip_url(exc), cursor.index
                )
                cursor.block, cursor.full, cursor.reconnected = False, True, True
                await backoff.wait()
                continue
            backoff.reset()
            if out is not None:
                yield out


@dataclass
class _Cursor:
    """Where a watch stands: the index it has delivered up to and the mirror of what it delivered."""

    index: int
    mirror: Mirror
    # False after a disconnect: read without blocking first, as a restarted server's
    # index may be below ours and it would hold a blocking query all `wait`.
    block: bool = True
    # List every unit, trusting no index that did not move: in the first round, after
    # a disconnect, and after a gap longer than `_FULL_AFTER`.
    full: bool = True
    # Set by a disconnect: the next round reads the generation marker whatever the index says.
    reconnected: bool = False
    ahead: _Response | None = None  # a first-level listing past `index`, read after the last round
    pace: RoundPace = field(default_factory=lambda: RoundPace(0.0))
    last_seen: float = field(default_factory=time.monotonic)

    def seen_now(self) -> None:
        now = time.monotonic()
        self.full = self.full or now - self.last_seen > _FULL_AFTER
        self.last_seen = now


def passing_failure(status: int, text: str) -> bool:
    """Whether a failed answer is the server (or its cluster) passing through a bad moment."""
    return status > 500 or (status == 500 and any(word in text for word in _PASSING_500))


def _ssl_context(config: StoreConfig) -> ssl.SSLContext | None:
    """HTTPS for `consuls://` or when a CA is configured; None for plain HTTP."""
    if config.scheme != "consuls" and not config.tls_ca and not config.tls_cert:
        return None
    try:
        # No tls_ca: the system's trusted CAs.
        context = ssl.create_default_context(cafile=config.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"store.tls_ca: cannot load {config.tls_ca}: {first_line(exc)}") from None
    if config.tls_cert:
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(
                f"store.tls_cert: cannot load {config.tls_cert} with its key: {first_line(exc)}"
            ) from None
    return context


def _value(raw: str | None) -> bytes:
    return base64.b64decode(raw) if raw else b""


def _entry(item: dict[str, Any]) -> _Entry:
    raw = item.get("Value")
    return _Entry(
        key=str(item["Key"]),
        value=_value(raw),
        modify_index=int(item.get("ModifyIndex", 0)),
        session=item.get("Session") or None,
    )


def _int(text: str | None) -> int:
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return 0


def _strip_url(exc: BaseException) -> str:
    """The reason of a StoreUnavailable without the 'consul at URL is unreachable:' lead."""
    text = str(exc)
    _, sep, reason = text.partition(" is unreachable: ")
    return reason if sep else text
