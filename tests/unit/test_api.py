"""The admin API, its client and overlayctl, and the status server, end to end without root.

The servers run on a temporary unix socket / free TCP port in the test's
event loop, backed by `FakeService`: a small in-memory implementation of the
daemon's side of `AdminService`. The synchronous client and `cli.main` run in
a worker thread so that they can talk to the server on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import aiohttp
import answers
import pytest

from overlayd.api.admin import RunningServer, ServerError, start_admin_server
from overlayd.api.client import AdminClient, ClientError
from overlayd.api.service import JSON, BadRequest, Conflict, NotFound
from overlayd.api.status import parse_listen, start_status_server
from overlayd.clients import cli
from overlayd.core.model import Endpoint, Network, first_free_ip
from overlayd.util.metrics import Metrics

# --- the daemon's side, in memory -------------------------------------------


@dataclass
class FakeService:
    node: str = "h1"
    ready: bool = False
    changes: list[str] = field(default_factory=list)
    networks: dict[str, Network] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], Endpoint] = field(default_factory=dict)

    def status(self) -> JSON:
        return answers.status_json(
            node=self.node,
            ready=self.ready,
            networks=sorted(self.networks),
            endpoints={"local": len(self.endpoints), "remote": 0},
        )

    def is_ready(self) -> bool:
        return self.ready

    def peers(self) -> list[JSON]:
        return [
            {"name": "h1", "vtep": "198.18.0.1", "started_at": 1_700_000_000.0,
             "endpoints": len(self.endpoints), "self": True},
            {"name": "h2", "vtep": "198.18.0.2", "started_at": 1_700_000_100.0,
             "endpoints": 0, "self": False},
        ]

    async def network_create(
        self, *, name: str, subnet: str, vni: int | None = None,
        gateway: str | None = None, mtu: int | None = None,
        mode: str | None = None, egress: str | None = None,
    ) -> JSON:
        if name in self.networks:
            raise Conflict(f"network {name!r} already exists")
        if vni is not None and any(n.vni == vni for n in self.networks.values()):
            raise Conflict(f"VNI {vni} is already used")
        net = Network.from_dict(
            {"name": name, "subnet": subnet, "vni": vni or 4096 + len(self.networks),
             "gateway": gateway, "mtu": mtu, "mode": mode or "vxlan", "egress": egress or "none"}
        )
        self.networks[name] = net
        return net.to_dict()

    def network_list(self) -> list[JSON]:
        return [{**n.to_dict(), "endpoints": self._members(n.name)} for n in self.networks.values()]

    def _members(self, network: str) -> int:
        return sum(1 for n, _ in self.endpoints if n == network)

    def _network(self, name: str) -> Network:
        if name == "boom":
            raise RuntimeError("store password is hunter2")
        if name not in self.networks:
            raise NotFound(f"network {name!r} not found")
        return self.networks[name]

    def network_inspect(self, name: str) -> JSON:
        net = self._network(name)
        members = [e.to_dict() for (n, _), e in self.endpoints.items() if n == name]
        return {**net.to_dict(), "endpoints": members}

    async def network_remove(self, name: str) -> None:
        self._network(name)
        if any(n == name for n, _ in self.endpoints):
            raise Conflict(f"network {name!r} still has endpoints")
        del self.networks[name]

    async def endpoint_add(
        self, *, network: str, name: str, netns: str, ip: str | None = None,
        ifname: str = "eth0",
    ) -> JSON:
        net = self._network(network)
        if (network, name) in self.endpoints:
            raise Conflict(f"endpoint {network}/{name} already exists")
        taken = {e.ip for (n, _), e in self.endpoints.items() if n == network}
        addr = IPv4Address(ip) if ip else first_free_ip(net, taken)
        net.check_endpoint_ip(addr)  # model.ValidationError -> 400
        ep = Endpoint(network=network, name=name, ip=addr, mac=f"02:00:00:00:00:{len(taken):02x}",
                      owner=self.node, netns=netns, ifname=ifname)
        self.endpoints[(network, name)] = ep
        return ep.to_dict()

    def endpoint_list(self, network: str | None = None) -> list[JSON]:
        return [e.to_dict() for (n, _), e in self.endpoints.items() if network in (None, n)]

    async def endpoint_remove(self, *, network: str, name: str) -> None:
        if (network, name) not in self.endpoints:
            raise NotFound(f"endpoint {network}/{name} not found")
        del self.endpoints[(network, name)]

    async def endpoint_check(self, *, network: str, name: str) -> JSON:
        ep = self.endpoints.get((network, name))
        if ep is None:
            raise NotFound(f"endpoint {network}/{name} is not on this host")
        return {"network": network, "name": name, "netns": ep.netns, "ifname": ep.ifname,
                "found": True, "mac": ep.mac, "up": True, "addresses": [f"{ep.ip}/24"], "error": None}

    async def diff(self) -> list[str]:
        if self.changes == ["bad"]:
            raise BadRequest("diff refused")
        return list(self.changes)


# --- fixtures ---------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="ovl-api-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Admin:
    service: FakeService
    path: str
    server: RunningServer


@pytest.fixture
async def admin(short_dir: str) -> AsyncIterator[Admin]:
    service = FakeService()
    path = os.path.join(short_dir, "run", "overlayd.sock")
    server = await start_admin_server(service, path)
    yield Admin(service, path, server)
    await server.close()


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def overlayctl(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return Run(code, out, err)


async def ctl(admin: Admin, capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    return await overlayctl(capsys, "--socket", admin.path, *argv)


async def raw(admin: Admin, method: str, path: str, data: bytes | None = None) -> tuple[int, Any]:
    """A request the real client would never send (malformed bodies, unknown routes)."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=admin.path)) as http:
        async with http.request(method, f"http://overlayd{path}", data=data) as resp:
            return resp.status, await resp.json()


