"""The level-triggered reconcile loop: observe the kernel, diff, apply the difference.

Triggers are coalesced: any number of `trigger()` calls while a pass runs
lead to exactly one more pass. A pass also runs every `interval` seconds to
repair drift. A failed kernel operation is never dropped: it is counted,
kept in `errors` for /status, and the pass is retried with backoff until the
kernel matches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from overlayd.dataplane.commands import Command, describe
from overlayd.dataplane.diff import diff
from overlayd.dataplane.kernel import Kernel
from overlayd.dataplane.kstate import KernelState
from overlayd.metrics import Metrics

log = logging.getLogger(__name__)

_RETRY_MIN, _RETRY_MAX = 0.2, 10.0


@dataclass
class PassReport:
    trigger: str
    started_at: float
    duration: float
    applied: int
    failed: int
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "trigger": self.trigger,
            "started_at": self.started_at,
            "duration_ms": round(self.duration * 1000, 3),
            "applied": self.applied,
            "failed": self.failed,
        }


class Reconciler:
    def __init__(
        self,
        *,
        kernel: Kernel,
        desired: Callable[[], KernelState],
        metrics: Metrics,
        interval: float,
        on_converged: Callable[[KernelState], None] | None = None,
    ) -> None:
        self._kernel = kernel
        self._desired = desired
        self._metrics = metrics
        self._interval = interval
        self._on_converged = on_converged
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.first_pass_done = asyncio.Event()
        self.last: PassReport | None = None
        self.errors: deque[str] = deque(maxlen=50)

    def trigger(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Run forever: a pass now, then after each trigger, periodically, and on failure."""
        trigger = "startup"
        retry = _RETRY_MIN
        while True:
            self._wake.clear()
            report = await self.reconcile(trigger)
            if report.failed:
                timeout = retry
                retry = min(retry * 2, _RETRY_MAX)
            else:
                timeout = self._interval
                retry = _RETRY_MIN
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
                trigger = "change"
            except TimeoutError:
                trigger = "retry" if report.failed else "periodic"

    async def reconcile(self, trigger: str) -> PassReport:
        """One pass. Passes never overlap (the admin API may ask for one directly)."""
        async with self._lock:
            started, t0 = time.time(), time.perf_counter()
            want = self._desired()
            errors: list[str] = []
            applied = 0
            try:
                have = await self._kernel.observe()
                commands = diff(want, have)
                if commands:
                    results = await self._kernel.execute(commands)
                    for result in results:
                        if result.error is None:
                            applied += 1
                        else:
                            errors.append(f"{describe(result.command)}: {result.error}")
            except Exception as exc:  # a failed read must not kill the loop: retry
                log.exception("reconcile pass failed")
                errors.append(f"reconcile: {exc}")
            duration = time.perf_counter() - t0
            self._metrics.reconcile_duration.observe(duration)
            self._metrics.reconciles.labels(trigger=trigger).inc()
            report = PassReport(trigger, started, duration, applied, len(errors), errors)
            self.last = report
            for line in errors:
                log.warning("kernel op failed (will retry): %s", line)
                self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}")
            if applied:
                log.info("reconcile (%s): applied %d changes in %.1f ms", trigger, applied, duration * 1e3)
            if not errors:
                self.first_pass_done.set()
                if self._on_converged:
                    self._on_converged(want)
            return report

    async def pending(self) -> list[Command]:
        """What a pass would change right now, without changing anything."""
        async with self._lock:
            return diff(self._desired(), await self._kernel.observe())
