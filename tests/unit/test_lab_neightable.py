"""The lab's room in the kernel's neighbour table (overlayd/lab/neightable.py), on a fake sysctl tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlayd.lab import neightable

DEFAULTS = (128, 512, 1024)


@pytest.fixture
def sysctl(tmp_path: Path) -> Path:
    root = tmp_path / "neigh"
    root.mkdir()
    neightable.write(DEFAULTS, root)
    return root


def test_small_labs_fit_the_defaults() -> None:
    assert neightable.limits_for(3, DEFAULTS) is None
    assert neightable.limits_for(10, DEFAULTS) is None


def test_a_30_host_lab_needs_more_and_never_gets_less_than_there_is() -> None:
    raised = neightable.limits_for(30, DEFAULTS)
    assert raised is not None
    one, two, three = raised
    assert one <= two <= three
    assert two >= 2 * 30 * 29  # every host's underlay ARP and every endpoint's, all pairs
    assert neightable.limits_for(30, (1 << 20, 1 << 20, 1 << 20)) is None
    bigger = neightable.limits_for(30, (100_000, 10, 10))
    assert bigger is not None and bigger[0] == 100_000


def test_raise_then_restore_puts_back_what_was_found(sysctl: Path, tmp_path: Path) -> None:
    saved = tmp_path / "labs" / "neigh-limits.json"
    assert neightable.ensure_room(3, saved, sysctl) is None
    assert not saved.exists()
    said = neightable.ensure_room(30, saved, sysctl)
    assert said is not None and "128/512/1024" in said
    assert neightable.read(sysctl) == neightable.limits_for(30, DEFAULTS)
    # A second big lab keeps the first values found, not the raised ones.
    assert neightable.ensure_room(40, saved, sysctl) is not None
    assert neightable.restore(saved, sysctl) is not None
    assert neightable.read(sysctl) == DEFAULTS
    assert not saved.exists()
    assert neightable.restore(saved, sysctl) is None
