"""`python -m faults [--short] [-s N ...] [-b BACKEND ...]`: run the fault suite, print the table.

The full run (`make faults`) runs every scenario on every backend it applies
to and writes `faults/results/latest.json`; `--short` runs each scenario once,
on its short backend, and writes `faults/results/short.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from faults.extra import EXTRA
from faults.harness import Row, purge_leftovers, run_one, table
from faults.scenarios import SCENARIOS

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faults")
    parser.add_argument("--short", action="store_true", help="each scenario once, on one backend")
    parser.add_argument("-s", "--scenario", type=int, action="append", help="only these scenario numbers")
    parser.add_argument("-b", "--backend", action="append", help="only these backends")
    parser.add_argument("--out", type=Path, help="where to write the rows (JSON)")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / ("short.json" if args.short else "latest.json")
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for scenario in sorted([*SCENARIOS, *EXTRA], key=lambda s: s.number):
            if args.scenario and scenario.number not in args.scenario:
                continue
            backends = (scenario.short_backend,) if args.short else scenario.backends
            for backend in backends:
                if args.backend and backend not in args.backend:
                    continue
                print(f"--- {scenario.number} {scenario.name} on {backend}", file=sys.stderr, flush=True)
                row = run_one(scenario, backend, short=args.short)
                print(f"    {row.result} in {row.duration_s:.0f}s {row.note}", file=sys.stderr, flush=True)
                rows.append(row)
    finally:
        errors = purge_leftovers()
        if errors:
            print("cleanup: " + "; ".join(errors), file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.to_json() for r in rows], indent=1) + "\n")
    print(table(rows))
    failed = [r for r in rows if r.result != "pass"]
    took = time.monotonic() - started
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed in {took:.0f}s; rows in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
