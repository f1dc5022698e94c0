"""The fault suite's short form (issue 9): each scenario once, on its short backend.

`make faults` runs the full table (every backend) and writes
`faults/results/latest.json`; here each scenario runs once so CI notices a
regression. A scenario known not to pass here is expected to fail, with its
reason (`Scenario.known_failures`).
"""

from __future__ import annotations

import pytest
from conftest import new_prefix

from faults.extra import EXTRA
from faults.harness import Scenario, run_one
from faults.scenarios import SCENARIOS

pytestmark = pytest.mark.root

ALL = sorted([*SCENARIOS, *EXTRA], key=lambda s: s.number)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario", ALL, ids=[f"{s.number:02d}-{s.short_backend}" for s in ALL])
def test_fault(scenario: Scenario) -> None:
    backend = scenario.short_backend
    row = run_one(scenario, backend, short=True, prefix=new_prefix())
    if row.result != "pass" and backend in scenario.known_failures:
        pytest.xfail(row.note)
    assert row.result == "pass", f"{row.note} (pings {row.pings_lost}/{row.pings_sent} lost, " \
        f"{row.wrongly_removed} entries wrongly removed)"
