"""Store URLs: scheme, endpoints and (ZooKeeper) chroot."""

from __future__ import annotations

import pytest

from overlayd.core.config import ConfigError, from_flat


def test_zookeeper_url_keeps_hosts_and_chroot() -> None:
    store = from_flat(
        {"underlay.address": "198.18.0.1", "store.url": "zookeeper://10.0.0.1:2181,10.0.0.2:2182/ovl/a/"}
    ).store
    assert store.scheme == "zookeeper"
    assert [(e.host, e.port) for e in store.endpoints] == [("10.0.0.1", 2181), ("10.0.0.2", 2182)]
    assert store.chroot == "/ovl/a"


def test_no_path_means_no_chroot_and_etcd_is_unchanged() -> None:
    assert from_flat({"underlay.address": "198.18.0.1", "store.url": "zookeeper://h:2181"}).store.chroot == ""
    etcd = from_flat({"underlay.address": "198.18.0.1", "store.url": "etcd://127.0.0.1:2379"}).store
    assert (etcd.scheme, etcd.chroot) == ("etcd", "")


@pytest.mark.parametrize("url", ["zookeeper://h:2181/a//b", "zookeeper://h:2181/a/../b", "zookeeper://h/a"])
def test_bad_zookeeper_urls_are_one_line_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_flat({"underlay.address": "198.18.0.1", "store.url": url})
    assert str(info.value).startswith("store.url:") and "\n" not in str(info.value)
