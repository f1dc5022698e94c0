"""ZooKeeper-only behaviour: the server runner, the chroot, digest auth and ACLs.

What every backend must do is in the conformance suite (tests/store).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import make_digest_acl_credential

from overlayd.core.config import from_flat
from overlayd.core.model import Endpoint, Network, Node, random_mac
from overlayd.core.view import NetworkPut
from overlayd.lab.proc import read_start_time
from overlayd.lab.zookeeper import ZooKeeperError, ZooKeeperServer
from overlayd.store.base import StoreError
from overlayd.store.zookeeper import ZooKeeperStore

PASSWORD = "s3cret-digest-pw"
DEMO = Network(name="demo", vni=42, subnet=IPv4Network("10.1.0.0/24"))


def node(name: str, last_octet: int = 1) -> Node:
    return Node(name=name, vtep=IPv4Address(f"198.18.0.{last_octet}"), started_at=time.time())


def endpoint(name: str, ip: str, owner: str, netns: str = "") -> Endpoint:
    return Endpoint(network="demo", name=name, ip=IPv4Address(ip), mac=random_mac(), owner=owner, netns=netns)


def gone(pid: int) -> bool:
    found = read_start_time(pid)
    return found is None or found[1] == "Z"


@pytest.fixture
def zk_server() -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def raw_client(server: ZooKeeperServer, auth: tuple[str, str] | None = None) -> KazooClient:
    client = KazooClient(
        hosts=f"127.0.0.1:{server.client_port}",
        auth_data=[("digest", f"{auth[0]}:{auth[1]}")] if auth else None,
    )
    client.start(10)
    return client


def stop(client: KazooClient) -> None:
    client.stop()
    client.close()


def make(server: ZooKeeperServer, tmp_path: Path, **extra: str) -> ZooKeeperStore:
    flat = {
        "node.name": "h1",
        "underlay.address": "198.18.0.1",
        "store.url": f"{server.url}/lab/one",
        "store.prefix": "/t/v1/",
        **extra,
    }
    return ZooKeeperStore(from_flat(flat).store, state_dir=str(tmp_path / "state"))


@pytest.fixture
async def closing() -> AsyncIterator[list[ZooKeeperStore]]:
    stores: list[ZooKeeperStore] = []
    yield stores
    for store in stores:
        await store.close()


def test_runner_restart_keeps_data_and_cleanup_leaves_nothing() -> None:
    server = ZooKeeperServer()
    server.start()
    try:
        assert "Mode: standalone" in server.four_letter("srvr")
        assert server.version().startswith("3.8")  # Debian 12's
        client = raw_client(server)
        client.create("/kept", b"v1")
        stop(client)
        old_pid = server.pid
        assert old_pid is not None
        server.restart()
        assert server.pid != old_pid and gone(old_pid)
        client = raw_client(server)
        assert client.get("/kept")[0] == b"v1"
        stop(client)
        pid = server.pid
        assert pid is not None
        server.kill()
        assert gone(pid) and not server.ready()
    finally:
        server.cleanup()
    assert not server.workdir.exists()
    server.cleanup()  # idempotent


def test_port_in_use_is_a_clear_error_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = ZooKeeperServer(client_port=port, workdir=tmp_path / "zk")
        with pytest.raises(ZooKeeperError) as info:
            server.start(timeout=20)
    assert str(port) in str(info.value)
    assert not server.running()


async def test_records_live_under_the_chroot(
    zk_server: ZooKeeperServer, tmp_path: Path, closing: list[ZooKeeperStore]
) -> None:
    store = make(zk_server, tmp_path)
    closing.append(store)
    await store.connect()
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    await store.create_endpoint(endpoint("web", "10.1.0.5", "h1"))
    client = raw_client(zk_server)
    try:
        assert client.get_children("/lab/one/t/v1/networks") == ["demo"]
        assert client.get("/lab/one/t/v1/vni/42")[0] == b"demo"
        _data, stat = client.get("/lab/one/t/v1/endpoints/demo/web")
        assert stat.ephemeralOwner == store.client.client_id[0]
        assert client.get("/lab/one/t/v1/ipam/demo/10.1.0.5")[0] == b"demo/web"
        assert client.exists("/t") is None  # nothing outside the chroot
    finally:
        stop(client)


async def test_digest_auth_protects_znodes_and_never_logs_the_password(
    zk_server: ZooKeeperServer,
    tmp_path: Path,
    closing: list[ZooKeeperStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = make(zk_server, tmp_path, **{"store.username": "ovl", "store.password": PASSWORD})
    closing.append(store)
    await store.connect()
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)

    def outsiders() -> tuple[str, list[object]]:
        anonymous = raw_client(zk_server)
        try:
            try:
                anonymous.get("/lab/one/t/v1/networks/demo")
                read = "allowed"
            except NoAuthError:
                read = "refused"
        finally:
            stop(anonymous)
        admin = raw_client(zk_server, ("ovl", PASSWORD))
        try:
            acls = admin.get_acls("/lab/one/t/v1/networks/demo")[0]
        finally:
            stop(admin)
        return read, acls

    read, acls = await asyncio.to_thread(outsiders)
    assert read == "refused"
    assert [acl.id.id for acl in acls] == [make_digest_acl_credential("ovl", PASSWORD)]

    wrong = make(zk_server, tmp_path, **{"store.username": "ovl", "store.password": "wrong"})
    closing.append(wrong)
    with pytest.raises(StoreError) as info:
        await wrong.connect()
    assert "\n" not in str(info.value) and "permission" in str(info.value)
    assert PASSWORD not in str(info.value) and "wrong" not in str(info.value)
    # (This test's own raw clients log their requests through kazoo.client; ours must not.)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("overlayd")]
    assert ours and not any(PASSWORD in line for line in ours)
    assert PASSWORD not in repr(store._config)


async def test_too_big_for_zookeeper_is_refused_before_sending(
    zk_server: ZooKeeperServer, tmp_path: Path, closing: list[ZooKeeperStore]
) -> None:
    store = make(zk_server, tmp_path)
    closing.append(store)
    await store.connect()
    await store.open_session(node("h1", 1))
    await store.create_network(DEMO)
    # Between ZooKeeper's 1 MiB and etcd's 1.5 MiB: the server would just drop the connection.
    with pytest.raises(StoreError) as info:
        await store.create_endpoint(endpoint("big", "10.1.0.5", "h1", netns="x" * 1_200_000))
    assert "at most" in str(info.value)
    assert store.healthy


async def test_new_session_takes_over_znodes_of_an_older_one(
    zk_server: ZooKeeperServer, tmp_path: Path, closing: list[ZooKeeperStore]
) -> None:
    """A restart that lost its saved session: the old session's znodes are replaced, not an error."""
    flat = {
        "node.name": "h1",
        "underlay.address": "198.18.0.1",
        "store.url": zk_server.url,
        "store.prefix": "/t/v1/",
        "store.lease_ttl": 2,
    }
    config = from_flat(flat).store
    first = ZooKeeperStore(config, state_dir=str(tmp_path / "first"))
    closing.append(first)
    await first.connect()
    await first.open_session(node("h1", 1))
    await first.create_network(DEMO)
    ep = endpoint("web", "10.1.0.5", "h1")
    await first.create_endpoint(ep)
    old_session = first.client.client_id[0]
    await first.close()  # the old session lives on until it times out

    second = ZooKeeperStore(config, state_dir=str(tmp_path / "second"))
    closing.append(second)
    await second.connect()
    await second.open_session(node("h1", 1))
    await second.publish_endpoint(ep)
    new_session = second.client.client_id[0]
    assert new_session != old_session
    client = raw_client(zk_server)
    try:
        for path in ("/t/v1/nodes/h1", "/t/v1/endpoints/demo/web", "/t/v1/ipam/demo/10.1.0.5"):
            assert client.get(path)[1].ephemeralOwner == new_session, path
    finally:
        stop(client)
    # Until well past the old session's timeout: nothing of ours goes with it.
    deadline = time.monotonic() + 3 * 2
    while time.monotonic() < deadline:
        snap = await second.snapshot()
        assert {type(f).__name__ for f in snap.facts} == {"NetworkPut", "NodePut", "EndpointPut"}
        await asyncio.sleep(0.25)


