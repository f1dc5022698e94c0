"""Fixtures shared by all tests: real etcd servers, lab prefixes, root-only skips.

Tests marked `pytest.mark.root` (namespaces, netlink) are skipped when not
running as root. Every namespace and lab a test makes is named with this
run's prefix (`ovt` + 4 random hex digits, then a per-test counter); at the
end of the session anything still carrying it is removed, processes inside
first, so a test that failed half way leaves nothing behind.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from overlayd.lab import EtcdServer, Lab, netns
from overlayd.lab.lab import LAB_ROOT
from overlayd.lab.proc import Proc, stop_all

RUN_PREFIX = "ovt" + secrets.token_hex(2)
_counter = itertools.count(1)


def is_root() -> bool:
    return os.geteuid() == 0


def new_prefix() -> str:
    """A lab/namespace prefix unique in this run: RUN_PREFIX plus a counter (<= 16 chars)."""
    return f"{RUN_PREFIX}{next(_counter):03x}"


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI cancelling, `timeout`) becomes an interrupt, so pytest still runs
    # the fixtures' teardown and the session's cleanup below instead of dying with
    # namespaces, daemons and etcd servers left behind.
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def purge(prefix: str) -> list[str]:
    """Remove every lab and namespace whose name starts with `prefix`; the errors met."""
    errors: list[str] = []
    if LAB_ROOT.is_dir():
        for labdir in sorted(LAB_ROOT.iterdir()):
            if labdir.name.startswith(prefix):
                lab = Lab.load(labdir.name) or Lab(prefix=labdir.name)
                errors += lab.down()
    leftover = [ns for ns in netns.list_netns() if ns.startswith(prefix)]
    procs = [Proc.of_pid(pid) for ns in leftover for pid in netns.netns_pids(ns)]
    stop_all([proc for proc in procs if proc is not None], timeout=5.0)
    for ns in leftover:
        try:
            netns.delete_netns(ns)
        except netns.CommandError as exc:
            errors.append(str(exc))
    return errors


@pytest.fixture(scope="session", autouse=True)
def _remove_leftovers() -> Iterator[None]:
    yield
    if is_root():
        errors = purge(RUN_PREFIX)
        if errors:
            pytest.fail("cleanup after the session failed: " + "; ".join(errors))


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A started etcd on 127.0.0.1 with free ports and a temporary data dir, removed after."""
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def lab_prefix() -> str:
    """A prefix for this test's namespaces and lab, unique in the run."""
    return new_prefix()


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """Build labs with `make_lab(hosts=3, **Lab options)`; each is taken down after the test.

    Pass `up=False` to get the Lab without building it (then call `up()` yourself).
    """
    labs: list[Lab] = []

    def make(hosts: int = 3, *, up: bool = True, **options: Any) -> Lab:
        lab = Lab(hosts=hosts, prefix=new_prefix(), **options)
        labs.append(lab)
        return lab.up() if up else lab

    yield make
    errors = [err for lab in labs for err in lab.down()]
    if errors:
        pytest.fail("lab down failed: " + "; ".join(errors))
