"""The lab with real overlayd daemons: `lab up|status|down` and the Lab API the e2e tests use."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest

from overlayd.lab import Lab, lab_down, lab_status, lab_up, netns
from overlayd.lab.proc import read_start_time

pytestmark = pytest.mark.root


def gone(pid: int) -> bool:
    found = read_start_time(pid)
    return found is None or found[1] == "Z"


def fdb_macs(lab: Lab, host: str) -> dict[str, str]:
    """MAC -> remote VTEP of the permanent unicast entries overlayd programmed on `host`."""
    return {e["mac"]: e["dst"] for e in lab.fdb(host) if "dst" in e and e["mac"] != "00:00:00:00:00:00"}


def test_lab_up_status_down(lab_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        assert lab_up(3, "etcd", lab_prefix, json_out=True) == 0
        up = json.loads(capsys.readouterr().out)
        assert len(up["ping"]) == 6 and all(p["ok"] for p in up["ping"]), up["ping"]

        assert lab_status(lab_prefix, json_out=True) == 0
        status = json.loads(capsys.readouterr().out)
        assert [d["host"] for d in status["daemons"]] == ["h1", "h2", "h3"]
        assert all(d["alive"] and d["ready"] for d in status["daemons"]), status["daemons"]
        assert {d["netns"] for d in status["daemons"]} == {f"{lab_prefix}-h{k}" for k in (1, 2, 3)}
        endpoints = status["endpoints"]
        assert [ep["netns"] for ep in endpoints] == [f"{lab_prefix}-h{k}-ep" for k in (1, 2, 3)]
        assert len({ep["ip"] for ep in endpoints}) == len({ep["mac"] for ep in endpoints}) == 3
        pids = [d["pid"] for d in status["daemons"]] + [status["store"]["pid"]]
    finally:
        assert lab_down(lab_prefix) == 0
    assert all(gone(pid) for pid in pids)
    assert [ns for ns in netns.list_netns() if ns.startswith(lab_prefix + "-")] == []


def test_lab_api_with_daemons(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=3, lease_ttl=3)
    assert all(r.ok for r in lab.ping_all()), lab.ping_all(timeout=1)
    h1_ep, h2_ep, h3_ep = lab.endpoints

    status, _ = lab.status_get("h2", "/readyz")
    assert status == 200
    assert fdb_macs(lab, "h2")[h1_ep.mac] == lab.host("h1").address
    assert lab.admin("h1").status().ready is True

    # A SIGTERM'd and restarted daemon comes back ready; traffic to its endpoint works.
    assert lab.stop_daemon("h1") == 0
    assert not lab.daemon_alive("h1")
    lab.start_daemon("h1")
    assert lab.ping(h2_ep.netns, h1_ep.ip)

    # A new endpoint is reachable from another host.
    extra = lab.add_endpoint("h2", "extra")
    assert extra.netns == f"{lab.prefix}-extra"
    lab.wait_ping(h1_ep.netns, extra.ip)

    # A crashed host's endpoints leave the others' kernels after its lease runs out.
    assert lab.kill_daemon("h3") == -signal.SIGKILL
    lab.wait_for(lambda: h3_ep.mac not in fdb_macs(lab, "h1"), 20, "h3-ep gone from h1")
    assert lab.ping(h2_ep.netns, h1_ep.ip)
