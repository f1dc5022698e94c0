"""Remove everything overlayd made in this namespace: `overlayctl teardown`'s kernel half.

Only links that carry both marks of ownership (name prefix and ifalias, see
`kstate.is_ours`) are touched. Endpoint ports go first (their container side
goes with them), then VXLAN devices, then bridges; FDB, flood and neighbour
entries live on those devices and disappear with them. Then what outlives
the links: routes with overlayd's protocol number (routed networks' host
routes through the underlay), overlayd's nftables tables, and the gateway
namespaces (everything inside goes with them). IPv4 forwarding switched on
on the underlay interface stays on: overlayd never knows who else needs it.
Errors are collected, not raised, so one stubborn object does not leave the
rest behind.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from overlayd.dataplane.commands import Command, DeleteNetns, DeleteNft, DeleteRoute, describe
from overlayd.dataplane.kernel import Kernel, KernelError, LinkInfo, error_text
from overlayd.dataplane.kstate import HOST_NS
from overlayd.dataplane.mirror import Mirror

__all__ = ["TeardownReport", "remove_owned_links"]

_ORDER = {"veth": 0, "vxlan": 1, "bridge": 2}


@dataclass
class TeardownReport:
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _order(link: LinkInfo) -> tuple[int, str]:
    return _ORDER.get(link.kind or "", len(_ORDER)), link.ifname


async def remove_owned_links(
    kernel: Kernel, *, progress: Callable[[str], None] | None = None
) -> TeardownReport:
    report = TeardownReport()
    links = sorted((link for link in await kernel.links() if link.ours), key=_order)
    for link in links:
        try:
            await kernel.ipr.link("del", index=link.index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                continue  # went with its peer or master meanwhile
            report.errors.append(f"cannot delete {link.ifname}: {error_text(exc)}")
            continue
        report.removed.append(link.ifname)
        if progress is not None:
            progress(link.ifname)
    try:
        mirror = Mirror()
        mirror.load_dump(await kernel.dump())
    except (KernelError, NetlinkError) as exc:
        report.errors.append(f"cannot read routes, tables and namespaces: {error_text(exc)}")
        return report
    t = mirror.tables
    rest: list[Command] = [DeleteRoute(key) for key in sorted(t.routes, key=str) if key[0] == HOST_NS]
    rest += [DeleteNft(netns, family) for netns, family in sorted(t.nft) if netns == HOST_NS]
    rest += [DeleteNetns(name) for name in sorted(t.netns)]
    for result in await kernel.execute(rest):
        what = describe(result.command)
        if result.error is not None:
            report.errors.append(f"{what}: {result.error}")
        else:
            report.removed.append(what)
            if progress is not None:
                progress(what)
    return report
