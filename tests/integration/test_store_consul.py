"""Consul-only behaviour of the Consul backend, against a real Consul agent.

What every backend must do is in the conformance suite (tests/store, which
runs it on Consul too); this file keeps what only Consul has: sessions and
their lock takeover, a dev agent that forgets everything on restart, ACL
tokens, HTTPS. The agent is Debian 11's consul 1.8.7, fetched by
scripts/fetch-consul.sh; the tests are skipped with that hint when it is missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from overlayd.core.config import StoreConfig, from_flat, parse_store_url
from overlayd.core.model import Endpoint, Network, Node, random_mac
from overlayd.core.view import ClusterView, EndpointDeleted, EndpointPut, NetworkPut
from overlayd.lab.consul import ConsulError, ConsulServer, find_consul
from overlayd.store.base import AlreadyExists, Changes, Snapshot, StoreError, StoreUnavailable
from overlayd.store.consul import ConsulStore
from overlayd.store.factory import make_store as factory_make_store
from overlayd.util.metrics import Metrics

PREFIX = "/t/v1/"
TOKEN = "8c6b2f0e-6a1d-4f6e-9c3b-2d9f1e7a5b40"

try:
    find_consul()
except ConsulError as exc:
    pytest.skip(str(exc), allow_module_level=True)


def store_config(url: str, ttl: int = 10, token: str | None = None) -> StoreConfig:
    scheme, endpoints = parse_store_url(url)
    return StoreConfig(url=url, scheme=scheme, endpoints=endpoints, prefix=PREFIX, lease_ttl=ttl, token=token)


@pytest.fixture
def consul_server() -> Iterator[ConsulServer]:
    """A started Consul dev agent on 127.0.0.1 with free ports and a temporary dir, removed after."""
    server = ConsulServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def make_store(
    consul_server: ConsulServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[ConsulStore]]]:
    made: list[ConsulStore] = []

    async def make(node: str = "h1", ttl: int = 10, state: str | None = None) -> ConsulStore:
        store = ConsulStore(
            store_config(consul_server.url, ttl),
            state_dir=str(tmp_path / (state or node)),
            metrics=Metrics(),
        )
        await store.connect()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def raw(server: ConsulServer, method: str, path: str, data: bytes | None = None) -> Any:
    """One request straight to the agent, as another program would make it."""
    async with aiohttp.ClientSession() as http:
        async with http.request(method, server.http_url + path, data=data) as response:
            assert response.status in (200, 404), await response.text()
            return await response.json() if response.status == 200 else None


def node(name: str, last_octet: int = 1) -> Node:
    return Node(name=name, vtep=IPv4Address(f"198.18.0.{last_octet}"), started_at=time.time())


def endpoint(name: str, ip: str, owner: str, network: str = "demo") -> Endpoint:
    return Endpoint(
        network=network, name=name, ip=IPv4Address(ip), mac=random_mac(), owner=owner, created_at=time.time()
    )


DEMO = Network(name="demo", vni=42, subnet=IPv4Network("10.1.0.0/24"))


def net(name: str, vni: int) -> Network:
    return Network(name=name, vni=vni, subnet=IPv4Network(f"10.{vni}.0.0/24"))


async def poll(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def view_of(store: ConsulStore) -> ClusterView:
    view = ClusterView()
    view.replace_all((await store.snapshot()).facts)
    return view


async def _true(value: bool) -> bool:
    return value


async def test_lost_session_is_replaced_and_records_republished(
    make_store: Any, consul_server: ConsulServer
) -> None:
    store = await make_store("h1")
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    ep = endpoint("phoenix", "10.1.0.30", "h1")
    await store.create_endpoint(ep)
    [kv] = await raw(consul_server, "GET", "/v1/kv/t/v1/endpoints/demo/phoenix")
    # As if the session had expired during an outage: its keys go with it.
    await raw(consul_server, "PUT", f"/v1/session/destroy/{kv['Session']}")
    assert ep.key not in (await view_of(store)).endpoints
    # A write now finds the session gone; it fails clearly and wakes the keeper.
    with pytest.raises(StoreError, match="session lost"):
        await store.create_endpoint(endpoint("late", "10.1.0.31", "h1"))
    keeper = asyncio.create_task(store.keep_session())
    try:

        async def back() -> bool:
            view = await view_of(store)
            return view.endpoints.get(ep.key) == ep and "h1" in view.nodes

        started = time.monotonic()
        await poll(back, 10, "re-publication under a new session")
        # The failed write set the keeper going at once, not after TTL/3.
        assert time.monotonic() - started < 3
    finally:
        keeper.cancel()
    [kv2] = await raw(consul_server, "GET", "/v1/kv/t/v1/ipam/demo/10.1.0.30")
    assert kv2["Session"] not in (None, kv["Session"])


async def test_restarted_daemon_resumes_its_session(make_store: Any, consul_server: ConsulServer) -> None:
    first = await make_store("h1", state="shared")
    await first.open_session(node("h1", 1))
    await first.create_network(DEMO)
    ep = endpoint("keep", "10.1.0.20", "h1")
    await first.create_endpoint(ep)
    [before] = await raw(consul_server, "GET", "/v1/kv/t/v1/endpoints/demo/keep")
    await first.close()

    second = await make_store("h1", state="shared")
    await second.open_session(node("h1", 1))
    await second.publish_endpoint(ep)
    [after] = await raw(consul_server, "GET", "/v1/kv/t/v1/endpoints/demo/keep")
    assert after["Session"] == before["Session"]
    # Same session, so the record was never deleted and re-created.
    assert after["CreateIndex"] == before["CreateIndex"]


async def test_restart_without_saved_session_takes_over_own_records(
    make_store: Any, consul_server: ConsulServer
) -> None:
    first = await make_store("h1", state="lost")
    await first.open_session(node("h1", 1))
    await first.create_network(DEMO)
    ep = endpoint("mine", "10.1.0.21", "h1")
    await first.create_endpoint(ep)
    await first.close()

    # State dir gone: a new session, while the old one still holds the keys.
    second = await make_store("h1", state="fresh")
    await second.open_session(node("h1", 1))
    await second.publish_endpoint(ep)
    [kv] = await raw(consul_server, "GET", "/v1/kv/t/v1/ipam/demo/10.1.0.21")
    [node_kv] = await raw(consul_server, "GET", "/v1/kv/t/v1/nodes/h1")
    assert kv["Session"] == node_kv["Session"] == second._session_id
    # An IP held for another endpoint is not taken over.
    with pytest.raises(AlreadyExists) as info:
        await second.publish_endpoint(endpoint("thief", "10.1.0.21", "h1"))
    assert info.value.what == "IP" and info.value.holder == ep.key


async def test_watch_delivers_changes_in_order_across_agent_restart(
    make_store: Any, consul_server: ConsulServer
) -> None:
    writer, watcher = await make_store("h1"), await make_store("h2")
    await writer.open_session(node("h1", 1))
    await writer.create_network(DEMO)
    start = (await watcher.snapshot()).revision
    batches: list[Changes | Snapshot] = []

    async def collect() -> None:
        async for batch in watcher.watch(start):
            batches.append(batch)

    def puts() -> list[str]:
        return [
            f.network.name
            for b in batches
            if isinstance(b, Changes)
            for f in b.facts
            if isinstance(f, NetworkPut)
        ]

    task = asyncio.create_task(collect())
    try:
        ep = endpoint("a", "10.1.0.9", "h1")
        for i in range(1, 6):
            await writer.create_network(net(f"n{i}", 100 + i))
        await writer.create_endpoint(ep)
        # Listings fold a put and a delete between two of them into nothing:
        # delete only once the watch has seen the endpoint.
        await poll(lambda: _true(any(EndpointPut(ep) in b.facts for b in batches)), 10, "put")
        await writer.delete_endpoint(ep)
        await writer.delete_network("n2")
        await poll(lambda: _true(any(EndpointDeleted(ep.key) in b.facts for b in batches)), 10, "delete")
        assert puts() == ["n1", "n2", "n3", "n4", "n5"]  # in order, nothing repeated
        view = ClusterView()
        view.replace_all((await watcher.snapshot()).facts)
        assert sorted(view.networks) == ["demo", "n1", "n3", "n4", "n5"]

        consul_server.restart()  # a dev agent comes back with no data at all
        await _retry(lambda: writer.create_network(net("after", 77)))

        def restarted() -> bool:
            snaps = [b for b in batches if isinstance(b, Snapshot)]
            return bool(snaps) and any(
                isinstance(f, NetworkPut) and f.network.name == "after"
                for b in batches[batches.index(snaps[0]) :]
                for f in b.facts
            )

        await poll(lambda: _true(restarted()), 20, "a Snapshot after the restart, then 'after'")
    finally:
        task.cancel()
    first_snap = next(b for b in batches if isinstance(b, Snapshot))
    # The Snapshot replaces the view: everything from before the restart is gone.
    assert not any(isinstance(f, NetworkPut) and f.network.name == "n1" for f in first_snap.facts)


async def _retry(op: Callable[[], Awaitable[None]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await op()
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_acl_token_is_sent_and_a_wrong_one_is_one_clear_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = ConsulServer(acl_master_token=TOKEN)
    try:
        server.start()
        good = ConsulStore(store_config(server.url, token=TOKEN), state_dir=str(tmp_path / "good"))
        await good.connect()
        await good.open_session(node("h1", 1))
        await good.create_network(DEMO)
        assert "demo" in (await view_of(good)).networks
        await good.close()

        wrong = "0" * 8 + TOKEN[8:]
        bad = ConsulStore(store_config(server.url, token=wrong), state_dir=str(tmp_path / "bad"))
        with pytest.raises(StoreError) as info:
            await asyncio.wait_for(bad.connect(), 15)
        message = str(info.value)
        assert "store.token" in message and "\n" not in message and wrong not in message
        await bad.close()
        assert TOKEN not in caplog.text and wrong not in caplog.text  # never logged
    finally:
        server.cleanup()


async def test_release_session_removes_owned_records(make_store: Any) -> None:
    store = await make_store("h1")
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    await store.create_endpoint(endpoint("bye", "10.1.0.41", "h1"))
    await store.release_session()
    view = await view_of(store)
    assert not view.endpoints and not view.nodes and "demo" in view.networks


def test_config_takes_consul_urls_and_hides_the_token(tmp_path: Path) -> None:
    config = from_flat(
        {
            "underlay.address": "198.18.0.11",
            "store.url": "consul://127.0.0.1:8500",
            "store.token": TOKEN,
        }
    )
    assert config.store.scheme == "consul" and config.store.token == TOKEN
    assert TOKEN not in repr(config)
    store = factory_make_store(config.store, state_dir=str(tmp_path))
    assert isinstance(store, ConsulStore)


def make_pki(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: x509.Name, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = cert(f"{name} test CA", ca_key, ca_name, ca_key, True)
    server_cert = cert("127.0.0.1", server_key, ca_name, ca_key, False)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


async def test_https_with_token_and_a_wrong_ca_is_one_clear_line(tmp_path: Path) -> None:
    ca, cert, key = make_pki(tmp_path / "pki", "right")
    other_ca, _, _ = make_pki(tmp_path / "other", "wrong")
    server = ConsulServer(acl_master_token=TOKEN, tls_cert=cert, tls_key=key, workdir=tmp_path / "consul")
    try:
        server.start()
        assert server.url.startswith("consuls://")

        def config(ca_file: Path) -> StoreConfig:
            return StoreConfig(
                url=server.url,
                scheme="consuls",
                endpoints=parse_store_url(server.url)[1],
                prefix=PREFIX,
                token=TOKEN,
                tls_ca=str(ca_file),
            )

        good = ConsulStore(config(ca), state_dir=str(tmp_path / "good"))
        await good.connect()
        await good.open_session(node("h1", 1))
        await good.create_network(DEMO)
        await good.create_endpoint(endpoint("tls", "10.1.0.7", "h1"))
        assert "demo/tls" in (await view_of(good)).endpoints
        await good.close()

        bad = ConsulStore(config(other_ca), state_dir=str(tmp_path / "bad"))
        with pytest.raises(StoreError) as info:
            await asyncio.wait_for(bad.connect(), 15)
        message = str(info.value)
        assert "TLS" in message and "store.tls_ca" in message and "\n" not in message
        assert not isinstance(info.value, StoreUnavailable)  # not retried as an outage
        await bad.close()

        missing = ConsulStore(config(tmp_path / "nope.pem"), state_dir=str(tmp_path / "missing"))
        with pytest.raises(StoreError, match=r"^store\.tls_ca: cannot load .*nope\.pem"):
            await missing.connect()
    finally:
        server.cleanup()


async def test_session_ttl_is_raised_to_consuls_minimum_and_is_a_pure_heartbeat(
    make_store: Any, consul_server: ConsulServer
) -> None:
    store = await make_store("h1", ttl=2)
    await store.open_session(node("h1", 1))
    [kv] = await raw(consul_server, "GET", "/v1/kv/t/v1/nodes/h1")
    [session] = await raw(consul_server, "GET", f"/v1/session/info/{kv['Session']}")
    assert session["TTL"] == "10s" and session["Behavior"] == "delete"
    assert session["LockDelay"] == 0 and session["NodeChecks"] == []


async def test_watch_from_an_unknown_index_starts_with_a_snapshot(make_store: Any) -> None:
    writer, watcher = await make_store("h1"), await make_store("h2")
    await writer.create_network(DEMO)
    old = (await writer.snapshot()).revision  # the watcher has no listing at this index
    await writer.create_network(net("later", 9))
    await writer.delete_network("demo")  # a deletion a watch from `old` could not see
    stream = watcher.watch(old).__aiter__()
    try:
        first = await asyncio.wait_for(stream.__anext__(), 10)
        assert isinstance(first, Snapshot) and first.revision > old
        assert [f.network.name for f in first.facts if isinstance(f, NetworkPut)] == ["later"]
        await writer.create_network(net("next", 10))
        second = await asyncio.wait_for(stream.__anext__(), 10)
        assert isinstance(second, Changes) and second.facts == [NetworkPut(net("next", 10))]
    finally:
        await stream.aclose()


async def test_a_mangled_saved_session_is_replaced(make_store: Any, tmp_path: Path) -> None:
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "consul-session").write_text("not-a-session-id\n")
    store = await make_store("h1")
    await store.open_session(node("h1", 1))
    assert "h1" in (await view_of(store)).nodes
    assert (tmp_path / "h1" / "consul-session").read_text().strip() == store._session_id


async def test_watch_re_reading_only_what_moved_still_sees_every_change(
    make_store: Any, consul_server: ConsulServer, tmp_path: Path
) -> None:
    """The watch re-lists only the units whose index moved (store/consultree.py): changes
    inside big networks (probed first) and small ones, in place or not, a network's
    endpoints all gone, and junk outside the record kinds all still come through."""
    writer = await make_store("h1")
    invalid: list[str] = []
    watcher = ConsulStore(
        store_config(consul_server.url),
        state_dir=str(tmp_path / "w"),
        metrics=Metrics(),
        on_invalid=invalid.append,
    )
    await watcher.connect()
    await writer.open_session(node("h1", 1))
    big = [net("a", 11), net("b", 12)]
    for n in [*big, net("c", 13)]:
        await writer.create_network(n)
    eps = {
        n.name: [endpoint(f"e{i}", f"10.{n.vni}.0.{10 + i}", "h1", n.name) for i in range(20)] for n in big
    }
    await asyncio.gather(*(writer.create_endpoint(ep) for group in eps.values() for ep in group))
    lone = endpoint("lone", "10.13.0.5", "h1", "c")
    await writer.create_endpoint(lone)
    snap = await watcher.snapshot()
    view = ClusterView()
    view.replace_all(snap.facts)
    batches: list[Changes | Snapshot] = []

    async def collect() -> None:
        async for batch in watcher.watch(snap.revision):
            batches.append(batch)
            view.replace_all(batch.facts) if isinstance(batch, Snapshot) else [
                view.apply(f) for f in batch.facts
            ]

    async def caught_up() -> bool:
        now = await view_of(writer)
        return (now.networks, now.nodes, now.endpoints) == (view.networks, view.nodes, view.endpoints)

    task = asyncio.create_task(collect())
    try:
        for step in range(3):  # after the first round (every unit listed), rounds probe big units
            moved = replace(eps["a"][step], mac=random_mac())
            await writer.publish_endpoint(moved)  # the same key, written in place
            await writer.delete_endpoint(eps["b"][step])
            await poll(caught_up, 10, f"step {step}")
            assert view.endpoints[moved.key] == moved and eps["b"][step].key not in view.endpoints
        await writer.delete_endpoint(lone)  # endpoints/c/ disappears as a folder
        await writer.create_network(net("d", 14))
        await poll(caught_up, 10, "the folder gone and the new network")
        assert lone.key not in view.endpoints and "d" in view.networks
        await raw(consul_server, "PUT", "/v1/kv/t/v1/junk", b"x")
        await raw(consul_server, "PUT", "/v1/kv/t/v1/other/thing", b"y")
        await raw(consul_server, "PUT", "/v1/kv/t/v1/endpoints/stray", b"z")
        await writer.create_network(net("after-junk", 15))
        await poll(caught_up, 10, "the network after the junk")
        await poll(lambda: _true(len(invalid) >= 3), 10, "the junk reported")
    finally:
        task.cancel()
        await watcher.close()
    reported = "\n".join(invalid)
    assert all(key in reported for key in ("t/v1/junk", "t/v1/other/thing", "t/v1/endpoints/stray"))
    assert not any(isinstance(b, Snapshot) for b in batches)
