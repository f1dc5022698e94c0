"""Scenarios 14-16: hostile input, permissions and secrets, clock jumps."""

from __future__ import annotations

from faults.harness import Scenario

EXTRA: list[Scenario] = []
