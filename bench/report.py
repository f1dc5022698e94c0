"""What a benchmark run produces: figures beside their baselines, as JSON and as a table. Pure.

Every `Figure` carries its baseline from the same run and says what that
baseline is; `ratio` is value / baseline in the same unit. A figure whose
value is None did not produce a number, and its `note` says why ("did not
complete in 60 s (812 of 20000 entries)", "n/a: ...", "listener overran").

`bench/results/latest.json` is `Run.to_json()`; `validate()` checks that shape
(the runner checks what it writes, the unit tests check the checker).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "missing", "skipped")


def _finite(value: float | None) -> float | None:
    """None for None, NaN and infinities: JSON has no infinity, and neither has a figure."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


@dataclass(frozen=True)
class Figure:
    bench: str  # the benchmark that measured it ("convergence")
    name: str  # what it is ("gossip, 10 hosts: add p99")
    value: float | None
    unit: str  # "ms", "s", "/s", "MB", "ms/endpoint", "CPU s/min", "Gbit/s"
    baseline: float | None
    baseline_what: str  # one line: what the baseline measured, in this run
    note: str = ""
    target: str = ""  # the target as text ("<= 10 ms"), empty if none
    higher: bool | None = None  # better when higher; None: from the unit

    @property
    def higher_is_better(self) -> bool:
        """Rates (adds/s, Gbit/s) are better high; times, CPU, memory and traffic are better low."""
        return self.higher if self.higher is not None else self.unit in ("/s", "Gbit/s")

    @property
    def times_worse(self) -> float | None:
        """How many times the baseline's cost this figure is (the ratio, inverted for rates)."""
        ratio = self.ratio
        if ratio is None or ratio <= 0:
            return None
        return 1.0 / ratio if self.higher_is_better else ratio

    @property
    def ratio(self) -> float | None:
        value, base = _finite(self.value), _finite(self.baseline)
        if value is None or base is None or base == 0:
            return None
        return value / base

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "name": self.name,
            "value": _finite(self.value),
            "unit": self.unit,
            "baseline": _finite(self.baseline),
            "baseline_what": self.baseline_what,
            "ratio": self.ratio,
            "better": "higher" if self.higher_is_better else "lower",
            "note": self.note,
            "target": self.target,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figure:
        return cls(
            bench=data["bench"],
            name=data["name"],
            value=data["value"],
            unit=data["unit"],
            baseline=data["baseline"],
            baseline_what=data["baseline_what"],
            note=data.get("note", ""),
            target=data.get("target", ""),
            higher=data.get("better") == "higher",
        )


