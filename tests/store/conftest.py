"""The conformance suite's backends: each test in tests/store runs once per name in BACKENDS.

A backend is a real server (started per test on 127.0.0.1 with a free port
and a temporary directory) plus two small hooks that go around overlayd:

- `raw_put(server, key, value)` writes bytes under a key the way something
  other than overlayd would (to check that junk is reported and skipped);
- `expire(server, store)` ends the store's lease/session from outside, as an
  outage longer than the TTL would.

Adding a backend: a server class with `start()`, `restart()`, `cleanup()` and
`url`; the two hooks; one `Backend(...)` entry in KINDS; its name in BACKENDS.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import pytest
from kazoo.client import KazooClient
from support import Backend, Stores

from overlayd.lab import EtcdServer
from overlayd.lab.consul import ConsulServer
from overlayd.lab.zookeeper import ZooKeeperError, ZooKeeperServer, find_zookeeper
from overlayd.store.base import Store

BACKENDS = ["etcd", "etcd-3.5", "zookeeper", "zookeeper-3.9", "consul"]


# --- etcd ---------------------------------------------------------------------


async def _etcd_raw_put(server: EtcdServer, key: str, value: bytes) -> None:
    client = aetcd.Client(host=server.host, port=server.client_port, timeout=5)
    try:
        await client.connect()
        await client.put(key.encode(), value)
    finally:
        await client.close()


async def _etcd_expire(server: EtcdServer, store: Store) -> None:
    client = aetcd.Client(host=server.host, port=server.client_port, timeout=5)
    try:
        await client.connect()
        await client.revoke_lease(store._lease_id)  # type: ignore[attr-defined]
    finally:
        await client.close()


# Servers Debian 12 does not have, unpacked by scripts/fetch-*.sh (`make test` and CI run them).
TEST_CACHE = Path(os.environ.get("OVERLAYD_TEST_CACHE", "/var/cache/overlayd-test"))
ETCD35_BINARY = TEST_CACHE / "etcd-3.5/usr/bin/etcd"  # Debian 13's etcd 3.5


def _etcd35_server() -> EtcdServer:
    if not os.access(ETCD35_BINARY, os.X_OK):
        pytest.skip(f"etcd 3.5 not fetched ({ETCD35_BINARY}): run scripts/fetch-etcd.sh")
    return EtcdServer(binary=str(ETCD35_BINARY))


# --- ZooKeeper ----------------------------------------------------------------

ZK_CHROOT = "/ovt"
# Debian 13's ZooKeeper 3.9.
ZK39_JARS = TEST_CACHE / "zookeeper-3.9/usr/share/java"


def _zk39_server() -> ZooKeeperServer:
    try:
        find_zookeeper(ZK39_JARS)
    except ZooKeeperError as exc:
        pytest.skip(str(exc))
    return ZooKeeperServer(jar_dir=ZK39_JARS)


def _zk_hosts(server: ZooKeeperServer) -> str:
    return f"{server.host}:{server.client_port}"


async def _zk_raw_put(server: ZooKeeperServer, key: str, value: bytes) -> None:
    def put() -> None:
        client = KazooClient(hosts=_zk_hosts(server) + ZK_CHROOT)
        client.start(10)
        try:
            if client.exists(key):
                client.set(key, value)
            else:
                client.create(key, value, makepath=True)
        finally:
            client.stop()
            client.close()

    await asyncio.to_thread(put)


async def _zk_expire(server: ZooKeeperServer, store: Store) -> None:
    # The classic way to end a ZooKeeper session from outside: join it with its
    # id and password, then close it.
    session = store.client.client_id  # type: ignore[attr-defined]

    def close_session() -> None:
        client = KazooClient(hosts=_zk_hosts(server), client_id=session)
        client.start(10)
        client.stop()
        client.close()

    await asyncio.to_thread(close_session)


# --- Consul -------------------------------------------------------------------


def _consul_server() -> ConsulServer:
    # Not a dev agent: a restart must keep data and sessions, as a real server does.
    return ConsulServer(dev=False)


async def _consul_raw_put(server: ConsulServer, key: str, value: bytes) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{server.http_url}/v1/kv/{key.lstrip('/')}", data=value) as response:
            response.raise_for_status()


async def _consul_expire(server: ConsulServer, store: Store) -> None:
    session = store._session_id  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{server.http_url}/v1/session/destroy/{session}") as response:
            response.raise_for_status()


KINDS: dict[str, Backend] = {
    "etcd": Backend("etcd", EtcdServer, _etcd_raw_put, _etcd_expire),
    "etcd-3.5": Backend("etcd-3.5", _etcd35_server, _etcd_raw_put, _etcd_expire, variant_of="etcd"),
    "zookeeper": Backend("zookeeper", ZooKeeperServer, _zk_raw_put, _zk_expire, url_path=ZK_CHROOT),
    "zookeeper-3.9": Backend(
        "zookeeper-3.9", _zk39_server, _zk_raw_put, _zk_expire, url_path=ZK_CHROOT, variant_of="zookeeper"
    ),
    "consul": Backend(
        "consul", _consul_server, _consul_raw_put, _consul_expire, min_ttl=10
    ),  # Consul refuses session TTLs under 10 s
}


# --- fixtures -----------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return KINDS[request.param]


@pytest.fixture
def kv_server(backend: Backend) -> Iterator[Any]:
    """The backend's real server, started on 127.0.0.1 with a free port; removed after."""
    server = backend.server()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def stores(backend: Backend, kv_server: Any, tmp_path: Path) -> AsyncIterator[Stores]:
    made = Stores(backend, kv_server, tmp_path, [], [])
    yield made
    for store in made.made:
        await store.close()


@pytest.fixture
def make_store(stores: Stores) -> Callable[..., Awaitable[Store]]:
    """`await make_store(node="h1", ttl=10, state=None)`: a connected store of this backend."""
    return stores.make
