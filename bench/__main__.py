"""`python -m bench`: run the suite, write results/latest.json, print the table, draw the plot."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from bench import SUITE
from bench.adapters import ADAPTERS, takes_context
from bench.context import FULL, QUICK, Context
from bench.report import BenchResult, Run, table, validate

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a CI timeout, `kill PID`) unwinds like Ctrl-C, so labs are removed.
    raise KeyboardInterrupt(f"signal {signum}")


def machine() -> dict[str, object]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "loadavg_at_start": list(os.getloadavg()),
    }


def run_one(ctx: Context, name: str) -> BenchResult:
    if ctx.left() <= 0:
        budget = f"{ctx.scale.run_budget / 60:g}-minute"
        return BenchResult(name, status="skipped", error=f"the run's {budget} budget was spent")
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            raise
        return BenchResult(name, status="missing", error=f"not built yet (bench/{name}.py)")
    ctx.say(f"=== {name}")
    start = time.monotonic()
    try:
        if takes_context(module.run):
            result: BenchResult = module.run(ctx)
        elif name in ADAPTERS:
            result = ADAPTERS[name](ctx, module)
        else:
            raise TypeError(f"bench/{name}.py: run() does not take the Context")
    except Exception as exc:
        result = BenchResult(name, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        ctx.say(f"{name} failed: {exc!r}")
    result.seconds = time.monotonic() - start
    ctx.say(f"=== {name} done in {result.seconds:.1f}s")
    return result


def write(run: Run, path: Path) -> Path:
    doc = run.to_json()
    problems = validate(doc)
    if problems:
        raise RuntimeError("results do not have the documented shape: " + "; ".join(problems[:5]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").strip())
    parser.add_argument("--quick", action="store_true", help="small scale, a few minutes")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SUITE)}")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for latest.json/.png (quick.json/.png with --quick)",
    )
    parser.add_argument("--seed", type=int, default=8, help="random choices (hosts, MACs)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in (s.strip() for s in args.only.split(",")) if n] or list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("python -m bench: needs root (it builds labs in network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    tag = "bn" + secrets.token_hex(2)
    ctx = Context(QUICK if args.quick else FULL, tag=tag, seed=args.seed)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ctx.say(f"{'quick' if args.quick else 'full'} run, lab prefixes {tag}*: {', '.join(names)}")
    info = machine()
    results: list[BenchResult] = []
    try:
        for name in names:
            results.append(run_one(ctx, name))
    finally:
        for err in ctx.close():
            ctx.say(f"cleanup: {err}")
    info["loadavg_at_end"] = list(os.getloadavg())
    run = Run(started, args.quick, time.monotonic() - ctx.started, info, results)
    # A quick run never overwrites the full run's results (the README shows those).
    stem = "quick" if args.quick else "latest"
    path = write(run, args.out / f"{stem}.json")
    print(table(run))
    print(f"\nresults: {path}")
    if not args.no_plot:
        try:
            from bench.plot import draw
        except ImportError as exc:
            print(f"plot skipped: {exc} (pip install -e '.[bench]')")
        else:
            print(f"plot: {draw(run, args.out / f'{stem}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
