"""One fault scenario on one backend: a lab, a ping checker, a kernel watch, a verdict.

`run_one(scenario, backend)` builds a fresh 3-host lab (network `demo`, one
endpoint per host), waits until every kernel holds the whole overlay, then:

- starts a kernel watch (`overlayd.lab.kwatch`) in every host namespace and
  snapshots each host's FDB/neighbour entries on overlayd's VXLAN devices;
- starts the ping checker: `ping -i 0.01` both ways between the endpoints of
  the hosts the fault should not touch (`Scenario.untouched`, at least two
  pairs);
- runs the scenario, which injects its fault, waits for what must follow and
  checks it (an `AssertionError` is a failure, its message the note);
- stops the checker and the watch: any lost ping fails the scenario, and so
  does any entry of the first snapshot that went missing at any moment,
  unless the scenario declared it (`Run.allow_removal`): "0 entries wrongly
  removed" is counted from the notifications, not from a second snapshot,
  so an entry deleted and re-added in between counts too;
- takes the lab down, whatever happened.

Everything waits with deadlines (`Run.wait`), never a fixed sleep, except
where the fault itself is a duration (a pause of N seconds).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from overlayd.api.client import AdminClient, ClientError
from overlayd.lab import Lab, netns
from overlayd.lab.kwatch import Entry, Fdb, KernelWatch, Neigh
from overlayd.lab.lab import LAB_ROOT, Endpoint, LabError, Pinger, PingStats
from overlayd.lab.proc import Proc, stop_all

KV_BACKENDS = ("etcd", "consul", "zookeeper")
ALL_BACKENDS = ("gossip", *KV_BACKENDS)
PING_INTERVAL = 0.01

# etcd 3.4.23 (Debian 12) loses watch events around compaction (etcd issue 17529): the
# suite runs against 3.5 (scripts/fetch-etcd.sh) when it is there, as production should.
ETCD_35 = os.path.join(
    os.environ.get("OVERLAYD_TEST_CACHE", "/var/cache/overlayd-test"), "etcd-3.5/usr/bin/etcd"
)
if os.access(ETCD_35, os.X_OK):
    os.environ.setdefault("OVERLAYD_ETCD_BIN", ETCD_35)

RUN_PREFIX = "flt" + secrets.token_hex(2)
_counter = iter(range(1, 1 << 16))


def new_prefix() -> str:
    return f"{RUN_PREFIX}{next(_counter):03x}"


class ScenarioFailed(AssertionError):
    """What must hold did not."""


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    run: Callable[[Run], None]
    backends: tuple[str, ...]
    short_backend: str
    hosts: int = 3
    lease_ttl: int = 10
    gossip_beside: bool = False  # beside a KV store, gossip too
    untouched: tuple[str, ...] = ("h2", "h3")  # pinged both ways throughout
    reconcile_interval: float = 30.0
    # backend -> why it cannot pass here: the row stays `fail`, with this as its note.
    known_failures: dict[str, str] = field(default_factory=dict)
    short_options: dict[str, Any] = field(default_factory=dict)  # Run.options in the short form
    lab: bool = True  # False: the scenario builds what it needs itself
    lab_class: type[Lab] = Lab  # e.g. faults.clusters.ClusterLab: a KV store of three members


@dataclass
class Row:
    scenario: int
    name: str
    backend: str
    result: str  # "pass" | "fail"
    pings_sent: int = 0
    pings_lost: int = 0
    wrongly_removed: int = 0
    converge_s: float | None = None
    duration_s: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Run:
    """What a scenario gets: the lab, the watch, and helpers that wait with deadlines."""

    def __init__(self, lab: Lab | None, backend: str, *, short: bool, options: dict[str, Any]) -> None:
        self._lab = lab
        self.backend = backend
        self.short = short
        self.options = options
        self.watch: KernelWatch | None = None
        self.notes: list[str] = []
        self.converge_s: float | None = None
        self.allowed: list[Callable[[str, Entry], bool]] = []
        self.cleanups: list[Callable[[], object]] = []
        self.extra_pings: list[PingStats] = []
        self.before: dict[str, dict[Entry, float]] = {}  # namespace -> the watched entries at the start

    @property
    def lab(self) -> Lab:
        assert self._lab is not None, "this scenario runs without a lab"
        return self._lab

    # --- checks ---

    def check(self, condition: object, message: str) -> None:
        if not condition:
            raise ScenarioFailed(message)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def wait(
        self,
        predicate: Callable[[], object],
        timeout: float,
        what: str,
        interval: float = 0.05,
        describe: Callable[[], str] | None = None,
    ) -> float:
        """Poll `predicate` until truthy; the seconds it took. ScenarioFailed on timeout.

        Errors from the daemons' APIs count as "not yet".
        """
        start = time.monotonic()
        last: Exception | None = None
        while True:
            try:
                if predicate():
                    return time.monotonic() - start
            except (ClientError, LabError, OSError) as exc:
                last = exc
            if time.monotonic() - start > timeout:
                detail = f" (last error: {last})" if last is not None else ""
                if describe is not None:
                    detail += f": {describe()}"
                raise ScenarioFailed(f"timed out after {timeout:g}s waiting for {what}{detail}")
            time.sleep(interval)

    # --- the lab's hosts ---

    def admin(self, host: str, timeout: float = 10.0) -> AdminClient:
        return self.lab.admin(host, timeout=timeout)

    def converged(self, host: str) -> bool:
        return self.admin(host).diff().changes == ()

    def all_converged(self, hosts: Iterable[str] | None = None) -> bool:
        return all(self.converged(h) for h in (hosts or self.lab.host_names) if self.lab.daemon_alive(h))

    def endpoint(self, host: str) -> Endpoint:
        return next(ep for ep in self.lab.endpoints if ep.host == host)

    def ns(self, host: str) -> str:
        return self.lab.host(host).netns

    def kernel(self, host: str) -> dict[Entry, float]:
        assert self.watch is not None
        return self.watch.entries(self.ns(host))

    def knows(self, host: str, ep: Endpoint, vtep: str | None = None) -> bool:
        """`host`'s kernel has ep's FDB entry (to `vtep`, default its owner's) and neighbour entry."""
        dst = vtep or self.lab.host(ep.host).address
        entries = self.kernel(host)
        fdb = any(isinstance(e, Fdb) and e.mac == ep.mac and e.dst == dst for e in entries)
        neigh = any(isinstance(e, Neigh) and e.ip == ep.ip and e.mac == ep.mac for e in entries)
        return fdb and neigh

    def forgot(self, host: str, ep: Endpoint) -> bool:
        entries = self.kernel(host)
        # By MAC: the IP may already belong to another endpoint (a freed address is reused).
        return not any(isinstance(e, Fdb | Neigh) and e.mac == ep.mac for e in entries)

    def allow_removal(self, ep: Endpoint) -> None:
        """The scenario removes or moves `ep`: its entries may go, everywhere."""
        self.allowed.append(
            lambda _ns, e: (
                (isinstance(e, Fdb) and e.mac == ep.mac)
                or (isinstance(e, Neigh) and (e.ip == ep.ip or e.mac == ep.mac))
            )
        )

    def allow(self, predicate: Callable[[str, Entry], bool]) -> None:
        self.allowed.append(predicate)

    def store_dump(self, via: str = "h1") -> dict[str, Any]:
        """What the KV store holds now, read with overlayd's store client from `via`'s namespace."""
        h = self.lab.host(via)
        argv = [*_python(), "-m", "faults.storedump", str(h.config_path)]
        out = self.lab.exec(h.netns, argv, timeout=40).stdout
        data: dict[str, Any] = json.loads(out)
        return data

    def status(self, host: str) -> Any:
        return self.admin(host).status()

    def metrics(self, host: str) -> str:
        code, body = self.lab.status_get(host, "/metrics")
        self.check(code == 200, f"/metrics on {host} answered {code}")
        return body.decode()

    def pinger(self, src: Endpoint, dst: Endpoint) -> Pinger:
        return self.lab.pinger(src.netns, dst.ip, interval=PING_INTERVAL)

    def nft(self, ns: str, script: str) -> None:
        netns.run_in(ns, ["nft", "-f", "-"], input=script)

    def cpu_seconds(self, pid: int) -> float:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def daemon_pid(self, host: str) -> int:
        proc = self.lab.host(host).proc
        assert proc is not None
        # The lab's Proc is `ip netns exec`, which execs: the same PID is the daemon.
        return proc.pid

    def rss_kib(self, pid: int) -> int:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def log_lines(self, host: str) -> list[str]:
        try:
            return self.lab.host(host).log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []


def _python() -> list[str]:
    import sys

    return [sys.executable]


def _lost(stats: PingStats) -> int:
    # The last echo may still be in flight when ping is stopped.
    return len([s for s in stats.lost_seqs if s != stats.transmitted])


def run_one(scenario: Scenario, backend: str, *, short: bool = False, prefix: str | None = None) -> Row:
    """Run `scenario` on `backend` in a lab of its own; the row, pass or fail, never raises."""
    row = Row(scenario.number, scenario.name, backend, "fail")
    started = time.monotonic()
    options = dict(scenario.short_options) if short else {}
    lab: Lab | None = None
    run: Run | None = None
    pingers: list[Pinger] = []
    stats: list[PingStats] = []
    try:
        if scenario.lab:
            lab = scenario.lab_class(
                hosts=scenario.hosts,
                prefix=prefix or new_prefix(),
                store=backend,
                lease_ttl=scenario.lease_ttl,
                gossip=scenario.gossip_beside,
                reconcile_interval=scenario.reconcile_interval,
                ready_timeout=90.0,
            )
        run = Run(lab, backend, short=short, options=options)
        if lab is not None:
            lab.up()
            bad = [f"{r.src.name}->{r.dst.name}" for r in lab.ping_all(timeout=60) if not r.ok]
            if bad:
                raise ScenarioFailed(f"lab not pinging before the fault: {bad}")
            run.wait(run.all_converged, 60, "every daemon converged before the fault")
            run.watch = KernelWatch([h.netns for h in lab.hosts]).start()
            before = {h.netns: run.watch.entries(h.netns) for h in lab.hosts}
            run.before = before
            t0 = time.monotonic()
            eps = [run.endpoint(h) for h in scenario.untouched]
            for src in eps:
                for dst in eps:
                    if src is not dst:
                        pingers.append(run.pinger(src, dst))
        scenario.run(run)
        if lab is not None:
            for p in pingers:
                stats.append(p.stop())
            pingers = []
            assert run.watch is not None
            wrong = _wrongly_removed(run, before, since=t0)
            row.pings_sent = sum(s.transmitted for s in stats) + sum(s.transmitted for s in run.extra_pings)
            row.pings_lost = sum(_lost(s) for s in stats) + sum(_lost(s) for s in run.extra_pings)
            row.wrongly_removed = len(wrong)
            overruns = run.watch.overruns(since=t0)
            if overruns:
                run.note(f"kernel watch overrun in {sorted({ns for ns, _ in overruns})}: counts inexact")
            if row.pings_lost:
                which = [f"{s.lost_seqs[:8]} of {s.transmitted}" for s in stats if _lost(s)]
                raise ScenarioFailed(
                    f"{row.pings_lost} of {row.pings_sent} pings lost between untouched hosts (seqs {which})"
                )
            if wrong:
                shown = ", ".join(f"{ns}:{e}" for ns, e in wrong[:4])
                raise ScenarioFailed(f"{len(wrong)} entries wrongly removed: {shown}")
        row.result = "pass"
    except ScenarioFailed as exc:
        row.note = str(exc)
    except Exception as exc:  # a broken harness or lab is a failed row with its reason, never a crash
        row.note = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc(limit=6)
        row.note += " | " + " / ".join(line.strip() for line in tb.splitlines()[-4:])
    finally:
        for p in pingers:
            try:
                stats.append(p.stop())
            except Exception:
                pass
        if run is not None:
            row.converge_s = None if run.converge_s is None else round(run.converge_s, 3)
            if run.notes:
                row.note = "; ".join([*([row.note] if row.note else []), *run.notes])
            for cleanup in reversed(run.cleanups):
                try:
                    cleanup()
                except Exception as exc:
                    row.note += f"; cleanup: {exc}"
            if run.watch is not None:
                run.watch.stop()
        if lab is not None:
            if row.result != "pass":
                keep = (
                    Path(os.environ.get("FAULTS_LOGS", "/tmp/faults-logs"))
                    / f"{scenario.number:02d}-{backend}"
                )
                shutil.rmtree(keep, ignore_errors=True)
                for h in lab.hosts:
                    if h.log_path.exists():
                        keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(h.log_path, keep / f"{h.name}.log")
            errors = lab.down()
            if errors:
                row.note += "; lab down: " + "; ".join(errors)
    known = scenario.known_failures.get(backend)
    if known and row.result == "fail":
        row.note = f"known: {known}" + (f" (this run: {row.note})" if row.note else "")
    row.duration_s = round(time.monotonic() - started, 1)
    return row


def _wrongly_removed(
    run: Run, before: dict[str, dict[Entry, float]], *, since: float
) -> list[tuple[str, Entry]]:
    """Entries (FDB, neighbour, and the VXLAN devices themselves) of the first snapshot that
    went missing at any moment since `since`, unless the scenario allowed it."""
    assert run.watch is not None
    wrong: list[tuple[str, Entry]] = []
    seen: set[tuple[str, Entry]] = set()
    for event in run.watch.events(since=since):
        if event.present or event.entry not in before.get(event.netns, {}):
            continue
        key = (event.netns, event.entry)
        if key in seen or any(allowed(event.netns, event.entry) for allowed in run.allowed):
            continue
        seen.add(key)
        wrong.append(key)
    return wrong


def purge_leftovers(prefix: str = RUN_PREFIX) -> list[str]:
    """Remove labs and namespaces of this run left by a crash of the runner itself."""
    errors: list[str] = []
    if LAB_ROOT.is_dir():
        for labdir in sorted(LAB_ROOT.iterdir()):
            if labdir.name.startswith(prefix):
                lab = Lab.load(labdir.name) or Lab(prefix=labdir.name)
                errors += lab.down()
    leftover = [ns for ns in netns.list_netns() if ns.startswith(prefix)]
    procs = [Proc.of_pid(pid) for ns in leftover for pid in netns.netns_pids(ns)]
    stop_all([p for p in procs if p is not None], timeout=5.0)
    for ns in leftover:
        try:
            netns.delete_netns(ns)
        except netns.CommandError as exc:
            errors.append(str(exc))
    return errors


def table(rows: Sequence[Row]) -> str:
    headers = [
        "#",
        "scenario",
        "backend",
        "result",
        "pings",
        "lost",
        "wrongly removed",
        "converge s",
        "s",
        "note",
    ]
    cells = [
        [
            str(r.scenario),
            r.name,
            r.backend,
            r.result,
            str(r.pings_sent),
            str(r.pings_lost),
            str(r.wrongly_removed),
            "-" if r.converge_s is None else f"{r.converge_s:.2f}",
            f"{r.duration_s:.0f}",
            r.note if len(r.note) <= 160 else r.note[:157] + "...",
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [headers, *cells]) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *cells]
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
