"""KV servers of three members for scenario 11, in the lab's KV namespace.

`EtcdCluster` (three etcd members) and `ZooKeeperEnsemble` (three ZooKeeper
servers) look to the lab like its one KV server (the lab's `KvServer`
protocol): `url` lists every member, `start`/`stop` act on all of them, and
`members` gives each one to kill. All members listen on the KV address
198.18.0.1 with ports of their own. `ClusterLab` is a `Lab` whose KV server
is one of these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from overlayd.lab import Lab
from overlayd.lab.etcd import EtcdServer
from overlayd.lab.lab import KV_ADDRESS, KvServer
from overlayd.lab.proc import Proc
from overlayd.lab.zookeeper import ZooKeeperServer

MEMBERS = 3


def _all(servers: Sequence[Any], action: Callable[[Any], object]) -> None:
    # Members wait for each other (a quorum) before they are ready: start them at once.
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(action, servers))


M = TypeVar("M", bound=EtcdServer | ZooKeeperServer)


class _Members(Generic[M]):
    """What the lab sees of a KV server made of several members: the first one's log
    and PID, every member's address in `url`, start and stop acting on all."""

    scheme = ""
    members: list[M]
    proc: Proc | None

    @property
    def url(self) -> str:
        return f"{self.scheme}://" + ",".join(f"{m.host}:{m.client_port}" for m in self.members)

    @property
    def log_path(self) -> Path:
        return self.members[0].log_path

    @property
    def pid(self) -> int | None:
        return self.members[0].pid

    def start(self, timeout: float) -> None:
        _all(self.members, lambda m: m.start(timeout))
        self.proc = self.members[0].proc

    def stop(self, timeout: float = 10.0) -> None:
        _all([m for m in self.members if m.running()], lambda m: m.stop(timeout))

    def running(self) -> bool:
        return any(m.running() for m in self.members)


class EtcdCluster(_Members[EtcdServer]):
    scheme = "etcd"

    def __init__(self, *, netns: str, workdir: Path, on_start: Callable[[Any], None]) -> None:
        self.workdir = workdir
        ports = [(2379 + 10000 * k, 2380 + 10000 * k) for k in range(MEMBERS)]
        initial = ",".join(f"m{k}=http://{KV_ADDRESS}:{peer}" for k, (_, peer) in enumerate(ports))
        self.members = [
            EtcdServer(
                host=KV_ADDRESS,
                client_port=client,
                peer_port=peer,
                netns=netns,
                workdir=workdir / f"m{k}",
                name=f"m{k}",
                # Later flags win: one cluster of three instead of the runner's cluster of one.
                extra_args=[
                    f"--initial-cluster={initial}",
                    "--election-timeout=1000",
                    "--heartbeat-interval=100",
                ],
                on_start=on_start,
            )
            for k, (client, peer) in enumerate(ports)
        ]
        self.proc: Proc | None = None

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)


class _EnsembleMember(ZooKeeperServer):
    def __init__(self, *, myid: int, servers: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.myid = myid
        self.servers = servers

    def config_text(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "myid").write_text(f"{self.myid}\n")
        return super().config_text() + self.servers + "initLimit=10\nsyncLimit=5\n"


class ZooKeeperEnsemble(_Members[_EnsembleMember]):
    scheme = "zookeeper"

    def __init__(self, *, netns: str, workdir: Path, on_start: Callable[[Any], None]) -> None:
        self.workdir = workdir
        servers = "".join(
            f"server.{k + 1}={KV_ADDRESS}:{2888 + 10 * k}:{3888 + 10 * k}\n" for k in range(MEMBERS)
        )
        self.members = [
            _EnsembleMember(
                myid=k + 1,
                servers=servers,
                host=KV_ADDRESS,
                client_port=2181 + 10 * k,
                netns=netns,
                workdir=workdir / f"m{k}",
                on_start=on_start,
            )
            for k in range(MEMBERS)
        ]
        self.proc: Proc | None = None

    def start(self, timeout: float = 90.0) -> None:
        super().start(timeout)


class ClusterLab(Lab):
    """A lab whose etcd or ZooKeeper runs three members (other stores as usual)."""

    def _kv_server(self) -> KvServer:
        workdir = self.dir / "kv"
        if self.store == "etcd":
            return EtcdCluster(netns=self.kv_ns, workdir=workdir, on_start=lambda _s: self._save())
        if self.store == "zookeeper":
            return ZooKeeperEnsemble(netns=self.kv_ns, workdir=workdir, on_start=lambda _s: self._save())
        return super()._kv_server()
