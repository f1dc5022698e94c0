"""overlayd-cni against a real admin server, without root.

`cni.main` runs in a worker thread with the CNI environment and a network
config on stdin; it talks over a temporary unix socket to the real admin
server (`start_admin_server`) in the test's loop, fronting `Service`: a small
in-memory stand-in for the daemon's side of `AdminService`. CHECK asks the
daemon, whose stand-in reads a real interface with the daemon's own
`inspect_endpoint`: loopback in the test's own namespace, which needs no privilege.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import answers
import pytest

from overlayd.api.admin import RunningServer, start_admin_server
from overlayd.api.service import JSON, BadRequest, Conflict, NotFound
from overlayd.clients import cni
from overlayd.dataplane.inspect import inspect_interface

CONTAINER = "3f1c0ffee0ddba11" + "ab" * 24
OWN_NETNS = "/proc/self/ns/net"


@dataclass
class Service:
    """The daemon's side: networks and endpoints as plain records, the admin API's JSON."""

    node: str = "h1"
    networks: dict[str, JSON] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], JSON] = field(default_factory=dict)
    macs: Iterator[str] = field(default_factory=lambda: (f"02:00:00:00:00:{i:02x}" for i in range(1, 255)))
    calls: list[str] = field(default_factory=list)

    def status(self) -> JSON:
        return answers.status_json(node=self.node)

    def is_ready(self) -> bool:
        return True

    def peers(self) -> list[JSON]:
        return []

    async def network_create(
        self, *, name: str, subnet: str, vni: int | None = None,
        gateway: str | None = None, mtu: int | None = None,
    ) -> JSON:
        raise BadRequest("not in this test")

    def network_list(self) -> list[JSON]:
        return list(self.networks.values())

    def network_inspect(self, name: str) -> JSON:
        self.calls.append(f"inspect {name}")
        if name not in self.networks:
            raise NotFound(f"network {name} not found")
        return {**self.networks[name], "endpoints": []}

    async def network_remove(self, name: str) -> None:
        raise BadRequest("not in this test")

    async def endpoint_add(
        self, *, network: str, name: str, netns: str, ip: str | None = None, ifname: str = "eth0",
    ) -> JSON:
        self.calls.append(f"add {network}/{name}")
        if network not in self.networks:
            raise NotFound(f"network {network} not found")
        if (network, name) in self.endpoints:
            raise Conflict(f"endpoint {name} already exists in network {network}")
        taken = {e["ip"] for (n, _), e in self.endpoints.items() if n == network}
        if ip in taken:
            raise Conflict(f"IP {ip} is already in use in network {network}")
        hosts = IPv4Network(self.networks[network]["subnet"]).hosts()
        address = ip or next(str(a) for a in hosts if str(a) not in taken and str(a) != "10.10.0.1")
        record = {"network": network, "name": name, "ip": address, "mac": next(self.macs),
                  "owner": self.node, "version": 1, "created_at": 1_700_000_000.0,
                  "netns": netns, "ifname": ifname}
        self.endpoints[(network, name)] = record
        return record

    def endpoint_list(self, network: str | None = None) -> list[JSON]:
        return [e for (n, _), e in self.endpoints.items() if network in (None, n)]

    async def endpoint_remove(self, *, network: str, name: str) -> None:
        self.calls.append(f"remove {network}/{name}")
        if (network, name) not in self.endpoints:
            raise NotFound(f"endpoint {network}/{name} not found")
        del self.endpoints[(network, name)]

    async def endpoint_check(self, *, network: str, name: str) -> JSON:
        self.calls.append(f"check {network}/{name}")
        if (network, name) not in self.endpoints:
            raise NotFound(f"endpoint {network}/{name} is not on this host")
        record = self.endpoints[(network, name)]
        found = await inspect_interface(network=network, name=name, netns=record["netns"],
                                        ifname=record["ifname"])
        return found.to_json()

    async def diff(self) -> list[str]:
        return []


@dataclass
class Daemon:
    service: Service
    socket: str
    server: RunningServer


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="ovl-cni-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def daemon(short_dir: str) -> AsyncIterator[Daemon]:
    service = Service()
    service.networks["demo"] = {"name": "demo", "vni": 42, "subnet": "10.10.0.0/24",
                                "gateway": "10.10.0.1", "mtu": None, "mode": "vxlan", "egress": "none"}
    service.networks["flat"] = {"name": "flat", "vni": 43, "subnet": "10.20.0.0/16",
                                "gateway": None, "mtu": None, "mode": "vxlan", "egress": "none"}
    path = os.path.join(short_dir, "overlayd.sock")
    server = await start_admin_server(service, path)
    yield Daemon(service, path, server)
    await server.close()


@pytest.fixture
def netns_path(short_dir: str) -> str:
    """Stands in for the runtime's namespace file: the plugin only checks it exists."""
    path = os.path.join(short_dir, "netns-1")
    with open(path, "w"):
        pass
    return path


