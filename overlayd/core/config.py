"""Daemon configuration: TOML file plus OVERLAYD_* environment overrides.

Every problem is reported as one `ConfigError` line that names the key, e.g.
`store.lease_ttl: must be a number >= 2 (got 0)`, so a daemon with a bad
config fails at start with a message an operator can act on.

Environment overrides use the dotted key in upper case with `_` for `.`:
`OVERLAYD_STORE_URL=etcd://10.0.0.5:2379` sets `store.url`.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from overlayd.core.clusterkey import decode_keys
from overlayd.core.model import ValidationError, parse_ipv4, validate_name

DEFAULT_PATH = "/etc/overlayd/overlayd.toml"
STORE_SCHEMES = ("etcd", "etcds", "consul", "consuls", "zookeeper")


class ConfigError(Exception):
    """One line naming the config key at fault."""


@dataclass(frozen=True)
class StoreEndpoint:
    host: str
    port: int


@dataclass(frozen=True)
class StoreConfig:
    url: str
    scheme: str
    endpoints: tuple[StoreEndpoint, ...]
    prefix: str = "/overlayd/v1/"
    lease_ttl: int = 10
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # ZooKeeper: the znode every path lives under ("" = the root), from the URL's path.
    chroot: str = ""
    # Consul ACL token (sent as X-Consul-Token); never logged.
    token: str | None = field(default=None, repr=False)
    # TLS to the store: CA bundle that signs the server's certificate, and an
    # optional client certificate and key (both or neither).
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Consul and ZooKeeper only (their watches poll): seconds between the starts of two
    # read rounds at least. A change after a quiet spell is read at once; what changes
    # within the pace is read in one round. Beside gossip the default is WATCH_PACE_BESIDE_GOSSIP.
    watch_pace: float = 0.0


@dataclass(frozen=True)
class GossipSettings:
    """Direct peer-to-peer dissemination (see overlayd.gossip)."""

    port: int = 7946
    bind: str | None = None  # None: the VTEP address
    keys: tuple[str, ...] = field(default=(), repr=False)  # base64 AES-256 keys, first = primary
    insecure: bool = False
    peers: tuple[tuple[str, int], ...] = ()
    probe_interval: float = 1.0
    anti_entropy_interval: float = 5.0
    # Gossip-only mode: how long a member confirmed dead keeps its endpoints.
    dead_grace: float = 30.0
    tombstone_ttl: float = 1800.0
    mtu: int = 1400


@dataclass(frozen=True)
class Config:
    node_name: str
    underlay_interface: str | None
    vtep_address: IPv4Address | None
    store: StoreConfig | None  # None: gossip-only (the embedded mode)
    gossip: GossipSettings | None = None
    admin_socket: str = "/run/overlayd/overlayd.sock"
    status_listen: str = "127.0.0.1:9480"
    state_dir: str = "/var/lib/overlayd"
    reconcile_interval: float = 300.0
    log_level: str = "info"
    # Gateway namespaces (VXLAN networks with egress) are named <prefix><VNI>.
    gateway_netns_prefix: str = "ovgw"
    # Interfaces besides the underlay's where replies to masqueraded traffic come in.
    egress_interfaces: tuple[str, ...] = ()


# Dotted key -> expected type: the single list of what the file may contain.
_KEYS: dict[str, type | tuple[type, ...]] = {
    "node.name": str,
    "underlay.interface": str,
    "underlay.address": str,
    "store.url": str,
    "store.prefix": str,
    "store.lease_ttl": int,
    "store.username": str,
    "store.password": str,
    "store.token": str,
    "store.tls_ca": str,
    "store.tls_cert": str,
    "store.tls_key": str,
    "store.watch_pace": (int, float),
    "admin.socket": str,
    "status.listen": str,
    "state.dir": str,
    "reconcile.interval": (int, float),
    "log.level": str,
    "gossip.enabled": bool,
    "gossip.port": int,
    "gossip.bind": str,
    "gossip.keys": list,
    "gossip.key_file": str,
    "gossip.insecure": bool,
    "gossip.peers": list,
    "gossip.probe_interval": (int, float),
    "gossip.anti_entropy_interval": (int, float),
    "gossip.dead_grace": (int, float),
    "gossip.tombstone_ttl": (int, float),
    "gossip.mtu": int,
    "egress.netns_prefix": str,
    "egress.interfaces": list,
}
# How a type error names what was expected, for every type _KEYS uses.
_EXPECTED: dict[type | tuple[type, ...], str] = {
    str: "a string",
    int: "an integer",
    (int, float): "a number",
    bool: "true or false",
    list: "a list of strings",
}
GOSSIP_STORE = "gossip"
# Beside gossip, peers hear of a change from gossip within milliseconds and the store's
# watch is the backstop: a Consul or ZooKeeper watch then reads at most one round per
# 0.3 s, so a burst of changes costs every daemon (and the server) one listing of the
# network, not one per change. consul-template paces its requests the same way. 0.3 s,
# not 0.1: on a 10-host lab, one change at a time, it cut the servers' CPU per change by
# 30-50% more (Consul's to about etcd's) and the daemons' by a quarter; what it delays is
# only a change gossip failed to bring, by at most 0.3 s. etcd's watch, a stream, is
# cancelled for the pace in a burst and made again after it (`StreamPace`): a quarter
# less CPU per change for the daemons, a fifth less for the server.
WATCH_PACE_BESIDE_GOSSIP = 0.3
MAX_WATCH_PACE = 10.0
_NETNS_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{0,39}[A-Za-z_.-]")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def load(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    """Read, merge and validate the configuration; raise ConfigError on any problem."""
    file = Path(path or DEFAULT_PATH)
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found (use --config PATH)") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    flat = _flatten(raw)
    flat.update(_env_overrides(os.environ if env is None else env))
    return from_flat(flat)


def from_flat(flat: dict[str, Any]) -> Config:
    for key, value in flat.items():
        if key not in _KEYS:
            raise ConfigError(f"{key}: unknown key")
        expected = _KEYS[key]
        if not _has_type(value, expected):
            raise ConfigError(f"{key}: must be {_EXPECTED[expected]} (got {value!r})")

    node_name = flat.get("node.name") or socket.gethostname().split(".")[0]
    try:
        validate_name(node_name, "node name")
    except ValidationError as exc:
        raise ConfigError(f"node.name: {exc}") from None

    interface = flat.get("underlay.interface")
    address = None
    if "underlay.address" in flat:
        try:
            address = parse_ipv4(flat["underlay.address"], "VTEP address")
        except ValidationError as exc:
            raise ConfigError(f"underlay.address: {exc}") from None
    if interface is None and address is None:
        raise ConfigError("underlay: set underlay.interface, underlay.address, or both")

    ttl = flat.get("store.lease_ttl", 10)
    if ttl < 2:
        raise ConfigError(f"store.lease_ttl: must be >= 2 seconds (got {ttl})")
    interval = float(flat.get("reconcile.interval", 300.0))
    if interval <= 0:
        raise ConfigError(f"reconcile.interval: must be > 0 seconds (got {interval})")
    level = flat.get("log.level", "info").lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"log.level: must be one of {', '.join(_LOG_LEVELS)} (got {level!r})")
    listen = flat.get("status.listen", "127.0.0.1:9480")
    parse_listen(listen, key="status.listen")
    prefix = flat.get("store.prefix", "/overlayd/v1/")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ConfigError(f"store.prefix: must start and end with '/' (got {prefix!r})")

    netns_prefix = flat.get("egress.netns_prefix", "ovgw")
    if not _NETNS_PREFIX_RE.fullmatch(netns_prefix):
        raise ConfigError(
            f"egress.netns_prefix: 1-40 letters, digits, '_', '.', '-', not ending in a digit "
            f"(got {netns_prefix!r})"
        )
    egress_interfaces = tuple(flat.get("egress.interfaces", ()))
    for name in egress_interfaces:
        if not isinstance(name, str) or not name or len(name) > 15 or "/" in name or " " in name:
            raise ConfigError(f"egress.interfaces: invalid interface name {name!r}")

    if "store.url" not in flat:
        raise ConfigError('store.url: required, e.g. etcd://127.0.0.1:2379 or "gossip"')
    gossip = _gossip_settings(flat)
    store: StoreConfig | None = None
    if flat["store.url"] in (GOSSIP_STORE, GOSSIP_STORE + "://"):
        if gossip is None:
            raise ConfigError('store.url: "gossip" (no KV store) needs gossip; remove gossip.enabled = false')
    else:
        store = _store_config(flat, prefix, ttl, beside_gossip=gossip is not None)
    return Config(
        node_name=node_name,
        underlay_interface=interface,
        vtep_address=address,
        store=store,
        gossip=gossip,
        admin_socket=flat.get("admin.socket", "/run/overlayd/overlayd.sock"),
        status_listen=listen,
        state_dir=flat.get("state.dir", "/var/lib/overlayd"),
        reconcile_interval=interval,
        log_level=level,
        gateway_netns_prefix=netns_prefix,
        egress_interfaces=egress_interfaces,
    )


def _has_type(value: object, expected: type | tuple[type, ...]) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    # bool is an int in Python, but `true` is never a port or a TTL.
    return not isinstance(value, bool) and isinstance(value, expected)


def _store_config(flat: dict[str, Any], prefix: str, ttl: int, *, beside_gossip: bool) -> StoreConfig:
    if ("store.tls_cert" in flat) != ("store.tls_key" in flat):
        raise ConfigError("store.tls_cert: set together with store.tls_key (a certificate and its key)")
    pace = float(flat.get("store.watch_pace", WATCH_PACE_BESIDE_GOSSIP if beside_gossip else 0.0))
    if not 0.0 <= pace <= MAX_WATCH_PACE:
        raise ConfigError(f"store.watch_pace: must be 0 to {MAX_WATCH_PACE:g} seconds (got {pace:g})")
    scheme, endpoints = parse_store_url(flat["store.url"])
    store = StoreConfig(
        url=flat["store.url"],
        scheme=scheme,
        endpoints=endpoints,
        prefix=prefix,
        lease_ttl=ttl,
        username=flat.get("store.username"),
        password=flat.get("store.password"),
        chroot=parse_store_chroot(flat["store.url"]),
        token=flat.get("store.token"),
        tls_ca=flat.get("store.tls_ca"),
        tls_cert=flat.get("store.tls_cert"),
        tls_key=flat.get("store.tls_key"),
        watch_pace=pace,
    )
    return store


def _gossip_settings(flat: dict[str, Any]) -> GossipSettings | None:
    """Gossip is on when the store is "gossip" or any gossip key is set, unless enabled = false."""
    keys_given = [k for k in flat if k.startswith("gossip.") and k != "gossip.enabled"]
    gossip_store = flat.get("store.url") in (GOSSIP_STORE, GOSSIP_STORE + "://")
    if not flat.get("gossip.enabled", bool(keys_given) or gossip_store):
        return None
    keys = list(flat.get("gossip.keys", []))
    if "gossip.key_file" in flat:
        path = Path(flat["gossip.key_file"])
        try:
            keys += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ConfigError(f"gossip.key_file: cannot read {path}: {exc.strerror}") from None
    insecure = flat.get("gossip.insecure", False)
    if not keys and not insecure:
        raise ConfigError(
            "gossip.keys: gossip needs a key (gossip.keys or gossip.key_file; "
            "`overlayctl gossip keygen` makes one), or gossip.insecure = true to run without one"
        )
    try:
        decode_keys(keys)
    except ValueError as exc:
        raise ConfigError(f"gossip.keys: {exc}") from None
    port = flat.get("gossip.port", 7946)
    if not 0 < port < 65536:
        raise ConfigError(f"gossip.port: must be 1..65535 (got {port})")
    peers = []
    for item in flat.get("gossip.peers", []):
        host, sep, peer_port = item.rpartition(":")
        if not sep:
            host, peer_port = item, str(port)
        try:
            parse_ipv4(host, "peer address")
        except ValidationError:
            raise ConfigError(f"gossip.peers: expected IPv4[:port], got {item!r}") from None
        if not peer_port.isdigit() or not 0 < int(peer_port) < 65536:
            raise ConfigError(f"gossip.peers: bad port in {item!r}")
        peers.append((host, int(peer_port)))
    numbers = {}
    for name, default in (
        ("probe_interval", 1.0),
        ("anti_entropy_interval", 5.0),
        ("dead_grace", 30.0),
        ("tombstone_ttl", 1800.0),
    ):
        value = float(flat.get(f"gossip.{name}", default))
        if value <= 0:
            raise ConfigError(f"gossip.{name}: must be > 0 seconds (got {value})")
        numbers[name] = value
    mtu = flat.get("gossip.mtu", 1400)
    if not 576 <= mtu <= 9000:
        raise ConfigError(f"gossip.mtu: must be 576..9000 (got {mtu})")
    bind = flat.get("gossip.bind")
    if bind is not None:
        try:
            parse_ipv4(bind, "gossip bind address")
        except ValidationError as exc:
            raise ConfigError(f"gossip.bind: {exc}") from None
    return GossipSettings(
        port=port,
        bind=bind,
        keys=tuple(keys),
        insecure=insecure,
        peers=tuple(peers),
        mtu=mtu,
        **numbers,
    )


def parse_store_url(url: str) -> tuple[str, tuple[StoreEndpoint, ...]]:
    """`etcd://host:port[,host:port...]` -> ("etcd", endpoints)."""
    parts = urlsplit(url)
    if parts.scheme not in STORE_SCHEMES:
        raise ConfigError(
            f"store.url: unsupported scheme {parts.scheme!r} in {url!r} "
            f"(supported: {', '.join(STORE_SCHEMES)})"
        )
    endpoints = []
    for item in parts.netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"store.url: expected host:port, got {item!r} in {url!r}")
        endpoints.append(StoreEndpoint(host, int(port)))
    return parts.scheme, tuple(endpoints)


def parse_store_chroot(url: str) -> str:
    """`zookeeper://host:port/a/b` -> "/a/b"; "" when the URL has no path."""
    path = urlsplit(url).path.rstrip("/")
    if not path:
        return ""
    if "//" in path or any(part in (".", "..") for part in path.split("/")[1:]):
        raise ConfigError(f"store.url: invalid chroot path {path!r} in {url!r}")
    return path


def parse_listen(value: str, *, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port (got {value!r})")
    return host.strip("[]"), int(port)


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a [{section}] table")
        for name, value in body.items():
            if isinstance(value, dict):
                raise ConfigError(f"{section}.{name}: unexpected nested table")
            flat[f"{section}.{name}"] = value
    return flat


def _env_overrides(env: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, expected in _KEYS.items():
        var = "OVERLAYD_" + key.upper().replace(".", "_")
        if var not in env:
            continue
        text = env[var]
        if expected is int:
            if not text.lstrip("-").isdigit():
                raise ConfigError(f"{key}: {var} must be an integer (got {text!r})")
            out[key] = int(text)
        elif expected == (int, float):
            try:
                out[key] = float(text)
            except ValueError:
                raise ConfigError(f"{key}: {var} must be a number (got {text!r})") from None
        elif expected is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{key}: {var} must be true or false (got {text!r})")
            out[key] = text.lower() in ("true", "1", "yes")
        elif expected is list:
            out[key] = [item.strip() for item in text.split(",") if item.strip()]
        else:
            out[key] = text
    return out


def secrets_held(raw_keys: Iterable[str]) -> list[str]:
    """Which of the config file's own keys (dotted, as in the file) are secrets."""
    return sorted(key for key in raw_keys if key in _SECRET_KEYS)


_SECRET_KEYS = frozenset({"store.password", "store.token", "gossip.keys"})


def exposure_warning(path: str, mode: int, secrets: Sequence[str]) -> str | None:
    """The warning for a config file that holds `secrets` and whose permission bits
    (`mode`) let group or others read it; None when there is nothing to say. Pure:
    the caller stats the file."""
    if not secrets or not mode & 0o044:
        return None
    return (
        f"config {path} holds secrets ({', '.join(secrets)}) and is readable by others "
        f"(mode {mode & 0o777:o}): chmod 600 {path}"
    )


def file_keys(path: str) -> list[str]:
    """The dotted keys the file itself sets (not the environment's)."""
    return list(_flatten(tomllib.loads(Path(path).read_text())))

