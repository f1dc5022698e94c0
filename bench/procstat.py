"""CPU time and resident memory of a process, from /proc. Parsing is pure.

The daemons' CPU comes from /proc/PID/stat (utime + stime of every thread,
in clock ticks), their memory from VmRSS in /proc/PID/status: what the kernel
accounted, not what the daemon reports about itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime from the text of /proc/PID/stat (the name in field 2 may hold spaces)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of the whole line; fields[0] here is field 3 (state).
    return int(fields[11]) + int(fields[12])


def parse_rss_kib(status: str) -> int | None:
    """VmRSS in KiB from the text of /proc/PID/status (None for a zombie or kernel thread)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


@dataclass(frozen=True)
class ProcSample:
    cpu_seconds: float
    rss_mb: float | None


def sample(pid: int) -> ProcSample:
    """CPU seconds used so far and RSS now; OSError if the process is gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    status = Path(f"/proc/{pid}/status").read_text()
    rss = parse_rss_kib(status)
    return ProcSample(parse_cpu_ticks(stat) / CLOCK_TICKS, rss / 1024 if rss is not None else None)


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (user + system): what tools we ran cost."""
    usage = os.times()
    return usage.children_user + usage.children_system
