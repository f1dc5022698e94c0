"""overlayctl's operator commands where no daemon is needed: completion, doctor's checks, teardown's guard.

Sockets and shells are real: the port checks bind real sockets in this
process, the completion script runs in a real bash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import answers
import pytest

from overlayd.api import schema
from overlayd.clients import cli, completion, doctor


def _complete(script: Path, line: str) -> list[str]:
    """What bash offers for `line` (a trailing space means: complete a new word)."""
    program = (
        'source "$1"; read -ra COMP_WORDS <<< "$2"; [[ "$2" == *" " ]] && COMP_WORDS+=(""); '
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _overlayctl; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    out = subprocess.run(
        ["bash", "-c", program, "_", str(script), line],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [word for word in out.splitlines() if word]


@pytest.fixture
def bash_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert cli.main(["completion", "bash"]) == 0
    path = tmp_path / "overlayctl.bash"
    path.write_text(capsys.readouterr().out)
    return path


def test_bash_completion_follows_the_parser(bash_script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(bash_script)], check=False).returncode == 0
    top = next(lv for lv in completion.walk(cli.build_parser()) if lv.path == ())
    assert set(_complete(bash_script, "overlayctl ")) == set(top.commands)
    assert {"doctor", "teardown", "completion", "diff"} <= set(top.commands)
    assert _complete(bash_script, "overlayctl net") == ["network"]
    assert _complete(bash_script, "overlayctl network ") == [
        "create",
        "ls",
        "list",
        "inspect",
        "rm",
        "remove",
    ]
    # Options of the subcommand, also after global options with a value.
    assert _complete(bash_script, "overlayctl --socket /x network create n1 --s") == ["--socket", "--subnet"]
    assert _complete(bash_script, "overlayctl teardown --y") == ["--yes"]
    assert _complete(bash_script, "overlayctl completion ") == ["bash", "zsh"]
    # The value of an option is not a subcommand.
    assert _complete(bash_script, "overlayctl endpoint add --netns ") == []


def test_zsh_completion_wraps_the_bash_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "zsh"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#compdef overlayctl\n")
    assert "bashcompinit" in text and "complete -F _overlayctl overlayctl" in text
    if shutil.which("zsh"):
        assert subprocess.run(["zsh", "-n"], input=text, text=True, check=False).returncode == 0


def test_completion_json_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "bash", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shell"] == "bash" and "complete -F" in data["script"]
    assert cli.main(["completion", "fish"]) == cli.EXIT_USAGE


def test_teardown_without_a_terminal_needs_yes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    r, w = os.pipe()  # stdin that is not a terminal
    os.close(w)
    with os.fdopen(r) as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        # No daemon is contacted before the confirmation question is settled.
        code = cli.main(["--socket", str(tmp_path / "none.sock"), "teardown"])
    assert code == cli.EXIT_USAGE
    assert "pass --yes" in capsys.readouterr().err


# --- doctor's checks ------------------------------------------------------------


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "admin.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    yield path
    sock.close()


def test_check_socket(unix_socket: Path, tmp_path: Path) -> None:
    owner_is_root = os.lstat(unix_socket).st_uid == 0
    assert doctor.check_socket(str(unix_socket)).result == (doctor.OK if owner_is_root else doctor.FAIL)
    os.chmod(unix_socket, 0o666)
    check = doctor.check_socket(str(unix_socket))
    assert check.result == doctor.FAIL and "0666" in check.message and check.hint
    assert doctor.check_socket(str(tmp_path / "missing")).result == doctor.FAIL
    plain = tmp_path / "file"
    plain.write_text("")
    assert "not a socket" in doctor.check_socket(str(plain)).message
    assert stat.S_ISREG(os.lstat(plain).st_mode)


def test_port_held_by_a_process_fails_and_by_the_daemon_passes() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        check = doctor.check_vxlan_port(port)
        assert check.result == doctor.FAIL and f"pid {os.getpid()}" in check.message, check
        # The gossip port held by the daemon itself (here: this process) is fine.
        assert doctor.check_gossip_port(port, os.getpid(), configured=True).result == doctor.OK
        other = doctor.check_gossip_port(port, os.getpid() + 100000, configured=False)
        assert other.result == doctor.FAIL and "Serf" in other.hint
    assert doctor.check_vxlan_port(port).result == doctor.OK  # free again
    assert doctor.check_gossip_port(port, None, configured=False).result == doctor.OK
    assert doctor.check_gossip_port(port, None, configured=True).result == doctor.FAIL


def test_tcp_listener_counts_for_the_gossip_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        assert doctor.check_gossip_port(port, None, configured=False).result == doctor.OK  # not listening
        tcp.listen()
        assert doctor.check_gossip_port(port, None, configured=False).result == doctor.FAIL


def test_check_mtu() -> None:
    status = answers.status(underlay={"interface": "eth0", "mtu": 1500})
    assert doctor.check_mtu(status, [answers.network("a"), answers.network("b", mtu=1400)]).result == "OK"
    check = doctor.check_mtu(status, [answers.network("big", mtu=1500)])
    assert check.result == doctor.FAIL and "big (1500)" in check.message
    assert "1550" in check.hint and "--mtu 1450" in check.hint
    small = answers.status(underlay={"interface": "x", "mtu": 1280})
    assert doctor.check_mtu(small, []).result == doctor.WARN
    assert doctor.check_mtu(answers.status(underlay=None), []).result == doctor.WARN


def test_check_gateway_tools() -> None:
    plain = answers.network("a")
    egress = dataclasses.replace(answers.network("out"), egress="nat", gateway=IPv4Address("10.1.0.1"))
    routed = dataclasses.replace(answers.network("rt"), mode="routed", gateway=IPv4Address("10.1.0.1"))
    assert doctor.check_gateway_tools([plain], which=lambda _: None).result == doctor.OK
    found = doctor.check_gateway_tools([plain, egress, routed], which=lambda tool: f"/usr/sbin/{tool}")
    assert found.result == doctor.OK and "out, rt" in found.message
    missing = doctor.check_gateway_tools([egress], which=lambda tool: None if tool == "nft" else tool)
    assert missing.result == doctor.FAIL and missing.message.startswith("nft not found")
    assert "nftables" in missing.hint


def test_check_clock() -> None:
    me = answers.peer("h1", me=True, started_at=1000.0)
    assert doctor.check_clock([me], 1000.0).result == doctor.OK
    # KV store only, no gossip: nothing measures peers' clocks
    peer = answers.peer("h2", started_at=990.0)
    check = doctor.check_clock([me, peer], 1000.0)
    assert check.result == doctor.WARN and "gossip is off" in check.message
    # gossip runs (peers carry a state) but has not probed anyone yet
    gossiping = answers.peer("h2", started_at=990.0, state="alive", rtt_ms=None)
    check = doctor.check_clock([me, gossiping], 1000.0)
    assert check.result == doctor.WARN and "measured yet" in check.message
    ahead = answers.peer("h3", started_at=1030.0)
    check = doctor.check_clock([me, peer, ahead], 1000.0)
    assert check.result == doctor.FAIL and "h3" in check.message
    # measured offsets, as gossip gives them (seconds, peer minus this host)
    close = answers.peer("h2", started_at=990.0, state="alive", rtt_ms=0.3, clock_offset=0.0012)
    check = doctor.check_clock([me, close], 1000.0)
    assert check.result == doctor.OK and check.message.startswith("h2's clock is 1.2 ms ahead")
    off = answers.peer("h2", started_at=990.0, state="alive", rtt_ms=0.3, clock_offset=0.8)
    fine = answers.peer("h3", started_at=990.0, state="alive", rtt_ms=0.3, clock_offset=-0.1)
    check = doctor.check_clock([me, off, fine], 1000.0)
    assert check.result == doctor.WARN and "h2" in check.message and "NTP" in check.hint
    far = answers.peer("h2", started_at=990.0, state="alive", rtt_ms=0.3, clock_offset=-7.0)
    check = doctor.check_clock([me, far], 1000.0)
    assert check.result == doctor.FAIL and "7.0 s behind" in check.message
    cut_off = answers.peer("h2", started_at=990.0, state="alive", rtt_ms=0.3, clock_offset=90.0)
    check = doctor.check_clock([me, cut_off], 1000.0)
    assert check.result == doctor.FAIL and "drops datagrams" in check.hint


def test_check_store() -> None:
    status = answers.status()
    assert doctor.check_store(status, answers.probe(), None).result == doctor.OK
    assert doctor.check_store(status, answers.probe(latency_ms=900.0), None).result == doctor.WARN
    down = doctor.check_store(status, answers.probe(ok=False, latency_ms=None, error="unreachable"), None)
    assert down.result == doctor.FAIL and "etcd://198.18.0.1:2379" in down.hint
    assert doctor.check_store(status, None, "daemon gone").result == doctor.FAIL


def test_check_store_data_loss() -> None:
    assert doctor.check_store_data(answers.status()).result == doctor.OK
    lost = answers.status(store=answers.store_json(data_loss="2026-12-01T10:00:00: etcd cluster ID changed"))
    assert lost.store.data_loss is not None and lost.to_json()["store"]["data_loss"].endswith("changed")
    check = doctor.check_store_data(lost)
    assert check.result == doctor.WARN and "cluster ID changed" in check.message


def test_check_warnings() -> None:
    assert doctor.check_warnings(answers.status()).result == doctor.OK
    said = "config /etc/overlayd/overlayd.toml holds secrets (gossip.keys) and is readable by others"
    warned = answers.status(warnings=[said])
    assert warned.to_json()["warnings"] == [said]
    check = doctor.check_warnings(warned)
    assert check.result == doctor.WARN and "readable by others" in check.message


def test_check_daemon_and_reconcile() -> None:
    ready = doctor.check_daemon(answers.status(), None)
    assert ready.result == doctor.OK and ready.message.startswith("node h1: ready: 1 network")
    starting = answers.status(ready=False, summary="starting: first reconcile")
    assert doctor.check_daemon(starting, None).result == doctor.WARN
    assert doctor.check_daemon(None, "no such file").result == doctor.FAIL
    status = answers.status()
    assert doctor.check_reconcile(status, schema.Diff(()), None).result == doctor.OK
    pending = doctor.check_reconcile(status, schema.Diff(("ReplaceFdb x",)), None)
    assert pending.result == doctor.WARN and "1 change(s) pending (last pass: 0 failed)" in pending.message


@pytest.mark.root
def test_vxlan_probe_in_a_throwaway_namespace() -> None:
    check = doctor.probe_vxlan()
    assert check.result == doctor.OK, check
    # The probe's device lived only in its own namespace.
    after = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert "ovdoctor0" not in after
    assert doctor.check_vxlan().result == doctor.OK


def test_a_reader_that_goes_away_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # `overlayctl ... | head`: the pipe's reader is gone before we are done writing.
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert cli.main(["completion", "bash"]) == cli.EXIT_OK
    finally:
        out.close()