@dataclass
class Run:
    code: int
    out: str

    def json(self) -> Any:
        return json.loads(self.out)


async def plugin(env: dict[str, str], stdin: str) -> Run:
    out = io.StringIO()
    code = await asyncio.to_thread(cni.main, env, io.StringIO(stdin), out)
    return Run(code, out.getvalue())


def conf(daemon: Daemon | None, version: str = "1.0.0", **extra: Any) -> str:
    data: dict[str, Any] = {"cniVersion": version, "name": "demo", "type": "overlayd", **extra}
    if daemon is not None:
        data.setdefault("socket", daemon.socket)
    return json.dumps(data)


def cni_env(command: str, netns: str = "", ifname: str = "eth0", args: str = "") -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": CONTAINER, "CNI_IFNAME": ifname,
           "CNI_PATH": "/opt/cni/bin"}
    if netns:
        env["CNI_NETNS"] = netns
    if args:
        env["CNI_ARGS"] = args
    return env


def assert_error(run: Run, code: int, *words: str) -> dict[str, Any]:
    assert run.code == 1, run.out
    assert run.out.count("\n") == 1, run.out  # one JSON document, nothing else on stdout
    error: dict[str, Any] = run.json()
    assert error["code"] == code, error
    assert error["cniVersion"] in cni.SUPPORTED_VERSIONS
    assert "\n" not in error["msg"]
    for word in words:
        assert word in error["msg"], error
    return error


# --- VERSION ------------------------------------------------------------------


async def test_version_needs_no_network_config() -> None:
    for stdin in ('{"cniVersion":"1.0.0"}', "", "not json"):
        run = await plugin({"CNI_COMMAND": "VERSION"}, stdin)
        assert run.code == 0
        assert run.json() == {"cniVersion": "1.0.0",
                              "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    run = await plugin({"CNI_COMMAND": "VERSION"}, '{"cniVersion":"0.4.0"}')
    assert run.json()["cniVersion"] == "0.4.0"


# --- ADD ----------------------------------------------------------------------


async def test_add_result_with_gateway_and_dns(daemon: Daemon, netns_path: str) -> None:
    dns = {"nameservers": ["10.10.0.53"], "search": ["example.org"]}
    run = await plugin(cni_env("ADD", netns_path), conf(daemon, dns=dns))
    assert run.code == 0, run.out
    name = cni.endpoint_name(CONTAINER, "eth0")
    record = daemon.service.endpoints[("demo", name)]
    assert (record["netns"], record["ifname"]) == (netns_path, "eth0")
    assert run.json() == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": record["mac"], "sandbox": netns_path}],
        "ips": [{"address": f"{record['ip']}/24", "gateway": "10.10.0.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.10.0.1"}],
        "dns": dns,
    }
    # The network is looked up before anything is created.
    assert daemon.service.calls == ["inspect demo", f"add demo/{name}"]


async def test_add_legacy_version_without_gateway(daemon: Daemon, netns_path: str) -> None:
    run = await plugin(cni_env("ADD", netns_path, ifname="net1"),
                       conf(daemon, "0.4.0", name="flat-net", network="flat"))
    assert run.code == 0, run.out
    result = run.json()
    assert result["cniVersion"] == "0.4.0"
    assert result["ips"] == [{"address": result["ips"][0]["address"], "version": "4", "interface": 0}]
    assert IPv4Address(result["ips"][0]["address"].split("/")[0]) in IPv4Network("10.20.0.0/16")
    assert result["routes"] == [] and "dns" not in result
    assert result["interfaces"][0]["name"] == "net1"


async def test_endpoint_name_is_stable_short_and_valid() -> None:
    name = cni.endpoint_name(CONTAINER, "eth0")
    assert name == cni.endpoint_name(CONTAINER, "eth0")
    assert name.startswith(f"cni-{CONTAINER[:12]}-eth0-") and len(name) <= 63
    # Same 12-character head, different container: different endpoint.
    assert cni.endpoint_name(CONTAINER[:12] + "x", "eth0") != name
    assert cni.endpoint_name(CONTAINER, "eth1") != name
    assert cni.endpoint_name(CONTAINER, "e@0").startswith(f"cni-{CONTAINER[:12]}-e_0-")


