"""The lab: several overlayd hosts on one machine, in network namespaces.

`overlayctl lab up|status|down` calls `lab_up`, `lab_status` and `lab_down`;
the end-to-end tests drive a `Lab` directly. `EtcdServer` runs a real etcd
for the lab and for the tests; `netns` wraps the iproute2 commands used;
`kwatch` times, from each namespace's kernel, when entries appear and vanish.
"""

from overlayd.lab.etcd import EtcdError, EtcdServer
from overlayd.lab.lab import (
    DEFAULT_PREFIX,
    DEMO_NETWORK,
    DEMO_SUBNET,
    Endpoint,
    Host,
    Lab,
    LabError,
    Pinger,
    PingResult,
    PingStats,
    lab_down,
    lab_status,
    lab_up,
    wait_for,
)
from overlayd.lab.netns import CommandError

__all__ = [
    "DEFAULT_PREFIX",
    "DEMO_NETWORK",
    "DEMO_SUBNET",
    "CommandError",
    "Endpoint",
    "EtcdError",
    "EtcdServer",
    "Host",
    "Lab",
    "LabError",
    "PingResult",
    "PingStats",
    "Pinger",
    "lab_down",
    "lab_status",
    "lab_up",
    "wait_for",
]
