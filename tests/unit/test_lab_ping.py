"""The lab's one-shot ping: a ping the busy machine could not even run in time is unanswered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NoReturn

import pytest

from overlayd.lab import Lab, netns


def failing_with(returncode: int) -> Callable[..., NoReturn]:
    def run_in(ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> NoReturn:
        raise netns.CommandError(["ip", "netns", "exec", ns, *argv], returncode, "")

    return run_in


def test_a_ping_that_ran_out_of_time_counts_as_unanswered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "run_in", failing_with(netns.PROCESS_TIMED_OUT))
    lab = Lab.__new__(Lab)  # ping needs nothing of a built lab but the namespace runner
    assert lab.ping("x-h1", "10.100.0.2") is False


def test_a_ping_that_cannot_run_at_all_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "run_in", failing_with(127))  # e.g. ping is not installed
    lab = Lab.__new__(Lab)
    with pytest.raises(netns.CommandError):
        lab.ping("x-h1", "10.100.0.2")
