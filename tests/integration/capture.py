"""Packet captures for the tests: tcpdump on one interface of a namespace the test made.

`Capture` starts tcpdump, returns once it is listening (so nothing sent
afterwards is missed), and `stop()` ends it by its PID with SIGINT and
returns the lines it printed. Always used as a context manager, so the
process is gone also when the test fails.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from types import TracebackType

import pytest

from overlayd.lab import netns as nsutil


def need_tcpdump() -> None:
    if shutil.which("tcpdump") is None:
        pytest.fail("tcpdump is not installed (scripts/system-packages.sh test installs it)")


class Capture:
    def __init__(self, ns: str, ifname: str, bpf: str, *, link_level: bool = False) -> None:
        need_tcpdump()
        argv = ["tcpdump", "-l", "-nn", "-i", ifname, *(["-e"] if link_level else []), bpf]
        self._proc = subprocess.Popen(
            nsutil.exec_argv(ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._done = False
        assert self._proc.stderr is not None
        deadline = time.monotonic() + 10
        seen = ""
        fd = self._proc.stderr.fileno()
        while "listening on" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or self._proc.poll() is not None:
                self._end()
                raise AssertionError(f"tcpdump in {ns} on {ifname} did not start: {seen!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096).decode(errors="replace")
                if not chunk:
                    continue
                seen += chunk

    def stop(self) -> list[str]:
        """End tcpdump (SIGINT, by PID) and return every line it printed (again: the same)."""
        if self._done:
            return self.lines
        if self._proc.poll() is None:
            # Let the last packets reach the capture before it ends.
            time.sleep(0.2)
            os.kill(self._proc.pid, signal.SIGINT)
        out = self._end()
        self.lines = [line for line in out.splitlines() if line.strip()]
        return self.lines

    def _end(self) -> str:
        self._done = True
        try:
            out, _ = self._proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self._proc.pid, signal.SIGKILL)
            out, _ = self._proc.communicate()
        return out or ""

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
