"""Room in the kernel's IPv4 neighbour table for a lab's hosts, all on one kernel.

On real hosts each kernel keeps its own neighbour table. In the lab every
simulated host, and every endpoint, is a namespace of this one kernel, and
the table's garbage-collection limits (`net.ipv4.neigh.default.gc_thresh1..3`,
128/512/1024 by default) count the dynamic entries of all namespaces
together. A 30-host lab needs about 2 x 30 x 29 of them (each host's underlay
ARP for every other VTEP, each endpoint's for every other endpoint in the
all-pairs ping): past 1,024 the kernel refuses new entries ("table full",
`/proc/net/stat/arp_cache`) and evicts live ones, and pings between correctly
programmed endpoints are lost. So a lab that needs more raises the limits,
remembers the values it found, and the last lab to go down puts them back.
"""

from __future__ import annotations

import json
from pathlib import Path

SYSCTL = Path("/proc/sys/net/ipv4/neigh/default")
NAMES = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
SPARE = 256  # the machine's own entries, and the lab's other namespaces (KV server, router, ...)


def needed(hosts: int) -> int:
    """Dynamic entries a lab of `hosts` hosts (one endpoint each, all pairs pinging) holds at most."""
    return 2 * hosts * (hosts - 1) + SPARE


def limits_for(hosts: int, current: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The limits a lab of `hosts` needs (never lower than `current`), or None if `current` does.

    Enough means the need stays under thresh2, above which the kernel starts
    collecting entries. Raised: thresh3 (the hard limit) to twice the need,
    thresh2 to the need, thresh1 (below which nothing is collected) to half of it.
    """
    want = needed(hosts)
    if current[1] >= want and current[2] >= want:
        return None
    return max(current[0], want // 2), max(current[1], want), max(current[2], 2 * want)


def read(root: Path = SYSCTL) -> tuple[int, int, int]:
    one, two, three = (int((root / name).read_text()) for name in NAMES)
    return one, two, three


def write(values: tuple[int, int, int], root: Path = SYSCTL) -> None:
    for name, value in zip(NAMES, values, strict=True):
        (root / name).write_text(f"{value}\n")


def ensure_room(hosts: int, saved: Path, root: Path = SYSCTL) -> str | None:
    """Raise the limits if a lab of `hosts` needs it; a line saying so, or None.

    The values found are kept in `saved` (the first time only), for `restore`.
    """
    current = read(root)
    raised = limits_for(hosts, current)
    if raised is None:
        return None
    if not saved.exists():
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(dict(zip(NAMES, current, strict=True))))
    write(raised, root)
    return (
        f"raised the kernel's neighbour-table limits (net.ipv4.neigh.default.gc_thresh1/2/3) from "
        f"{'/'.join(map(str, current))} to {'/'.join(map(str, raised))}: {hosts} hosts on one "
        "kernel share its table; `lab down` of the last lab puts them back"
    )


def restore(saved: Path, root: Path = SYSCTL) -> str | None:
    """Put back the limits `ensure_room` found; a line saying so, or None if it raised none."""
    if not saved.exists():
        return None
    data = json.loads(saved.read_text())
    values = (int(data[NAMES[0]]), int(data[NAMES[1]]), int(data[NAMES[2]]))
    write(values, root)
    saved.unlink()
    return f"neighbour-table limits back to {'/'.join(map(str, values))}"
