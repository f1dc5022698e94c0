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

import asyncio
import contextlib
import errno
import functools
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address

from pyroute2.netlink.exceptions import NetlinkError

from overlayd.dataplane import netlink as nl
from overlayd.dataplane.kernel import Kernel, KernelError, LinkInfo, error_code_text, error_text, netns_path
from overlayd.dataplane.kstate import VETH_PREFIX, link_alias
from overlayd.dataplane.nlsync import BlockingRtnl

__all__ = ["create_local_endpoint", "delete_local_endpoint", "port_exists"]

_IFNAMSIZ = 15
# Threads for the kernel's slow link work (see `nlsync`): the kernel serializes it under
# its RTNL lock anyway, a few threads keep every add's share of it off the event loop.
_LINK_WORKERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="links")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class _HostSocket(threading.local):
    netns: str | None = None
    rtnl: BlockingRtnl | None = None


_host = _HostSocket()


@contextlib.contextmanager
def _host_rtnl(host_netns: str | None) -> Iterator[BlockingRtnl]:
    """This thread's netlink socket in the host's namespace, kept from one job to the next:
    a socket of its own per add cost six system calls more (made, set up, bound, closed),
    each a release of the GIL the event loop waits for. Answers are matched by sequence
    number, so a later job never takes an earlier one's. One namespace per thread (the
    daemon has one). After a job that failed, the socket is closed and not used again:
    it may be broken, or owe a timed-out answer (failures are rare, a new one is cheap)."""
    rtnl = _host.rtnl
    if rtnl is None or _host.netns != host_netns:
        _host.rtnl = None
        if rtnl is not None:
            rtnl.close()
        rtnl = BlockingRtnl(host_netns)
        _host.rtnl, _host.netns = rtnl, host_netns
    try:
        yield rtnl
    except BaseException:
        _host.rtnl = None
        rtnl.close()
        raise


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
    bridge_index: int | None = None,
    announce: bool = True,
) -> None:
    """Wire namespace `netns` (a name under /run/netns, or a path) to `bridge`.

    The bridge must exist already (the reconciler creates it from desired
    state; pass its ifindex if known, to save a lookup). Raises
    `KernelError` and leaves nothing behind on any failure.

    `announce`: the endpoint broadcasts its address as it comes up (a gratuitous
    ARP), for whoever may have cached another MAC for it. The bridge floods it to
    every port on the host, and each endpoint's namespace processes it: kernel
    work that grows with the endpoints on the host, on every add. The caller
    knows when nobody can hold such a cache (`announce.own_announcement_needed`).

    Four netlink round trips: the veth pair is created, its peer born inside
    the namespace, named, with its MAC and MTU; the host side gets its
    ifalias, goes on the bridge and up in one change; inside, the peer's
    index is read, then its settings, address, link up, loopback up and
    default route go in one batch.
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
    if bridge_index is None:
        br = await kernel.link(bridge)
        br_role = br.role() if br is not None else None
        if br is None or br.kind != "bridge" or br_role is None or br_role[0] != "bridge":
            raise KernelError(f"bridge {bridge} does not exist (or is not overlayd's)")
        bridge_index = br.index

    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(
        _LINK_WORKERS,
        functools.partial(
            _create_blocking,
            host_netns=kernel.netns,
            netns=netns,
            ifname=ifname,
            host_ifname=host_ifname,
            ip=ip,
            prefixlen=prefixlen,
            mac=mac,
            mtu=mtu,
            gateway=gateway,
            bridge_index=bridge_index,
            alias=link_alias(network, "port"),
            announce=announce,
        ),
    )
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        # The thread runs to its end whatever happens here: all or nothing means
        # waiting for it, then taking back what it made.
        try:
            await work
        except KernelError:
            pass
        else:
            await loop.run_in_executor(_LINK_WORKERS, _delete_blocking, kernel.netns, host_ifname)
        raise


def _create_blocking(
    *,
    host_netns: str | None,
    netns: str,
    ifname: str,
    host_ifname: str,
    ip: IPv4Address,
    prefixlen: int,
    mac: str,
    mtu: int,
    gateway: IPv4Address | None,
    bridge_index: int,
    alias: str,
    announce: bool,
) -> None:
    """`create_local_endpoint`'s kernel work, in a worker thread (see `nlsync`)."""
    fd = _open_netns(netns)
    try:
        with _host_rtnl(host_netns) as host:
            code, text = host.request(_veth_request(host_ifname, mtu, ifname, fd, mac))
            if code == errno.EEXIST:
                raise KernelError(
                    f"cannot create the endpoint: {ifname} already exists in netns {netns} "
                    f"(or {host_ifname} exists on the host)"
                )
            if code:
                raise KernelError(f"cannot create veth {host_ifname}: {error_code_text(code, text)}")
            try:
                code, text = host.request(_port_request(host_ifname, alias, bridge_index))
                if code == errno.EAFNOSUPPORT:  # a kernel without IPv6: nothing to silence
                    code, text = host.request(_port_request(host_ifname, alias, bridge_index, ipv6=False))
                if code:
                    raise KernelError(
                        f"cannot put {host_ifname} on its bridge: {error_code_text(code, text)}"
                    )
                _configure_inside(netns, fd, ifname, ip, prefixlen, gateway, announce=announce)
            except BaseException as exc:
                # All or nothing: the container side goes with the host side.
                note = ""
                code, text = host.request(nl.delete_link_by_name(host_ifname))
                if code and code != errno.ENODEV:
                    note = f" (and removing {host_ifname} again failed: {error_code_text(code, text)})"
                if isinstance(exc, OSError | KernelError):
                    raise KernelError(
                        f"cannot set up endpoint {ifname} in netns {netns}: {error_text(exc)}{note}"
                    ) from exc
                raise
    except OSError as exc:
        raise KernelError(f"cannot create veth {host_ifname}: {exc}") from exc
    finally:
        os.close(fd)


