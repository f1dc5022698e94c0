"""The endpoints this host owns, kept on local disk.

The local registry, not the store, is the truth about which endpoints live on
this host: after a restart, or after the lease lapsed while the store was
unreachable, the daemon re-publishes from here.

On disk: `endpoints.json` (a snapshot, replaced atomically: temp file,
fsync, rename) and `endpoints.journal` (one JSON line per change since the
snapshot, appended and fsynced). A change costs one appended line, not a
rewrite of every endpoint, and changes made at the same time share one
fsync (group commit), in a thread so the event loop never waits on the disk.
The journal is folded into a new snapshot once it is longer than the
snapshot itself. A torn last line (a crash mid-append) is ignored on load.

Removals keep the address and MAC the endpoint had, and when it went, for
`announce.WINDOW` (the snapshot carries those still that young): after a
restart, a new endpoint given an address freed just before it still knows
that local containers may cache the old MAC (`announce.Removed.recall`). A
clean stop adds the remote addresses the kernel lost lately (`keep_removals`),
which only the reconciler's memory knew.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path

from overlayd.core.model import Endpoint, ValidationError
from overlayd.dataplane.announce import WINDOW

log = logging.getLogger(__name__)

_MIN_COMPACT = 256


class LocalRegistry:
    def __init__(self, state_dir: str) -> None:
        self._dir = Path(state_dir)
        self._path = self._dir / "endpoints.json"
        self._journal = self._dir / "endpoints.journal"
        self._endpoints: dict[str, Endpoint] = {}
        # Removals younger than `WINDOW`, oldest first: (address, MAC, wall-clock time).
        self._removals: list[tuple[str, str, float]] = []
        self._journal_lines = 0
        self._pending: list[str] = []
        self._lock = asyncio.Lock()
        # A thread of its own: a write never queues behind other blocking work (a veth
        # being made in the kernel) in the loop's default executor.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")

    def load(self) -> None:
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{self._path}: cannot read local endpoint registry: {exc}") from None
        for item in raw.get("endpoints", []):
            self._load_one(item)
        for item in raw.get("removed", []):
            self._load_removal(item)
        try:
            lines = self._journal.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            raise RuntimeError(f"{self._journal}: cannot read local endpoint registry: {exc}") from None
        for number, line in enumerate(lines, 1):
            try:
                change = json.loads(line)
            except ValueError:
                if number == len(lines):
                    log.warning("%s: ignoring a torn last line (a crash while writing)", self._journal)
                    break
                raise RuntimeError(f"{self._journal}:{number}: not a registry change") from None
            if "put" in change:
                self._load_one(change["put"])
            elif "remove" in change:
                self._endpoints.pop(str(change["remove"]), None)
                self._load_removal(change)  # (a line of an older release has no address)
        self._journal_lines = len(lines)

    def _load_one(self, item: object) -> None:
        try:
            endpoint = Endpoint.from_dict(item)
        except ValidationError as exc:
            log.error("%s: skipping invalid entry: %s", self._path, exc)
            return
        self._endpoints[endpoint.key] = endpoint

    def _load_removal(self, item: object) -> None:
        """One remembered removal; anything malformed is only a lost hint, never an error."""
        if not isinstance(item, dict):
            return
        ip, mac, at = item.get("ip"), item.get("mac"), item.get("at")
        if not (isinstance(ip, str) and isinstance(mac, str) and isinstance(at, int | float)):
            return
        try:
            IPv4Address(ip)
        except ValueError:
            return
        self._removals.append((ip, mac, float(at)))

    def recent_removals(self, now: float | None = None) -> list[tuple[IPv4Address, str, float]]:
        """Removals younger than `WINDOW`, oldest first: (address, MAC, seconds ago)."""
        now = time.time() if now is None else now
        ordered = sorted(self._removals, key=lambda r: r[2])
        return [(IPv4Address(ip), mac, now - at) for ip, mac, at in ordered if now - at < WINDOW]

    def all(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def get(self, key: str) -> Endpoint | None:
        return self._endpoints.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._endpoints

    def __len__(self) -> int:
        return len(self._endpoints)

    async def add(self, endpoint: Endpoint) -> None:
        """Record `endpoint`; returns once it is on disk."""
        self._endpoints[endpoint.key] = endpoint
        await self._persist(json.dumps({"put": endpoint.to_dict()}, sort_keys=True))

    async def remove(self, key: str) -> None:
        endpoint = self._endpoints.pop(key, None)
        if endpoint is not None:
            removal = (str(endpoint.ip), endpoint.mac, time.time())
            self._removals.append(removal)
            ip, mac, at = removal
            await self._persist(json.dumps({"remove": key, "ip": ip, "mac": mac, "at": at}))

    async def keep_removals(
        self, removals: Iterable[tuple[IPv4Address, str, float]], now: float | None = None
    ) -> None:
        """Keep `removals` (address, MAC, seconds ago) for the next life, beside this host's
        own: they are written with a new snapshot now (on a clean stop)."""
        now = time.time() if now is None else now
        known = {(ip, mac) for ip, mac, _ in self._removals}
        for address, mac, ago in removals:
            if (str(address), mac) not in known:
                self._removals.append((str(address), mac, now - ago))
        await self.compact()

    async def compact(self) -> None:
        """Fold the journal into the snapshot now (e.g. after a teardown emptied the registry)."""
        async with self._lock:
            snapshot = self._snapshot()
            batch, self._pending = self._pending, []
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write, batch, snapshot)

    async def _persist(self, line: str) -> None:
        self._pending.append(line)
        async with self._lock:
            if not self._pending:
                return  # an earlier writer took our line with its batch
            batch, self._pending = self._pending, []
            snapshot = None
            if self._journal_lines + len(batch) > max(_MIN_COMPACT, 2 * len(self._endpoints)):
                snapshot = self._snapshot()
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write, batch, snapshot)

    def _snapshot(self) -> dict[str, object]:
        """What a new snapshot holds: every endpoint, and the removals younger than `WINDOW`
        (older ones are forgotten here). Made on the event loop, written in the thread."""
        now = time.time()
        self._removals = [r for r in self._removals if now - r[2] < WINDOW]
        return {
            "endpoints": [ep.to_dict() for ep in self._endpoints.values()],
            "removed": [{"ip": ip, "mac": mac, "at": at} for ip, mac, at in self._removals],
        }

    def _write(self, batch: list[str], snapshot: dict[str, object] | None) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        if snapshot is not None:
            # The snapshot holds every change up to now, the batch included.
            tmp = self._path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump(snapshot, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self._path)
            with open(self._journal, "w") as f:
                os.fsync(f.fileno())
            self._journal_lines = 0
            return
        with open(self._journal, "a") as f:
            f.write("".join(line + "\n" for line in batch))
            f.flush()
            os.fsync(f.fileno())
        self._journal_lines += len(batch)