@dataclass
class BenchResult:
    """One benchmark's outcome: its figures, raw samples for plots, and how it ended."""

    name: str
    status: str = "ok"
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    # Raw samples by series ("gossip/10/add" -> seconds per sample; None = never completed).
    samples: dict[str, list[float | None]] = field(default_factory=dict)
    error: str = ""
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "notes": list(self.notes),
            "figures": [f.to_json() for f in self.figures],
            "samples": {k: [_finite(v) for v in vs] for k, vs in self.samples.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchResult:
        return cls(
            name=data["name"],
            status=data["status"],
            seconds=data["seconds"],
            figures=[Figure.from_json(f) for f in data["figures"]],
            samples={k: list(v) for k, v in data["samples"].items()},
            error=data.get("error", ""),
            notes=list(data.get("notes", [])),
        )


@dataclass
class Run:
    started: str  # ISO 8601, UTC
    quick: bool
    seconds: float
    machine: dict[str, Any]
    benches: list[BenchResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "started": self.started,
            "quick": self.quick,
            "seconds": round(self.seconds, 1),
            "machine": self.machine,
            "benchmarks": [b.to_json() for b in self.benches],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Run:
        return cls(
            started=data["started"],
            quick=data["quick"],
            seconds=data["seconds"],
            machine=dict(data["machine"]),
            benches=[BenchResult.from_json(b) for b in data["benchmarks"]],
        )

    def figures(self) -> list[Figure]:
        return [f for b in self.benches for f in b.figures]


_NUMBER = (int, float)


def validate(doc: Any) -> list[str]:
    """What is wrong with a results document (empty when it has the expected shape)."""
    errors: list[str] = []

    def need(obj: Mapping[str, Any], key: str, kinds: tuple[type, ...] | type, where: str) -> Any:
        if key not in obj:
            errors.append(f"{where}: missing {key!r}")
            return None
        value = obj[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
            errors.append(f"{where}.{key}: {type(value).__name__} is not {_names(kinds)}")
            return None
        return value

    if not isinstance(doc, dict):
        return [f"document: {type(doc).__name__} is not an object"]
    if doc.get("version") != SCHEMA_VERSION:
        errors.append(f"version: {doc.get('version')!r} is not {SCHEMA_VERSION}")
    need(doc, "started", str, "document")
    need(doc, "quick", bool, "document")
    need(doc, "seconds", _NUMBER, "document")
    need(doc, "machine", dict, "document")
    benches = need(doc, "benchmarks", list, "document") or []
    for i, bench in enumerate(benches):
        where = f"benchmarks[{i}]"
        if not isinstance(bench, dict):
            errors.append(f"{where}: not an object")
            continue
        need(bench, "name", str, where)
        status = need(bench, "status", str, where)
        if status is not None and status not in STATUSES:
            errors.append(f"{where}.status: {status!r} is not one of {', '.join(STATUSES)}")
        need(bench, "seconds", _NUMBER, where)
        need(bench, "error", str, where)
        need(bench, "notes", list, where)
        samples = need(bench, "samples", dict, where) or {}
        for key, series in samples.items():
            if not isinstance(series, list) or not all(
                v is None or (isinstance(v, _NUMBER) and not isinstance(v, bool)) for v in series
            ):
                errors.append(f"{where}.samples[{key!r}]: not a list of numbers or nulls")
        for j, fig in enumerate(need(bench, "figures", list, where) or []):
            fwhere = f"{where}.figures[{j}]"
            if not isinstance(fig, dict):
                errors.append(f"{fwhere}: not an object")
                continue
            for key in ("bench", "name", "unit", "baseline_what", "note", "target"):
                need(fig, key, str, fwhere)
            if fig.get("better") not in ("higher", "lower"):
                errors.append(f"{fwhere}.better: {fig.get('better')!r} is not 'higher' or 'lower'")
            for key in ("value", "baseline", "ratio"):
                if key not in fig:
                    errors.append(f"{fwhere}: missing {key!r}")
                elif fig[key] is not None and (
                    not isinstance(fig[key], _NUMBER) or isinstance(fig[key], bool)
                ):
                    errors.append(f"{fwhere}.{key}: not a number or null")
            if fig.get("value") is None and not fig.get("note"):
                errors.append(f"{fwhere}: no value and no note saying why")
    return errors


def _as_tuple(kinds: tuple[type, ...] | type) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _names(kinds: tuple[type, ...] | type) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kinds))


# --- the table ------------------------------------------------------------------


def format_value(value: float | None, unit: str) -> str:
    """A number with about three significant digits and its unit; "-" for None."""
    v = _finite(value)
    if v is None:
        return "-"
    magnitude = abs(v)
    if magnitude == 0:
        text = "0"
    elif magnitude >= 100:
        text = f"{v:.0f}"
    elif magnitude >= 10:
        text = f"{v:.1f}"
    elif magnitude >= 1:
        text = f"{v:.2f}"
    elif magnitude >= 0.01:
        text = f"{v:.3f}"
    else:
        text = f"{v:.2g}"
    return f"{text} {unit}" if unit else text


def format_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    if abs(ratio) >= 0.1:
        return f"{ratio:.2f}x"
    return f"{ratio:.2g}x"


def _grid(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])]


def table(run: Run) -> str:
    """The one table: every figure beside its baseline and the ratio; baselines as a legend."""
    legend: dict[str, int] = {}
    rows: list[list[str]] = []
    for bench in run.benches:
        if bench.status != "ok" and not bench.figures:
            what = bench.error or bench.status
            rows.append([bench.name, f"({bench.status})", "-", "-", "-", what])
            continue
        for fig in bench.figures:
            ref = legend.setdefault(fig.baseline_what, len(legend) + 1)
            note = "; ".join(x for x in (fig.note, f"target {fig.target}" if fig.target else "") if x)
            rows.append(
                [
                    fig.bench,
                    fig.name,
                    format_value(fig.value, fig.unit) if fig.value is not None else "-",
                    f"{format_value(fig.baseline, fig.unit)} [{ref}]",
                    format_ratio(fig.ratio),
                    note,
                ]
            )
        if bench.status != "ok":
            rows.append([bench.name, f"({bench.status})", "-", "-", "-", bench.error])
    kind = "quick" if run.quick else "full"
    cpus = run.machine.get("cpus", "?")
    head = (
        f"overlayd benchmarks: {kind} run started {run.started}, {run.seconds / 60:.1f} min, "
        f"{cpus} CPUs, kernel {run.machine.get('kernel', '?')}"
    )
    lines = [head, ""]
    lines += _grid(["benchmark", "figure", "value", "baseline", "ratio", "note"], rows, right={2, 3, 4})
    if legend:
        lines += ["", "baselines (measured in this run):"]
        lines += [f"  [{n}] {what}" for what, n in legend.items()]
    notes = [f"  {b.name}: {n}" for b in run.benches for n in b.notes]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)