def _veth_request(host_ifname: str, mtu: int, peer: str, peer_netns_fd: int, peer_mac: str) -> bytes:
    """RTM_NEWLINK: the pair, the peer born in its namespace under its final name with its
    MAC and MTU; the host side down and on no bridge yet.

    Down and loose, the new link makes the host's monitors two notifications; made up on
    the bridge it makes a dozen more, and the owner reads every one on its event loop.
    """
    peer_info = nl.IFINFOMSG.pack(0, 0, 0, 0, 0) + b"".join(
        (
            nl.nla_str(nl.IFLA_IFNAME, peer),
            nl.nla_u32(nl.IFLA_NET_NS_FD, peer_netns_fd),
            nl.nla(nl.IFLA_ADDRESS, nl.mac_bytes(peer_mac)),
            nl.nla_u32(nl.IFLA_MTU, mtu),
        )
    )
    linkinfo = nl.nla_str(nl.IFLA_INFO_KIND, "veth") + nl.nla(
        nl.IFLA_INFO_DATA | nl.NLA_F_NESTED, nl.nla(nl.VETH_INFO_PEER | nl.NLA_F_NESTED, peer_info)
    )
    body = nl.IFINFOMSG.pack(0, 0, 0, 0, 0) + b"".join(
        (
            nl.nla_str(nl.IFLA_IFNAME, host_ifname),
            nl.nla_u32(nl.IFLA_MTU, mtu),
            nl.nla(nl.IFLA_LINKINFO | nl.NLA_F_NESTED, linkinfo),
        )
    )
    return nl.message(nl.RTM_NEWLINK, nl.NLM_F_CREATE | nl.NLM_F_EXCL, body)