async def create_demo(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    run = await ctl(admin, capsys, "network", "create", "demo", "--subnet", "10.10.0.0/24",
                    "--gateway", "10.10.0.1", "--vni", "42")
    assert run.code == 0, run.err


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


# --- the socket -------------------------------------------------------------


async def test_socket_is_root_only_and_removed_on_close(short_dir: str) -> None:
    path = os.path.join(short_dir, "a", "b", "overlayd.sock")
    server = await start_admin_server(FakeService(), path)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    await server.close()
    with pytest.raises(FileNotFoundError):
        os.lstat(path)


async def test_stale_socket_is_replaced(short_dir: str) -> None:
    path = os.path.join(short_dir, "overlayd.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # bound, never listening: what a killed daemon leaves behind
    dead.close()
    server = await start_admin_server(FakeService(), path)
    try:
        status = await asyncio.to_thread(AdminClient(path).status)
        assert status.node == "h1"
    finally:
        await server.close()


async def test_live_socket_is_not_stolen(admin: Admin) -> None:
    with pytest.raises(ServerError, match="another process is serving"):
        await start_admin_server(FakeService(), admin.path)
    assert (await asyncio.to_thread(AdminClient(admin.path).status)).node == "h1"


async def test_non_socket_path_is_left_alone(short_dir: str) -> None:
    path = os.path.join(short_dir, "overlayd.sock")
    write_file(path, "precious")
    with pytest.raises(ServerError, match="not a socket"):
        await start_admin_server(FakeService(), path)
    assert read_file(path) == "precious"


# --- overlayctl against the API ---------------------------------------------


async def test_network_create_ls_inspect(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    await create_demo(admin, capsys)
    run = await ctl(admin, capsys, "network", "create", "blue", "--subnet", "10.20.0.0/16")
    assert run.code == 0
    assert run.out == (
        "created network blue: VNI 4097, subnet 10.20.0.0/16, gateway -, MTU auto, mode vxlan, egress none\n"
    )

    run = await ctl(admin, capsys, "network", "ls")
    assert run.code == 0
    assert run.out.splitlines() == [
        "NAME  VNI   SUBNET        GATEWAY    MTU   MODE   EGRESS",
        "demo  42    10.10.0.0/24  10.10.0.1  auto  vxlan  none",
        "blue  4097  10.20.0.0/16  -          auto  vxlan  none",
    ]

    run = await ctl(admin, capsys, "network", "inspect", "demo")
    assert run.code == 0
    assert run.out.splitlines() == [
        "name:      demo",
        "vni:       42",
        "subnet:    10.10.0.0/24",
        "gateway:   10.10.0.1",
        "mtu:       auto",
        "mode:      vxlan",
        "egress:    none",
        "endpoints: -",
    ]


async def test_json_before_and_after_the_command(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    await create_demo(admin, capsys)
    before = await overlayctl(capsys, "--json", "--socket", admin.path, "network", "ls")
    after = await overlayctl(capsys, "network", "ls", "--socket", admin.path, "--json")
    assert before.code == after.code == 0
    assert before.json() == after.json() == [{**admin.service.networks["demo"].to_dict(), "endpoints": 0}]


async def test_socket_from_environment(
    admin: Admin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OVERLAYD_SOCKET", admin.path)
    run = await overlayctl(capsys, "--json", "status")
    assert run.code == 0
    assert run.json() == admin.service.status()


async def test_status_and_peers(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    run = await ctl(admin, capsys, "status")
    assert run.code == 0
    # One "key: value" per line, values aligned in one column.
    rows = {key: value.strip() for key, _, value in (line.partition(":") for line in run.out.splitlines())}
    assert rows["node"] == "h1"
    assert rows["store.healthy"] == "yes"
    assert rows["last_reconcile.started_at"] == "2023-11-14T22:13:30Z"
    lines = run.out.splitlines()
    assert len({len(line) - len(line.partition(":")[2].lstrip()) for line in lines}) == 1

    run = await ctl(admin, capsys, "peers")
    assert run.code == 0
    assert run.out.splitlines() == [
        "NAME  VTEP        ENDPOINTS  STARTED               SELF",
        "h1    198.18.0.1  0          2023-11-14T22:13:20Z  yes",
        "h2    198.18.0.2  0          2023-11-14T22:15:00Z",
    ]
    run = await ctl(admin, capsys, "peers", "--json")
    assert [p["name"] for p in run.json()] == ["h1", "h2"]


async def test_endpoint_lifecycle(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    await create_demo(admin, capsys)
    run = await ctl(admin, capsys, "endpoint", "add", "demo", "web", "--netns", "ns-web")
    assert run.code == 0, run.err
    assert run.out.startswith("created endpoint demo/web: IP 10.10.0.2, MAC 02:00:00:00:00:00")

    run = await ctl(admin, capsys, "--json", "endpoint", "add", "demo", "db", "--netns", "ns-db",
                    "--ip", "10.10.0.9", "--ifname", "eth1")
    assert run.code == 0
    assert run.json()["ip"] == "10.10.0.9"
    assert run.json()["ifname"] == "eth1"

    run = await ctl(admin, capsys, "endpoint", "ls", "--network", "demo")
    assert run.out.splitlines() == [
        "NETWORK  NAME  IP         MAC                OWNER  NETNS",
        "demo     web   10.10.0.2  02:00:00:00:00:00  h1     ns-web",
        "demo     db    10.10.0.9  02:00:00:00:00:01  h1     ns-db",
    ]
    run = await ctl(admin, capsys, "endpoint", "ls", "--network", "other")
    assert run.out == "NETWORK  NAME  IP  MAC  OWNER  NETNS\n"

    run = await ctl(admin, capsys, "network", "inspect", "demo")
    assert "endpoints:\nNETWORK  NAME  IP" in run.out

    run = await ctl(admin, capsys, "network", "rm", "demo")
    assert (run.code, run.out) == (1, "")
    assert run.err == "overlayctl: error: network 'demo' still has endpoints\n"

    for name in ("web", "db"):
        run = await ctl(admin, capsys, "endpoint", "rm", "demo", name)
        assert (run.code, run.out) == (0, f"removed endpoint demo/{name}\n")
    run = await ctl(admin, capsys, "--json", "network", "rm", "demo")
    assert run.code == 0
    assert run.json() == {"network": "demo", "removed": True}
    assert admin.service.networks == {}


async def test_daemon_errors_are_one_line_exit_1(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    await create_demo(admin, capsys)
    cases = [
        (["network", "inspect", "nope"], "network 'nope' not found"),  # 404
        (["network", "create", "demo", "--subnet", "10.30.0.0/24"],
         "network 'demo' already exists"),  # 409
        (["network", "create", "red", "--subnet", "10.30.0.0/24", "--vni", "42"],
         "VNI 42 is already used"),  # 409
        (["endpoint", "add", "demo", "x", "--netns", "n", "--ip", "10.99.0.5"],
         "IP 10.99.0.5 is not a usable address in network demo (10.10.0.0/24)"),  # 400
        (["endpoint", "rm", "demo", "ghost"], "endpoint demo/ghost not found"),
        (["network", "create", "bad name", "--subnet", "10.30.0.0/24"], "invalid network name"),
    ]
    for argv, message in cases:
        run = await ctl(admin, capsys, *argv)
        assert run.code == 1, argv
        assert run.out == ""
        assert run.err.startswith(f"overlayctl: error: {message}"), run.err
        assert run.err.count("\n") == 1
    assert list(admin.service.networks) == ["demo"]  # nothing half-created


async def test_internal_error_hides_details_and_logs_them(
    admin: Admin, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="overlayd.api.admin"):
        run = await ctl(admin, capsys, "network", "inspect", "boom")
    assert run.code == 1
    assert run.err == (
        "overlayctl: error: internal error (RuntimeError); see the overlayd log for details\n"
    )
    assert "hunter2" not in run.err
    assert any(r.exc_info and "hunter2" in str(r.exc_info[1]) for r in caplog.records)


async def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ["network", "create", "n", "--subnet", "10.0.0.0/24", "--vni", "x"],
        ["network", "create", "n", "--subnet", "10.0.0.0/24", "--vni", "0"],
        ["network", "create", "n", "--subnet", "10.0.0.0/24", "--vni", str(2**24)],
        ["network", "create", "n", "--subnet", "10.0.0.1/24"],
        ["network", "create", "n", "--subnet", "banana"],
        ["network", "create", "n"],
        ["endpoint", "add", "demo", "web", "--netns", "ns", "--ip", "10.0.0.300"],
        ["lab", "up", "--hosts", "0"],
        ["network"],
        [],
    ]
    for argv in cases:
        run = await overlayctl(capsys, "--socket", "/nonexistent.sock", *argv)
        assert run.code == 2, argv
        assert "error:" in run.err


async def test_daemon_not_running(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = os.path.join(short_dir, "overlayd.sock")
    run = await overlayctl(capsys, "--socket", missing, "status")
    assert run.code == 1
    assert run.err == (
        f"overlayctl: error: cannot reach overlayd at {missing}: no such file "
        "(is the daemon running?)\n"
    )
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(missing)
    dead.close()
    run = await overlayctl(capsys, "--socket", missing, "network", "ls")
    assert run.code == 1
    assert "connection refused (is the daemon running?)" in run.err


async def test_diff_exit_codes(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    run = await ctl(admin, capsys, "diff")
    assert (run.code, run.out, run.err) == (0, "", "")

    admin.service.changes = ["ReplaceFdb demo 02:00:00:00:00:01 -> 198.18.0.2",
                             "DeleteNeigh demo 10.10.0.7"]
    run = await ctl(admin, capsys, "diff")
    assert run.code == 3
    assert run.out.splitlines() == admin.service.changes
    run = await ctl(admin, capsys, "diff", "--json")
    assert (run.code, run.json()) == (3, admin.service.changes)

    admin.service.changes = ["bad"]
    run = await ctl(admin, capsys, "diff")
    assert (run.code, run.err) == (1, "overlayctl: error: diff refused\n")


async def test_json_output_is_exactly_what_the_daemon_sent(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints the schema record's to_json(): the daemon's answer, same keys, same order."""
    await create_demo(admin, capsys)
    assert (await ctl(admin, capsys, "endpoint", "add", "demo", "web", "--netns", "ns")).code == 0
    gossip_peers = [
        {"name": "h1", "vtep": "198.18.0.1", "started_at": 1_700_000_000.0, "endpoints": 1,
         "self": True, "state": "alive", "rtt_ms": None, "clock_offset": None},
        {"name": "h3", "vtep": "198.18.0.3", "started_at": None, "endpoints": 0, "self": False,
         "state": "suspect", "rtt_ms": 0.42, "clock_offset": 0.003},
    ]
    admin.service.peers = lambda: gossip_peers  # type: ignore[method-assign]
    withdrawn = {**admin.service.endpoint_list()[0], "conflict": "IP 10.10.0.2 is h2's (older claim)"}
    admin.service.endpoint_list = lambda network=None: [withdrawn]  # type: ignore[method-assign]
    cases: list[tuple[list[str], Any]] = [
        (["status"], admin.service.status()),
        (["peers"], gossip_peers),
        (["network", "ls"], admin.service.network_list()),
        (["network", "inspect", "demo"], admin.service.network_inspect("demo")),
        (["endpoint", "ls"], [withdrawn]),
    ]
    for argv, answer in cases:
        run = await ctl(admin, capsys, "--json", *argv)
        assert run.code == 0, (argv, run.err)
        assert run.out == json.dumps(answer, indent=2) + "\n", argv
    table = await ctl(admin, capsys, "peers")
    assert table.out.splitlines()[0].split() == ["NAME", "VTEP", "ENDPOINTS", "STARTED", "SELF", "STATE",
                                                 "RTT", "MS"]


async def test_an_answer_of_the_wrong_shape_is_one_line(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = answers.status_json(store=answers.store_json(healthy="yes"))
    admin.service.status = lambda: broken  # type: ignore[method-assign]
    run = await ctl(admin, capsys, "status")
    assert run.code == 1
    assert run.err == (
        "overlayctl: error: unexpected answer from overlayd: "
        "status.store.healthy: must be true or false, got a string\n"
    )
    with pytest.raises(ClientError, match="missing field 'ready'"):
        admin.service.status = lambda: {k: v for k, v in broken.items() if k != "ready"}  # type: ignore
        await asyncio.to_thread(AdminClient(admin.path).status)


async def test_endpoint_check_route(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    await create_demo(admin, capsys)
    status, data = await raw(admin, "GET", "/v1/endpoints/demo/web/check")
    assert (status, data) == (404, {"error": "endpoint demo/web is not on this host"})
    assert (await ctl(admin, capsys, "endpoint", "add", "demo", "web", "--netns", "ns")).code == 0
    status, data = await raw(admin, "GET", "/v1/endpoints/demo/web/check")
    assert status == 200 and data["found"] is True and data["netns"] == "ns"


# --- the wire: what only a hand-made request can reach ----------------------


async def test_malformed_requests_are_400_naming_the_field(admin: Admin) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"{", "request body is not valid JSON"),
        (b"", "request body is not valid JSON"),
        (b"[1]", "request body must be a JSON object, got an array"),
        (b'{"subnet": "10.0.0.0/24"}', "missing field 'name'"),
        (b'{"name": "n", "subnet": 5}', "field 'subnet' must be a string, got an integer"),
        (b'{"name": "n", "subnet": "10.0.0.0/24", "vni": "7"}',
         "field 'vni' must be an integer, got a string"),
        (b'{"name": "n", "subnet": "10.0.0.0/24", "mtu": true}',
         "field 'mtu' must be an integer, got a boolean"),
        (b'{"name": "n", "subnet": "10.0.0.0/24", "vnii": 7}', "unknown field 'vnii'"),
        (b'{"name": "n", "subnet": "10.0.0.0/33"}', "invalid subnet"),  # model.ValidationError
    ]
    for body, message in cases:
        status, data = await raw(admin, "POST", "/v1/networks", body)
        assert status == 400, body
        assert data["error"].startswith(message), (body, data)
    assert admin.service.networks == {}


async def test_unknown_route_and_method(admin: Admin) -> None:
    assert await raw(admin, "GET", "/v1/nope") == (
        404, {"error": "no such API route: GET /v1/nope"}
    )
    status, data = await raw(admin, "DELETE", "/v1/diff")
    assert status == 405
    assert data["error"].startswith("method DELETE not allowed on /v1/diff")


async def test_client_methods(admin: Admin) -> None:
    client = AdminClient(admin.path)
    net = await asyncio.to_thread(
        lambda: client.network_create(name="demo", subnet="10.10.0.0/24", mtu=1400)
    )
    assert net.to_json() == {"name": "demo", "vni": 4096, "subnet": "10.10.0.0/24", "gateway": None,
                             "mtu": 1400, "mode": "vxlan", "egress": "none"}
    ep = await asyncio.to_thread(
        lambda: client.endpoint_add(network="demo", name="a", netns="/run/netns/a")
    )
    assert ep.netns == "/run/netns/a" and ep.ip == IPv4Address("10.10.0.1")
    assert [e.name for e in await asyncio.to_thread(client.endpoint_list, "demo")] == ["a"]
    check = await asyncio.to_thread(lambda: client.endpoint_check(network="demo", name="a"))
    assert check.found and str(check.addresses[0]) == "10.10.0.1/24"
    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(client.network_inspect, "missing")
    assert (info.value.status, info.value.message) == (404, "network 'missing' not found")
    await asyncio.to_thread(lambda: client.endpoint_remove(network="demo", name="a"))
    await asyncio.to_thread(client.network_remove, "demo")
    assert await asyncio.to_thread(client.network_list) == ()
    assert (await asyncio.to_thread(client.diff)).changes == ()


# --- lab dispatch -----------------------------------------------------------


async def test_lab_commands_dispatch_to_overlayd_lab(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, object]]] = []

    def recorder(name: str, code: int) -> Any:
        def call(**kwargs: object) -> int:
            calls.append((name, kwargs))
            return code
        return call

    lab = types.ModuleType("overlayd.lab")
    lab.lab_up = recorder("up", 0)  # type: ignore[attr-defined]
    lab.lab_status = recorder("status", 0)  # type: ignore[attr-defined]
    lab.lab_down = recorder("down", 1)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "overlayd.lab", lab)

    assert (await overlayctl(capsys, "lab", "up")).code == 0
    assert (await overlayctl(capsys, "--json", "lab", "up", "--hosts", "5", "--prefix", "t1")).code == 0
    assert (await overlayctl(capsys, "lab", "status", "--json")).code == 0
    assert (await overlayctl(capsys, "lab", "down", "--prefix", "t1")).code == 1
    assert calls == [
        ("up", {"hosts": 3, "store": "gossip", "prefix": "ovl", "json_out": False, "egress": "none",
                "mode": "vxlan"}),
        ("up", {"hosts": 5, "store": "gossip", "prefix": "t1", "json_out": True, "egress": "none",
                "mode": "vxlan"}),
        ("status", {"prefix": "ovl", "json_out": True}),
        ("down", {"prefix": "t1"}),
    ]


# --- table formatting -------------------------------------------------------


def test_format_table_aligns_without_trailing_blanks() -> None:
    text = cli.format_table(["A", "LONGER", "C"], [["xyz", "1", ""], ["x", "22", "end"]])
    assert text.splitlines() == [
        "A    LONGER  C",
        "xyz  1",
        "x    22      end",
    ]
    assert cli.format_table(["ONLY"], []) == "ONLY"


# --- the status server ------------------------------------------------------


@pytest.fixture
async def status_server() -> AsyncIterator[tuple[FakeService, Metrics, str]]:
    service, metrics = FakeService(), Metrics()
    server = await start_status_server(service, metrics, "127.0.0.1:0")
    yield service, metrics, f"http://{server.address}"
    await server.close()


async def test_status_server(status_server: tuple[FakeService, Metrics, str]) -> None:
    service, metrics, base = status_server
    metrics.convergence_latency.labels(path="watch").observe(0.004)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok\n")
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503
        service.ready = True
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/status") as resp:
            assert resp.status == 200
            assert await resp.json() == service.status()
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            body = await resp.text()
        assert 'overlayd_convergence_latency_seconds_bucket{le="0.005",path="watch"} 1.0' in body
        async with http.post(f"{base}/status") as resp:
            assert resp.status == 405  # read-only


async def test_status_server_reports_unusable_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ServerError, match=f"cannot listen on {address}: "):
            await start_status_server(FakeService(), Metrics(), address)
    with pytest.raises(ServerError, match="invalid listen address 'localhost'"):
        await start_status_server(FakeService(), Metrics(), "localhost")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9480") == ("127.0.0.1", 9480)
    assert parse_listen("[::1]:9480") == ("::1", 9480)
    for bad in ("9480", ":9480", "host:x", "host:70000"):
        with pytest.raises(ValueError, match="invalid listen address"):
            parse_listen(bad)
