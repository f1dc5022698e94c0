"""Small helpers around iproute2 for the lab: namespaces, veths, bridges, addresses, tc.

Every helper runs one `ip` (or `tc`) command and raises `CommandError`, which
carries the command line and its stderr, when that command fails. Names of
namespaces are those of `ip netns` (files under /run/netns).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
from collections.abc import Sequence
from typing import Any

from overlayd.util.nsutil import socket_in_netns as _socket_in_netns

NETNS_DIR = "/run/netns"
IFNAMSIZ = 16  # including the terminating NUL: names are at most 15 characters


# CommandError.returncode of a command that ran past its timeout (and was killed).
PROCESS_TIMED_OUT = -1


class CommandError(RuntimeError):
    """A command exited non-zero; the message names it and quotes its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = f": {self.stderr}" if self.stderr else ""
        super().__init__(f"`{shlex.join(self.argv)}` failed (exit {returncode}){detail}")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; raise CommandError on a non-zero exit if `check`."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, PROCESS_TIMED_OUT, f"timed out after {timeout:g}s") from exc
    if check and result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stderr)
    return result


def ip(*args: str, netns: str | None = None, timeout: float = 30.0) -> str:
    """Run `ip [-n NETNS] ARGS...` and return its stdout."""
    argv = ["ip", *(("-n", netns) if netns is not None else ()), *args]
    return run(argv, timeout=timeout).stdout


def ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    """Run `ip -j [-n NETNS] ARGS...` and return the decoded JSON list."""
    out = ip("-j", *args, netns=netns).strip()
    data: list[dict[str, Any]] = json.loads(out) if out else []
    return data


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside `netns`."""
    return ["ip", "netns", "exec", netns, *argv]


def enter_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` in `netns`'s network namespace only.

    Unlike `ip netns exec`, which also gives the command a mount namespace of its
    own, the command shares the machine's mounts, as a daemon started by the
    system would: a namespace it pins under /run/netns (`ip netns add`) is seen
    by everyone and outlives it.
    """
    return ["nsenter", f"--net={os.path.join(NETNS_DIR, netns)}", "--", *argv]


def run_in(
    netns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside `netns` (via `ip netns exec`)."""
    return run(exec_argv(netns, argv), check=check, timeout=timeout, input=input)


def check_ifname(name: str) -> str:
    """Raise ValueError unless `name` is a valid Linux interface name."""
    if not name or len(name) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid interface name {name!r}: 1-15 characters, no '/' or spaces")
    return name


# --- namespaces --------------------------------------------------------------


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def add_netns(name: str, *, lo_up: bool = True) -> None:
    """Create namespace `name` (error if it exists) and bring its loopback up."""
    run(["ip", "netns", "add", name])
    if lo_up:
        set_up(name, "lo")


def delete_netns(name: str) -> bool:
    """Delete namespace `name`; False if there was none.

    Interfaces in it go with it once no process is left inside: end those
    processes first (see `netns_pids`).
    """
    if not netns_exists(name):
        return False
    run(["ip", "netns", "delete", name])
    return True


def netns_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is `name`."""
    if not netns_exists(name):
        return []
    out = run(["ip", "netns", "pids", name]).stdout
    return [int(word) for word in out.split()]


# --- links and addresses -------------------------------------------------------


def set_up(netns: str | None, ifname: str) -> None:
    ip("link", "set", "dev", ifname, "up", netns=netns)


def set_mtu(netns: str | None, ifname: str, mtu: int) -> None:
    ip("link", "set", "dev", ifname, "mtu", str(mtu), netns=netns)


def add_bridge(netns: str | None, name: str, *, mtu: int | None = None) -> None:
    """Create bridge `name` (STP off, the default) and bring it up."""
    mtu_args = ("mtu", str(mtu)) if mtu is not None else ()
    ip("link", "add", check_ifname(name), *mtu_args, "type", "bridge", netns=netns)
    set_up(netns, name)


def add_veth(
    netns: str | None,
    name: str,
    peer_netns: str,
    peer_name: str,
    *,
    mtu: int | None = None,
) -> None:
    """Create a veth pair: `name` in `netns`, `peer_name` in `peer_netns`; both left down."""
    mtu_args = ("mtu", str(mtu)) if mtu is not None else ()
    ip(
        *("link", "add", check_ifname(name), *mtu_args, "type", "veth"),
        *("peer", "name", check_ifname(peer_name), *mtu_args, "netns", peer_netns),
        netns=netns,
    )


def set_master(netns: str | None, ifname: str, master: str) -> None:
    ip("link", "set", "dev", ifname, "master", master, netns=netns)


def add_address(netns: str | None, ifname: str, cidr: str) -> None:
    ip("address", "add", cidr, "dev", ifname, netns=netns)


def links(netns: str | None) -> list[dict[str, Any]]:
    """`ip -j link show` in `netns`: one dict per interface (ifname, mtu, operstate, ...)."""
    return ip_json("link", "show", netns=netns)


def link_names(netns: str | None) -> list[str]:
    return [str(link["ifname"]) for link in links(netns)]


def addresses(netns: str | None, ifname: str) -> list[str]:
    """The IPv4 addresses of `ifname` as CIDR strings."""
    out = []
    for link in ip_json("-4", "address", "show", "dev", ifname, netns=netns):
        for info in link.get("addr_info", []):
            out.append(f"{info['local']}/{info['prefixlen']}")
    return out


def tc(netns: str | None, *args: str) -> str:
    """Run `tc [-n NETNS] ARGS...`, e.g. `tc(ns, "qdisc", "replace", "dev", "ul0", "root",
    "netem", "delay", "20ms")`, and return its stdout."""
    argv = ["tc", *(("-n", netns) if netns is not None else ()), *args]
    return run(argv).stdout


# --- sockets inside a namespace ---------------------------------------------------


def socket_in_netns(
    netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that lives in `netns`, usable from any thread of this process."""
    return _socket_in_netns(netns, family, type)


def free_port(host: str = "127.0.0.1", *, netns: str | None = None) -> int:
    """A TCP port on `host` that nothing listens on right now (in `netns` if given)."""
    sock = (
        socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM)
        if netns is not None
        else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    )
    with sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