def _port_request(host_ifname: str, alias: str, bridge_index: int, *, ipv6: bool = True) -> bytes:
    """RTM_NEWLINK on the new host side, all in one change: marked overlayd's (ifalias), no
    IPv6 link-local (see `nl.no_ipv6_link_local`), on the bridge and up.

    The kernel brings it up before it applies the IPv6 setting, which is still in time: a
    veth whose peer is down has no carrier, and a link gets its link-local address only
    once it has one.
    """
    v6 = nl.nla(
        nl.AF_INET6 | nl.NLA_F_NESTED,
        nl.nla(nl.IFLA_INET6_ADDR_GEN_MODE, bytes([nl.IN6_ADDR_GEN_MODE_NONE])),
    )
    body = nl.IFINFOMSG.pack(0, 0, 0, nl.IFF_UP, nl.IFF_UP) + b"".join(
        (
            nl.nla_str(nl.IFLA_IFNAME, host_ifname),
            nl.nla_str(nl.IFLA_IFALIAS, alias),
            nl.nla_u32(nl.IFLA_MASTER, bridge_index),
            nl.nla(nl.IFLA_AF_SPEC | nl.NLA_F_NESTED, v6) if ipv6 else b"",
        )
    )
    return nl.message(nl.RTM_NEWLINK, 0, body)


def _configure_inside(
    netns: str,
    netns_fd: int,
    ifname: str,
    ip: IPv4Address,
    prefixlen: int,
    gateway: IPv4Address | None,
    *,
    announce: bool,
) -> None:
    """Inside the namespace: the peer's index, then everything else in one batch."""
    try:
        inside = BlockingRtnl(netns_fd)
    except OSError as exc:
        raise KernelError(f"cannot open netlink in netns {netns}: {exc}") from exc
    with inside:
        found = inside.get_link(ifname)
        if found is None:
            raise KernelError(f"{ifname} did not appear in netns {netns}")
        index = found.index
        # In this order, each applied before the next is read:
        # - no IPv6 link-local, before it is up: the address would have it multicast DAD, MLD
        #   reports and router solicitations for as long as it lives, each flooded to every
        #   port of the network on every host (see `nl.no_ipv6_link_local`);
        # - arp_notify (if `announce`): coming up, the interface announces its address (a
        #   gratuitous ARP). A gateway or a container on this host may have cached another
        #   MAC for it, of an endpoint that had the address before. Hence the address before
        #   up too. Set either way: the namespace's default could be on.
        requests = [
            nl.no_ipv6_link_local(index),
            nl.set_devconf(index, {nl.IPV4_DEVCONF_ARP_NOTIFY: int(announce)}),
            nl.add_address(index, ip, prefixlen),
            nl.set_up(index),
            nl.set_up(nl.LOOPBACK_INDEX),
        ]
        what = [
            f"{ifname} without IPv6 link-local",
            f"{ifname} arp_notify {int(announce)}",
            f"address {ip}/{prefixlen}",
            f"{ifname} up",
            "loopback up",
        ]
        if gateway is not None:
            # "add", not "replace": a namespace that already routes its
            # default elsewhere is a conflict to report, not to overwrite.
            requests.append(nl.add_default_route(index, gateway))
            what.append(f"default route via {gateway}")
        # One round trip. A failed step does not stop the kernel from applying the later
        # ones, which is harmless: the caller then deletes the pair with all it carries
        # (only "loopback up" outlives it, as it would have before the failure anyway).
        answers = inside.requests(requests)
        if answers[0][0] == errno.EAFNOSUPPORT:  # a kernel without IPv6: nothing to silence
            answers[0] = (0, "")
        for (code, text), item in zip(answers, what, strict=True):
            if code:
                raise KernelError(f"{item}: {error_code_text(code, text)}")


def _delete_blocking(host_netns: str | None, host_ifname: str) -> tuple[int, str]:
    with _host_rtnl(host_netns) as host:
        return host.request(nl.delete_link_by_name(host_ifname))


async def delete_local_endpoint(kernel: Kernel, *, host_ifname: str) -> None:
    """Remove an endpoint's veth pair; nothing to do if it is gone already.

    Refuses (`KernelError`) to delete a link that is not one of our ports.
    """
    link = await kernel.link(host_ifname)
    if link is None:
        return
    if not _is_port(link):
        raise KernelError(f"refusing to delete {host_ifname}: not an overlayd endpoint port")
    # Unregistering a device waits for the kernel's grace periods: in a thread, not on the loop.
    code, text = await asyncio.get_running_loop().run_in_executor(
        _LINK_WORKERS, _delete_blocking, kernel.netns, host_ifname
    )
    if code and code != errno.ENODEV:
        raise KernelError(f"cannot delete {host_ifname}: {error_code_text(code, text)}")


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
