"""What every benchmark gets from the runner: its scale, labs, listeners and a clock.

Labs are expensive on two cores (a 30-host lab takes most of a minute to
form), so the context keeps the last lab a benchmark released and hands it
to the next one that asks for the same kind (`lab(key, ...)`); the runner
orders the benchmarks so that consecutive ones share. Only one lab runs at a
time: idle daemons of another lab would load the machine under the one
being measured. Everything made through the context (labs, their extra
namespaces, listener processes) is removed by `close()`, also on failure.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from overlayd.lab import Lab, LabError
from overlayd.lab.kwatch import KernelWatch


@dataclass(frozen=True)
class Scale:
    """How big each benchmark runs; `FULL` is `make bench`, `QUICK` is `make bench-quick`."""

    quick: bool
    run_budget: float  # seconds: benchmarks that would start later are skipped
    conv_total: float  # seconds convergence may spend in all; labs that would not fit are skipped
    conv_stores: tuple[str, ...]
    conv_hosts: tuple[int, ...]
    conv_samples: int  # per lab, at most
    conv_samples_30: int  # per 30-host lab, at most
    conv_budget: float  # seconds of sampling per lab, at most
    steady_timeout: float  # for a lab to hold every demo entry before sampling
    sample_timeout: float  # per endpoint add or delete
    coldstart_hosts: int
    coldstart_timeout: float
    join_sizes: tuple[int, ...]
    join_timeout: float  # per join, at most
    idle_settle: float  # more time for the last join to complete before idle measures
    idle_base_window: float
    idle_window: float
    churn_adds: int
    churn_clients: int
    churn_budget: float
    churn_paced: int  # adds offered at a fixed rate after the saturating run
    drift_timeout: float
    iperf_seconds: int
    iperf_rounds: int  # each path once per round, the order reversed every other round
    floor_samples: int


FULL = Scale(
    quick=False,
    run_budget=14 * 60.0,
    conv_total=330.0,
    conv_stores=("gossip", "zookeeper", "consul", "etcd"),
    conv_hosts=(3, 10, 30),
    conv_samples=25,
    conv_samples_30=15,
    conv_budget=15.0,
    steady_timeout=20.0,
    sample_timeout=10.0,
    coldstart_hosts=30,
    coldstart_timeout=30.0,
    join_sizes=(1000, 10000),
    join_timeout=60.0,
    idle_settle=45.0,
    idle_base_window=15.0,
    idle_window=30.0,
    churn_adds=500,
    churn_clients=16,
    churn_budget=40.0,
    churn_paced=400,
    drift_timeout=35.0,
    iperf_seconds=4,
    iperf_rounds=5,
    floor_samples=25,
)

QUICK = Scale(
    quick=True,
    run_budget=5 * 60.0,
    conv_total=120.0,
    conv_stores=("gossip", "zookeeper", "consul", "etcd"),
    conv_hosts=(3,),
    conv_samples=5,
    conv_samples_30=5,
    conv_budget=6.0,
    steady_timeout=10.0,
    sample_timeout=5.0,
    coldstart_hosts=5,
    coldstart_timeout=20.0,
    join_sizes=(100, 1000),
    join_timeout=20.0,
    idle_settle=10.0,
    idle_base_window=5.0,
    idle_window=10.0,
    churn_adds=50,
    churn_clients=16,
    churn_budget=20.0,
    churn_paced=60,
    drift_timeout=10.0,
    iperf_seconds=2,
    iperf_rounds=2,
    floor_samples=8,
)

STORE_LETTER = {"gossip": "g", "etcd": "e", "consul": "c", "zookeeper": "z"}


def lab_key(store: str, hosts: int) -> str:
    """The short name of a convergence-style lab: store letter + hosts ("g30", "e3")."""
    return f"{STORE_LETTER[store]}{hosts}"


class Context:
    def __init__(self, scale: Scale, *, tag: str, seed: int, verbose: bool = True) -> None:
        self.scale = scale
        self.tag = tag  # every lab prefix starts with it
        self.rng = random.Random(seed)
        self.verbose = verbose
        self.started = time.monotonic()
        self._cached: tuple[str, Lab] | None = None
        self._active: list[Lab] = []
        self._watches: list[KernelWatch] = []
        # What one benchmark leaves prepared for the next (with the lab it belongs to).
        self.handoff: dict[str, object] = {}

    def left(self) -> float:
        """Seconds left of the run's budget (negative once it is spent)."""
        return self.scale.run_budget - (time.monotonic() - self.started)

    def say(self, message: str) -> None:
        if self.verbose:
            elapsed = time.monotonic() - self.started
            print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    # --- labs ---

    def lab(
        self,
        key: str,
        *,
        hosts: int,
        store: str,
        gossip: bool | None = None,
        demo: bool = True,
        daemons: bool = True,
        ready_timeout: float | None = None,
    ) -> Lab:
        """The released lab named `key` if there is one, else a new one built now.

        Labs of the same `key` must be built the same way: the key is the promise.
        """
        if self._cached is not None:
            cached_key, cached = self._cached
            self._cached = None
            if cached_key == key:
                self._active.append(cached)
                self.say(f"reusing lab {cached.prefix}")
                return cached
            self._down(cached)
        lab = Lab(
            hosts=hosts,
            prefix=f"{self.tag}{key}",
            store=store,
            gossip=gossip,
            ready_timeout=ready_timeout if ready_timeout is not None else max(30.0, 3.0 * hosts),
            progress=None,
        )
        self.say(f"building lab {lab.prefix}: {hosts} hosts, {store}{' + gossip' if gossip else ''}")
        start = time.monotonic()
        self._active.append(lab)  # from here on, close() removes it whatever happens
        try:
            lab.up(daemons=daemons, demo=demo and daemons)
        except BaseException:
            self._active.remove(lab)  # a failed up() removed what it made
            raise
        self.say(f"lab {lab.prefix} up in {time.monotonic() - start:.1f}s")
        return lab

    def release(self, lab: Lab, key: str) -> None:
        """Done with `lab`: keep it for the next benchmark asking for `key` (one is kept at most)."""
        if lab in self._active:
            self._active.remove(lab)
        if self._cached is not None:
            self._down(self._cached[1])
        self._cached = (key, lab)

    def discard(self, lab: Lab) -> None:
        if lab in self._active:
            self._active.remove(lab)
        self._down(lab)

    def _down(self, lab: Lab) -> None:
        self.say(f"removing lab {lab.prefix}")
        errors = lab.down()
        for err in errors:
            self.say(f"  lab down {lab.prefix}: {err}")

    # --- listeners ---

    def watch(self, namespaces: Sequence[str]) -> KernelWatch:
        """A started listener on `namespaces`, stopped by `close()` (or `unwatch()`)."""
        watch = KernelWatch(namespaces)
        self._watches.append(watch)
        watch.start(timeout=30.0)
        return watch

    def unwatch(self, watch: KernelWatch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)
        watch.stop()

    def close(self) -> list[str]:
        """Stop every listener and remove every lab; the errors met."""
        errors: list[str] = []
        for watch in self._watches:
            watch.stop()
        self._watches = []
        labs = list(self._active) + ([self._cached[1]] if self._cached else [])
        self._active, self._cached = [], None
        for lab in labs:
            try:
                errors += lab.down()
            except LabError as exc:
                errors.append(str(exc))
        return errors