async def test_requested_ip_from_cni_args(daemon: Daemon, netns_path: str) -> None:
    env = cni_env("ADD", netns_path, args="IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.10.0.77")
    run = await plugin(env, conf(daemon))
    assert run.code == 0, run.out
    assert run.json()["ips"][0]["address"] == "10.10.0.77/24"
    assert daemon.service.endpoints[("demo", cni.endpoint_name(CONTAINER, "eth0"))]["ip"] == "10.10.0.77"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("IP=banana", ["IP=banana", "not an IP address"]),
        ("IP=fd00::1", ["IPv4 only"]),
        ("IP=10.99.0.1", ["not in network demo", "10.10.0.0/24"]),
        ("IgnoreUnknown=1;garbage", ["KEY=VALUE", "garbage"]),
    ],
)
async def test_bad_cni_args_are_env_errors(
    daemon: Daemon, netns_path: str, args: str, words: list[str]
) -> None:
    run = await plugin(cni_env("ADD", netns_path, args=args), conf(daemon))
    assert_error(run, cni.ERR_INVALID_ENV, *words)
    assert daemon.service.endpoints == {}


async def test_repeated_add_gives_the_same_result(daemon: Daemon, netns_path: str) -> None:
    first = await plugin(cni_env("ADD", netns_path), conf(daemon))
    again = await plugin(cni_env("ADD", netns_path), conf(daemon))
    assert first.code == again.code == 0
    assert first.json() == again.json()
    assert len(daemon.service.endpoints) == 1


async def test_taken_ip_is_refused_with_the_daemons_reason(daemon: Daemon, netns_path: str) -> None:
    run = await plugin(cni_env("ADD", netns_path, args="IP=10.10.0.9"), conf(daemon))
    assert run.code == 0
    other = {**cni_env("ADD", netns_path, args="IP=10.10.0.9"), "CNI_CONTAINERID": "other"}
    error = assert_error(await plugin(other, conf(daemon)), cni.ERR_OVERLAYD,
                         "10.10.0.9 is already in use")
    assert error["details"] == "HTTP 409"
    assert len(daemon.service.endpoints) == 1


# --- DEL ----------------------------------------------------------------------


async def test_del_is_idempotent(daemon: Daemon, netns_path: str) -> None:
    assert (await plugin(cni_env("ADD", netns_path), conf(daemon))).code == 0
    name = cni.endpoint_name(CONTAINER, "eth0")
    run = await plugin(cni_env("DEL", netns_path), conf(daemon))
    assert (run.code, run.out) == (0, "")
    assert daemon.service.endpoints == {}
    # Again, and with the namespace gone (the runtime passes none): nothing to do, success.
    for env in (cni_env("DEL", netns_path), cni_env("DEL")):
        run = await plugin(env, conf(daemon))
        assert (run.code, run.out) == (0, "")
    assert daemon.service.calls.count(f"remove demo/{name}") == 3
    # A network the daemon never had: the endpoint cannot exist either.
    run = await plugin(cni_env("DEL"), conf(daemon, network="nowhere"))
    assert (run.code, run.out) == (0, "")


# --- CHECK --------------------------------------------------------------------


async def test_check_looks_at_the_interface_and_the_daemon(daemon: Daemon) -> None:
    # The test's own namespace and its loopback: a real interface, no privilege needed.
    daemon.service.networks["loop"] = {"name": "loop", "vni": 44, "subnet": "127.0.0.0/8",
                                       "gateway": None, "mtu": None, "mode": "vxlan", "egress": "none"}
    daemon.service.macs = iter(["00:00:00:00:00:00", "02:00:00:00:00:42"])
    env = cni_env("ADD", OWN_NETNS, ifname="lo", args="IP=127.0.0.1")
    added = await plugin(env, conf(daemon, network="loop"))
    assert added.code == 0, added.out
    prev = added.json()

    check = cni_env("CHECK", OWN_NETNS, ifname="lo")
    run = await plugin(check, conf(daemon, network="loop", prevResult=prev))
    assert (run.code, run.out) == (0, "")

    record = daemon.service.endpoints[("loop", cni.endpoint_name(CONTAINER, "lo"))]
    record["ip"] = "127.0.0.2"
    assert_error(await plugin(check, conf(daemon, network="loop")), cni.ERR_OVERLAYD,
                 "lo", "lacks 127.0.0.2/8")
    assert_error(await plugin(check, conf(daemon, network="loop", prevResult=prev)),
                 cni.ERR_OVERLAYD, "prevResult", "127.0.0.1/8")
    record["ip"], record["mac"] = "127.0.0.1", "02:00:00:00:00:99"
    assert_error(await plugin(check, conf(daemon, network="loop")), cni.ERR_OVERLAYD,
                 "MAC 00:00:00:00:00:00", "02:00:00:00:00:99")
    record["mac"], record["owner"] = "00:00:00:00:00:00", "h2"
    assert_error(await plugin(check, conf(daemon, network="loop")), cni.ERR_OVERLAYD,
                 "owned by h2")
    daemon.service.endpoints.clear()
    assert_error(await plugin(check, conf(daemon, network="loop")), cni.ERR_OVERLAYD,
                 "does not know endpoint")
    other_if = cni_env("CHECK", OWN_NETNS, ifname="nosuch0")
    assert (await plugin(cni_env("ADD", OWN_NETNS, ifname="nosuch0"), conf(daemon))).code == 0
    assert_error(await plugin(other_if, conf(daemon)), cni.ERR_OVERLAYD, "no interface nosuch0")