def test_fetched_release_runs_from_its_own_jars() -> None:
    jars = (
        Path(os.environ.get("OVERLAYD_TEST_CACHE", "/var/cache/overlayd-test"))
        / "zookeeper-3.9/usr/share/java"
    )
    if not (jars / "zookeeper.jar").is_file():
        pytest.skip("ZooKeeper 3.9 not fetched (scripts/fetch-zookeeper.sh)")
    with ZooKeeperServer(jar_dir=jars) as server:
        assert server.version().startswith("3.9")


def make_pki(directory: Path, name: str) -> dict[str, Path]:
    """A CA plus a server (127.0.0.1) and a client certificate it signed, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])

    def issue(common_name: str, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def write(file: str, data: bytes) -> Path:
        path = directory / f"{name}-{file}"
        path.write_bytes(data)
        return path

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    files = {
        "ca": write("ca.pem", issue(f"{name} CA", ca_key, True).public_bytes(serialization.Encoding.PEM))
    }
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}_key"] = write(f"{role}.key", key_pem(key))
        files[f"{role}_cert"] = write(
            f"{role}.pem", issue(role, key, False).public_bytes(serialization.Encoding.PEM)
        )
    return files


async def test_tls_with_client_certificates_and_a_wrong_ca_is_one_clear_error(
    tmp_path: Path, closing: list[ZooKeeperStore]
) -> None:
    pki, other = make_pki(tmp_path, "good"), make_pki(tmp_path, "other")
    server = ZooKeeperServer(tls=(pki["server_cert"], pki["server_key"]), client_ca=pki["ca"])
    try:
        server.start()
        assert server.url == f"zookeeper://127.0.0.1:{server.secure_port}"
        tls = {"store.tls_cert": str(pki["client_cert"]), "store.tls_key": str(pki["client_key"])}
        good = make(server, tmp_path, **tls, **{"store.tls_ca": str(pki["ca"])})
        closing.append(good)
        await good.connect()
        await good.open_session(node("h1", 1))
        await good.create_network(DEMO)
        assert NetworkPut(DEMO) in (await good.snapshot()).facts

        wrong = make(server, tmp_path / "w", **tls, **{"store.tls_ca": str(other["ca"])})
        closing.append(wrong)
        with pytest.raises(StoreError) as info:
            await asyncio.wait_for(wrong.connect(), 20)
        message = str(info.value)
        assert "TLS failed" in message and "store.tls_ca" in message and "\n" not in message

        missing = make(server, tmp_path / "m", **tls, **{"store.tls_ca": str(tmp_path / "nope.pem")})
        with pytest.raises(StoreError, match=r"^store\.tls_ca: cannot load .*nope\.pem"):
            await missing.connect()
    finally:
        server.cleanup()
