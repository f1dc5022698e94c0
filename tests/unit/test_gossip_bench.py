"""bench/gossip_scale.py end to end on a tiny cluster, so CI keeps the bench runner's entry point working."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gossip_scale.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gossip_scale", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gossip_scale"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_run_returns_and_writes_the_figures(tmp_path: Path) -> None:
    bench = load()
    settings = bench.Settings(members=30, trials=3, rest=2.0, churn=2.0, churn_rate=2.0, losses=(0.0, 0.05))
    out = tmp_path / "gossip_scale.json"
    result = bench.run(settings=settings, out=out)
    assert json.loads(out.read_text()) == result
    assert [sp["loss"] for sp in result["spread"]] == [0.0, 0.05]
    for sp in result["spread"]:
        assert sp["trials"] == 3 and sp["receivers"] == 29
        assert 0.0 <= sp["within"] <= 1.0
        assert set(sp["delivery"]) == {"p50", "p99", "p99.99", "max"}
    rest = [t for t in result["traffic"] if t["changes_per_second"] == 0]
    assert len(rest) == 2 and all(t["bytes_per_member_per_second"] > 0 for t in rest)
    assert set(result["baselines"]) >= {
        "ideal_push_s",
        "docker_spread",
        "docker_full_sync_bytes_per_member_per_second",
    }
    assert isinstance(result["target_met"], bool)
