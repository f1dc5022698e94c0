"""An endpoint added on one host right after its network was created through another.

Beside gossip, a store's watch is paced (one round per 0.3 s in a burst), and ZooKeeper
and Consul write a network and its VNI claim as separate changes, so the network may
reach the other hosts a few hundred milliseconds after its creator answered. An add there
in that moment waits for it rather than answering "not found"; a network nobody created
is still "not found".
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlayd.api.client import ClientError
from overlayd.lab import Lab

pytestmark = pytest.mark.root


@pytest.mark.parametrize("store", ["zookeeper", "consul"])
def test_an_add_right_after_the_network_was_created_elsewhere_finds_it(
    make_lab: Callable[..., Lab], store: str
) -> None:
    lab = make_lab(3, store=store, gossip=True, up=False).up(demo=False)
    namespaces = [f"{lab.prefix}-quick{n}" for n in range(4)]
    lab.add_namespaces(namespaces)
    for n in range(3):  # created through h1, used at once through h3
        subnet = IPv4Network(f"10.6{n}.0.0/24")
        lab.create_network(f"quick{n}", str(subnet), via="h1")
        record = lab.admin("h3").endpoint_add(network=f"quick{n}", name=f"e{n}", netns=namespaces[n])
        assert IPv4Address(record.ip) in subnet
    with pytest.raises(ClientError) as raised:
        lab.admin("h3").endpoint_add(network="nosuch", name="e9", netns=namespaces[3])
    assert raised.value.status == 404
