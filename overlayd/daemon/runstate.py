"""Where the daemon stands, shared by its parts: set by the daemon and the operations, read by status.

Pure data, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from overlayd.core.model import Endpoint


@dataclass
class RunState:
    # The first full read of the cluster view is in (store: its first snapshot;
    # gossip-only: membership and records are being heard). Admin changes wait for it.
    synced: bool = False
    # Nothing the view lacks is merely unheard any more: from here on, an entry the
    # view does not want is removed from the kernel (see Reconciler.hold_deletions).
    view_complete: bool = False
    view_complete_at: float | None = None
    tearing_down: bool = False
    torn_down: bool = False
    fatal: str | None = None  # why the daemon had to stop (main prints it, exit 1)
    store_error: str | None = None  # why the store is not ready yet, while starting
    store_latency: float | None = None  # of the last store probe (overlayctl doctor)
    # The last time the store turned out to have lost its data: "when: why" (None: never).
    store_data_loss: str | None = None
    invalid_records: deque[str] = field(default_factory=lambda: deque(maxlen=10))
    # For the operator, from start-up on (a config with secrets readable by others).
    warnings: list[str] = field(default_factory=list)
    # Own endpoints withdrawn after losing a clash: key -> (endpoint, why), until removed.
    conflicts: dict[str, tuple[Endpoint, str]] = field(default_factory=dict)

    def report_invalid(self, message: str) -> None:
        self.invalid_records.append(message)
