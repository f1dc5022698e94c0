"""Pick the KV backend named by the store URL's scheme."""

from __future__ import annotations

from collections.abc import Callable

from overlayd.core.config import StoreConfig
from overlayd.store.base import Store
from overlayd.util.metrics import Metrics


def make_store(
    config: StoreConfig,
    *,
    state_dir: str,
    metrics: Metrics | None = None,
    on_invalid: Callable[[str], None] | None = None,
) -> Store:
    # Imports are local so a host running one backend never imports the others' clients.
    if config.scheme in ("etcd", "etcds"):
        from overlayd.store.etcd import EtcdStore

        return EtcdStore(config, state_dir=state_dir, metrics=metrics, on_invalid=on_invalid)
    if config.scheme in ("consul", "consuls"):
        from overlayd.store.consul import ConsulStore

        return ConsulStore(config, state_dir=state_dir, metrics=metrics, on_invalid=on_invalid)
    if config.scheme == "zookeeper":
        from overlayd.store.zookeeper import ZooKeeperStore

        return ZooKeeperStore(config, state_dir=state_dir, metrics=metrics, on_invalid=on_invalid)
    raise ValueError(f"store.url: no backend for scheme {config.scheme!r}")
