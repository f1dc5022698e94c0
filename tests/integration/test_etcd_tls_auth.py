"""etcd with TLS (client certificates required) and user/password auth, against a real server.

Certificates are made by the test with trustme. The right settings connect;
a wrong password, an unknown CA, a missing client certificate each fail at
once with one clear line (never a hang, never a stack trace), and the
password never appears in what the daemon says.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import trustme

from overlayd.core.config import StoreConfig, parse_store_url
from overlayd.core.model import Endpoint, Network, Node, random_mac
from overlayd.lab import EtcdServer
from overlayd.lab import netns as nsutil
from overlayd.lab.lab import overlayd_argv
from overlayd.store.base import StoreError
from overlayd.store.etcd import EtcdStore

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("overlayd-client")
    files = {
        "ca": root / "ca.pem",
        "other_ca": root / "other-ca.pem",
        "server_cert": root / "server.pem",
        "server_key": root / "server.key",
        "client_cert": root / "client.pem",
        "client_key": root / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    other_ca.cert_pem.write_to_path(str(files["other_ca"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    server.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    return files


@pytest.fixture(scope="module")
def secure_etcd(pki: dict[str, Path]) -> Iterator[EtcdServer]:
    server = EtcdServer(
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        client_ca=pki["ca"],
        extra_args=["--auth-token-ttl=2"],  # tokens expire quickly: renewal is tested
    )
    try:
        server.start()
        etcdctl = [
            "etcdctl",
            f"--endpoints={server.client_url}",
            f"--cacert={pki['ca']}",
            f"--cert={pki['client_cert']}",
            f"--key={pki['client_key']}",
        ]
        env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
        for args in (
            ["user", "add", f"root:{PASSWORD}"],
            ["user", "add", f"overlayd:{PASSWORD}"],
            ["user", "grant-role", "overlayd", "root"],
            ["auth", "enable"],
        ):
            subprocess.run([*etcdctl, *args], check=True, capture_output=True, env=env, timeout=30)
        yield server
    finally:
        server.cleanup()


def config(server: EtcdServer, pki: dict[str, Path], **changes: object) -> StoreConfig:
    url = server.url.replace("etcd://", "etcds://")
    scheme, endpoints = parse_store_url(url)
    base = StoreConfig(
        url=url,
        scheme=scheme,
        endpoints=endpoints,
        prefix="/tls/v1/",
        username="overlayd",
        password=PASSWORD,
        tls_ca=str(pki["ca"]),
        tls_cert=str(pki["client_cert"]),
        tls_key=str(pki["client_key"]),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_right_settings_connect_and_work(
    secure_etcd: EtcdServer, pki: dict[str, Path], tmp_path: Path
) -> None:
    store = EtcdStore(config(secure_etcd, pki), state_dir=str(tmp_path))
    await store.connect()
    try:
        await store.open_session(Node("h1", IPv4Address("198.18.0.11"), time.time()))
        await store.create_network(Network("demo", 42, IPv4Network("10.1.0.0/24")))
        ep = Endpoint("demo", "a", IPv4Address("10.1.0.2"), random_mac(), "h1", created_at=time.time())
        await store.create_endpoint(ep)
        snap = await store.snapshot()
        assert any(getattr(f, "endpoint", None) == ep for f in snap.facts)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"password": "wrong"}, "refused the credentials of user 'overlayd'"),
        ({"tls_ca": "OTHER"}, "TLS with etcd"),
        ({"tls_cert": None, "tls_key": None}, "TLS with etcd"),
    ],
)
async def test_wrong_settings_fail_fast_with_one_line(
    secure_etcd: EtcdServer, pki: dict[str, Path], tmp_path: Path, changes: dict[str, object], expected: str
) -> None:
    if changes.get("tls_ca") == "OTHER":
        changes = {"tls_ca": str(pki["other_ca"])}
    store = EtcdStore(config(secure_etcd, pki, **changes), state_dir=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        await asyncio.wait_for(store.connect(), 20)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message and PASSWORD not in message
    assert time.monotonic() - started < 15
    await store.close()


async def test_expired_auth_token_is_renewed(
    secure_etcd: EtcdServer, pki: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="overlayd.store.etcd")
    store = EtcdStore(config(secure_etcd, pki), state_dir=str(tmp_path))
    await store.connect()
    try:
        start = (await store.snapshot()).revision
        stream = store.watch(start).__aiter__()
        # Past the server's 2 s token lifetime (the scenario itself, not a wait for a condition).
        await asyncio.sleep(4)
        network = Network("late", 77, IPv4Network("10.77.0.0/24"))
        await store.create_network(network)
        batch = await asyncio.wait_for(stream.__anext__(), 20)
        assert any(getattr(f, "network", None) == network for f in getattr(batch, "facts", []))
        assert "auth token expired" in caplog.text  # the write above needed a fresh token
        await stream.aclose()
    finally:
        await store.close()


@pytest.mark.root
def test_daemon_with_a_wrong_password_exits_with_one_line(
    pki: dict[str, Path], tmp_path: Path, lab_prefix: str
) -> None:
    """The whole daemon: a wrong password ends it at start with one line, no traceback, no hang."""
    ns = f"{lab_prefix}-tls"
    nsutil.add_netns(ns)
    server = EtcdServer(netns=ns, tls_cert=pki["server_cert"], tls_key=pki["server_key"], client_ca=pki["ca"])
    try:
        nsutil.add_veth(ns, "ul0", ns, "ul1")
        nsutil.add_address(ns, "ul0", "198.18.9.1/24")
        nsutil.set_up(ns, "ul0")
        server.start()
        etcdctl = [
            "etcdctl",
            f"--endpoints={server.client_url}",
            f"--cacert={pki['ca']}",
            f"--cert={pki['client_cert']}",
            f"--key={pki['client_key']}",
        ]
        for args in (["user", "add", f"root:{PASSWORD}"], ["auth", "enable"]):
            nsutil.run_in(ns, [*etcdctl, *args])
        config_file = tmp_path / "overlayd.toml"
        config_file.write_text(
            f'[node]\nname = "h1"\n[underlay]\ninterface = "ul0"\n'
            f'[store]\nurl = "etcds://127.0.0.1:{server.client_port}"\n'
            f'username = "root"\npassword = "not-{PASSWORD}"\n'
            f'tls_ca = "{pki["ca"]}"\ntls_cert = "{pki["client_cert"]}"\ntls_key = "{pki["client_key"]}"\n'
            f'[admin]\nsocket = "{tmp_path}/overlayd.sock"\n[status]\nlisten = "127.0.0.1:19480"\n'
            f'[state]\ndir = "{tmp_path}/state"\n'
        )
        result = subprocess.run(
            nsutil.exec_argv(ns, [*overlayd_argv(), "--config", str(config_file)]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("overlayd: cannot use the store: etcd at 127.0.0.1:"), last
        assert "refused the credentials of user 'root'" in last
        assert "Traceback" not in result.stderr and PASSWORD not in result.stderr
    finally:
        server.cleanup()
        nsutil.delete_netns(ns)
