"""EtcdServer against the real etcd binary: start, restart keeps data, stop, cleanup."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import aetcd
import pytest

from overlayd.lab import EtcdError, EtcdServer, netns
from overlayd.lab.proc import read_start_time


def gone(pid: int) -> bool:
    found = read_start_time(pid)
    return found is None or found[1] == "Z"


async def put_get(server: EtcdServer, key: bytes, value: bytes | None = None) -> bytes | None:
    client = aetcd.Client(host=server.host, port=server.client_port, timeout=5)
    try:
        if value is not None:
            await client.put(key, value)
        got = await client.get(key)
        return got.value if got is not None else None
    finally:
        await client.close()


async def test_fixture_server_answers_and_restart_keeps_data(etcd_server: EtcdServer) -> None:
    assert etcd_server.healthy()
    assert etcd_server.url == f"etcd://127.0.0.1:{etcd_server.client_port}"
    assert await put_get(etcd_server, b"/t/k", b"v1") == b"v1"
    old_pid = etcd_server.pid
    assert old_pid is not None

    etcd_server.restart()

    assert etcd_server.pid != old_pid
    assert gone(old_pid)
    assert etcd_server.url == f"etcd://127.0.0.1:{etcd_server.client_port}"
    assert await put_get(etcd_server, b"/t/k") == b"v1"


async def test_kill_then_start_keeps_data(etcd_server: EtcdServer) -> None:
    await put_get(etcd_server, b"/t/crash", b"before")
    pid = etcd_server.pid
    assert pid is not None
    etcd_server.kill()
    assert gone(pid)
    assert not etcd_server.healthy()
    etcd_server.start()
    assert await put_get(etcd_server, b"/t/crash") == b"before"


def test_cleanup_leaves_no_process_and_no_directory() -> None:
    server = EtcdServer()
    server.start()
    pid = server.pid
    assert pid is not None and server.data_dir.is_dir()
    server.cleanup()
    assert gone(pid)
    assert not server.workdir.exists()
    server.cleanup()  # idempotent


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    server = EtcdServer(workdir=tmp_path / "etcd")
    server.start()
    proc = server.proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    try:
        server.stop(timeout=0.5)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.returncode() == -signal.SIGKILL
    server.cleanup()


def test_port_in_use_is_a_clear_error_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = EtcdServer(client_port=port, peer_port=netns.free_port(), workdir=tmp_path / "etcd")
        with pytest.raises(EtcdError, match="address already in use"):
            server.start(timeout=10)
        assert server.proc is None or not server.proc.alive()
        server.cleanup()


@pytest.mark.root
def test_etcd_inside_a_namespace(lab_prefix: str, tmp_path: Path) -> None:
    ns = f"{lab_prefix}-kv"
    netns.add_netns(ns)
    try:
        with EtcdServer(netns=ns, workdir=tmp_path / "etcd") as server:
            assert server.pid in netns.netns_pids(ns)
            assert server.healthy()
            # Not reachable from this process's own namespace.
            with socket.socket() as outside:
                outside.settimeout(1)
                assert outside.connect_ex(("127.0.0.1", server.client_port)) != 0
    finally:
        netns.delete_netns(ns)
