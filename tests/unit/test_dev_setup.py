"""`./dev.sh lab` installs what the lab uses and nothing of the test toolchain; `test` all of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BASH = shutil.which("bash") or "/bin/bash"
SCRIPT = ROOT / "scripts" / "system-packages.sh"
# What `overlayctl lab up` runs in the default gossip lab: `ip` and `bridge` (iproute2),
# `ping`, and the daemons from a Python venv.
LAB = {"python3", "python3-venv", "iproute2", "iputils-ping"}
TOOLCHAIN = {"etcd-server", "zookeeper", "default-jre-headless", "podman", "docker-compose", "nftables"}


def packages(*args: str, path: str | None = None) -> list[str]:
    env = None if path is None else {"PATH": path}
    result = subprocess.run(
        [BASH, str(SCRIPT), *args], capture_output=True, text=True, check=True, env=env, timeout=60
    )
    return result.stdout.split()


def test_the_lab_group_is_what_the_lab_runs() -> None:
    assert set(packages("--list", "lab")) == LAB


def test_the_test_group_adds_the_toolchain() -> None:
    listed = packages("--list", "test")
    assert len(listed) == len(set(listed))
    assert LAB | TOOLCHAIN <= set(listed)


def test_on_a_bare_machine_the_lab_asks_for_its_packages_only(tmp_path: Path) -> None:
    # An empty PATH: every `command -v` check fails, as on a fresh machine.
    bare = str(tmp_path)
    missing_lab = set(packages("--missing", "lab", path=bare))
    assert missing_lab == LAB
    assert TOOLCHAIN - {"etcd-server", "zookeeper"} <= set(packages("--missing", "test", path=bare))


def test_unknown_group_is_a_usage_error() -> None:
    result = subprocess.run([BASH, str(SCRIPT), "prod"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "usage" in result.stderr


def dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -n prints the recipes without running them; -B as if nothing were installed yet.
    result = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), target], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout


def test_make_lab_installs_the_lab_packages_and_the_package_alone() -> None:
    recipe = dry_run("lab")
    assert "scripts/system-packages.sh lab" in recipe
    assert "system-packages.sh test" not in recipe
    assert "pip install --quiet -e ." in recipe and "[test]" not in recipe


def test_make_test_and_ci_install_everything() -> None:
    recipe = dry_run("test")
    assert "scripts/system-packages.sh test" in recipe and "-e '.[test]'" in recipe
    assert "scripts/system-packages.sh test" in (ROOT / ".ci" / "run").read_text()
