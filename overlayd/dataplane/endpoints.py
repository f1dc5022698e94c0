"""Local endpoints: a veth pair from a container's network namespace to our bridge.

The host side (`ovep...`, alias `overlayd:port:<network>`) sits on the
network's bridge; the container side, created directly inside the target
namespace, carries the endpoint's name, MAC, address and default route.
Creating is all or nothing: if any step fails, the pair is removed again
(deleting the host side takes the container side with it) and a
`KernelError` says what went wrong.

Only the admin API creates and deletes these; the reconciler just keeps an
existing host side on its bridge with its MTU (`SetPort`).
"""

from __future__ import annotations

import errno
import os
import re
from ipaddress import IPv4Address

from pyroute2.netlink.exceptions import NetlinkError

from overlayd.dataplane.kernel import Kernel, KernelError, LinkInfo, error_text, netns_path, open_iproute
from overlayd.dataplane.kstate import VETH_PREFIX, link_alias

__all__ = ["create_local_endpoint", "delete_local_endpoint", "port_exists"]

_IFNAMSIZ = 15
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > _IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise KernelError(f"invalid {what} {name!r} (1-{_IFNAMSIZ} characters, no '/' or spaces)")


def _open_netns(netns: str) -> int:
    """An fd on the namespace; the kernel takes it to place the container side there."""
    path = netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KernelError(f"network namespace {netns} does not exist ({path})") from None
    except OSError as exc:
        raise KernelError(f"cannot open network namespace {netns}: {exc}") from exc


def _is_port(link: LinkInfo) -> bool:
    role = link.role()
    return link.kind == "veth" and role is not None and role[0] == "port"


async def port_exists(kernel: Kernel, host_ifname: str) -> bool:
    """True if `host_ifname` is one of our endpoint veths."""
    link = await kernel.link(host_ifname)
    return link is not None and _is_port(link)


async def create_local_endpoint(
    kernel: Kernel,
    *,
    netns: str,
    ifname: str,
    host_ifname: str,
    ip: IPv4Address,
    prefixlen: int,
    mac: str,
    mtu: int,
    gateway: IPv4Address | None,
    bridge: str,
    network: str,
) -> None:
    """Wire namespace `netns` (a name under /run/netns, or a path) to `bridge`.

    The bridge must exist already (the reconciler creates it from desired
    state). Raises `KernelError` and leaves nothing behind on any failure.
    """
    _check_name(ifname, "interface name")
    _check_name(host_ifname, "host interface name")
    if not host_ifname.startswith(VETH_PREFIX):
        # Without the prefix the port would not count as ours: nothing could
        # ever see, repair or delete it.
        raise KernelError(f"host interface name {host_ifname!r} must start with {VETH_PREFIX!r}")
    mac = mac.lower()
    if not _MAC_RE.fullmatch(mac):
        raise KernelError(f"invalid MAC address {mac!r}")
    if not 0 < prefixlen <= 32:
        raise KernelError(f"invalid prefix length {prefixlen}")

    if await kernel.link(host_ifname) is not None:
        raise KernelError(f"host interface {host_ifname} already exists")
    br = await kernel.link(bridge)
    br_role = br.role() if br is not None else None
    if br is None or br.kind != "bridge" or br_role is None or br_role[0] != "bridge":
        raise KernelError(f"bridge {bridge} does not exist (or is not overlayd's)")

    fd = _open_netns(netns)
    try:
        # The peer is born inside the target namespace under its final name,
        # so a name clash there fails the whole create and nothing is left.
        await kernel.ipr.link(
            "add",
            ifname=host_ifname,
            kind="veth",
            mtu=mtu,
            peer={"ifname": ifname, "net_ns_fd": fd, "address": mac, "mtu": mtu},
        )
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise KernelError(
                f"cannot create the endpoint: {ifname} already exists in netns {netns} "
                f"(or {host_ifname} appeared on the host meanwhile)"
            ) from exc
        raise KernelError(f"cannot create veth {host_ifname}: {error_text(exc)}") from exc
    except OSError as exc:
        raise KernelError(f"cannot create veth {host_ifname}: {exc}") from exc
    finally:
        os.close(fd)

    host = await kernel.link(host_ifname)
    if host is None:
        raise KernelError(f"veth {host_ifname} vanished right after it was created")
    try:
        await kernel.ipr.link(
            "set",
            index=host.index,
            ifalias=link_alias(network, "port"),
            master=br.index,
            state="up",
        )
        await _configure_inside(netns, ifname, ip, prefixlen, gateway)
    except BaseException as exc:
        # All or nothing, also when cancelled: the container side goes with
        # the host side.
        note = ""
        try:
            await kernel.ipr.link("del", index=host.index)
        except NetlinkError as cleanup:
            if cleanup.code != errno.ENODEV:
                note = f" (and removing {host_ifname} again failed: {error_text(cleanup)})"
        if isinstance(exc, NetlinkError | OSError | KernelError):
            raise KernelError(
                f"cannot set up endpoint {ifname} in netns {netns}: {error_text(exc)}{note}"
            ) from exc
        raise


async def _configure_inside(
    netns: str, ifname: str, ip: IPv4Address, prefixlen: int, gateway: IPv4Address | None
) -> None:
    async with open_iproute(netns) as ns:
        found = await ns.link_lookup(ifname=ifname)
        if not found:
            raise KernelError(f"{ifname} did not appear in netns {netns}")
        index = found[0]
        await ns.addr("add", index=index, address=str(ip), prefixlen=prefixlen)
        await ns.link("set", index=index, state="up")
        loopback = await ns.link_lookup(ifname="lo")
        if loopback:
            await ns.link("set", index=loopback[0], state="up")
        if gateway is not None:
            # "add", not "replace": a namespace that already routes its
            # default elsewhere is a conflict to report, not to overwrite.
            await ns.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=index)


async def delete_local_endpoint(kernel: Kernel, *, host_ifname: str) -> None:
    """Remove an endpoint's veth pair; nothing to do if it is gone already.

    Refuses (`KernelError`) to delete a link that is not one of our ports.
    """
    link = await kernel.link(host_ifname)
    if link is None:
        return
    if not _is_port(link):
        raise KernelError(f"refusing to delete {host_ifname}: not an overlayd endpoint port")
    try:
        await kernel.ipr.link("del", index=link.index)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise KernelError(f"cannot delete {host_ifname}: {error_text(exc)}") from exc


async def quarantine_local_endpoint(kernel: Kernel, *, host_ifname: str) -> None:
    """Take an endpoint's veth off its bridge and down, keeping it for the operator to inspect.

    For an endpoint that lost an address clash: left on the bridge it would
    answer for an IP that belongs to another host's endpoint now.
    """
    link = await kernel.link(host_ifname)
    if link is None:
        return
    if not _is_port(link):
        raise KernelError(f"refusing to touch {host_ifname}: not an overlayd endpoint port")
    try:
        await kernel.ipr.link("set", index=link.index, master=0, state="down")
    except NetlinkError as exc:
        raise KernelError(f"cannot quarantine {host_ifname}: {error_text(exc)}") from exc
