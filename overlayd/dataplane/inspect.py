"""What a local endpoint's namespace holds now: its interface, MAC, state and IPv4 addresses.

Read-only. It answers the admin API's endpoint check, which is the CNI
plugin's CHECK: the plugin asks the daemon instead of entering a container's
namespace and speaking netlink itself, so it stays a thin client of the API.
What is found (or missing) is reported as facts; the caller judges them
against the endpoint's record.
"""

from __future__ import annotations

import os
import socket
from ipaddress import IPv4Interface

from pyroute2.netlink.exceptions import NetlinkError

from overlayd.api.schema import EndpointCheck
from overlayd.core.model import Endpoint
from overlayd.dataplane.kernel import Kernel, KernelError, error_text
from overlayd.util.nsutil import netns_path

__all__ = ["inspect_endpoint", "inspect_interface"]


def _is_own_netns(netns: str) -> bool:
    """True if `netns` is the namespace this process runs in: read it without entering it.

    Entering a namespace needs CAP_SYS_ADMIN even when it is our own.
    """
    try:
        target, own = os.stat(netns_path(netns)), os.stat("/proc/self/ns/net")
    except OSError:
        return False  # gone or unreadable: the Kernel reports it
    return (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino)


async def inspect_endpoint(endpoint: Endpoint) -> EndpointCheck:
    """Read the endpoint's interface in its namespace. Never raises for what it finds."""
    return await inspect_interface(
        network=endpoint.network, name=endpoint.name, netns=endpoint.netns, ifname=endpoint.ifname
    )


async def inspect_interface(*, network: str, name: str, netns: str, ifname: str) -> EndpointCheck:
    """Read `ifname` in `netns` for endpoint `network/name`. Never raises for what it finds.

    A namespace that is gone or cannot be entered is a finding too (`error`),
    as is an interface that is not there (`found` false).
    """

    def report(
        *,
        found: bool = False,
        mac: str | None = None,
        up: bool | None = None,
        addresses: tuple[IPv4Interface, ...] = (),
        error: str | None = None,
    ) -> EndpointCheck:
        return EndpointCheck(
            network=network,
            name=name,
            netns=netns,
            ifname=ifname,
            found=found,
            mac=mac,
            up=up,
            addresses=addresses,
            error=error,
        )

    try:
        async with Kernel(netns=None if _is_own_netns(netns) else netns) as kernel:
            link = await kernel.link(ifname)
            if link is None:
                return report()
            # One interface's addresses with their prefix length: a small pyroute2 dump.
            addresses = tuple(
                [
                    IPv4Interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
                    async for msg in await kernel.ipr.get_addr(index=link.index, family=socket.AF_INET)
                ]
            )
    except KernelError as exc:
        return report(error=str(exc))
    except (NetlinkError, OSError) as exc:
        return report(error=error_text(exc))
    return report(found=True, mac=link.mac, up=link.up, addresses=addresses)
