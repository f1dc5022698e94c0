"""The layers declared in pyproject.toml (import-linter) cover the pure modules and hold."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
# Pure by design (DESIGN.md): each must be a source of the core contract once it exists.
PURE = [
    "overlayd.core.model",
    "overlayd.core.view",
    "overlayd.core.config",
    "overlayd.api.schema",
    "overlayd.dataplane.kstate",
    "overlayd.dataplane.desired",
    "overlayd.dataplane.diff",
    "overlayd.dataplane.commands",
    "overlayd.core.admission",
    "overlayd.view",
]


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def test_every_pure_module_that_exists_is_in_the_core_contract() -> None:
    core = next(c for name, c in contracts().items() if name.startswith("The core"))
    present = [m for m in PURE if importlib.util.find_spec(m) is not None]
    missing = [m for m in present if m not in core["source_modules"]]
    assert not missing, f"add these to the core contract's source_modules in pyproject.toml: {missing}"
    io = {"pyroute2", "aiohttp", "aetcd", "kazoo", "grpc", "overlayd.store", "overlayd.dataplane.kernel"}
    assert io <= set(core["forbidden_modules"])


def test_the_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{len(contracts())} kept, 0 broken" in result.stdout
