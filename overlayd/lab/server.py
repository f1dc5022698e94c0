"""What every test/lab server runner (etcd, ZooKeeper, Consul) does the same way.

A subclass starts its process into `self.proc`, says what it is called
(`label`), which error it raises (`error`) and when it is ready (`is_ready`);
waiting, stopping by PID, restarting and cleaning up are shared.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from overlayd.lab.proc import Proc


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    error: type[Exception] = RuntimeError
    proc: Proc | None
    workdir: Path

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll `is_ready` until it holds; the error (with the log's tail) if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or not self.proc.alive():
                code = self.proc.returncode() if self.proc is not None else None
                raise self.error(
                    f"{self.label} exited (status {code}) while starting; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self.is_ready():
                return
            if time.monotonic() >= deadline:
                raise self.error(
                    f"{self.label} not ready after {timeout:g}s; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, wait up to `timeout`, then SIGKILL. No-op when not running."""
        if self.proc is not None:
            self.proc.stop(timeout=timeout)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL by PID, as a crash would."""
        if self.proc is not None:
            self.proc.stop(sig=signal.SIGKILL)
            self.proc = None

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same ports (what survives depends on the server)."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop the server and remove its directory (data, config and log)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
