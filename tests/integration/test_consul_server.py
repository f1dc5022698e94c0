"""ConsulServer against the real consul binary: dev vs persistent restart, stop, cleanup."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from overlayd.lab import netns
from overlayd.lab.consul import ConsulError, ConsulServer, find_consul
from overlayd.lab.proc import read_start_time

try:
    find_consul()
except ConsulError as exc:
    pytest.skip(str(exc), allow_module_level=True)


def gone(pid: int) -> bool:
    found = read_start_time(pid)
    return found is None or found[1] == "Z"


def put(server: ConsulServer, key: str, value: bytes) -> None:
    request = urllib.request.Request(f"{server.http_url}/v1/kv/{key}", data=value, method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.load(response) is True


def get(server: ConsulServer, key: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v1/kv/{key}?raw", timeout=5) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "persistent"])
def test_restart_keeps_data_only_when_persistent(dev: bool, tmp_path: Path) -> None:
    with ConsulServer(dev=dev, workdir=tmp_path / "consul") as server:
        assert server.healthy()
        put(server, "t/k", b"v1")
        url, old_pid = server.url, server.pid
        assert old_pid is not None
        server.restart()
        assert server.url == url and server.pid != old_pid and gone(old_pid)
        assert get(server, "t/k") == (None if dev else b"v1")


def test_cleanup_leaves_no_process_and_no_directory() -> None:
    server = ConsulServer()
    server.start()
    pid = server.pid
    assert pid is not None
    server.cleanup()
    assert gone(pid) and not server.workdir.exists()
    server.cleanup()  # idempotent


def test_port_in_use_is_a_clear_error_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = ConsulServer(http_port=busy.getsockname()[1], workdir=tmp_path / "consul")
        with pytest.raises(ConsulError, match="address already in use"):
            server.start(timeout=10)
        assert server.proc is None or not server.proc.alive()
        server.cleanup()


@pytest.mark.root
def test_consul_inside_a_namespace(lab_prefix: str, tmp_path: Path) -> None:
    ns = f"{lab_prefix}-kv"
    netns.add_netns(ns)
    try:
        with ConsulServer(netns=ns, workdir=tmp_path / "consul") as server:
            assert server.pid in netns.netns_pids(ns)
            assert server.healthy()
            with socket.socket() as outside:
                outside.settimeout(1)
                assert outside.connect_ex(("127.0.0.1", server.http_port)) != 0
    finally:
        netns.delete_netns(ns)
