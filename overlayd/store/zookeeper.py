"""ZooKeeper backend (kazoo).

The key layout of `keys.py` maps one to one onto znode paths under the URL's
chroot: `zookeeper://h1:2181,h2:2181/ovl` with prefix `/overlayd/v1/` keeps
`/ovl/overlayd/v1/networks/demo`. Records a node owns (its node record, its
endpoints and their IP claims) are ephemeral znodes of the node's session;
compare-and-set is "create fails if the znode exists" inside a transaction,
or a version check.

What ZooKeeper and kazoo really do, and how this module answers (BACKENDS.md):

- kazoo runs its connection and callbacks on threads of its own. Requests go
  through its `*_async` calls; completions and watch events are handed to the
  event loop with `call_soon_threadsafe`, straight from kazoo's connection
  thread (`_Handler`: not through kazoo's worker threads, a second hop). Requests are refused at once while
  disconnected (kazoo would queue them until reconnected).
- SUSPENDED (disconnected, session alive) changes nothing we own. LOST
  (session expired) means the server deleted our ephemeral znodes: kazoo
  reconnects with a new session and `keep_session` re-publishes the node and
  its endpoints (an IP claim only if it is free or already names ours).
- The session id and password are saved in the state directory; a restarted
  daemon resumes the session, so its znodes never blink out. `close()` drops
  the connection without ending the session for the same reason.
- kazoo 2.11 has only one-shot watches, dropped on disconnect. `watch()`
  keeps a mirror of every record znode (`zktree.py`, pure): each event re-reads the znode or
  directory it names (re-arming its watch; a record's deletion lists its directory, as the
  directory's own event does: one listing for both) and the difference to the mirror
  becomes facts, ordered by zxid (the revision). After a reconnect the whole
  tree is re-read and diffed the same way, so changes made while the watch
  was away are delivered too. Several changes to one znode between two reads
  arrive as one.
- Data over about 1 MiB makes the server drop the connection without a word:
  sizes are checked before writing.
- Digest auth: credentials go in `auth_data` and every znode we create gets a
  digest ACL for that user, so nothing else can change them.
- TLS when `store.tls_ca` or `store.tls_cert` is set (kazoo's `use_ssl`,
  verifying the certificate and host name). kazoo retries a failed handshake
  until the connect times out, so one direct handshake then says why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    SessionExpiredError,
)
from kazoo.handlers.threading import AsyncResult, KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.states import EventType, WatchedEvent, ZnodeStat
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from overlayd.core.config import StoreConfig
from overlayd.core.model import Endpoint, Network, Node
from overlayd.core.view import Fact, NetworkPut
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
    republish,
)
from overlayd.store.keys import KeyLayout, encode, fact_for_delete
from overlayd.store.zktree import Change, Dirs, Gone, Mirror, Rec
from overlayd.util.metrics import Metrics

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 5.0
# jute.maxbuffer is 1 MiB for a whole request; a larger one makes the server
# drop the connection. Leave room for the path and the rest of a transaction.
MAX_VALUE_BYTES = 1_000_000
_UNREACHABLE = (
    ConnectionLoss,
    SessionExpiredError,
    ConnectionClosedError,
    OperationTimeoutError,
    KazooTimeoutError,
    TimeoutError,
)
# kazoo's own log, filtered: its lowest level ("BLATHER") dumps whole requests, credentials included.
_kazoo_log = logging.getLogger(f"{__name__}.kazoo")
_kazoo_log.setLevel(logging.INFO)


@dataclass(frozen=True)
class _Tree:
    records: dict[str, Rec]
    revision: int


class ZooKeeperStore(Store):
    def __init__(
        self,
        config: StoreConfig,
        *,
        state_dir: str,
        metrics: Metrics | None = None,
        on_invalid: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._layout = KeyLayout(config.chroot + config.prefix)
        self._base = (config.chroot + config.prefix).rstrip("/")
        self._dirs = Dirs(self._base)
        # Holds the session's password: readable by root only.
        self._session_file = SessionFile(state_dir, "zookeeper-session", private=True)
        self._health = Health("zookeeper", metrics=metrics, log=log)
        self._decoder = RecordDecoder(self._layout, metrics=metrics, on_invalid=on_invalid, log=log)
        self._on_invalid = on_invalid
        self._hosts = ",".join(f"{e.host}:{e.port}" for e in config.endpoints)
        self._client: KazooClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        # Set when the server gave us a new session: owned records must be re-published.
        self._session_replaced = asyncio.Event()
        self._session_id: int | None = None
        self._disconnected_at: float | None = None  # monotonic; None while connected
        # The prefix root's creation (zxid, time in ms) as first read: another one means
        # the tree was made anew (the server lost its data, or is an older backup). The
        # time too: a new server numbers its first writes as the old one did.
        self._base_made: tuple[int, int] = (0, 0)
        self._owns_session = False  # resumed or opened: close() must not end it
        self._node: Node | None = None
        self._owned: dict[str, Endpoint] = {}
        self._writes = EndpointWrites(self._owned)
        self._session_lock = asyncio.Lock()
        self._acl: list[Any] | None = None
        if config.username is not None:
            self._acl = [make_digest_acl(config.username, config.password or "", all=True)]
        self._tls_context: ssl.SSLContext | None = None
        # Trees read by snapshot(), by revision: watch(revision) diffs against the one it names.
        self._snapshots: dict[int, dict[str, Rec]] = {}

    # ----------------------------------------------------------------- plumbing

    @property
    def healthy(self) -> bool:
        return self._health.up

    @property
    def client(self) -> KazooClient:
        if self._client is None:
            raise StoreUnavailable("zookeeper client is not connected")
        return self._client

    async def _call(
        self,
        operation: str,
        start: Callable[[KazooClient], Any],
        expect: tuple[type[KazooException], ...] = (),
    ) -> Any:
        """Run one kazoo async request; errors in `expect` pass through, others become StoreErrors."""
        client = self.client
        # kazoo queues a request made while it reconnects and sends it later: one that
        # timed out here could still land. Refuse at once instead; kazoo's own flag is
        # the fresher one (ours follows it through the event loop).
        if not self._connected.is_set() or not client.connected:
            self._health.count_error(operation)
            raise StoreUnavailable(f"zookeeper at {self._hosts} is unreachable (reconnecting)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # A timer of our own rather than `wait_for`: no second future and task step per
        # request, on the path of every watch event; and on Python 3.11 `wait_for` returns
        # an answer that came in the same loop iteration as a cancel and drops the cancel,
        # so a watch stopped at that moment ran on for ever (a test hung on `stop()`).
        timer = loop.call_later(REQUEST_TIMEOUT, _expire, future)
        try:
            start(client).rawlink(_Handoff(loop, functools.partial(_settle, future)))
            return await future
        except expect:
            raise
        except _UNREACHABLE as exc:
            self._health.count_error(operation)
            raise StoreUnavailable(f"zookeeper at {self._hosts} is unreachable: {first_line(exc)}") from None
        except NoAuthError:
            self._health.count_error(operation)
            raise StoreError(
                f"zookeeper {operation} refused: no permission (check store.username and store.password)"
            ) from None
        except KazooException as exc:
            self._health.count_error(operation)
            raise StoreError(f"zookeeper {operation} failed: {first_line(exc)}") from None
        finally:
            timer.cancel()

    async def _get(self, path: str, watch: Callable[[WatchedEvent], None] | None = None) -> Rec | None:
        try:
            data, stat = await self._call("get", lambda c: c.get_async(path, watch=watch), (NoNodeError,))
        except NoNodeError:
            return None
        return Rec(int(stat.mzxid), bytes(data or b""))

    async def _get_stat(self, path: str) -> tuple[bytes, ZnodeStat] | None:
        try:
            data, stat = await self._call("get", lambda c: c.get_async(path), (NoNodeError,))
        except NoNodeError:
            return None
        return bytes(data or b""), stat

    async def _commit(self, operation: str, build: Callable[[Any], None]) -> list[Any]:
        """Commit a transaction; the per-operation results (exceptions in place of failures)."""

        def start(client: KazooClient) -> Any:
            txn = client.transaction()
            build(txn)
            return txn.commit_async()

        results: list[Any] = await self._call(operation, start)
        return results

    # ----------------------------------------------------------------- connection

    async def connect(self) -> None:
        if self._client is not None:
            # Called again (the daemon retries until everything worked): keep a live client.
            if self._connected.is_set():
                await self._ensure_dirs()
                return
            await self.close()
        self._loop = asyncio.get_running_loop()
        self._tls_context = _tls_context(self._config)
        saved = self._load_session()
        auth = None
        if self._config.username is not None:
            auth = [("digest", f"{self._config.username}:{self._config.password or ''}")]
        client = KazooClient(
            hosts=self._hosts,
            handler=_Handler(),
            timeout=float(self._config.lease_ttl),
            client_id=saved,
            auth_data=auth,
            default_acl=self._acl,
            # Reconnect forever, quickly: the session is ticking while we are away.
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
            logger=_kazoo_log,
            **self._tls_options(),
        )
        client.add_listener(self._listener)
        try:
            await asyncio.to_thread(client.start, _CONNECT_TIMEOUT)
        except (KazooTimeoutError, KazooException, OSError) as exc:
            self._health.set(False)
            if self._tls_context is not None:
                # kazoo retries a failed handshake until it times out: ask once more to say why.
                tls_failure = await asyncio.to_thread(self._tls_probe)
                if tls_failure is not None:
                    raise StoreError(f"zookeeper at {self._hosts}: {tls_failure}") from None
            raise StoreUnavailable(f"cannot reach zookeeper at {self._hosts} ({first_line(exc)})") from None
        self._client = client
        session_id = _client_id(client)[0]
        self._session_id = session_id
        self._connected.set()
        self._health.set(True)
        if saved is not None and saved[0] == session_id:
            self._owns_session = True
            log.info("resumed zookeeper session %x", session_id)
        try:
            await self._ensure_dirs()
        except StoreError:
            await self.close()
            raise

    def _tls_options(self) -> dict[str, Any]:
        """kazoo's TLS arguments: TLS when store.tls_ca or store.tls_cert is set."""
        config = self._config
        if self._tls_context is None:
            return {}
        return {
            "use_ssl": True,
            "ca": config.tls_ca,
            "certfile": config.tls_cert,
            "keyfile": config.tls_key,
            "verify_certs": True,
            "check_hostname": True,
        }

    def _tls_probe(self) -> str | None:
        """One TLS handshake with the first server; the reason it fails, or None."""
        assert self._tls_context is not None
        endpoint = self._config.endpoints[0]
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=3) as sock:
                with self._tls_context.wrap_socket(sock, server_hostname=endpoint.host):
                    return None
        except ssl.SSLError as exc:
            return f"TLS failed: {first_line(exc)}; check store.tls_ca, store.tls_cert and store.tls_key"
        except OSError:
            return None

    async def _ensure_dirs(self) -> None:
        for kind in ("networks", "vni", "nodes", "endpoints", "ipam"):
            path = f"{self._base}/{kind}"
            await self._ensure_path(path)
            # ensure_path succeeds on a znode it may not read: check we may.
            await self._children(path)

    async def _ensure_path(self, path: str) -> None:
        await self._call("create", lambda c: c.ensure_path_async(path, acl=self._acl))

    async def _delete_if(self, path: str, version: int = -1) -> None:
        """Delete `path` at `version`; quietly nothing if it is gone, changed or not empty."""
        try:
            await self._call(
                "delete",
                lambda c: c.delete_async(path, version=version),
                (NoNodeError, NotEmptyError, BadVersionError),
            )
        except (NoNodeError, NotEmptyError, BadVersionError):
            pass

    def _listener(self, state: str) -> None:  # on a kazoo thread: must not block
        if self._loop is not None:
            _threadsafe(self._loop, self._on_state, state)

    def _on_state(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            client = self._client
            if client is None:
                return
            session_id = client.client_id[0] if client.client_id else None
            if self._session_id is not None and session_id != self._session_id and self._owns_session:
                self._session_replaced.set()
            self._session_id = session_id
            self._disconnected_at = None
            self._connected.set()
            self._health.set(True)
        else:
            if self._disconnected_at is None:
                self._disconnected_at = time.monotonic()
            self._connected.clear()
            self._health.set(False)
            if state == KazooState.LOST and self._owns_session:
                log.warning("zookeeper session %x expired", self._session_id or 0)
                self._session_replaced.set()

    async def close(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is None:
            return
        try:
            if self._owns_session:
                await asyncio.to_thread(_drop_connection, client)
            else:
                await asyncio.to_thread(client.stop)
                await asyncio.to_thread(client.close)
        except Exception as exc:  # closing a broken connection must not mask the real error
            log.debug("closing zookeeper client: %s", exc)

    # ----------------------------------------------------------------- session

    async def open_session(self, node: Node) -> None:
        async with self._session_lock:
            client = self.client
            self._owns_session = True
            self._save_session(_client_id(client))
            self._node = node
            await self._put_owned(self._layout.node(node.name), encode(node))

    async def keep_session(self) -> None:
        # kazoo pings by itself; this only answers a lost session.
        backoff = Backoff()
        while True:
            try:
                # Not `wait_for`: on Python 3.11 it drops a cancel that comes as the event is
                # set, and this loop would run on past the daemon's stop.
                async with asyncio.timeout(self._config.lease_ttl / 2):
                    await self._session_replaced.wait()
            except TimeoutError:
                self._unstick()
                continue
            await self._connected.wait()
            self._session_replaced.clear()
            try:
                await self._republish()
            except StoreError as exc:
                log.warning("re-publishing after a new zookeeper session failed: %s", exc)
                self._session_replaced.set()
                await backoff.wait()
            else:
                backoff.reset()

    async def ensure_session(self) -> None:
        # A server that lost its data expires our session: kazoo connects with a new one
        # and `keep_session` re-publishes on its own. Wait until connected again.
        await self._connected.wait()

    def _unstick(self) -> None:
        """A server that lost its data (or came back from an older backup) refuses, for
        ever, a client that has seen a newer zxid than its own, and kazoo keeps offering
        it. Once disconnected for longer than the session timeout, when the session is
        gone on every server anyway, forget the zxid and the session: the next attempt
        opens a new session (the CONNECTED handler then re-publishes)."""
        client = self._client
        since = self._disconnected_at
        if client is None or since is None or self._connected.is_set():
            return
        away = time.monotonic() - since
        if away < self._config.lease_ttl or client.last_zxid == 0:
            return
        log.warning(
            "zookeeper unreachable for %.0fs: reconnecting as a new session (a server that lost "
            "its data refuses the old one)",
            away,
        )
        client.last_zxid = 0
        client._reset_session()

    async def _republish(self) -> None:
        async with self._session_lock:
            client = self.client
            client_id = _client_id(client)
            log.warning("new zookeeper session %x: re-publishing owned records", client_id[0])
            self._save_session(client_id)
            if self._node is not None:
                await self._put_owned(self._layout.node(self._node.name), encode(self._node))
            await republish(self._writes, self._owned, self._put_endpoint, log=log, report=self._on_invalid)

    async def release_session(self) -> None:
        client = self.client
        self._owns_session = False
        self._owned.clear()
        self._node = None
        self._session_file.remove()
        # Ending the session deletes every ephemeral znode at once; then start a fresh one.
        self._connected.clear()
        try:
            await asyncio.to_thread(client.restart)
        except (KazooTimeoutError, KazooException, OSError) as exc:
            raise StoreUnavailable(f"zookeeper at {self._hosts}: {first_line(exc)}") from None
        self._session_id = _client_id(client)[0]
        self._connected.set()

    def _load_session(self) -> tuple[int, bytes] | None:
        text = self._session_file.load()
        try:
            sid, passwd = (text or "").split()
            return int(sid, 16), bytes.fromhex(passwd)
        except ValueError:
            return None

    def _save_session(self, client_id: tuple[int, bytes]) -> None:
        self._session_file.save(f"{client_id[0]:x} {client_id[1].hex()}")

    def _require_session(self) -> int:
        if not self._owns_session or self._session_id is None:
            raise StoreError("no zookeeper session: open_session() first")
        return self._session_id

    # ----------------------------------------------------------------- records

    async def create_network(self, network: Network) -> None:
        net_path, vni_path = self._layout.network(network.name), self._layout.vni(network.vni)
        value = _checked(encode(network), net_path)

        def build(txn: Any) -> None:
            txn.create(net_path, value)
            txn.create(vni_path, network.name.encode())

        results = await self._commit("txn", build)
        if _ok(results):
            return
        if isinstance(results[0], NodeExistsError):
            raise AlreadyExists("network name", network.name)
        if isinstance(results[1], NodeExistsError):
            holder = await self._get(vni_path)
            raise AlreadyExists("VNI", str(network.vni), holder.data.decode() if holder else None)
        raise StoreError(f"creating network {network.name} failed: {_first_failure(results)}")

    async def delete_network(self, name: str) -> None:
        net_path = self._layout.network(name)
        current = await self._get_stat(net_path)
        if current is None:
            raise NotFoundError(f"network {name} not found")
        data, stat = current
        vni_path = None
        fact = self._decode(net_path, data)
        if isinstance(fact, NetworkPut):
            vni_path = self._layout.vni(fact.network.vni)
            claim = await self._get_stat(vni_path)
            if claim is None or claim[0] != name.encode():
                vni_path = None  # not ours to release

        def build(txn: Any) -> None:
            txn.delete(net_path, version=stat.version)
            if vni_path is not None:
                txn.delete(vni_path)

        results = await self._commit("txn", build)
        if not _ok(results):
            raise StoreError(f"network {name} changed while being deleted; try again")
        # The per-network directories go too once empty; a live endpoint keeps its own.
        for kind in ("endpoints", "ipam"):
            await self._delete_if(f"{self._base}/{kind}/{name}")

    async def _ensure_network_dirs(self, network: str) -> None:
        for kind in ("endpoints", "ipam"):
            await self._ensure_path(f"{self._base}/{kind}/{network}")

    async def create_endpoint(self, endpoint: Endpoint) -> None:
        self._require_session()
        ep_path = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_path = self._layout.ip_claim(endpoint.network, endpoint.ip)
        value = _checked(encode(endpoint), ep_path)

        def build(txn: Any) -> None:
            txn.create(ep_path, value, ephemeral=True)
            txn.create(ip_path, endpoint.key.encode(), ephemeral=True)

        for attempt in range(4):
            if attempt:
                # The network's directories were missing (its first endpoint, or the network
                # was deleted and re-created). Not made before the first try: that cost two
                # round trips on every add, before the gossip publish that follows it.
                await self._ensure_network_dirs(endpoint.network)
            results = await self._commit("txn", build)
            if _ok(results):
                self._owned[endpoint.key] = endpoint
                return
            if isinstance(results[0], NodeExistsError):
                raise AlreadyExists("endpoint name", endpoint.key)
            if isinstance(results[1], NodeExistsError):
                holder = await self._get(ip_path)
                raise AlreadyExists("IP", str(endpoint.ip), holder.data.decode() if holder else None)
            if not any(isinstance(r, NoNodeError) for r in results):
                break
        raise StoreError(f"creating endpoint {endpoint.key} failed: {_first_failure(results)}")

    async def publish_endpoint(self, endpoint: Endpoint) -> None:
        async with self._writes.hold(endpoint.key):
            await self._put_endpoint(endpoint)

    async def _put_endpoint(self, endpoint: Endpoint) -> None:
        self._require_session()
        ep_path = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_path = self._layout.ip_claim(endpoint.network, endpoint.ip)
        await self._ensure_network_dirs(endpoint.network)
        await self._put_owned(
            ep_path,
            _checked(encode(endpoint), ep_path),
            claim=(ip_path, endpoint.key.encode(), str(endpoint.ip)),
        )
        self._owned[endpoint.key] = endpoint

    async def _put_owned(self, path: str, value: bytes, claim: tuple[str, bytes, str] | None = None) -> None:
        """Make `path` hold `value` as an ephemeral znode of our session, with its IP claim.

        A znode left by an older session of ours (a restart that could not
        resume it) is replaced. The claim is taken if free or already naming
        this endpoint; if another endpoint took the IP meanwhile, it keeps it.
        Reads and one transaction with version checks; a race retries.
        """
        results: list[Any] = []
        for _attempt in range(5):
            session = self._require_session()
            ops: list[tuple[str, str, bytes, int]] = []
            if claim is not None:
                claim_path, claim_value, ip = claim
                held = await self._get_stat(claim_path)
                if held is None:
                    ops.append(("create", claim_path, claim_value, -1))
                elif held[0] != claim_value:
                    raise AlreadyExists("IP", ip, held[0].decode(errors="replace"))
                elif held[1].ephemeralOwner != session:
                    ops.append(("delete", claim_path, b"", held[1].version))
                    ops.append(("create", claim_path, claim_value, -1))
                else:
                    ops.append(("check", claim_path, b"", held[1].version))
            current = await self._get_stat(path)
            if current is None:
                ops.append(("create", path, value, -1))
            elif current[1].ephemeralOwner != session:
                ops += [("delete", path, b"", current[1].version), ("create", path, value, -1)]
            elif current[0] != value:
                ops.append(("set", path, value, current[1].version))

            def build(txn: Any, ops: list[tuple[str, str, bytes, int]] = ops) -> None:
                for op, p, v, version in ops:
                    if op == "create":
                        txn.create(p, v, ephemeral=True)
                    elif op == "delete":
                        txn.delete(p, version=version)
                    elif op == "set":
                        txn.set_data(p, v, version=version)
                    else:
                        txn.check(p, version)

            results = await self._commit("txn", build)
            if _ok(results):
                return
            if not any(isinstance(r, (NodeExistsError, NoNodeError, BadVersionError)) for r in results):
                break
        raise StoreError(f"publishing {path} failed: {_first_failure(results)}")

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        async with self._writes.hold(endpoint.key):
            await self._delete_endpoint(endpoint)

    async def _delete_endpoint(self, endpoint: Endpoint) -> None:
        ep_path = self._layout.endpoint(endpoint.network, endpoint.name)
        ip_path = self._layout.ip_claim(endpoint.network, endpoint.ip)
        # Record first, then the claim: the IP is never free while the record exists.
        # The claim is read meanwhile (one round trip less before the gossip removal).
        _, held = await asyncio.gather(self._delete_if(ep_path), self._get_stat(ip_path))
        # Release the IP only if this endpoint still holds it: never free a
        # claim that someone else took after ours lapsed.
        if held is not None and held[0] == endpoint.key.encode():
            await self._delete_if(ip_path, held[1].version)
        self._owned.pop(endpoint.key, None)

    # ----------------------------------------------------------------- reading

    async def _children(
        self, path: str, watch: Callable[[WatchedEvent], None] | None = None
    ) -> tuple[list[str], int] | None:
        """Children of `path` and its pzxid, or None if it does not exist."""
        try:
            children, stat = await self._call(
                "list",
                lambda c: c.get_children_async(path, watch=watch, include_data=True),
                (NoNodeError,),
            )
        except NoNodeError:
            return None
        return list(children), int(stat.pzxid)

    async def _read_tree(self, watch: Callable[[WatchedEvent], None] | None = None) -> _Tree:
        """Every record znode with its zxid; arms `watch` on every directory and record read."""
        revision = 0
        dirs = [self._dirs.networks, self._dirs.nodes]
        listed = await self._children(self._dirs.endpoints, watch)
        if listed is not None:
            revision = max(revision, listed[1])
            dirs += [f"{self._dirs.endpoints}/{name}" for name in listed[0]]
        records: dict[str, Rec] = {}
        listings = await asyncio.gather(*(self._children(d, watch) for d in dirs))
        paths: list[str] = []
        for d, found in zip(dirs, listings, strict=True):
            if found is not None:
                revision = max(revision, found[1])
                paths += [f"{d}/{name}" for name in found[0]]
        got = await asyncio.gather(*(self._get(p, watch) for p in paths))
        for path, rec in zip(paths, got, strict=True):
            if rec is not None:
                records[path] = rec
                revision = max(revision, rec.zxid)
        return _Tree(records, revision)

    async def _base_id(self) -> tuple[int, int]:
        """When the prefix's root was made: (czxid, ctime), or (0, 0) if it does not exist."""
        stat = await self._call("exists", lambda c: c.exists_async(self._base))
        return (int(stat.czxid), int(stat.ctime)) if stat is not None else (0, 0)

    async def snapshot(self) -> Snapshot:
        if self._base_made == (0, 0):
            self._base_made = await self._base_id()
        tree = await self._read_tree()
        facts = [f for path, rec in sorted(tree.records.items()) if (f := self._decode(path, rec.data))]
        # Remember what the caller was given, so watch(revision) can diff against it.
        self._snapshots[tree.revision] = tree.records
        while len(self._snapshots) > 2:
            del self._snapshots[next(iter(self._snapshots))]
        return Snapshot(facts=facts, revision=tree.revision)

    def _decode(self, path: str, data: bytes) -> Fact | None:
        return self._decoder.put(path, data)

    async def watch(self, after_revision: int) -> AsyncIterator[Changes | Snapshot]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[WatchedEvent] = asyncio.Queue()

        on_event = _Handoff(loop, events.put_nowait)  # one object: kazoo keeps a set of watchers per path

        baseline = self._snapshots.pop(after_revision, None)
        mirror = Mirror(baseline, after_revision)
        full = True
        first = baseline is None
        backoff = Backoff()
        pace = RoundPace(self._config.watch_pace)
        while True:
            try:
                if full:
                    await self._connected.wait()
                    tree = await self._read_tree(on_event)
                    base = await self._base_id()
                    full = False
                    lost = None
                    known = self._base_made
                    if not first and known != (0, 0) and base != (0, 0) and base != known:
                        lost = f"zookeeper: {self._base} made anew (czxid {known[0]:#x} -> {base[0]:#x})"
                    elif not first and tree.revision < mirror.revision:
                        lost = f"zookeeper zxid went back from {mirror.revision:#x} to {tree.revision:#x}"
                    if base != (0, 0):
                        self._base_made = base
                    if first or lost is not None:
                        # Unknown starting point, or the server lost its state: start over.
                        if lost is not None:
                            log.warning("%s: the server lost its data", lost)
                        first = False
                        mirror = Mirror(tree.records, tree.revision)
                        yield self._snapshot_of(mirror, data_lost=lost)
                    else:
                        changes = mirror.replace(tree.records, tree.revision)
                        if batch := self._changes(mirror, changes, tree.revision):
                            yield batch
                    backoff.reset()
                # Events that come while the pace is waited out are read in the same round.
                await pace.wait()
                dirty = [await events.get()]
                pace.started()
                while not events.empty():
                    dirty.append(events.get_nowait())
                if any(e.type == EventType.NONE or e.path is None for e in dirty):
                    full = True  # the connection dropped and took every watch with it
                    continue
                deletions = ((e.path, e.type == EventType.DELETED) for e in dirty)
                if batch := await self._refresh(mirror, deletions, on_event):
                    yield batch
            except StoreUnavailable as exc:
                log.warning("zookeeper watch interrupted (%s); re-reading after reconnect", exc)
                full = True
                await backoff.wait()

    def _snapshot_of(self, mirror: Mirror, data_lost: str | None = None) -> Snapshot:
        facts = [f for path, rec in sorted(mirror.records.items()) if (f := self._decode(path, rec.data))]
        return Snapshot(facts=facts, revision=mirror.revision, data_lost=data_lost)

    def _changes(self, mirror: Mirror, changes: list[Change], revision: int) -> Changes | None:
        """The mirror's changes as facts in zxid order (None if none is a fact)."""
        facts: list[Fact] = []
        for change in mirror.advance(changes, revision):
            if isinstance(change, Gone):
                action, fact = "delete", fact_for_delete(self._layout, change.path)
            else:
                action, fact = "put", self._decode(change.path, change.rec.data)
            if fact is not None:
                facts.append(fact)
                self._health.count_event(fact, action)
        return Changes(facts, mirror.revision) if facts else None

    async def _refresh(
        self, mirror: Mirror, events: Iterable[tuple[str, bool]], watch: Callable[[WatchedEvent], None]
    ) -> Changes | None:
        """Re-read the znodes events named (re-arming their watches); the differences as facts.

        `events`: (path, whether the event announced the znode's deletion), see `Dirs.plan`.
        """
        dirs_of = self._dirs
        reads = dirs_of.plan(events)
        top, dirs, records = reads.top, reads.dirs, reads.records
        changes: list[Change] = []
        revision = mirror.revision
        if top:
            listed = await self._children(dirs_of.endpoints, watch)
            names = set(listed[0]) if listed is not None else set()
            revision = max(revision, listed[1] if listed is not None else 0)
            known = mirror.subdirs(dirs_of.endpoints)
            # New network directories are listed below; vanished ones take their records along.
            dirs |= {f"{dirs_of.endpoints}/{name}" for name in names - known}
            for name in known - names:
                changes += mirror.drop_dir(f"{dirs_of.endpoints}/{name}", revision)
        for directory in sorted(dirs):
            listed = await self._children(directory, watch)
            if listed is None:
                changes += mirror.drop_dir(directory, revision)
                continue
            revision = max(revision, listed[1])
            gone, new = mirror.sync_dir(directory, listed[0], listed[1], reads.deleted)
            changes += gone
            # New children are read (arming their data watch); known ones have theirs armed,
            # but for those whose deletion an event announced: listed again, they were made anew.
            records |= new
        paths_list = sorted(records)
        # Mostly one record (an endpoint added): no task for it.
        got = (
            [await self._get(paths_list[0], watch)]
            if len(paths_list) == 1
            else await asyncio.gather(*(self._get(p, watch) for p in paths_list))
        )
        for path, rec in zip(paths_list, got, strict=True):
            if rec is not None and (put := mirror.put(path, rec)) is not None:
                changes.append(put)
            # Gone: its directory's listing (here or in the next batch) reports the deletion.
        return self._changes(mirror, changes, revision)


def _tls_context(config: StoreConfig) -> ssl.SSLContext | None:
    """The client's TLS settings, checked now so a bad file is one clear error at start."""
    if config.tls_ca is None and config.tls_cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=config.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"store.tls_ca: cannot load {config.tls_ca}: {first_line(exc)}") from None
    if config.tls_cert is not None:
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(
                f"store.tls_cert: cannot load {config.tls_cert} with its key: {first_line(exc)}"
            ) from None
    return context


def _client_id(client: KazooClient) -> tuple[int, bytes]:
    """(session id, password) of the live session; StoreUnavailable while there is none."""
    client_id = client.client_id
    if client_id is None:
        raise StoreUnavailable("zookeeper session is not established (reconnecting)")
    return int(client_id[0]), bytes(client_id[1])


def _checked(value: bytes, path: str) -> bytes:
    if len(value) > MAX_VALUE_BYTES:
        raise StoreError(f"{path}: record is {len(value)} bytes, zookeeper takes at most {MAX_VALUE_BYTES}")
    return value


def _ok(results: list[Any]) -> bool:
    return not any(isinstance(r, Exception) for r in results)


def _first_failure(results: list[Any]) -> str:
    for r in results:
        if isinstance(r, Exception) and not isinstance(r, RolledBackError):
            return first_line(r)
    return "transaction failed"


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    """Hand a kazoo AsyncResult's outcome to `future` (on the event loop)."""
    if future.done():
        return  # the caller gave up (timeout, cancellation)
    if result.successful():
        future.set_result(result.value)
    else:
        future.set_exception(result.exception)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("zookeeper request timed out"))


