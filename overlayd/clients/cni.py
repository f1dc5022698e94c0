"""overlayd-cni: the CNI plugin (spec 1.0.0, also 0.3.x/0.4.0 configs), a thin client of overlayd.

A container runtime execs this once per attachment with `CNI_COMMAND` and the
other `CNI_*` variables in the environment and the network config on stdin:

    ADD      create the endpoint through the local daemon's admin API (the daemon
             makes the veth into `CNI_NETNS` as `CNI_IFNAME`, with IP, MAC and
             default route) and print the CNI result
    DEL      remove it; succeeds when there is nothing to remove (netns gone,
             endpoint never created, network gone)
    CHECK    the daemon still owns the endpoint, and the interface in the
             namespace has its MAC and address (the daemon looks, over the
             admin API: the plugin never enters the namespace itself)
    VERSION  the spec versions supported; needs no network config

Plugin keys in the config (besides cniVersion, name, type):

    network  overlayd network to attach to (default: the config's `name`)
    socket   the daemon's admin socket (default /run/overlayd/overlayd.sock)
    dns      passed through to the result, as the spec asks of plugins

The endpoint is named after the container id and interface, so DEL and CHECK
find it again from the same environment. A static IP arrives from podman in
`CNI_ARGS` as `IP=a.b.c.d`.

Every failure is printed on stdout in the CNI error format with a one-line
`msg`, and the exit status is 1. Nothing of the daemon is imported: the admin
API, read through its schema (`overlayd.api.client`, `overlayd.api.schema`),
is the whole contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from typing import Any, TextIO

from overlayd.api.client import DEFAULT_SOCKET, AdminClient, ClientError
from overlayd.api.schema import EndpointInfo

SPEC_VERSION = "1.0.0"
# 0.3.x and 0.4.0 share one result format (IPs carry "version": "4"); 1.0.0 drops it.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
_LEGACY_RESULT = frozenset({"0.3.0", "0.3.1", "0.4.0"})

# Well-known error codes of the spec; 999 is ours for "the daemon refused or failed".
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_OVERLAYD = 999

# The spec's rules for CNI_CONTAINERID and CNI_IFNAME.
_CONTAINER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_IFNAME_BAD = re.compile(r"[/:\s]")
_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CniError(Exception):
    """A failure reported to the runtime as {"code", "msg", "details"}."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# --- input ------------------------------------------------------------------


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    network: str
    socket: str
    dns: dict[str, Any] | None
    prev_result: dict[str, Any] | None


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str
    netns: str
    ifname: str
    ip: IPv4Address | None