async def test_check_reports_a_namespace_that_is_gone_or_another(daemon: Daemon, netns_path: str) -> None:
    assert (await plugin(cni_env("ADD", netns_path), conf(daemon))).code == 0
    elsewhere = os.path.join(os.path.dirname(netns_path), "netns-2")
    assert_error(await plugin(cni_env("CHECK", elsewhere), conf(daemon)), cni.ERR_OVERLAYD,
                 f"is in netns {netns_path}, not in {elsewhere}")
    os.unlink(netns_path)  # the container's namespace went away
    assert_error(await plugin(cni_env("CHECK", netns_path), conf(daemon)), cni.ERR_INVALID_ENV,
                 f"CNI_NETNS={netns_path}", "does not exist")
    name = cni.endpoint_name(CONTAINER, "eth0")
    assert daemon.service.calls.count(f"check demo/{name}") == 1  # the daemon looked, not the plugin


def test_the_plugin_imports_no_netlink_and_nothing_of_the_daemon() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, overlayd.clients.cni; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2' or m.startswith("
        "('overlayd.dataplane', 'overlayd.store', 'overlayd.gossip', 'overlayd.daemon.main', 'aiohttp'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- errors -------------------------------------------------------------------


async def test_daemon_down_is_try_again_later(short_dir: str, netns_path: str) -> None:
    missing = os.path.join(short_dir, "gone.sock")
    for command in ("ADD", "DEL", "CHECK"):
        run = await plugin(cni_env(command, netns_path), conf(None, socket=missing))
        error = assert_error(run, cni.ERR_TRY_AGAIN, "cannot reach overlayd", missing)
        assert error["details"]


async def test_bad_config(daemon: Daemon, netns_path: str) -> None:
    env = cni_env("ADD", netns_path)
    assert_error(await plugin(env, "{"), cni.ERR_DECODE, "not valid JSON")
    assert_error(await plugin(env, "[]"), cni.ERR_DECODE, "JSON object")
    assert_error(await plugin(env, json.dumps({"cniVersion": "1.0.0", "type": "overlayd"})),
                 cni.ERR_INVALID_CONFIG, "missing key 'name'")
    error = assert_error(await plugin(env, conf(daemon, "0.2.0")), cni.ERR_INCOMPATIBLE_VERSION,
                         "0.2.0", "1.0.0")
    assert error["cniVersion"] == "1.0.0"
    assert_error(await plugin(env, conf(daemon, socket=7)), cni.ERR_INVALID_CONFIG, "'socket'")
    assert_error(await plugin(env, conf(daemon, dns={"nameservers": "10.0.0.1"})),
                 cni.ERR_INVALID_CONFIG, "dns.nameservers")
    assert_error(await plugin(env, conf(daemon, dns={"servers": []})), cni.ERR_UNSUPPORTED_FIELD,
                 "dns.servers")
    error = assert_error(await plugin(env, conf(daemon, "0.4.0", network="nosuch")),
                         cni.ERR_INVALID_CONFIG, "no network 'nosuch'")
    assert error["cniVersion"] == "0.4.0"
    assert daemon.service.endpoints == {}


async def test_missing_or_bad_environment(daemon: Daemon, netns_path: str) -> None:
    good = cni_env("ADD", netns_path)
    for key in ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"):
        env = {k: v for k, v in good.items() if k != key}
        assert_error(await plugin(env, conf(daemon)), cni.ERR_INVALID_ENV, f"{key} is not set")
    cases = [
        ({"CNI_COMMAND": "GC"}, "CNI_COMMAND=GC"),
        ({"CNI_CONTAINERID": "-bad id"}, "CNI_CONTAINERID"),
        ({"CNI_IFNAME": "much-too-long-name"}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "eth/0"}, "CNI_IFNAME"),
        ({"CNI_NETNS": netns_path + "-gone"}, "no such network namespace"),
    ]
    for change, word in cases:
        assert_error(await plugin({**good, **change}, conf(daemon)), cni.ERR_INVALID_ENV, word)
    assert daemon.service.endpoints == {}


def test_example_conflist_is_valid() -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "cni", "overlayd.conflist")
    with open(path) as f:
        conflist = json.load(f)
    # What a runtime hands the plugin: the list's version and name with the plugin's own keys.
    plugin_conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    parsed = cni.parse_conf(plugin_conf)
    assert (parsed.network, parsed.socket) == ("demo", "/run/overlayd/overlayd.sock")
    assert plugin_conf["type"] == "overlayd"
