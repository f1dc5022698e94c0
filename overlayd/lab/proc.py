"""Child processes of the lab, known by PID and start time, never by name.

A `Proc` is started by this process (it then holds the `Popen` and reaps it)
or rebuilt from `lab.json` by another one (`overlayctl lab down`). The start
time read from `/proc/<pid>/stat` tells our process apart from an unrelated
one that got the same PID after ours exited, so a stale record never leads to
signalling a stranger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def read_start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of `pid`, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[19]), rest[0]


class Proc:
    """One process: PID plus start time; `popen` when this process started it."""

    def __init__(self, pid: int, start_time: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.start_time = start_time
        self.popen = popen

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        banner: str | None = None,
    ) -> Proc:
        """Start `argv` in a session of its own, stdout and stderr appended to `log_path`.

        A session of its own keeps a Ctrl-C in the terminal that ran
        `overlayctl lab up` from reaching the lab's servers.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            if banner is not None:
                log.write(f"=== lab: {banner} ===\n".encode())
                log.flush()
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        # Not reaped until we wait for it, so /proc/<pid> is there even if it already exited.
        found = read_start_time(popen.pid)
        start_time = found[0] if found is not None else 0
        return cls(popen.pid, start_time, popen)

    @classmethod
    def of_pid(cls, pid: int) -> Proc | None:
        """The process running now as `pid` (not started by us), or None if there is none."""
        found = read_start_time(pid)
        return cls(pid, found[0]) if found is not None else None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        found = read_start_time(self.pid)
        return found is not None and found[0] == self.start_time and found[1] != "Z"

    def returncode(self) -> int | None:
        """Exit status when this process started it and it has ended, else None."""
        return self.popen.poll() if self.popen is not None else None

    def send_signal(self, sig: int) -> bool:
        """Send `sig` if the process is still ours and alive; False if it was gone."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; True if it did."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Send `sig`, wait up to `timeout` seconds, then SIGKILL and wait for the end."""
        if self.send_signal(sig) and self.wait(timeout):
            return
        if self.send_signal(signal.SIGKILL) and not self.wait(10.0):
            raise RuntimeError(f"process {self.pid} did not end after SIGKILL")

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Proc:
        return cls(int(data["pid"]), int(data["start_time"]))


def stop_all(procs: Sequence[Proc], timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop several processes at once: `sig` to all, one bounded wait, SIGKILL to the rest."""
    signalled = [proc for proc in procs if proc.send_signal(sig)]
    deadline = time.monotonic() + timeout
    for proc in signalled:
        proc.wait(max(0.0, deadline - time.monotonic()))
    stubborn = [proc for proc in signalled if proc.send_signal(signal.SIGKILL)]
    for proc in stubborn:
        if not proc.wait(10.0):
            raise RuntimeError(f"process {proc.pid} did not end after SIGKILL")