def _decode(raw: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CniError(ERR_DECODE, f"network config on stdin is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CniError(ERR_DECODE, "network config on stdin must be a JSON object")
    return data


def _conf_str(data: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if value is None:
        raise CniError(ERR_INVALID_CONFIG, f"network config: missing key {key!r}")
    if not isinstance(value, str) or not value:
        raise CniError(ERR_INVALID_CONFIG, f"network config: {key!r} must be a non-empty string")
    return value


def _check_version(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"CNI version {version} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})",
        )


def _dns(value: object) -> dict[str, Any] | None:
    """The config's `dns`, checked against the spec's shape."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CniError(ERR_INVALID_CONFIG, "network config: 'dns' must be an object")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "domain":
            if not isinstance(item, str):
                raise CniError(ERR_INVALID_CONFIG, "network config: 'dns.domain' must be a string")
        elif key in ("nameservers", "search", "options"):
            if not isinstance(item, list) or not all(isinstance(s, str) for s in item):
                raise CniError(ERR_INVALID_CONFIG, f"network config: 'dns.{key}' must be a list of strings")
        else:
            raise CniError(
                ERR_UNSUPPORTED_FIELD,
                f"network config: unknown key 'dns.{key}' (allowed: nameservers, domain, search, options)",
            )
        out[key] = item
    return out or None


def parse_conf(data: Mapping[str, Any]) -> NetConf:
    version = _conf_str(data, "cniVersion")
    _check_version(version)
    name = _conf_str(data, "name")
    prev = data.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(ERR_INVALID_CONFIG, "network config: 'prevResult' must be an object")
    return NetConf(
        cni_version=version,
        name=name,
        network=_conf_str(data, "network", name),
        socket=_conf_str(data, "socket", DEFAULT_SOCKET),
        dns=_dns(data.get("dns")),
        prev_result=prev,
    )


def parse_cni_args(raw: str) -> dict[str, str]:
    """`K1=V1;K2=V2` (the runtime's CNI_ARGS) as a dict; unknown keys are the caller's to ignore."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CniError(
                ERR_INVALID_ENV, f"CNI_ARGS: expected KEY=VALUE pairs separated by ';', got {pair!r}"
            )
        out[key.strip()] = value.strip()
    return out


def _requested_ip(args: Mapping[str, str]) -> IPv4Address | None:
    raw = args.get("IP")
    if not raw:
        return None
    try:
        address = ip_address(raw)
    except ValueError:
        raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: IP={raw} is not an IP address") from None
    if not isinstance(address, IPv4Address):
        raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: IP={raw}: overlayd networks are IPv4 only")
    return address


def _need(environ: Mapping[str, str], key: str) -> str:
    value = environ.get(key, "")
    if not value:
        raise CniError(ERR_INVALID_ENV, f"{key} is not set")
    return value


def parse_env(environ: Mapping[str, str]) -> Env:
    command = _need(environ, "CNI_COMMAND")
    if command not in ("ADD", "DEL", "CHECK", "VERSION"):
        raise CniError(ERR_INVALID_ENV, f"CNI_COMMAND={command}: expected ADD, DEL, CHECK or VERSION")
    container_id = _need(environ, "CNI_CONTAINERID")
    if not _CONTAINER_ID_RE.fullmatch(container_id):
        raise CniError(
            ERR_INVALID_ENV,
            f"CNI_CONTAINERID={container_id!r}: use letters, digits, '_', '.', '-', "
            "starting with a letter or digit",
        )
    ifname = _need(environ, "CNI_IFNAME")
    if len(ifname) > 15 or ifname in (".", "..") or _IFNAME_BAD.search(ifname):
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME={ifname!r}: 1-15 characters, no '/', ':' or spaces")
    # DEL may come after the namespace is gone; the runtime then passes none.
    netns = environ.get("CNI_NETNS", "") if command == "DEL" else _need(environ, "CNI_NETNS")
    return Env(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        ip=_requested_ip(parse_cni_args(environ.get("CNI_ARGS", ""))),
    )


def endpoint_name(container_id: str, ifname: str) -> str:
    """The endpoint's name in overlayd: stable for (container, interface), <= 41 chars.

    A readable head (short container id, interface) for operators, and a hash
    of the full pair so that two ids sharing 12 characters never collide.
    """
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:8]
    return f"cni-{container_id[:12]}-{_NAME_SAFE.sub('_', ifname)}-{digest}"


# --- talking to overlayd ----------------------------------------------------


def _daemon_error(exc: ClientError, doing: str) -> CniError:
    if exc.status is None or exc.status == 503:
        return CniError(ERR_TRY_AGAIN, f"{doing}: {exc.message}", "overlayd is down or not synced yet")
    return CniError(ERR_OVERLAYD, f"{doing}: overlayd refused: {exc.message}", f"HTTP {exc.status}")


def _network(client: AdminClient, conf: NetConf) -> tuple[IPv4Network, IPv4Address | None]:
    try:
        record = client.network_inspect(conf.network)
    except ClientError as exc:
        if exc.status == 404:
            raise CniError(
                ERR_INVALID_CONFIG,
                f"overlayd has no network {conf.network!r} (create it with `overlayctl network create`, "
                "or fix the config's 'network')",
            ) from None
        raise _daemon_error(exc, f"looking up network {conf.network}") from None
    return record.subnet, record.gateway


def _find_endpoint(client: AdminClient, network: str, name: str) -> EndpointInfo | None:
    for record in client.endpoint_list(network):
        if record.name == name:
            return record
    return None


# --- the result -------------------------------------------------------------


def make_result(
    conf: NetConf,
    env: Env,
    endpoint: EndpointInfo,
    subnet: IPv4Network,
    gateway: IPv4Address | None,
) -> dict[str, Any]:
    address = IPv4Interface(f"{endpoint.ip}/{subnet.prefixlen}")
    ip: dict[str, Any] = {"address": str(address), "interface": 0}
    if conf.cni_version in _LEGACY_RESULT:
        ip["version"] = "4"
    if gateway is not None:
        ip["gateway"] = str(gateway)
    result: dict[str, Any] = {
        "cniVersion": conf.cni_version,
        # Only the container side: the host side is the daemon's business and
        # no runtime needs its name.
        "interfaces": [{"name": env.ifname, "mac": endpoint.mac, "sandbox": env.netns}],
        "ips": [ip],
        # The daemon installs the default route exactly when the network has a gateway.
        "routes": [{"dst": "0.0.0.0/0", "gw": str(gateway)}] if gateway is not None else [],
    }
    if conf.dns is not None:
        result["dns"] = conf.dns
    return result


# --- commands ---------------------------------------------------------------


def cmd_add(conf: NetConf, env: Env, client: AdminClient) -> dict[str, Any]:
    if not os.path.exists(env.netns):
        raise CniError(ERR_INVALID_ENV, f"CNI_NETNS={env.netns}: no such network namespace")
    # Looked up first, so a failure here leaves no endpoint behind.
    subnet, gateway = _network(client, conf)
    if env.ip is not None and env.ip not in subnet:
        raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: IP={env.ip} is not in network {conf.network} ({subnet})")
    name = endpoint_name(env.container_id, env.ifname)
    try:
        record = client.endpoint_add(
            network=conf.network,
            name=name,
            netns=env.netns,
            ip=str(env.ip) if env.ip is not None else None,
            ifname=env.ifname,
        )
    except ClientError as exc:
        if exc.status != 409:
            raise _daemon_error(exc, f"creating endpoint {name} in {conf.network}") from None
        # A repeated ADD for the same attachment (a runtime retrying) gets the same answer.
        existing = _find_endpoint(client, conf.network, name)
        if existing is None or existing.netns != env.netns or existing.ifname != env.ifname:
            raise _daemon_error(exc, f"creating endpoint {name} in {conf.network}") from None
        record = existing
    return make_result(conf, env, record, subnet, gateway)


def cmd_del(conf: NetConf, env: Env, client: AdminClient) -> None:
    name = endpoint_name(env.container_id, env.ifname)
    try:
        client.endpoint_remove(network=conf.network, name=name)
    except ClientError as exc:
        if exc.status == 404:
            return  # never created, or removed already: DEL is idempotent
        raise _daemon_error(exc, f"removing endpoint {name} from {conf.network}") from None


def _prev_result_ip(conf: NetConf, ifname: str) -> IPv4Interface | None:
    """The address prevResult gave to `ifname` (CHECK compares against it), if any."""
    prev = conf.prev_result
    if not prev:
        return None
    interfaces = prev.get("interfaces") or []
    for ip in prev.get("ips") or []:
        index = ip.get("interface")
        if isinstance(index, int) and 0 <= index < len(interfaces):
            if interfaces[index].get("name") != ifname:
                continue
        try:
            address = IPv4Interface(ip["address"])
        except (KeyError, TypeError, ValueError):
            continue
        return address
    return None


def cmd_check(conf: NetConf, env: Env, client: AdminClient) -> None:
    name = endpoint_name(env.container_id, env.ifname)
    subnet, _ = _network(client, conf)
    try:
        record = _find_endpoint(client, conf.network, name)
        node = client.status().node
    except ClientError as exc:
        raise _daemon_error(exc, f"looking up endpoint {name}") from None
    if record is None:
        raise CniError(ERR_OVERLAYD, f"overlayd does not know endpoint {name} in network {conf.network}")
    if record.owner != node:
        raise CniError(ERR_OVERLAYD, f"endpoint {name} is owned by {record.owner}, not by this host ({node})")
    if record.netns != env.netns:
        raise CniError(ERR_OVERLAYD, f"endpoint {name} is in netns {record.netns}, not in {env.netns}")
    expected = IPv4Interface(f"{record.ip}/{subnet.prefixlen}")
    previous = _prev_result_ip(conf, env.ifname)
    if previous is not None and previous != expected:
        raise CniError(ERR_OVERLAYD, f"prevResult gave {env.ifname} {previous}, overlayd has {expected}")
    try:
        found = client.endpoint_check(network=conf.network, name=name)
    except ClientError as exc:
        raise _daemon_error(exc, f"checking endpoint {name}") from None
    if found.error is not None:
        raise CniError(ERR_INVALID_ENV, f"CNI_NETNS={env.netns}: {found.error}")
    if not found.found:
        raise CniError(ERR_OVERLAYD, f"no interface {env.ifname} in {env.netns}")
    if (found.mac or "").lower() != record.mac.lower():
        have = f"{env.ifname} in {env.netns} has MAC {found.mac}"
        raise CniError(ERR_OVERLAYD, f"{have}, overlayd has {record.mac}")
    if expected not in found.addresses:
        have = ", ".join(str(a) for a in found.addresses) or "none"
        raise CniError(ERR_OVERLAYD, f"{env.ifname} in {env.netns} lacks {expected} (has: {have})")


def version_info(raw: str) -> dict[str, Any]:
    """VERSION: answers whatever stdin holds (podman sends only {"cniVersion": ...})."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        data = {}
    asked = data.get("cniVersion") if isinstance(data, dict) else None
    version = asked if asked in SUPPORTED_VERSIONS else SPEC_VERSION
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


# --- entry point -------------------------------------------------------------


def _error_version(raw: str) -> str:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return SPEC_VERSION
    version = data.get("cniVersion") if isinstance(data, dict) else None
    return version if version in SUPPORTED_VERSIONS else SPEC_VERSION


def run(environ: Mapping[str, str], raw: str) -> dict[str, Any] | None:
    """Execute one command; the JSON to print (None for none). Raises CniError."""
    if environ.get("CNI_COMMAND") == "VERSION":
        return version_info(raw)
    env = parse_env(environ)
    conf = parse_conf(_decode(raw))
    client = AdminClient(conf.socket)
    if env.command == "ADD":
        return cmd_add(conf, env, client)
    if env.command == "DEL":
        cmd_del(conf, env, client)
    else:
        cmd_check(conf, env, client)
    return None


def main(
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    stdout = sys.stdout if stdout is None else stdout
    raw = ""
    try:
        raw = (sys.stdin if stdin is None else stdin).read()
        output = run(environ, raw)
    except CniError as exc:
        error: dict[str, Any] = {"cniVersion": _error_version(raw), "code": exc.code, "msg": exc.msg}
        if exc.details:
            error["details"] = exc.details
        stdout.write(json.dumps(error) + "\n")
        return 1
    except OSError as exc:
        stdout.write(json.dumps({"cniVersion": _error_version(raw), "code": ERR_IO, "msg": str(exc)}) + "\n")
        return 1
    if output is not None:
        stdout.write(json.dumps(output) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
