"""The Debian rootfs the systemd and compose tests share (scripts/fetch-rootfs.sh, cached).

Not a test module: test_systemd.py boots it under systemd-nspawn, test_compose.py
imports it into podman as the base image deploy/Dockerfile names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("OVERLAYD_TEST_CACHE", "/var/cache/overlayd-test"))
FETCH_ROOTFS = REPO / "scripts" / "fetch-rootfs.sh"
MARKER = ".overlayd-rootfs"
# Cached builds keyed by pyproject.toml (venvs, wheelhouses) unused this long are removed.
STALE_DAYS = 14


def os_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    pytest.fail("/etc/os-release names no VERSION_CODENAME")


def debian_rootfs() -> Path:
    """The cached rootfs of this machine's Debian release; made now if missing (~80 s, once).

    `make test-deps` makes it before the tests run; this is for a lone `pytest`.
    """
    rootfs = CACHE / f"rootfs-{os_codename()}"
    if not (rootfs / MARKER).exists():
        result = subprocess.run(
            [str(FETCH_ROOTFS), str(rootfs)], capture_output=True, text=True, timeout=900, check=False
        )
        assert result.returncode == 0, f"{FETCH_ROOTFS} failed:\n{result.stderr[-3000:]}"
    return rootfs


def mark_used_and_prune(current: Path, marker: str) -> None:
    """Note that `current` (a cached build whose complete state `marker` marks) was used
    now, and remove its siblings of the same kind (`<prefix>-<key>`) unused for STALE_DAYS.
    Siblings without the marker are left alone: another run may be making one."""
    (current / marker).touch()
    prefix = current.name.rsplit("-", 1)[0]
    stale = time.time() - STALE_DAYS * 86400
    for other in current.parent.glob(f"{prefix}-*"):
        done = other / marker
        if other != current and done.exists() and done.stat().st_mtime < stale:
            shutil.rmtree(other, ignore_errors=True)
