"""Remove everything overlayd made in this namespace: `overlayctl teardown`'s kernel half.

Only links that carry both marks of ownership (name prefix and ifalias, see
`kstate.is_ours`) are touched. Endpoint ports go first (their container side
goes with them), then VXLAN devices, then bridges; FDB, flood and neighbour
entries live on those devices and disappear with them. Errors are collected,
not raised, so one stubborn link does not leave the rest behind.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from overlayd.dataplane.kernel import Kernel, LinkInfo, error_text

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
    return report