class _Handoff:
    """A kazoo callback that only hands its call to the event loop (`call_soon_threadsafe`).

    kazoo runs callbacks on worker threads of its own, fed by queues: from its
    connection thread to a worker (a queue put, a condition notified, a thread
    woken) and only then to the event loop. A handoff never blocks, so `_Handler`
    runs it on the thread that has the answer or the event: one thread hop per
    request and per watch event instead of two. Nothing it raises reaches kazoo.
    """

    __slots__ = ("_fn", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., None]) -> None:
        self._loop = loop
        self._fn = fn

    def __call__(self, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more


class _Result(AsyncResult):  # type: ignore[misc]
    """kazoo's AsyncResult, running `_Handoff` callbacks where the result is set.

    The rest as kazoo 2.11's `_do_callbacks` does: queued to its completion
    worker while the handler runs, called at once when it is stopped.
    """

    def _do_callbacks(self) -> None:
        for callback in self._callbacks:
            if isinstance(callback, _Handoff) or not self._handler.running:
                callback(self)
            else:
                self._handler.completion_queue.put(functools.partial(callback, self))


class _Handler(SequentialThreadingHandler):  # type: ignore[misc]
    """kazoo's threading handler, running `_Handoff` callbacks (results and watch
    events) on the thread that delivers them; others go through its workers as before."""

    def async_result(self) -> _Result:
        return _Result(self)

    def dispatch_callback(self, callback: Any) -> None:
        if isinstance(callback.func, _Handoff):
            callback.func(*callback.args)
        else:
            super().dispatch_callback(callback)


def _threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more


def _drop_connection(client: KazooClient) -> None:
    """Stop the client WITHOUT ending its session, so a restarted daemon can resume it.

    `KazooClient.stop()` sends a close-session request, which deletes every
    ephemeral znode at once. Instead mark the client stopped (so it does not
    reconnect) and drop the socket, using the hook kazoo's own tests use.
    """
    from kazoo.protocol.connection import _CONNECTION_DROP

    client._stopped.set()
    client._queue.append((_CONNECTION_DROP, None))
    client._connection._write_sock.send(b"\0")
    client._connection.stop(10)
    client.handler.stop()
    client.close()
